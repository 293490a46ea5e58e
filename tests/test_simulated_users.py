"""The simulated population on the server's real HTTP app (FastAPI over a LocalBackend, reached through
httpx's ASGI transport: the same routes and checks as on Ray Serve, in this process): it fills the served
queue, labels it as its scoring function says, chats and rates, judges a blind study, and stops at its
bound or at the first HTTP error with the route and status."""

import asyncio

import httpx
import pytest
import torch

from envs.builtin import sentiment_score
from rlhf_ray.evaluation.study import study_items
from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_store import FeedbackStore
from rlhf_ray.simulated_users import Population, make_people

KEY = "population-test-key"
SCORE = "scripted:envs.builtin:sentiment_reward"
PROMPTS = ["the movie was", "my day was", "the food is", "i think the team", "our trip was", "the show was"]


@pytest.fixture
def site(tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)
    store = FeedbackStore(tmp_path / "feedback.db")
    keys = {name: store.add_annotator(name) for name in ("alice", "bob")}
    app = build_api(LocalBackend(GenerationEngine(model, tokenizer), store, "tiny", "v1"), ServeConfig(api_key=KEY))
    yield store, keys, httpx.ASGITransport(app=app)
    store.close()


def population(site, noise=0.0, **kwargs) -> Population:
    store, keys, transport = site
    people = make_people(SCORE, {"alice": noise, "bob": noise}, keys, seed=0)
    return Population("http://server", people, api_key=KEY, transport=transport, **kwargs)


def test_the_population_labels_what_the_served_policy_answered_as_its_score_says(site):
    store = site[0]

    async def visit():
        async with population(site) as people:
            await people.ask(PROMPTS[:4], n=2, max_tokens=8)
            await people.ask(PROMPTS[4:], n=2, max_tokens=8, chat=True)  # chat-formatted prompts
            labelled = await people.label("served", rate=1.0)
            chats = await people.chat(PROMPTS[:4], max_tokens=8)
            return labelled, chats

    labelled, chats = asyncio.run(visit())
    served = store.queue("served")
    assert labelled == served["items"] > 0  # every item once (labels_per_item 1), by one of the two
    assert any(label["prompt"].startswith("user: ") for label in store.label_records("served"))
    for label in store.label_records("served"):
        difference = sentiment_score(label["response_a"]) - sentiment_score(label["response_b"])
        expected = "tie" if abs(difference) <= 0.02 else "A" if difference > 0 else "B"
        assert label["choice"] == expected and label["annotator"] in ("alice", "bob")
        assert label["rating_a"] == min(5, max(1, round(3 + 4 * sentiment_score(label["response_a"]))))
    assert chats["ratings"] + chats["likes"] == 4
    page_feedback = [r for r in store.feedback_records() if r["annotator"]]
    assert len(page_feedback) == 4 and {r["kind"] for r in page_feedback} <= {"rating", "like"}


def test_the_population_judges_a_blind_study_in_turns(site):
    store = site[0]
    prompts = [f"question {i}" for i in range(6)]
    store.add_queue("study", "study", "test", 2, {"models": {"a": "kind", "b": "rude"}},
                    study_items(prompts, ["great fun"] * 6, ["awful and sad"] * 6, seed=1))

    async def judge():
        async with population(site, noise=0.05) as people:
            return await people.judge("study")

    assert asyncio.run(judge()) == 12
    results = store.study_results("study")
    assert results["win_rate"]["rate"] == 1.0
    assert {tuple(group["annotators"]) for group in results["agreement"]} == {("alice", "bob")}


def test_the_population_is_bounded_and_stops_at_an_http_error(site):
    store, keys, transport = site

    async def too_many():
        async with population(site, max_requests=3) as people:  # /v1/models takes the first
            await people.ask(PROMPTS[:3], n=2, max_tokens=4)

    with pytest.raises(RuntimeError, match="bound of 3 requests is spent"):
        asyncio.run(too_many())

    async def wrong_key():
        people = make_people(SCORE, {"alice": 0.0}, {"alice": "ann-wrong"})
        async with Population("http://server", people, api_key=KEY, transport=transport) as population_:
            await population_.label("served")

    with pytest.raises(RuntimeError, match="GET /ui/api/next: 401 .*unknown annotator key"):
        asyncio.run(wrong_key())
