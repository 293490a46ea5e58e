"""The DPO stage (rlhf_ray/stages/dpo.py): its pieces against direct computations, and `rlhf-ray pipeline`
running it end to end on the tiny model, checked against the saved models."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray.data import PreferenceRecord, load_preferences
from rlhf_ray.models import load_policy, load_tokenizer
from rlhf_ray.stages.common import split_records
from rlhf_ray.stages.dpo import pair_logps, tokenize_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_pairs_end_with_eos_and_long_ones_are_cut_and_counted(tiny_tokenizer):
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    records = [PreferenceRecord("today the movie was", "very good", "bad"),
               PreferenceRecord("i think the day was all", "fun . fun . fun", "sad")]
    pairs, cut = tokenize_pairs(records, tiny_tokenizer, max_length=8)
    assert pairs[0] == (ids("today the movie was"), ids("very good") + [eos], ids("today the movie was"), ids("bad") + [eos])
    assert cut == 1  # 6 + 6 tokens > 8 for the chosen side; the rejected side (6 + 2) fits
    prompt_c, chosen, prompt_r, rejected = pairs[1]
    assert len(prompt_c) + len(chosen) == 8 and prompt_c == ids("i think the day was all")[4:]
    assert prompt_r == ids("i think the day was all") and rejected == ids("sad") + [eos]


def test_pair_log_probs_are_the_responses_own(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    eos = tokenizer.eos_token_id
    pairs = [([5, 6, 7], [8, 9, eos], [6, 7], [10, eos]), ([5], [8, eos], [5], [11, 12, 13, eos])]

    def direct(prompt, response):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        return [float(logits[len(prompt) - 1 + t, token]) for t, token in enumerate(response)]

    with torch.no_grad():
        chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id, average=False)
        chosen_avg, rejected_avg = pair_logps(model, pairs, tokenizer.pad_token_id, average=True)
    for row, (pc, c, pr, r) in enumerate(pairs):
        assert chosen[row].item() == pytest.approx(sum(direct(pc, c)), rel=1e-5)
        assert rejected[row].item() == pytest.approx(sum(direct(pr, r)), rel=1e-5)
        assert rejected_avg[row].item() == pytest.approx(sum(direct(pr, r)) / len(r), rel=1e-5)
        assert chosen_avg[row].item() == pytest.approx(sum(direct(pc, c)) / len(c), rel=1e-5)


DPO_ONLY = ["dpo={base: rlhf-ray/tiny-gpt2, data: {path: experiments/data/preferences.jsonl}, epochs: 2, "
            "lr: 1.0e-3, batch_size: 16, eval_fraction: 0.1}", "sft=null"]


def run_pipeline(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "pipeline", "experiments/pipeline_dpo.yaml",
           f"output_dir={tmp_path}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def tensorboard_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the TensorBoard event files in `folder` (TFRecord framing: length, its CRC,
    the Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + size])
            at += 12 + size + 4
            scalars.update({(value.tag, event.step): value.simple_value for value in event.summary.value})
    return scalars


def test_dpo_stage_learns_the_held_out_preferences_against_a_reference_computed_once(tmp_path):
    proc = run_pipeline(tmp_path, *DPO_ONLY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stages: dpo ran\n" in proc.stdout, proc.stdout[-2000:]
    assert "ppo: not run" in proc.stdout
    out = tmp_path / "pipeline_dpo" / "dpo"
    summary = json.loads((out / "summary.json").read_text())
    # before the first step the policy is the reference: every implicit reward is 0, the loss log 2
    assert summary["eval_loss_before"] == pytest.approx(0.693147, abs=1e-5)
    assert summary["eval_accuracy_before"] == 0.0 and summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_loss_after"] < 0.6 and summary["eval_accuracy_after"] >= 0.8
    assert summary["eval_margin_after"] > 0.0
    assert summary["train_pairs"] + summary["eval_pairs"] == 300 and summary["cut_pairs"] == 0

    # the cached reference log-probs are the start model's, summed over each response's tokens
    base, tokenizer = load_policy("rlhf-ray/tiny-gpt2")
    cached = torch.load(out / "reference_logps.pt")
    assert cached["average"] is False and cached["heldout"].shape == (summary["eval_pairs"], 2)
    records = load_preferences(ROOT / "experiments/data/preferences.jsonl")
    pairs, _ = tokenize_pairs(records, load_tokenizer(out), max_length=512)
    train, heldout = split_records(pairs, 0.1, seed=0)
    with torch.no_grad():
        chosen, rejected = pair_logps(base, heldout[:4], tokenizer.pad_token_id, average=False)
    torch.testing.assert_close(cached["heldout"][:4].float(), torch.stack([chosen, rejected], 1), rtol=1e-4, atol=1e-4)

    # the saved policy prefers the chosen responses more than the reference does: its held-out margin, recomputed
    policy, _ = load_policy(out)
    with torch.no_grad():
        new_chosen, new_rejected = pair_logps(policy, heldout, tokenizer.pad_token_id, average=False)
    margins = 0.1 * ((new_chosen - cached["heldout"][:, 0]) - (new_rejected - cached["heldout"][:, 1]))
    assert float(margins.mean()) == pytest.approx(summary["eval_margin_after"], rel=1e-3, abs=1e-4)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "dpo/loss" in r]
    assert trained and {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                        "logps/chosen", "logps/rejected"} <= set(trained[-1])
    assert trained[-1]["rewards/accuracies"] > 0.5
    # the same lines in TensorBoard, at their step
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars[("rewards/margins", trained[-1]["step"])] == pytest.approx(trained[-1]["rewards/margins"])
    assert scalars[("eval/accuracy", 0)] == 0.0

    # `rlhf-ray eval RUN` on a pipeline that ended with DPO: its dpo/ against the stage's start
    from rlhf_ray.cli import main
    run = tmp_path / "pipeline_dpo"
    assert main(["eval", str(run), "--prompts", str(ROOT / "experiments/data/prompts_heldout.jsonl"),
                 "--num-prompts", "4", "--max-new-tokens", "4"]) == 0
    info = json.loads((run / "eval" / "eval.json").read_text())["info"]
    assert info["policy"] == str(out) and info["reference"] == "rlhf-ray/tiny-gpt2"


def test_dpo_preflight_names_the_bad_setting_before_ray_starts(tmp_path):
    proc = run_pipeline(tmp_path, *DPO_ONLY, "dpo.label_smoothing=0.7")
    assert proc.returncode == 2 and "dpo.label_smoothing" in proc.stderr, proc.stderr[-2000:]
    proc = run_pipeline(tmp_path, *DPO_ONLY, "dpo.data.limit=10")  # 9 to train, 1 held out
    assert proc.returncode != 0 and "dpo.batch_size: 16 is more than the 9 training records" in proc.stderr, \
        proc.stderr[-2000:]
    proc = run_pipeline(tmp_path, *DPO_ONLY, "dpo.data.path=experiments/data/sft.jsonl")
    assert proc.returncode != 0 and "sft.jsonl:1" in proc.stderr and "chosen" in proc.stderr, proc.stderr[-2000:]


def test_dpo_trains_on_the_served_feedback_its_pipeline_exports(tmp_path):
    """`dpo.feedback_db`: the pairs the server's users chose, exported as `rlhf-ray feedback export` does, ties
    left out and counted; a database without pairs is one clear error."""
    from rlhf_ray.config import RunConfig
    from rlhf_ray.pipeline.stages import export_stage_feedback
    from rlhf_ray.serve.feedback_store import ChoiceRecord, CompletionRecord, FeedbackStore
    from rlhf_ray.stages import StageError

    store = FeedbackStore(tmp_path / "feedback.db")
    choices = lambda texts: [ChoiceRecord(i, 0, "the movie was", t, "stop") for i, t in enumerate(texts)]  # noqa: E731
    store.record_completions([CompletionRecord("c1", 1.0, "tiny", "v1", "completions", choices([" good", " bad"]), {}),
                              CompletionRecord("c2", 1.0, "tiny", "v1", "completions", choices([" fun", " fun"]), {})])
    config = RunConfig.model_validate({"name": "fb", "output_dir": str(tmp_path),
                                       "dpo": {"base": "rlhf-ray/tiny-gpt2", "feedback_db": str(store.path)}})
    with pytest.raises(StageError, match="holds no preference pairs to train on"):
        export_stage_feedback(config, "dpo")
    store.add_feedback("c1", choice_index=0)
    store.add_feedback("c2", choice_index=1)  # the same text twice: a tie
    store.close()
    exported = export_stage_feedback(config, "dpo")
    assert exported.dpo.feedback_db is None and exported.dpo.data.path == str(tmp_path / "fb" / "dpo_feedback" /
                                                                                "preferences.jsonl")
    assert [(r.prompt, r.chosen, r.rejected) for r in exported.dpo.data.load_preferences()] == \
        [("the movie was", " good", " bad")]
    with pytest.raises(StageError, match="does not exist"):
        export_stage_feedback(RunConfig.model_validate({**config.model_dump(), "dpo": {
            "base": "rlhf-ray/tiny-gpt2", "feedback_db": str(tmp_path / "missing.db")}}), "dpo")


def test_ipo_with_lora_on_two_zero3_ranks_matches_one_rank(tmp_path):
    """The stage sharded: 2 ranks under ZeRO-3 with LoRA adapters train as one rank does (IPO with the RPO
    term, whose per-pair lengths must follow each rank's pairs). The 9 held-out pairs
    do not split evenly, so one rank's last evaluation batch holds a filler pair (every rank must make the
    same forward passes under ZeRO-3, or the run hangs) that must not count."""
    common = [*DPO_ONLY, "dpo.loss_type=ipo", "dpo.rpo_alpha=0.5", "dpo.epochs=1", "dpo.data.limit=90",
              "dpo.batch_size=8",
              "model.lora={r: 8, alpha: 16, target_modules: [c_attn]}"]
    runs = {}
    for ranks in (1, 2):
        proc = run_pipeline(tmp_path / str(ranks), *common, f"learner.num_workers={ranks}", "learner.zero_stage=3",
                            "learner.zero3_param_persistence_threshold=0")  # shard even the tiny model
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[ranks] = tmp_path / str(ranks) / "pipeline_dpo" / "dpo"
    one, two = (json.loads((runs[r] / "summary.json").read_text()) for r in (1, 2))
    assert one["eval_pairs"] == 9 and one["steps"] == 10
    for key in ("eval_loss_before", "eval_accuracy_before", "eval_loss_after", "eval_margin_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert one["eval_loss_after"] < one["eval_loss_before"]
    cached = [torch.load(runs[r] / "reference_logps.pt") for r in (1, 2)]
    torch.testing.assert_close(cached[1]["heldout"], cached[0]["heldout"], rtol=1e-5, atol=1e-5)
    # IPO's log-probs are the means over each response's tokens
    assert cached[0]["average"] is True


def test_simpo_needs_no_reference(tmp_path):
    proc = run_pipeline(tmp_path, *DPO_ONLY, "dpo.loss_type=simpo", "dpo.epochs=1", "dpo.beta=2.0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "pipeline_dpo" / "dpo"
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "reference_logps.pt").exists()
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["eval_accuracy_after"] > summary["eval_accuracy_before"]
