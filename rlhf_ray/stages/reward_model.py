"""The reward model: a scalar head on a transformer, trained on comparisons with the Bradley-Terry loss.

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))      (Stiennon et al. 2020; Ouyang et al. 2022)

The model is `AutoModelForSequenceClassification(num_labels=1)` on the base model's transformer, read
at the last token of `join_prompt_response(prompt, response)`: the same text, tokenizer settings and
head that `rlhf_ray.rewards.RewardModelScorer` uses in PPO, so the folder this stage writes is the
reward PPO loads. The loss fixes only differences of scores, so their offset is arbitrary; the mean and
standard deviation of the final scores on the training responses are saved in `reward_stats.json`
and the scorer standardises by them. Held-out pair accuracy is measured before and after each epoch.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from rlhf_ray.learner.distributed import all_reduce_sum, get_rank, global_mean
from rlhf_ray.learner.engine import create_engine
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.rewards.reward_model import STATS_FILE, join_prompt_response
from rlhf_ray.stages.common import (
    StageWriter, epoch_batches, rank_batches, rank_slice, split_records, stage_engine_config, start_stage,
    trained_state_dict, with_lora,
)


def load_reward_model(path, dtype: torch.dtype, pad_token_id: int):
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = pad_token_id  # the head finds each row's last real token by the pad id
    return model


def encode(tokenizer, texts: list[str], max_length: int) -> dict:
    """Right-padded, left-truncated ids (the end of the response is where the score is read)."""
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def pair_scores(model, tokenizer, pairs, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r(chosen), r(rejected) (B,) for (prompt, chosen, rejected) records, in one forward pass."""
    texts = ([join_prompt_response(p.prompt, p.chosen) for p in pairs]
             + [join_prompt_response(p.prompt, p.rejected) for p in pairs])
    batch = encode(tokenizer, texts, max_length)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(engine, tokenizer, pairs, max_length: int, batch_size: int) -> dict:
    """Accuracy (chosen scored higher), loss, and score moments over `pairs`, across ranks."""
    sums = torch.zeros(5, dtype=torch.float64)  # correct, loss, pairs, score sum, score sum of squares
    for batch, real in rank_batches(pairs, batch_size):
        chosen, rejected = pair_scores(engine, tokenizer, batch, max_length)
        chosen, rejected = chosen[:real], rejected[:real]
        both = torch.cat([chosen, rejected]).double()
        sums += torch.stack([(chosen > rejected).sum().double(), -F.logsigmoid(chosen - rejected).sum().double(),
                             torch.tensor(float(len(chosen)), dtype=torch.float64), both.sum(), (both ** 2).sum()])
    correct, loss, n, total, squares = all_reduce_sum(sums).tolist()
    mean = total / max(2 * n, 1)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "pairs": int(n), "mean": mean,
            "std": max(squares / max(2 * n, 1) - mean ** 2, 0.0) ** 0.5}


def reward_model_loop(loop_config: dict) -> None:
    config, stage, out, base, tokenizer = start_stage(loop_config, "reward_model")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    records = stage.data.load_preferences(tokenizer)
    train, heldout = split_records(records, stage.eval_fraction, config.seed)
    engine_cfg = stage_engine_config(stage, config)
    dtype = DTYPES[config.model.dtype]
    engine = create_engine(with_lora(load_reward_model(base, dtype, tokenizer.pad_token_id), config, ("score",)),
                           engine_cfg,
                           train_batch_size=stage.batch_size)
    writer = StageWriter(out)
    micro, length = engine_cfg.micro_batch_size, stage.max_length

    def held_out(epoch: int, step: int) -> dict | None:
        if not heldout:
            return None
        result = evaluate_pairs(engine, tokenizer, heldout, length, micro)
        writer.log({"epoch": epoch, "step": step, "rm/eval_accuracy": result["accuracy"],
                    "rm/eval_loss": result["loss"]})
        return result

    before = after = held_out(0, 0)
    step = 0
    for epoch in range(stage.epochs):
        for batch in epoch_batches(len(train), stage.batch_size, epoch, config.seed):
            chosen, rejected = pair_scores(engine, tokenizer, [train[i] for i in rank_slice(batch)], length)
            loss = -F.logsigmoid(chosen - rejected).mean()  # equal pairs per rank: DeepSpeed's mean is global
            engine.backward(loss)
            engine.step()
            step += 1
            writer.log({"epoch": epoch + 1, "step": step,
                        "rm/loss": global_mean(loss.item() * len(chosen), len(chosen)),
                        "rm/accuracy": global_mean(float((chosen > rejected).sum()), len(chosen))},
                       show=step % 10 == 0)
        after = held_out(epoch + 1, step)

    stats = evaluate_pairs(engine, tokenizer, train, length, micro)  # moments of the final scores
    export = load_reward_model(base, torch.float32, tokenizer.pad_token_id) if get_rank() == 0 else None
    state = trained_state_dict(engine, config, export)
    if get_rank() == 0:
        (writer.tmp / STATS_FILE).write_text(json.dumps({"mean": stats["mean"], "std": stats["std"]}) + "\n")
    writer.finish(export, state, tokenizer, {
        "stage": "reward_model", "base": str(stage.base), "train_pairs": len(train), "eval_pairs": len(heldout),
        "steps": step, "train_accuracy": stats["accuracy"],
        "eval_accuracy_before": before and before["accuracy"], "eval_accuracy_after": after and after["accuracy"],
        "eval_loss_before": before and before["loss"], "eval_loss_after": after and after["loss"],
        "score_mean": stats["mean"], "score_std": stats["std"],
    })
