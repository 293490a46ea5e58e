"""Direct preference optimisation: the policy learns from (prompt, chosen, rejected) pairs directly, with no
reward model and no sampling (Rafailov et al. 2023; IPO and SimPO as `dpo.loss_type`).

Each step reads the log-probability of the chosen and the rejected response of every pair (a forward pass
for each side, response tokens only, in PPO's layout: `rlhf_ray.models.forward`) and takes the loss of
`rlhf_ray.algorithms.preference`. The frozen reference is the start model: its log-probabilities are
computed once, before the first step, for every training and held-out pair (each rank its share, then
summed across ranks) and kept in the stage folder (`reference_logps.pt`), so no second model is held
during training; SimPO needs none. Records longer than `max_length` are cut as SFT cuts them (the prompt on
the left first) and counted (`cut_pairs` in `summary.json`); a pair whose chosen and rejected responses are
the same text is a data error with its file and line, or left out with `data.on_error: skip`.

Logged per step, under the field's names: `dpo/loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`; and `perf/step_s`,
`perf/tokens_per_s` (prompt and response tokens of both sides, padding not counted). The held-out pairs'
loss, accuracy and margin are measured before training and after each epoch; `summary.json` has both ends.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms.preference import (
    averages_log_probs, dpo_loss, ipo_loss, sequence_logps, simpo_loss, with_chosen_nll,
)
from rlhf_ray.learner.distributed import all_reduce_sum, get_rank
from rlhf_ray.learner.engine import create_engine
from rlhf_ray.models.forward import pack_episodes, response_logprobs
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.stages.common import (
    StageWriter, epoch_batches, held_out_figures, rank_batches, rank_slice, split_records, stage_engine_config,
    start_stage, trained_state_dict, with_lora,
)
from rlhf_ray.stages.sft import cut_to_length

REFERENCE_FILE = "reference_logps.pt"


def tokenize_pairs(records, tokenizer, max_length: int) -> tuple[list[tuple], int]:
    """(prompt ids, chosen ids, prompt ids, rejected ids) per pair, each side cut to `max_length` as SFT cuts
    (its prompt may then differ from the other side's), and how many pairs were cut. (The loader has already
    refused, or skipped and counted, records whose chosen and rejected responses are the same text.)"""
    pairs, cut = [], 0
    for record in records:
        prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
        sides = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for text in (record.chosen, record.rejected)]
        cut += any(len(prompt) + len(side) > max_length for side in sides)
        (prompt_c, chosen), (prompt_r, rejected) = (cut_to_length(prompt, side, max_length) for side in sides)
        pairs.append((prompt_c, chosen, prompt_r, rejected))
    return pairs, cut


def pair_logps(model, pairs, pad_id: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen | prompt), log pi(rejected | prompt) (B,), summed or averaged, in two forward passes: the
    chosen responses' and the rejected ones', each padded to its own longest. One pass over both would pad
    every chosen row to the longest rejected one, and a rejected response often runs much longer (on the
    SmolLM2 assistant pairs two passes compute 26 % fewer positions)."""
    def side(prompts, responses) -> torch.Tensor:
        batch = pack_episodes(prompts, responses, pad_id)
        return sequence_logps(response_logprobs(model, batch), batch.response_mask, average=average)

    return side([p[0] for p in pairs], [p[1] for p in pairs]), side([p[2] for p in pairs], [p[3] for p in pairs])


@torch.no_grad()
def reference_logps(engine, pairs, pad_id: int, average: bool, batch_size: int) -> torch.Tensor:
    """(N, 2) the start model's chosen and rejected log-probs of every pair: each rank its share, summed."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for index, real in rank_batches(range(len(pairs)), batch_size):
        chosen, rejected = pair_logps(engine, [pairs[i] for i in index], pad_id, average)
        out[index[:real]] = torch.stack([chosen, rejected], dim=1)[:real].double()
    return all_reduce_sum(out)


def preference_loss(stage, pairs, chosen, rejected, reference: torch.Tensor | None):
    """The stage's loss on these `pairs` (their chosen and rejected log-probs and reference rows)."""
    if stage.loss_type == "simpo":
        out = simpo_loss(chosen, rejected, stage.beta, stage.simpo_gamma, stage.label_smoothing)
    else:
        ref_chosen, ref_rejected = reference[:, 0].to(chosen.dtype), reference[:, 1].to(chosen.dtype)
        out = (ipo_loss(chosen, rejected, ref_chosen, ref_rejected, stage.beta) if stage.loss_type == "ipo" else
               dpo_loss(chosen, rejected, ref_chosen, ref_rejected, stage.beta, stage.label_smoothing))
    lengths = torch.tensor([len(pair[1]) for pair in pairs])
    return with_chosen_nll(out, chosen, lengths, stage.rpo_alpha, averages_log_probs(stage.loss_type))


@torch.no_grad()
def evaluate(engine, stage, pairs, reference, pad_id: int, batch_size: int) -> dict:
    """Held-out loss, accuracy (chosen's implicit reward above rejected's) and margin, across ranks."""
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
    average = averages_log_probs(stage.loss_type)
    for index, real in rank_batches(range(len(pairs)), batch_size):
        chosen, rejected = pair_logps(engine, [pairs[i] for i in index], pad_id, average)
        index, chosen, rejected = index[:real], chosen[:real], rejected[:real]
        out = preference_loss(stage, [pairs[i] for i in index], chosen, rejected,
                              None if reference is None else reference[index])
        sums += torch.tensor([float(out.losses.sum()), float((out.chosen_rewards > out.rejected_rewards).sum()),
                              float((out.chosen_rewards - out.rejected_rewards).sum()), float(len(index))],
                             dtype=torch.float64)
    loss, correct, margin, n = all_reduce_sum(sums).tolist()
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "margin": margin / max(n, 1)}


def dpo_loop(loop_config: dict) -> None:
    config, stage, out, base, tokenizer = start_stage(loop_config, "dpo")
    records = stage.data.load_preferences(tokenizer)
    pairs, cut = tokenize_pairs(records, tokenizer, stage.max_length)
    train, heldout = split_records(pairs, stage.eval_fraction, config.seed)
    engine_cfg = stage_engine_config(stage, config)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[config.model.dtype])
    engine = create_engine(with_lora(model, config), engine_cfg, train_batch_size=stage.batch_size)
    writer = StageWriter(out)
    pad, micro, average = tokenizer.pad_token_id, engine_cfg.micro_batch_size, averages_log_probs(stage.loss_type)

    # the start model is the reference: its log-probs once, before any step (SimPO has no reference)
    train_ref = heldout_ref = None
    if stage.loss_type != "simpo":
        train_ref = reference_logps(engine, train, pad, average, micro)
        heldout_ref = reference_logps(engine, heldout, pad, average, micro) if heldout else None
        if get_rank() == 0:
            torch.save({"train": train_ref, "heldout": heldout_ref, "average": average}, writer.tmp / REFERENCE_FILE)

    held_out = held_out_figures(writer, heldout, lambda: evaluate(engine, stage, heldout, heldout_ref, pad, micro),
                                "eval/")

    before = after = held_out(0, 0)
    step = 0
    for epoch in range(stage.epochs):
        for batch in epoch_batches(len(train), stage.batch_size, epoch, config.seed):
            started = time.perf_counter()
            index = rank_slice(batch)
            chosen, rejected = pair_logps(engine, [train[i] for i in index], pad, average)
            out = preference_loss(stage, [train[i] for i in index], chosen, rejected,
                                  None if train_ref is None else train_ref[index])
            engine.backward(out.losses.mean())  # equal pairs per rank: DeepSpeed's mean is global
            engine.step()
            step_s = time.perf_counter() - started
            step += 1
            # the step's means over all ranks' pairs, and its tokens (prompt and response of both sides, no
            # padding), in one all-reduce
            values = {"dpo/loss": out.losses.detach(), "rewards/chosen": out.chosen_rewards,
                      "rewards/rejected": out.rejected_rewards,
                      "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).double(),
                      "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                      "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
            tokens = sum(len(part) for i in index for part in train[i])
            sums = all_reduce_sum(torch.tensor([float(v.double().sum()) for v in values.values()]
                                               + [float(tokens), float(len(index))], dtype=torch.float64))
            metrics = {"epoch": epoch + 1, "step": step,
                       **{key: float(total / sums[-1]) for key, total in zip(values, sums[:-2])},
                       "perf/step_s": step_s, "perf/tokens_per_s": float(sums[-2]) / step_s}
            writer.log(metrics, show=step % 10 == 0)
        after = held_out(epoch + 1, step)

    export = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if get_rank() == 0 else None
    state = trained_state_dict(engine, config, export)
    writer.finish(export, state, tokenizer, {
        "stage": "dpo", "base": str(stage.base), "loss_type": stage.loss_type, "beta": stage.beta,
        "rpo_alpha": stage.rpo_alpha, "train_pairs": len(train), "eval_pairs": len(heldout), "steps": step,
        "cut_pairs": cut,
        **{f"eval_{key}_{end}": result and result[key] for end, result in (("before", before), ("after", after))
           for key in ("loss", "accuracy", "margin")},
    })
