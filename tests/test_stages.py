"""The RLHF stages: SFT, the reward model H, the satisfaction model S and `rlhf-ray pipeline` (SFT -> RM -> S ->
PPO against R = Q + lambda S + mu H) on tiny models.

The end-to-end test runs the pipeline of experiments/pipeline_satisfaction.yaml, made smaller, on a real local Ray,
then checks each stage's reported figures against a direct computation with the saved models.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from envs.builtin import sentiment_score
from rlhf_ray.data import load_preferences, load_ratings, load_sft
from rlhf_ray.models import load_policy, load_tokenizer
from rlhf_ray.rewards import RewardModelScorer
from rlhf_ray.stages.common import epoch_batches, split_records
from rlhf_ray.stages.sft import response_nll, tokenize_demonstrations

PIPELINE = ["experiments/pipeline_satisfaction.yaml", "sft.epochs=1", "reward_model.epochs=1", "train.iterations=2",
            "train.checkpoint_every=1", "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=1"]


def pipeline(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "pipeline", *PIPELINE, f"output_dir={tmp_path}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------ pieces


def test_split_and_batches_are_seeded_and_disjoint():
    train, held = split_records(list(range(50)), 0.1, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(50))
    assert split_records(list(range(50)), 0.1, seed=3) == (train, held)
    assert split_records([1, 2], 0.01, seed=0)[1] and not split_records([1, 2], 0.0, seed=0)[1]
    batches = epoch_batches(10, 4, epoch=0, seed=0)
    assert [len(b) for b in batches] == [4, 4] and len(set(sum(batches, []))) == 8  # remainder dropped
    assert epoch_batches(10, 4, epoch=1, seed=0) != batches


def test_demonstrations_end_with_eos_and_long_ones_lose_the_prompt_start(tiny_tokenizer):
    from rlhf_ray.data import SFTRecord

    records = [SFTRecord("today the movie was", "very good"), SFTRecord("i think the day was all", "fun . fun . fun")]
    pairs = tokenize_demonstrations(records, tiny_tokenizer, max_length=8)
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert pairs[0] == (ids("today the movie was"), ids("very good") + [tiny_tokenizer.eos_token_id])
    prompt, response = pairs[1]  # 6 + 6 tokens > 8: two prompt tokens cut from the left... and more
    assert len(prompt) + len(response) == 8 and prompt == ids("i think the day was all")[4:]
    assert response == ids("fun . fun . fun") + [tiny_tokenizer.eos_token_id]


def test_sft_loss_is_over_response_tokens_only(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    prompt, response = [5, 6, 7], [8, 9, tokenizer.eos_token_id]
    nll, mask = response_nll(model, [(prompt, response), ([5], [8])], tokenizer.pad_token_id)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
    expected = [-float(logits[len(prompt) - 1 + t, token]) for t, token in enumerate(response)]
    np.testing.assert_allclose(nll[0].detach().numpy(), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    proc = pipeline(tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stages: sft ran, reward_model ran, satisfaction_model ran, ppo ran" in proc.stdout
    return tmp, tmp / "pipeline_satisfaction"


def test_sft_lowers_held_out_response_loss_as_reported(pipeline_run):
    _, run = pipeline_run
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    # the reported held-out loss, recomputed with the saved model on the same held-out split
    tokenizer = load_tokenizer(run / "sft")
    pairs = tokenize_demonstrations(load_sft("experiments/data/sft.jsonl"), tokenizer, 512)
    _, heldout = split_records(pairs, 0.1, seed=0)
    model, _ = load_policy(run / "sft")
    with torch.no_grad():
        nll, mask = response_nll(model, heldout, tokenizer.pad_token_id)
    assert float((nll * mask).sum() / mask.sum()) == pytest.approx(summary["eval_loss_after"], rel=1e-4)
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["sft/eval_loss"] == summary["eval_loss_before"] and any("sft/loss" in r for r in rows)


def test_reward_model_learns_the_planted_preference(pipeline_run):
    _, run = pipeline_run
    summary = json.loads((run / "reward_model" / "summary.json").read_text())
    assert summary["eval_accuracy_after"] >= 0.8 and summary["eval_pairs"] == 30
    pairs = load_preferences("experiments/data/preferences.jsonl")
    assert all(sentiment_score(p.chosen) > sentiment_score(p.rejected) for p in pairs)  # what was planted
    train, heldout = split_records(pairs, 0.1, seed=0)
    raw = RewardModelScorer(run / "reward_model", normalize=False)
    chosen = raw([p.prompt for p in heldout], [p.chosen for p in heldout])
    rejected = raw([p.prompt for p in heldout], [p.rejected for p in heldout])
    assert float(np.mean(chosen > rejected)) == pytest.approx(summary["eval_accuracy_after"])
    # normalisation statistics: standardised scores of the training responses have mean 0 and std 1
    scorer = RewardModelScorer(run / "reward_model")
    scores = np.concatenate([scorer([p.prompt for p in train], [p.chosen for p in train]),
                             scorer([p.prompt for p in train], [p.rejected for p in train])])
    assert abs(scores.mean()) < 1e-3 and scores.std() == pytest.approx(1.0, rel=1e-3)


def test_satisfaction_model_learns_the_ratings_and_scores_on_their_scale(pipeline_run):
    _, run = pipeline_run
    summary = json.loads((run / "satisfaction_model" / "summary.json").read_text())
    # below the error of predicting the training mean for every answer: it learned from the answers
    assert summary["eval_mse_after"] < summary["eval_mse_of_mean"] < summary["eval_mse_before"]
    records = load_ratings("experiments/data/ratings.jsonl")
    train, heldout = split_records(records, 0.1, seed=0)
    assert summary["train_mean"] == pytest.approx(np.mean([r.satisfaction for r in train]))
    # the folder is a reward component on the labels' scale (no reward_stats.json: raw scores), and the
    # reported held-out error is its error
    assert not (run / "satisfaction_model" / "reward_stats.json").exists()
    scores = RewardModelScorer(run / "satisfaction_model")([r.prompt for r in heldout], [r.response for r in heldout])
    errors = scores - np.array([r.satisfaction for r in heldout])
    assert float(np.mean(errors ** 2)) == pytest.approx(summary["eval_mse_after"], rel=1e-4)
    assert float(np.mean(np.abs(errors))) == pytest.approx(summary["eval_mae_after"], rel=1e-4)


def test_ppo_uses_the_stage_outputs_and_logs_each_reward_component(pipeline_run):
    _, run = pipeline_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:  # R = 1.0 H + 0.5 S + 0.2 Q, averaged over the batch
        assert row["rollout/reward_mean"] == pytest.approx(
            row["reward/human"] + 0.5 * row["reward/satisfaction"] + 0.2 * row["reward/quality"], abs=1e-5)
    assert (run / "policy" / "config.json").is_file()
    # iteration 1's KL is measured against the reference, which is the SFT model the policy starts from
    assert abs(rows[0]["objective/kl"]) < 1e-4


def test_rerun_skips_finished_stages(pipeline_run):
    tmp, run = pipeline_run
    stamps = {p: p.stat().st_mtime_ns for p in (run / "sft" / "summary.json", run / "reward_model" / "summary.json",
                                                 run / "metrics.jsonl")}
    proc = pipeline(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages: sft skipped, reward_model skipped, satisfaction_model skipped, ppo skipped" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_malformed_data_line_fails_before_any_stage_with_file_and_line(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    proc = pipeline(tmp_path, f"sft.data.path={bad}")
    assert proc.returncode == 1
    assert f"{bad}:3: missing field 'response'" in proc.stderr
    assert not (tmp_path / "pipeline_satisfaction" / "sft").exists()


def test_policy_naming_a_stage_the_config_lacks_is_an_error(tmp_path):
    proc = pipeline(tmp_path, "sft=null")
    assert proc.returncode == 1
    assert "model.policy is '{run}/sft', but the config has no 'sft' section to make it" in proc.stderr


def test_the_pipeline_trains_lora_adapters_in_every_stage(tmp_path):
    """SFT, the reward model (adapters and its new score head) and PPO train LoRA adapters on GPT-2's Conv1D
    layers through the same learner launch; each stage writes the merged plain model, PPO the adapters too."""
    from peft import PeftModel

    proc = pipeline(tmp_path, "model.lora={r: 8, alpha: 16, target_modules: [c_attn, c_fc]}", "sft.lr=3e-3",
                    "reward_model.lr=3e-3", "train.iterations=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "pipeline_satisfaction"
    sft = json.loads((run / "sft" / "summary.json").read_text())
    assert sft["eval_loss_after"] < sft["eval_loss_before"] - 0.3
    rm = json.loads((run / "reward_model" / "summary.json").read_text())
    assert rm["eval_accuracy_after"] > rm["eval_accuracy_before"]
    # the exported policy is the SFT model with PPO's adapters merged in, as PEFT merges them
    policy, _ = load_policy(run / "policy")
    merged = PeftModel.from_pretrained(load_policy(run / "sft")[0], run / "policy_adapter").merge_and_unload()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    checkpoint = run / "checkpoints" / "iter_000001" / "actor"  # adapters and their optimizer state only:
    full_weights = 4 * sum(p.numel() for p in policy.parameters())  # less than the policy's float32 weights alone
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < full_weights


def test_rank_batches_make_every_rank_run_as_many_passes(monkeypatch):
    import rlhf_ray.stages.common as common

    monkeypatch.setattr(common, "get_world_size", lambda: 2)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(common, "get_rank", lambda rank=rank: rank)
        shares[rank] = common.rank_batches(list("abcdefghi"), 2)
    assert shares[0] == [(["a", "c"], 2), (["e", "g"], 2), (["i"], 1)]
    assert shares[1] == [(["b", "d"], 2), (["f", "h"], 2), (["a"], 0)]  # a filler that does not count
    monkeypatch.setattr(common, "get_world_size", lambda: 4)
    monkeypatch.setattr(common, "get_rank", lambda: 3)
    assert common.rank_batches(list("ab"), 8) == [(["a"], 0)]  # no item of its own


def test_the_satisfaction_model_trains_on_the_served_ratings_its_pipeline_exports(tmp_path):
    """`satisfaction_model.feedback_db`: the latest rating of each served answer, exported as `rlhf-ray feedback
    export` writes it; a database without ratings is one clear error."""
    from rlhf_ray.config import RunConfig
    from rlhf_ray.pipeline.stages import export_stage_feedback
    from rlhf_ray.serve.feedback_store import ChoiceRecord, CompletionRecord, FeedbackStore
    from rlhf_ray.stages import StageError

    store = FeedbackStore(tmp_path / "feedback.db")
    choices = [ChoiceRecord(i, 0, "the movie was", text, "stop") for i, text in enumerate([" good", " bad"])]
    store.record_completions([CompletionRecord("c1", 1.0, "tiny", "v1", "completions", choices, {})])
    config = RunConfig.model_validate({"name": "fb", "output_dir": str(tmp_path), "satisfaction_model": {
        "base": "rlhf-ray/tiny-gpt2", "feedback_db": str(store.path)}})
    with pytest.raises(StageError, match="holds no rated answers to train on"):
        export_stage_feedback(config, "satisfaction_model")
    store.add_feedback("c1", rating=2, choice_index=1)
    store.add_feedback("c1", rating=5, choice_index=0)
    store.add_feedback("c1", rating=4, choice_index=0)  # the latest rating of an answer counts
    store.close()
    exported = export_stage_feedback(config, "satisfaction_model").satisfaction_model
    assert exported.feedback_db is None
    assert exported.data.path == str(tmp_path / "fb" / "satisfaction_model_feedback" / "ratings.jsonl")
    assert sorted((r.response, r.satisfaction) for r in exported.data.load_ratings()) == [(" bad", 0.25),
                                                                                         (" good", 0.75)]
