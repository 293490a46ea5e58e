"""A person's whole visit to the feedback pages, in a real headless Chromium (Debian's `chromium` and
`chromedriver`, driven by Selenium) against a real `rlhf-ray serve`: sign in with an annotator key, label
eleven items of a pairs queue with the keyboard (reloading half-way), rate a chat answer, and run a blind
study of twenty items as two people; then the stored records, the study's win rate and kappa against the
numbers worked out by hand in tests/test_feedback_pages.py, the admin view, and bad input: each a message
on the page and a 4xx from the API, nothing stored twice.

Without Chromium the test is skipped, unless RLHF_RAY_REQUIRE_BROWSER=1 (as `.ci/run` sets it, after
installing the browser). RLHF_RAY_SCREENSHOTS=DIR saves a screenshot of each page there (the README's).
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rlhf_ray.cli import main
from rlhf_ray.serve.feedback_store import FeedbackStore
from test_feedback_pages import ALICE, BOB, EXPECTED, choice_for

pytestmark = pytest.mark.timeout(420)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("RLHF_RAY_REQUIRE_BROWSER") == "1":
        raise RuntimeError("RLHF_RAY_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402 - after the skip: selenium is a test extra
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

API_KEY = "browser-test-key"
PAIR_CHOICES = ["A", "B", "tie", "A", "A", "B", "tie", "B", "A", "A"]  # items 1..10, by keyboard; 11: two clicks
KEYS = {"A": "a", "B": "b", "tie": "t"}
WAIT_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CONVERSATION = "your order number ? <|end|> <|user|> it is 427 <|end|> <|assistant|> refund 427 done"


@pytest.fixture(scope="module")
def site(tiny_model_dir, tmp_path_factory):
    """Annotators, a pairs queue and a study made with the commands, then `rlhf-ray serve` on that database."""
    folder = tmp_path_factory.mktemp("pages")
    db = folder / "feedback.db"
    pairs = [{"id": f"{i:05d}-pair", "prompt": f"the movie number {i} was", "response_a": f" good {i}",
              "response_b": f" bad {i}"} for i in range(11)]
    pairs[10]["response_a"] = CONVERSATION  # a dialogue's answer: a whole conversation
    pairs = write_jsonl(folder / "pairs.jsonl", pairs)
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(20)])
    answers_a = write_jsonl(folder / "a.jsonl", [{"prompt": f"question {i}", "response": f"alpha {i}"}
                                                 for i in range(20)])
    answers_b = write_jsonl(folder / "b.jsonl", [{"prompt": f"question {i}", "response": f"beta {i}"}
                                                 for i in range(20)])
    keys = {}
    for name in ("alice", "bob"):
        keys[name] = run_cli(["annotators", "add", name, "--db", str(db)]).splitlines()[-1]
    assert "11 items" in run_cli(["queue", "add", "toy", "--pairs", str(pairs), "--db", str(db)])
    assert "20 items" in run_cli(["study", "create", "blind", "--a", str(answers_a), "--b", str(answers_b),
                                  "--prompts", str(prompts), "--db", str(db), "--seed", "3"])
    port = free_port()
    command = [sys.executable, "-m", "rlhf_ray.cli", "serve", str(tiny_model_dir), "--port", str(port),
               "--feedback-db", str(db), "--model-name", "tiny", "--api-key", API_KEY,
               "--set", "default_max_tokens=6"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while not any(line.startswith("serving tiny") for line in output):
            assert server.poll() is None and time.time() < deadline, \
                f"rlhf-ray serve did not start within 240 s:\n{''.join(output[-30:])}"
            time.sleep(0.5)
        yield {"base": base, "db": db, "keys": keys, "folder": folder}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_cli(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waited {WAIT_S} s for {what}")


def shown(driver, element_id: str) -> bool:
    elements = driver.find_elements(By.ID, element_id)
    return bool(elements) and elements[0].is_displayed()


def message(driver) -> str:
    return driver.find_element(By.ID, "message").text


def sign_in(driver, url: str, key: str) -> None:
    """Open `url` as the person with `key` (a fresh browser profile for the site: no key remembered)."""
    driver.get(url)
    driver.execute_script("localStorage.clear()")
    driver.get(url)
    wait(driver, lambda d: shown(d, "key-form"), "the key form")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(driver, lambda d: shown(d, "work"), "the page after signing in")


def queue_header(driver) -> str:
    """The queue's header once the page has filled it in (after its first request for an item)."""
    return wait(driver, lambda d: d.find_element(By.ID, "queue-header").text, "the queue header")


def current_item(driver) -> int | None:
    """The id of the item on the page once it has loaded; None when the queue is done for this person."""
    wait(driver, lambda d: shown(d, "item") or shown(d, "done"), "an item or the end of the queue")
    return int(driver.find_element(By.ID, "item").get_attribute("data-item-id")) if shown(driver, "item") else None


def press(driver, key: str, item: int) -> None:
    ActionChains(driver).send_keys(key).perform()
    wait(driver, lambda d: shown(d, "done") or (shown(d, "item") and
                                                int(d.find_element(By.ID, "item").get_attribute("data-item-id")) != item),
         f"the item after {item}")


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("RLHF_RAY_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_a_visit_labels_chats_and_runs_a_blind_study(site, browser):
    base, db, keys = site["base"], site["db"], site["keys"]

    # label eleven items of the pairs queue: ten with the keyboard, reloading half-way, one with two clicks
    sign_in(browser, f"{base}/ui/label?queue=toy", keys["alice"])
    assert "toy" in queue_header(browser)
    seen = []
    for index, choice in enumerate(PAIR_CHOICES):
        item = current_item(browser)
        assert item not in seen, "an item was shown twice"
        if index == 0:
            Select(browser.find_element(By.ID, "rating-a")).select_by_visible_text("4")
            browser.find_element(By.TAG_NAME, "h3").click()  # focus off the menu: keys go to the page
            screenshot(browser, "label")
        if index == 5:
            browser.refresh()
            assert current_item(browser) == item  # reloading shows the same unlabelled item, no labelled one
        seen.append(item)
        press(browser, KEYS[choice], item)
        assert message(browser).startswith("Saved label"), message(browser)
    last = current_item(browser)
    assert browser.find_element(By.ID, "answer-a").text == "your order number ?\n[user] it is 427\n[assistant] refund 427 done"
    browser.execute_script("const b = document.getElementById('choose-B'); b.click(); b.click();")  # a double click
    wait(browser, lambda d: shown(d, "done"), "the end of the queue")
    assert "Nothing left" in browser.find_element(By.ID, "done").text and message(browser).startswith("Saved label")
    browser.refresh()
    assert current_item(browser) is None  # after a reload too

    # chat: ask, like the answer, rate it 4
    browser.get(f"{base}/ui/chat")
    wait(browser, lambda d: shown(d, "work"), "the chat page (the key is remembered)")
    browser.find_element(By.ID, "chat-input").send_keys("the movie was")
    browser.find_element(By.ID, "send").click()
    answer = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant"), "the policy's answer")[0]
    answer.find_element(By.CLASS_NAME, "like-up").click()
    wait(browser, lambda d: "saved (like" in answer.find_element(By.CLASS_NAME, "status").text, "the like's ack")
    Select(answer.find_element(By.CLASS_NAME, "rating")).select_by_visible_text("4")
    wait(browser, lambda d: "saved (rating" in answer.find_element(By.CLASS_NAME, "status").text, "the rating's ack")
    completion_id = answer.find_element(By.CLASS_NAME, "rate").get_attribute("data-completion-id")
    screenshot(browser, "chat")

    # the blind study: alice, then bob, each judging all twenty items by what the answers say
    for name, outcomes in (("alice", ALICE), ("bob", BOB)):
        sign_in(browser, f"{base}/ui/eval?queue=blind", keys[name])
        assert "Blind study" in queue_header(browser) and "alpha" not in queue_header(browser)
        current_item(browser)
        page_text = browser.find_element(By.TAG_NAME, "body").text
        assert "a.jsonl" not in page_text and "b.jsonl" not in page_text  # the models are not named
        for judged in range(20):
            item = current_item(browser)
            shown_a = browser.find_element(By.ID, "answer-a").text
            index, first = int(shown_a.split()[-1]), "a" if shown_a.startswith("alpha") else "b"
            if name == "alice" and judged == 0:
                screenshot(browser, "eval")
            press(browser, KEYS[choice_for(outcomes[index], first)], item)
        assert current_item(browser) is None

    # the admin view, with the API key
    browser.get(f"{base}/ui/admin")
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#admin-form button").click()
    summary = wait(browser, lambda d: d.find_elements(By.CLASS_NAME, "study-summary"), "the study's results")[0].text
    assert "67.5% (95% CI 52.0%–79.9%)" in summary and "24 wins, 10 losses, 6 ties" in summary
    assert "0.643" in browser.find_element(By.ID, "studies").text
    screenshot(browser, "admin")

    # what was stored: each label once, with who gave it
    store = FeedbackStore(db, readonly=True)
    try:
        toy = store.label_records("toy")
        assert [(label["item_id"], label["choice"]) for label in toy] == \
            list(zip(seen + [last], PAIR_CHOICES + ["B"]))  # the double click stored one label
        assert {label["annotator"] for label in toy} == {"alice"} and toy[0]["rating_a"] == 4
        chat = [r for r in store.feedback_records() if r["completion_id"] == completion_id]
        assert [(r["kind"], r["liked"], r["rating"], r["annotator"]) for r in chat] == \
            [("like", 1, None, "alice"), ("rating", None, 4, "alice")]
        results = store.study_results("blind")
    finally:
        store.close()
    rate = results["win_rate"]
    assert (rate["wins"], rate["losses"], rate["ties"]) == (EXPECTED["wins"], EXPECTED["losses"], EXPECTED["ties"])
    assert rate["rate"] == pytest.approx(EXPECTED["rate"])
    assert (rate["low"], rate["high"]) == pytest.approx((EXPECTED["low"], EXPECTED["high"]), abs=1e-4)
    assert results["agreement"][0]["kappa"] == pytest.approx(EXPECTED["kappa"])

    # the export: 9 preference pairs (2 ties left out), 3 ratings and likes, the study, all with lineage
    out = site["folder"] / "export"
    assert main(["feedback", "export", str(db), "--out", str(out)]) == 0
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 9 and {p["source"] for p in prefs} == {"queue:toy"} and prefs[0]["pair_id"] == "00000-pair"
    ratings = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 3 and {r["annotator"] for r in ratings} == {"alice"}
    chat_rating = next(r for r in ratings if r["source"] == "chat" and "rating" in r)
    assert chat_rating["completion_id"] == completion_id and chat_rating["sampling"]["user"] == "annotator:alice"
    assert json.loads((out / "studies.json").read_text())["blind"]["win_rate"]["rate"] == pytest.approx(0.675)


def test_bad_input_is_a_message_on_the_page_and_a_4xx(site, browser):
    base, keys = site["base"], site["keys"]
    for key, words in (("ann-not-a-key", "unknown annotator key"), ("", "missing annotator key")):
        browser.get(f"{base}/ui/label")
        browser.execute_script("localStorage.clear()")
        browser.get(f"{base}/ui/label")
        wait(browser, lambda d: shown(d, "key-form"), "the key form")
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait(browser, lambda d: words in message(d), f"the message {words!r}")
        assert not shown(browser, "work")
    sign_in(browser, f"{base}/ui/label?queue=nope", keys["bob"])
    wait(browser, lambda d: "no queue “nope”; showing “toy”" in message(d), "the message about the unknown queue")

    # two tabs: the item on this page gets labelled in another one first; then a rating out of range
    tabs = write_jsonl(site["folder"] / "tabs.jsonl", [{"id": f"tab{i}", "prompt": f"p{i}", "response_a": " x",
                                                         "response_b": " y"} for i in range(2)])
    run_cli(["queue", "add", "tabs", "--pairs", str(tabs), "--db", str(site["db"])])
    sign_in(browser, f"{base}/ui/label?queue=tabs", keys["bob"])
    first = current_item(browser)
    other_tab = httpx.post(f"{base}/ui/api/labels", headers={"X-Annotator-Key": keys["bob"]}, timeout=60,
                           json={"queue": "tabs", "item_id": first, "choice": "tie"})
    assert other_tab.status_code == 200, other_tab.text
    press(browser, "a", first)  # the page says so and moves on to the next item
    assert f"item {first} is already labelled by bob" in message(browser), message(browser)
    second = current_item(browser)
    browser.execute_script("const s = document.getElementById('rating-a'); s.add(new Option('9', '9')); s.value = '9';")
    browser.find_element(By.TAG_NAME, "h3").click()
    ActionChains(browser).send_keys("b").perform()
    wait(browser, lambda d: "rating_a" in message(d), "the message about the rating")
    assert current_item(browser) == second  # still on the page, to be corrected
    store = FeedbackStore(site["db"], readonly=True)
    try:
        assert [(label["item_id"], label["choice"]) for label in store.label_records("tabs")] == [(first, "tie")]
    finally:
        store.close()

    browser.get(f"{base}/ui/admin")
    browser.find_element(By.ID, "api-key").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#admin-form button").click()
    wait(browser, lambda d: "invalid API key" in message(d), "the admin page's message")

    alice = {"X-Annotator-Key": keys["alice"]}
    with httpx.Client(base_url=base, timeout=60) as client:
        item = client.get("/ui/api/next", params={"queue": "blind"}, headers={"X-Annotator-Key": keys["bob"]}).json()
        assert item["item"] is None  # bob has judged everything
        cases = [
            ({}, {"queue": "toy", "item_id": 1, "choice": "A"}, 401, "missing annotator key"),
            ({"X-Annotator-Key": "nope"}, {"queue": "toy", "item_id": 1, "choice": "A"}, 401, "unknown annotator key"),
            (alice, {"queue": "toy", "item_id": 9999, "choice": "A"}, 404, "not in queue 'toy'"),
            (alice, {"queue": "toy", "item_id": 1, "choice": "A", "rating_a": 6}, 400, "rating_a"),
            (alice, {"queue": "toy", "item_id": 1, "choice": "maybe"}, 400, "choice"),
            (alice, {"queue": "toy", "item_id": 1, "choice": "B"}, 409, "already labelled by alice"),
        ]
        for headers, body, status, words in cases:
            response = client.post("/ui/api/labels", headers=headers, json=body)
            assert response.status_code == status and words in response.json()["error"]["message"], (body, response.text)
        assert client.get("/ui/api/admin").status_code == 401

    # a double submit that reaches the server (two requests at once): one label, one 409
    race = write_jsonl(site["folder"] / "race.jsonl", [{"id": "race", "prompt": "p", "response_a": " x",
                                                         "response_b": " y"}])
    run_cli(["queue", "add", "race", "--pairs", str(race), "--db", str(site["db"])])

    async def twice():
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            bob = {"X-Annotator-Key": keys["bob"]}
            item = (await client.get("/ui/api/next", params={"queue": "race"}, headers=bob)).json()["item"]
            body = {"queue": "race", "item_id": item["id"], "choice": "A"}
            return await asyncio.gather(*(client.post("/ui/api/labels", headers=bob, json=body) for _ in range(2)))

    first, second = asyncio.run(twice())
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    store = FeedbackStore(site["db"], readonly=True)
    try:
        assert [label["annotator"] for label in store.label_records("race")] == ["bob"]
    finally:
        store.close()
