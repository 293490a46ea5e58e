"""Supervised fine-tuning: maximise log pi(response | prompt) on demonstrations, response tokens only.

The loss is the mean negative log-likelihood over every response token of a global batch (all ranks),
the prompt tokens being context only (Ouyang et al. 2022; OpenRLHF's SFT trainer masks prompts the
same way). Each response ends with the tokenizer's EOS, so the model learns to stop. The same layout
as PPO (`rlhf_ray.models.forward.pack_episodes`) computes it, so what SFT lowers is exactly the
log-likelihood PPO later starts from. Held-out loss is measured before training and after each epoch.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.learner.distributed import get_rank, global_mean, global_token_mean_loss
from rlhf_ray.learner.engine import create_engine
from rlhf_ray.models.forward import pack_episodes, response_logprobs
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.stages.common import (
    StageWriter, epoch_batches, rank_batches, rank_slice, split_records, stage_engine_config, start_stage,
    trained_state_dict, with_lora,
)


def cut_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A prompt and response of at most `max_length` tokens together: the prompt is cut on the left (keeping
    at least its last token), then the response's end."""
    excess = len(prompt) + len(response) - max_length
    if excess > 0:
        cut = min(excess, len(prompt) - 1)
        prompt, excess = prompt[cut:], excess - cut
    if excess > 0:
        response = response[:len(response) - excess]
    return prompt, response


def tokenize_demonstrations(records, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per record, cut to `max_length` (`cut_to_length`)."""
    return [cut_to_length(tokenizer(r.prompt, add_special_tokens=False)["input_ids"],
                          tokenizer(r.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                          max_length) for r in records]


def response_nll(model, pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the responses (B, R) and their mask."""
    batch = pack_episodes([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    return -response_logprobs(model, batch), batch.response_mask


@torch.no_grad()
def heldout_loss(engine, pairs, pad_id: int, batch_size: int) -> float:
    """Mean response-token NLL over the held-out demonstrations, across ranks."""
    total = count = 0.0
    for batch, real in rank_batches(pairs, batch_size):
        nll, mask = response_nll(engine, batch, pad_id)
        total += float((nll * mask)[:real].sum())
        count += float(mask[:real].sum())
    return global_mean(total, count)


def sft_loop(loop_config: dict) -> None:
    config, stage, out, base, tokenizer = start_stage(loop_config, "sft")
    pairs = tokenize_demonstrations(stage.data.load_sft(tokenizer), tokenizer, stage.max_length)
    train, heldout = split_records(pairs, stage.eval_fraction, config.seed)
    engine_cfg = stage_engine_config(stage, config)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[config.model.dtype])
    engine = create_engine(with_lora(model, config), engine_cfg, train_batch_size=stage.batch_size)
    writer = StageWriter(out)
    pad, micro = tokenizer.pad_token_id, engine_cfg.micro_batch_size

    before = heldout_loss(engine, heldout, pad, micro) if heldout else None
    writer.log({"epoch": 0, "step": 0, "sft/eval_loss": before})
    step, eval_loss = 0, before
    for epoch in range(stage.epochs):
        for batch in epoch_batches(len(train), stage.batch_size, epoch, config.seed):
            nll, mask = response_nll(engine, [train[i] for i in rank_slice(batch)], pad)
            loss = global_token_mean_loss(nll, mask)
            engine.backward(loss)
            engine.step()
            step += 1
            writer.log({"epoch": epoch + 1, "step": step,
                        "sft/loss": global_mean(float((nll.detach() * mask).sum()), float(mask.sum()))},
                       show=step % 10 == 0)
        eval_loss = heldout_loss(engine, heldout, pad, micro) if heldout else None
        writer.log({"epoch": epoch + 1, "step": step, "sft/eval_loss": eval_loss})

    export = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if get_rank() == 0 else None
    state = trained_state_dict(engine, config, export)
    writer.finish(export, state, tokenizer, {
        "stage": "sft", "base": str(stage.base), "train_records": len(train), "eval_records": len(heldout),
        "steps": step, "eval_loss_before": before, "eval_loss_after": eval_loss,
    })
