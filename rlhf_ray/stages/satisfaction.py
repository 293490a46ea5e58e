"""The user-satisfaction model S: how satisfied people are with an answer, learned from their ratings and likes.

    loss = (s(prompt, response) - satisfaction)^2,   satisfaction = (rating - 1) / 4, or 1 for a like, 0 for a dislike

The model is the reward model's (`AutoModelForSequenceClassification(num_labels=1)` read at the last token of
`join_prompt_response`), so `rlhf_ray.rewards.RewardModelScorer` loads the folder as a reward component:
the S of R = Q + lambda S + mu H. Unlike the reward model's scores, S is on the scale of its labels (the
predicted satisfaction, about 0 to 1), so the folder has no `reward_stats.json` and the scorer uses the
raw score. The held-out mean squared and absolute errors are measured before and after each epoch, next to
the error of predicting the training labels' mean for every answer (`eval_mse_of_mean`): the bar a model
must clear to have learned anything.
"""

from __future__ import annotations

import torch

from rlhf_ray.learner.distributed import all_reduce_sum, get_rank
from rlhf_ray.learner.engine import create_engine
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.rewards.reward_model import join_prompt_response
from rlhf_ray.stages.common import (
    StageWriter, epoch_batches, held_out_figures, rank_batches, rank_slice, split_records, stage_engine_config,
    start_stage, trained_state_dict, with_lora,
)
from rlhf_ray.stages.reward_model import encode, load_reward_model


def predicted(model, tokenizer, records, max_length: int) -> torch.Tensor:
    """s(prompt, response) (B,) of the records, in one forward pass."""
    batch = encode(tokenizer, [join_prompt_response(r.prompt, r.response) for r in records], max_length)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()


def targets(records) -> torch.Tensor:
    return torch.tensor([r.satisfaction for r in records], dtype=torch.float32)


@torch.no_grad()
def evaluate(engine, tokenizer, records, max_length: int, batch_size: int, mean: float) -> dict:
    """Mean squared and absolute error over `records` across ranks, and that of predicting `mean` for all."""
    sums = torch.zeros(4, dtype=torch.float64)  # squared error, absolute error, squared error of the mean, count
    for batch, real in rank_batches(records, batch_size):
        truth = targets(batch)[:real].double()
        error = predicted(engine, tokenizer, batch, max_length)[:real].double() - truth
        sums += torch.stack([(error ** 2).sum(), error.abs().sum(), ((truth - mean) ** 2).sum(),
                             torch.tensor(float(real), dtype=torch.float64)])
    squared, absolute, of_mean, n = all_reduce_sum(sums).tolist()
    return {"mse": squared / max(n, 1), "mae": absolute / max(n, 1), "mse_of_mean": of_mean / max(n, 1)}


def satisfaction_loop(loop_config: dict) -> None:
    config, stage, out, base, tokenizer = start_stage(loop_config, "satisfaction_model")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    records = stage.data.load_ratings(tokenizer)
    train, heldout = split_records(records, stage.eval_fraction, config.seed)
    mean = float(targets(train).double().mean())
    engine_cfg = stage_engine_config(stage, config)
    model = load_reward_model(base, DTYPES[config.model.dtype], tokenizer.pad_token_id)
    engine = create_engine(with_lora(model, config, ("score",)), engine_cfg, train_batch_size=stage.batch_size)
    writer = StageWriter(out)
    micro, length = engine_cfg.micro_batch_size, stage.max_length

    held_out = held_out_figures(writer, heldout, lambda: evaluate(engine, tokenizer, heldout, length, micro, mean),
                                "satisfaction/eval_")

    before = after = held_out(0, 0)
    step = 0
    for epoch in range(stage.epochs):
        for batch in epoch_batches(len(train), stage.batch_size, epoch, config.seed):
            mine = [train[i] for i in rank_slice(batch)]
            loss = ((predicted(engine, tokenizer, mine, length) - targets(mine)) ** 2).mean()  # equal per rank
            engine.backward(loss)
            engine.step()
            step += 1
            total = all_reduce_sum(torch.tensor([loss.item() * len(mine), float(len(mine))], dtype=torch.float64))
            writer.log({"epoch": epoch + 1, "step": step, "satisfaction/loss": float(total[0] / total[1])},
                       show=step % 10 == 0)
        after = held_out(epoch + 1, step)

    export = load_reward_model(base, torch.float32, tokenizer.pad_token_id) if get_rank() == 0 else None
    state = trained_state_dict(engine, config, export)
    writer.finish(export, state, tokenizer, {
        "stage": "satisfaction_model", "base": str(stage.base), "train_records": len(train),
        "eval_records": len(heldout), "steps": step, "train_mean": mean,
        **{f"eval_{key}_{end}": result and result[key] for end, result in (("before", before), ("after", after))
           for key in ("mse", "mae")},
        "eval_mse_of_mean": before and before["mse_of_mean"],
    })
