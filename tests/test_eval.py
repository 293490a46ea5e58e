"""`rlhf-ray eval`: the report's numbers are those of a direct computation; its page and plots; bad input.

The run folder is built by hand from its real parts (a saved policy, a reward model, the resolved
config.yaml), since a real `rlhf-ray train` costs ~40 s of Ray start-up. Its metrics.jsonl is
hand-written with the keys training logs and feeds the training plots only: no number checked
against a direct computation comes from it.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2ForSequenceClassification

from envs.builtin import sentiment_reward
from rlhf_ray.config import dump_config, load_config
from rlhf_ray.evaluation.cli import add_eval_commands, eval_dataset, load_eval_records, training_metrics
from rlhf_ray.evaluation.evaluate import evaluate
from rlhf_ray.models import build_tiny_model, build_tiny_tokenizer, save_tiny_model
from rlhf_ray.models.loading import load_policy
from rlhf_ray.rewards.quality import length_score
from rlhf_ray.rewards.reward_model import RewardModelScorer
from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "experiments" / "data" / "sft.jsonl"
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
NUM_PROMPTS, SEED, TEMPERATURE, MAX_NEW_TOKENS = 6, 3, 0.9, 6
WEIGHTS = {"sentiment": 1.0, "length": 0.5, "rm": 0.1}


def rlhf_ray_eval(*argv) -> int:
    """`rlhf-ray eval ARGV` through the parser the command adds to `rlhf-ray`."""
    parser = argparse.ArgumentParser(prog="rlhf-ray")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *map(str, argv)])
    return args.func(args)


def save_trained_policy(path: Path) -> Path:
    """rlhf-ray/tiny-gpt2 with every weight moved by N(0, 0.1^2) noise: a policy that has drifted from its
    reference (KL ~2 nats per 6-token response) while sharing its tokenizer."""
    model, tokenizer = load_policy("rlhf-ray/tiny-gpt2")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_reward_model(path: Path) -> Path:
    """A tiny untrained GPT-2 reward model with a scalar head, on the toy tokenizer."""
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """runs/toy: a policy drifted from rlhf-ray/tiny-gpt2 (the config's initial policy), a reward model,
    a composite reward with the RM in it, and held-out prompts with reference responses."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "runs" / "toy"
    save_trained_policy(run / "policy")
    save_reward_model(run / "reward_model")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(SFT.read_text().splitlines(keepends=True)[:NUM_PROMPTS + 2]))
    config = load_config(None, [
        "name=toy", "output_dir=moved/elsewhere",  # the folder was trained elsewhere: {run} must still find it
        f"seed={SEED}", f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.sampling.temperature={TEMPERATURE}",
        "reward.components={sentiment: {function: 'envs.builtin:sentiment_reward', weight: 1.0}, "
        "length: {function: 'rlhf_ray.rewards.quality:length_score', kwargs: {target: 4}, weight: 0.5}, "
        "rm: {model: '{run}/reward_model', weight: 0.1}}",
        f"data.eval_dataset={{path: '{heldout}'}}",
    ])
    (run / "config.yaml").write_text(dump_config(config))
    rows = [{"iteration": i, "rollout/reward_mean": 0.1 * i, "objective/kl": 0.5 * i, "reward/sentiment": 0.1 * i,
             "reward/length": 0.5, "reward/rm": -0.2} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    assert rlhf_ray_eval(run_dir, "--num-prompts", NUM_PROMPTS, "--samples", 3) == 0
    return json.loads((run_dir / "eval" / "eval.json").read_text())


def sequence_logprob_sums(model, prompt_ids, response_ids) -> float:
    """sum_t log p(response_t | prompt, response_<t) at the sampling temperature, one unpadded sequence."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1] / TEMPERATURE  # (R, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).sum().item()


def expected_numbers(run: Path) -> dict:
    """The evaluation worked out directly: same sampler and seeds, plain forward passes, the reward
    terms called one by one, the win rate by hand, BLEU and ROUGE from their libraries."""
    records = [json.loads(line) for line in SFT.read_text().splitlines()[:NUM_PROMPTS]]
    prompts, targets = [r["prompt"] for r in records], [r["response"] for r in records]
    policy, tokenizer = load_policy(run / "policy")
    reference, _ = load_policy("rlhf-ray/tiny-gpt2")
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    seeds = [episode_seed(SEED, 0, i) for i in range(len(prompts))]
    rm = RewardModelScorer(run / "reward_model")
    expected = {}
    for side, model in (("policy", policy), ("reference", reference)):
        episodes = Sampler(model, tokenizer, lambda p, r: np.zeros(len(p)), params).generate(prompt_ids, seeds)
        responses = [e.response for e in episodes]
        parts = {"sentiment": sentiment_reward(prompts, responses),
                 "length": length_score(prompts, responses, target=4), "rm": rm(prompts, responses)}
        rouge = [rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(t, r)
                 for r, t in zip(responses, targets)]
        expected[side] = {
            "responses": responses, "rm": parts["rm"],
            "reward": np.mean(sum(WEIGHTS[name] * scores for name, scores in parts.items())),
            **{f"reward/{name}": np.mean(scores) for name, scores in parts.items()},
            "length": np.mean([len(e.response_ids) for e in episodes]),
            "bleu": sacrebleu.corpus_bleu(responses, [targets]).score,
            **{kind: np.mean([s[kind].fmeasure for s in rouge]) for kind in ("rouge1", "rouge2", "rougeL")},
        }
        if side == "policy":
            expected["kl"] = np.mean([
                sequence_logprob_sums(policy, e.prompt_ids, e.response_ids)
                - sequence_logprob_sums(reference, e.prompt_ids, e.response_ids) for e in episodes])
    policy_rm, reference_rm = expected["policy"]["rm"], expected["reference"]["rm"]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_rm, reference_rm)]
    expected["win_rate"] = np.mean(wins)
    return expected


def test_eval_report_numbers_match_a_direct_computation(run_dir, report):
    expected = expected_numbers(run_dir)
    assert report["num_prompts"] == NUM_PROMPTS
    assert report["judge"] == str((run_dir / "reward_model").resolve())  # the RM component judges by default
    for side in ("policy", "reference"):
        assert [s[f"{side}_response"] for s in report["samples"]] == expected[side]["responses"]
        for key in ("reward", "reward/sentiment", "reward/length", "reward/rm", "length", "bleu",
                    "rouge1", "rouge2", "rougeL"):
            assert report[side][key] == pytest.approx(expected[side][key], rel=1e-5, abs=1e-6), (side, key)
    assert report["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-5)
    assert report["win_rate"] == pytest.approx(expected["win_rate"])
    # not a vacuous comparison: the two models answer differently and the KL between them is large
    assert expected["policy"]["responses"] != expected["reference"]["responses"] and report["kl"] > 1.0


def test_report_page_has_the_summary_plots_and_sample_table(run_dir, report):
    folder = run_dir / "eval"
    for name in ("reward_kl_over_iterations.png", "reward_vs_kl.png", "length.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'<img src="{name}"' in (folder / "report.html").read_text()
    page = (folder / "report.html").read_text()
    assert '<table class="summary">' in page and "reward/rm" in page and "ROUGE-L F" in page
    assert '<table class="samples">' in page and "before (reference)" in page and "after (policy)" in page
    assert page.count("<tr>", page.index('<table class="samples">')) == 1 + 3  # header + --samples 3
    first = report["samples"][0]
    assert first["prompt_text"] in page and first["target"] in page and first["policy_response"] in page
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".eval-")]  # no staging folder left


def test_bare_policy_report_skips_training_plots_and_escapes_text(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie was <great> & fun"}\n{"prompt": "my day was"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier report")
    policy = save_tiny_model(tmp_path / "policy", seed=2)
    assert rlhf_ray_eval(policy, "--config", QUICKSTART, "--prompts", prompts, "--out", out, "--seed", 5) == 0
    printed = capsys.readouterr().out
    assert "win rate vs reference" in printed and f"report: {out / 'report.html'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "length.png", "report.html"]
    page = (out / "report.html").read_text()
    assert "plots are left out" in page
    assert "the movie was &lt;great&gt; &amp; fun" in page and "<great>" not in page
    numbers = json.loads((out / "eval.json").read_text())
    assert numbers["info"]["seed"] == 5 and "bleu" not in numbers["policy"]  # prompts only: no BLEU/ROUGE
    assert numbers["judge"] == "reward (envs.builtin:sentiment_reward)"


def test_prompts_get_the_chat_template_and_responses_become_targets(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}user: {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} assistant:{% endif %}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the day was"}\n')
    formatted, texts, targets = load_eval_records(eval_dataset(load_config(), str(SFT), 2), tokenizer)
    records = [json.loads(line) for line in SFT.read_text().splitlines()[:2]]
    assert formatted == [f"user: {r['prompt']} assistant:" for r in records]
    assert texts == [r["prompt"] for r in records] and targets == [r["response"] for r in records]
    assert load_eval_records(eval_dataset(load_config(), str(prompts), None), tokenizer) == (
        ["user: the day was assistant:"], ["the day was"], None)


def test_training_metrics_in_iteration_order_and_a_bad_line_named(tmp_path):
    rows = [{"iteration": 2, "objective/kl": 1.0}, {"iteration": 1, "objective/kl": 9.0},
            {"iteration": 1, "objective/kl": 0.5}]  # iteration 1 logged again after a resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert training_metrics(tmp_path) == ([rows[2], rows[0]], None)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2, "objective/kl"\n')
    metrics, note = training_metrics(tmp_path)
    assert metrics is None and f"{tmp_path / 'metrics.jsonl'}:2: not valid JSON" in note


def test_ties_count_half_in_the_win_rate():
    policy, tokenizer = build_tiny_model(seed=1)
    reference, _ = build_tiny_model(seed=0)
    result = evaluate(policy, reference, tokenizer, ["the movie was", "my day was"], sentiment_reward,
                      judge=lambda prompts, responses: np.ones(len(prompts)), params=SamplingParams(max_new_tokens=8))
    assert result.win_rate == 0.5 and result.judge.endswith("<lambda>")


def test_missing_prompts_is_one_clear_error(tmp_path, capsys):
    policy = save_tiny_model(tmp_path / "policy")
    capsys.readouterr()  # the progress bar of saving the model
    assert rlhf_ray_eval(policy, "--config", QUICKSTART) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("rlhf-ray eval: no held-out prompts") and "--prompts" in error and "\n" not in error


def test_malformed_prompt_line_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n{"prompt": "the day\n')
    assert rlhf_ray_eval("rlhf-ray/tiny-gpt2", "--config", QUICKSTART, "--prompts", prompts) == 1
    assert f"{prompts}:2: not valid JSON" in capsys.readouterr().err


def test_missing_run_folder_is_one_clear_error(tmp_path, capsys):
    assert rlhf_ray_eval(tmp_path / "runs" / "nope") == 1
    assert f"{tmp_path / 'runs' / 'nope'}: no such run folder" in capsys.readouterr().err
