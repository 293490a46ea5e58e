"""Multi-turn episodes: the task tokenizer, the chat format, the tasks' users and tools, the Dialogue-v0 envs,
the sampler carrying the KV cache across turns, and the learner's masks."""

from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import DIALOGUE_ENV_ID  # importing envs registers the environments
from envs.dialogue import (
    Calculator, ChatFormat, DialogueVectorEnv, RefundCustomer, Reply, calculator_reward, load_task, order_number,
    refund_prompts, refund_reward, refund_success, split_turns,
)
from rlhf_ray.config import PPOConfig
from rlhf_ray.data.chat import format_prompt
from rlhf_ray.errors import TaskError
from rlhf_ray.learner.ppo import make_experience
from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.forward import pack, response_logprobs
from rlhf_ray.models.tiny import build_task_tokenizer
from rlhf_ray.rollout.sampler import DialogueParams, Episode, Sampler, SamplingParams

OPENING = "<|user|> hi , i want a refund <|end|> <|assistant|>"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_task_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_task_tokenizer_splits_digits_and_has_roles_and_a_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "refund order 427"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|user|> refund order 427 <|end|> <|assistant|>"
    assert tokenizer.convert_ids_to_tokens(ids(tokenizer, text)) == [
        "<|user|>", "refund", "order", "4", "2", "7", "<|end|>", "<|assistant|>"]
    assert tokenizer.decode(ids(tokenizer, text), skip_special_tokens=True) == "refund order 4 2 7"


def test_the_chat_format_is_read_off_the_template(tokenizer):
    fmt = ChatFormat.of(tokenizer)
    assert (fmt.prefixes, fmt.turn_end, fmt.generation_prompt) == (
        {"assistant": "<|assistant|> ", "user": "<|user|> ", "tool": "<|tool|> "}, " <|end|> ", "<|assistant|>")
    assert fmt.after_turn("<|end|>") == " " and fmt.after_turn(None) == " <|end|> "
    assert fmt.message("tool", "42") == "<|tool|> 42 <|end|> <|assistant|>"
    chatml = build_task_tokenizer()
    chatml.chat_template = CHATML
    fmt = ChatFormat.of(chatml)
    assert (fmt.prefixes["user"], fmt.turn_end, fmt.generation_prompt) == (
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    assert fmt.after_turn("<|im_end|>") == "\n"
    turns = [("assistant", "your order ?"), ("user", "it is 427"), ("assistant", "refunded")]
    assert fmt.transcript(turns) == ("your order ?<|im_end|>\n<|im_start|>user\nit is 427<|im_end|>\n"
                                     "<|im_start|>assistant\nrefunded")
    assert split_turns(fmt.transcript(turns)) == turns
    assert split_turns(ChatFormat.of(tokenizer).transcript(turns)) == turns
    no_template = build_tiny_model()[1]
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        ChatFormat.of(no_template)


def test_the_refund_customer_and_reward_by_hand():
    number = order_number(OPENING)
    assert number == order_number("hi , i want a refund") and len(number) == 3  # the opening's text fixes it
    customer = RefundCustomer()
    turns = [("assistant", "hello")]
    assert customer.reply(OPENING, turns) == Reply("user", "i want a refund for my order")
    turns += [("user", "i want a refund for my order"), ("assistant", "your order number please")]
    assert customer.reply(OPENING, turns) == Reply("user", f"it is {number}")
    turns += [("user", f"it is {number}"), ("assistant", f"refund {number} done")]
    assert customer.reply(OPENING, turns) is None  # the goal: the conversation is over
    transcript = ChatFormat.of(build_task_tokenizer()).transcript(turns)
    # refund 1 + 0.2 naming the number - 0.1 for the third turn + 0.1 * politeness (1 turn of 3 polite)
    assert refund_reward([OPENING], [transcript])[0] == pytest.approx(1.0 + 0.2 - 0.1 + 0.1 / 3)
    assert refund_success([OPENING], [transcript])[0] == 1.0
    # the refund before the number: not the goal; the number alone: 0.3; a rude word: the customer leaves, 0
    early = "refund please <|end|> <|user|> i want a refund for my order <|end|> <|assistant|> order ?"
    assert refund_reward([OPENING], [early])[0] == pytest.approx(0.3 + 0.1 * 0.5)
    assert refund_success([OPENING], [early])[0] == 0.0
    assert customer.reply(OPENING, [("assistant", "i hate refunds")]) is None
    assert refund_reward([OPENING], ["i hate refunds"])[0] == 0.0


def test_the_calculator_tool_and_reward_by_hand():
    tool = Calculator()
    assert tool.reply("what is 37 * 24 ?", [("assistant", "call 3 7 * 2 4")]) == Reply("tool", "888")
    assert tool.reply("what is 37 * 24 ?", [("assistant", "call 1234567 + 1")]) == Reply("tool", "error", reward=-0.1)
    assert tool.reply("what is 37 * 24 ?", [("assistant", "it is 888")]) is None  # an answer ends it
    prompt = "<|user|> what is 3 7 * 2 4 ? <|end|> <|assistant|>"
    called = "call 3 7 * 2 4 <|end|> <|tool|> 8 8 8 <|end|> <|assistant|> 8 8 8"
    twice = "call 3 7 * 2 4 <|end|> <|tool|> 8 8 8 <|end|> <|assistant|> call 1 + 1 <|end|> <|tool|> 2 <|end|> " \
            "<|assistant|> the answer is 888"
    assert calculator_reward([prompt] * 4, [called, twice, "8 8 7", "call 3 7 * 2 4"]).tolist() == [
        1.0, pytest.approx(0.95), 0.0, 0.0]
    with pytest.raises(ValueError, match="not a calculator prompt"):
        calculator_reward(["hello"], ["1"])


def test_reports_and_pages_show_a_conversation_turn_by_turn():
    from rlhf_ray.evaluation.report import readable

    assert readable("order ? <|end|> <|user|> it is 427 <|end|> <|assistant|> refund") == \
        "order ?\n[user] it is 427\n[assistant] refund"
    assert readable("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello") == "[user] hi\n[assistant] hello"
    assert readable("the movie was good") == "the movie was good"


def test_rlhf_ray_label_samples_whole_conversations_and_prefers_the_better_one(tmp_path):
    import json

    from rlhf_ray.cli import main

    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--policy", "rlhf-ray/tiny-chat-gpt2", "--prompts",
                 "experiments/data/dialogue/refund_train.jsonl", "--out", str(out), "--num-prompts", "12",
                 "--annotator", "scripted:envs.dialogue:refund_reward", "--dialogue", "refund", "--max-turns", "2",
                 "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {row["prompt"] for row in rows} <= set(refund_prompts())  # the raw openings
    for row in rows:
        assert "<|user|>" in row["chosen"] + row["rejected"]  # a conversation, not one answer
        assert refund_reward([row["prompt"]], [row["chosen"]])[0] > refund_reward([row["prompt"]], [row["rejected"]])[0]


def test_load_task_names_what_it_could_not_load():
    assert isinstance(load_task("calculator"), Calculator)
    assert isinstance(load_task("envs.dialogue:RefundCustomer"), RefundCustomer)
    with pytest.raises(TaskError, match="'nope'.*built-in task"):
        load_task("nope")
    with pytest.raises(TaskError, match="'envs.dialogue:Missing' cannot be loaded: AttributeError"):
        load_task("envs.dialogue:Missing")


@pytest.mark.parametrize("task, expected", [
    ("user_code:RaisingUser", "rlhf-ray: rollout.dialogue.task: dialogue task 'user_code:RaisingUser' raised "
                              "KeyError: 'number' (replying to turn 1 of the conversation opened by"),
    ("user_code:WrongReply", "rlhf-ray: rollout.dialogue.task: dialogue task 'user_code:WrongReply' returned "
                             "'it is 427'; expected None (the conversation is over) or Reply(role, content, reward)"),
    ("user_code:Nowhere", "rlhf-ray: rollout.dialogue.task: dialogue task 'user_code:Nowhere' cannot be loaded: "
                          "AttributeError"),
])
def test_a_broken_task_is_one_line_naming_it_before_ray_starts(tmp_path, capsys, monkeypatch, task, expected):
    from rlhf_ray.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # user_code, as a user's own module
    status = main(["train", "experiments/dialogue_refund.yaml", f"rollout.dialogue.task={task}",
                   f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert status == 1 and err.strip().splitlines()[-1].startswith(expected), err[-2000:]
    assert not (tmp_path / "dialogue_refund").exists()


@pytest.mark.parametrize("task", ["refund", "calculator"])
def test_dialogue_env_passes_gymnasiums_checker(task):
    env = gymnasium.make(DIALOGUE_ENV_ID, task=task)
    check_env(env.unwrapped, skip_render_check=True)


def test_an_episode_by_hand_appends_the_users_tokens_as_context(tokenizer):
    env = DialogueVectorEnv(num_envs=2, tokenizer=tokenizer, prompts=["hi , i want a refund"], task="refund",
                            max_new_tokens=5, max_turns=3, autoreset_mode="Disabled")
    observations, _ = env.reset(options={"prompt_indices": np.array([0, 0])})
    prompt = ids(tokenizer, OPENING)
    assert observations["input_ids"][0, :len(prompt)].tolist() == prompt
    number = order_number(OPENING)
    # env 0: "order ?" <|end|>, then a refund naming the number; env 1 writes 5 words a turn (the budget)
    script0 = ids(tokenizer, "order ? <|end|>") + ids(tokenizer, f"refund {number} <|end|>")
    script1 = ids(tokenizer, "hello hello hello hello hello") * 3
    appended, finished = [], {}
    for step in range(15):
        actions = np.array([script0[step] if step < len(script0) else 0, script1[step]])
        observations, rewards, terminated, truncated, infos = env.step(actions)
        if "appended" in infos:
            appended.append((step, [e for e in range(2) if infos["_appended"][e]],
                             [a.tolist() for a in infos["appended"] if a is not None]))
        for e in np.flatnonzero(terminated | truncated):
            finished[int(e)] = (step, bool(terminated[e]), float(rewards[e]), infos["turns"][e], infos["response"][e])
    reply = ids(tokenizer, f"<|user|> it is {number} <|end|> <|assistant|>")
    restate = ids(tokenizer, "<|end|> <|user|> i want a refund for my order <|end|> <|assistant|>")
    assert appended == [(2, [0], [reply]), (4, [1], [restate]), (9, [1], [restate])]
    assert finished[0][:2] == (7, True)  # the customer got the refund: terminated
    assert finished[0][3] == [{"role": "assistant", "content": "order ?"}, {"role": "user", "content": f"it is {number}"},
                              {"role": "assistant", "content": f"refund {' '.join(number)}"}]
    assert finished[0][2] == pytest.approx(1.2)
    assert finished[1][:2] == (14, False)  # three turns of five words: truncated by max_turns
    # the action mask: 1 on the policy's tokens, 0 on the prompt and on what the environment appended
    row = observations["input_ids"][1, :observations["length"][1]].tolist()
    assert row == prompt + script1[:5] + restate + script1[5:10] + restate + script1[10:]
    mask = observations["action_mask"][1, :len(row)].tolist()
    assert mask == [0] * len(prompt) + ([1] * 5 + [0] * len(restate)) * 2 + [1] * 5


def test_a_conversation_without_room_for_the_reply_is_truncated(tokenizer):
    env = DialogueVectorEnv(num_envs=1, tokenizer=tokenizer, prompts=["hi"], task="refund", max_new_tokens=2,
                            max_turns=5, max_length=12)
    env.reset(options={"prompt_indices": np.array([0])})
    hello = ids(tokenizer, "hello")[0]
    results = [env.step(np.array([hello]))[2:4] for _ in range(2)]
    assert [(bool(t[0]), bool(u[0])) for t, u in results] == [(False, False), (False, True)]  # 4 + 2 + 11 > 12


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def chat_model(request):
    torch.set_num_threads(1)
    return build_tiny_model(request.param, seed=5, vocabulary="task")


def sample(model, tokenizer, prompts, max_batch=None, task="refund", greedy=False):
    params = SamplingParams(max_new_tokens=5, greedy=greedy, dialogue=DialogueParams(task, max_turns=3,
                                                                                     max_env_tokens=16))
    reward = refund_reward if task == "refund" else calculator_reward
    sampler = Sampler(model, tokenizer, reward, params, max_batch=max_batch)
    prompt_ids = [ids(tokenizer, format_prompt(tokenizer, p, True)) for p in prompts]
    return sampler, sampler.generate(prompt_ids, list(range(100, 100 + len(prompts))))


OPENINGS = ["hi , i want a refund", "i need a refund please", "hello , can i get my money back for my order",
            "i want my money back", "hi , i want a refund of my order", "i need a refund for my order"]


def test_the_cache_carried_across_turns_gives_the_log_probs_of_the_whole_conversation(chat_model):
    """Sampler equivalence: every action's behaviour log-prob, decoded with the cache carried across turns
    (the environment's tokens prefilled by `extend`), equals a forward pass over the whole conversation
    from scratch; continuous batching (rows refilled, holes compacted) gives the same episodes."""
    model, tokenizer = chat_model
    _, episodes = sample(model, tokenizer, OPENINGS * 2)
    assert sum(len(e.turns) for e in episodes) > 2 * len(episodes)  # several turns each
    batch = pack(episodes, tokenizer.pad_token_id)
    with torch.inference_mode():
        scratch = response_logprobs(model, batch).numpy()
    for row, episode in enumerate(episodes):
        actions = episode.action_mask.astype(bool)
        np.testing.assert_allclose(scratch[row, :len(actions)][actions], episode.behaviour_logprobs[actions],
                                   atol=2e-5)
        assert (episode.behaviour_logprobs[~actions] == 0).all()
        np.testing.assert_array_equal(batch.response_mask[row, :len(actions)].numpy(), actions)
    _, continuous = sample(model, tokenizer, OPENINGS * 2, max_batch=3)
    for mine, theirs in zip(episodes, continuous):
        np.testing.assert_array_equal(mine.response_ids, theirs.response_ids)
        np.testing.assert_allclose(mine.behaviour_logprobs, theirs.behaviour_logprobs, atol=2e-5)
        assert (mine.reward, mine.turns) == (theirs.reward, theirs.turns)


def test_greedy_decoding_with_the_cache_equals_decoding_every_step_from_scratch(chat_model):
    model, tokenizer = chat_model
    _, episodes = sample(model, tokenizer, OPENINGS[:3], greedy=True)
    assert all(len(e.turns) >= 3 for e in episodes)
    env = DialogueVectorEnv(num_envs=1, tokenizer=tokenizer, prompts=["hi"], task="refund",
                            max_new_tokens=5, max_turns=3, max_env_tokens=16,
                            stop_token_ids=[tokenizer.eos_token_id, ids(tokenizer, "<|end|>")[0]])
    for episode in episodes:
        observations, _ = env.reset(options={"prompt_ids": [episode.prompt_ids.tolist()]})
        done = False
        while not done:  # no cache: a forward pass over the whole conversation for every token
            length = int(observations["length"][0])
            with torch.inference_mode():
                logits = model(input_ids=torch.as_tensor(observations["input_ids"][:, :length])).logits[0, -1]
            observations, _, terminated, truncated, _ = env.step(np.array([int(torch.argmax(logits))]))
            done = bool(terminated[0] or truncated[0])
        length = int(observations["length"][0])
        # the learner's ids are the sampler's: the prompt, the actions and the environment's tokens, as the env has them
        assert observations["input_ids"][0, :length].tolist() == episode.prompt_ids.tolist() + episode.response_ids.tolist()
        assert observations["action_mask"][0, len(episode.prompt_ids):length].tolist() == episode.action_mask.tolist()


def test_two_turn_masks_and_advantages_by_hand():
    """Two episodes of one prompt (a GRPO group): env tokens get no advantage, no KL and no log-prob; the
    actions get the group's advantage, +1 and -1 (scores 1 and 0: mean 0.5, std 0.7071)."""
    prompt = np.array([3, 4])

    def episode(response, mask, reward):
        mask = np.array(mask, dtype=np.int8)
        return Episode(prompt_ids=prompt, response_ids=np.array(response), behaviour_logprobs=np.where(mask, -1.5, 0.0)
                       .astype(np.float32), eos=True, reward=reward, prompt="p", response="r", seed=0, action_mask=mask)

    episodes = [episode([10, 11, 20, 21, 12], [1, 1, 0, 0, 1], 1.0), episode([13, 22, 14], [1, 0, 1], 0.0)]
    model, _ = build_tiny_model("gpt2", seed=0, vocabulary="task")
    cfg = PPOConfig(advantage_estimator="grpo", group_size=2, kl={"coef": 0.1, "in_reward": False})
    experience, _ = make_experience(episodes, model, None, model, cfg, kl_coef=0.1, temperature=1.0, pad_id=0)
    expected_mask = [[1, 1, 0, 0, 1], [1, 0, 1, 0, 0]]
    assert experience.mask.tolist() == expected_mask
    advantage = 0.5 / (np.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(experience.advantages.numpy(), np.array(expected_mask) * [[advantage], [-advantage]],
                               rtol=1e-6)
    assert (experience.old_logprobs.numpy() == np.array(expected_mask) * -1.5).all()
    assert (experience.ref_logprobs.numpy()[np.array(expected_mask) == 0] == 0).all()
    assert experience.batch.input_ids[0].tolist() == [3, 4, 10, 11, 20, 21, 12]
    assert experience.batch.input_ids[1].tolist() == [3, 4, 13, 22, 14, 0, 0]


def test_rlhf_ray_train_learns_the_refund_dialogue_and_runs_the_calculator(tmp_path):
    """Both tasks train end to end from `rlhf-ray train`. On the refund dialogue the tiny chat model's held-out
    success rate (12 openings it never trains on) rises from 0 within 40 iterations (about a minute), and the
    learner's log-probs of the sampler's token ids, environment tokens masked, equal the sampler's."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "experiments/dialogue_refund.yaml",
                           f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "dialogue_refund" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["iteration"], r["eval/reward/success"], r["eval/kl"]) for r in rows if "eval/reward/success" in r]
    assert [i for i, _, _ in evals] == [0, 10, 20, 30, 40]
    assert evals[0][1] <= 0.1 and evals[-1][1] >= 0.75 and evals[-1][2] > 0, evals
    trained = [r for r in rows if "rollout/logprob_diff_max" in r]
    assert trained and max(r["rollout/logprob_diff_max"] for r in trained) < 1e-3
    # `rlhf-ray eval` samples whole conversations too, and its report shows them turn by turn
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "eval", str(tmp_path / "dialogue_refund"),
                           "--num-prompts", "6", "--judge", "envs.dialogue:refund_success"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "dialogue_refund" / "eval" / "eval.json").read_text())
    assert report["win_rate"] > 0.5 and all("<|user|>" in s["reference_response"] for s in report["samples"])
    assert "[user] it is " in (tmp_path / "dialogue_refund" / "eval" / "report.html").read_text()
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "experiments/dialogue_calculator.yaml",
                           f"output_dir={tmp_path}", "train.iterations=2", "train.eval_every=2", "train.eval_prompts=4",
                           "rollout.batch_size=4", "ppo.minibatch_size=16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "dialogue_calculator" / "eval_samples.jsonl").open()]
    assert samples and all("what is" in s["prompt"] for s in samples)


class ErrorTool:
    """A tool whose every answer is an error that costs the turn 0.5 (a per-turn reward)."""

    def reply(self, prompt, turns):
        return Reply("tool", "error", reward=-0.5) if len(turns) < 5 else None


def test_per_turn_rewards_by_hand(tokenizer):
    """A reply's reward is the step's reward, lands on the last token of the turn it answers, and adds to the
    returns: with GAE (gamma = lam = 1, values 0) every action token before it gets it, the final score too."""
    env = DialogueVectorEnv(num_envs=1, tokenizer=tokenizer, prompts=["hi"], task=ErrorTool(),
                            reward_fn=lambda p, r: [1.0] * len(r), max_new_tokens=2, max_turns=3,
                            autoreset_mode="Disabled")
    env.reset(options={"prompt_indices": np.array([0])})
    hello = ids(tokenizer, "hello")[0]
    rewards = [float(env.step(np.array([hello]))[1][0]) for _ in range(5)]
    assert rewards == [0.0, -0.5, 0.0, -0.5, 0.0]  # the third turn ends the episode: no reply, no turn reward
    model, _ = build_tiny_model("gpt2", seed=0, vocabulary="task")
    params = SamplingParams(max_new_tokens=2, dialogue=DialogueParams(ErrorTool(), max_turns=3))
    episode = Sampler(model, tokenizer, lambda p, r: [1.0] * len(r), params).generate(
        [ids(tokenizer, OPENING)], [0])[0]
    if not episode.eos:  # the sampled turns used their budget: the error tool answered both
        actions = np.flatnonzero(episode.action_mask)
        turn_ends = [a for a in actions if a + 1 not in actions][:2]
        expected = np.zeros(len(episode.response_ids), dtype=np.float32)
        expected[turn_ends] = -0.5
        np.testing.assert_array_equal(episode.turn_rewards, expected)
        assert episode.reward == 1.0
    mask = [1, 1, 0, 0, 1, 1, 0, 0, 1]
    handmade = Episode(prompt_ids=np.array([3]), response_ids=np.arange(10, 19), eos=False, reward=1.0, prompt="p",
                       response="r", seed=0, behaviour_logprobs=np.zeros(9, dtype=np.float32),
                       action_mask=np.array(mask, dtype=np.int8),
                       turn_rewards=np.array([0, -0.5, 0, 0, 0, -0.5, 0, 0, 0], dtype=np.float32))
    cfg = PPOConfig(advantage_estimator="gae", gamma=1.0, lam=1.0, whiten_advantages=False, kl={"coef": 0.0})

    def zero_critic(input_ids, attention_mask, position_ids):  # values 0: advantages are the returns-to-go
        return torch.zeros(input_ids.shape)

    experience, stats = make_experience([handmade], model, zero_critic, model, cfg, kl_coef=0.0, temperature=1.0,
                                        pad_id=0)
    # returns-to-go over the action tokens: 1 - 0.5 - 0.5 = 0 from the start, 1 - 0.5 = 0.5 after the first turn
    np.testing.assert_allclose(experience.advantages[0].numpy(), np.array([0, 0, 0, 0, 0.5, 0.5, 0, 0, 1.0]) * mask)
    assert stats["rollout/turn_reward_mean"] == pytest.approx(-1.0)
