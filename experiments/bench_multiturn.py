"""Benchmark multi-turn rollouts: the KV cache carried across turns against re-prefilling the conversation.

    python experiments/bench_multiturn.py [--batch 32] [--turns 4] [--turn-tokens 16] [--env-tokens 16]
                                          [--repeats 3] [--threads 2] [--json PATH]

Every side makes the same conversations: a prompt of 16 tokens, then `--turns` assistant turns of
`--turn-tokens` tokens each, and after each turn but the last a user message of `--env-tokens` tokens (the
template's marks included). Decoding is greedy and the model's output layer forbids both end tokens, so every
turn runs to its budget and the sides can be compared token for token (`same_tokens`).

- carried: `Sampler.generate` with `rollout.dialogue` (envs.dialogue's vector env): the environment's tokens
  go into the live rows' cache with one forward pass over them (`DecodeBatch.extend`).
- re-prefill: for each turn, the single-turn `Sampler` on the whole conversation so far (the same decoder,
  prefill included): what a multi-turn loop does without a cache that outlives a turn.
- generate: the same loop with Hugging Face `model.generate` for each turn.

Tokens/s counts the assistant's tokens per second of wall time (median of `--repeats`, interleaved, after a
warm-up each). The model is GPT-2-shaped (4 layers, 256 wide) on the task tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import write_json  # noqa: E402

from envs.dialogue import ChatFormat, Reply  # noqa: E402
from rlhf_ray.decoding import keep_freed_memory  # noqa: E402
from rlhf_ray.models.tiny import END_OF_TURN, build_task_tokenizer  # noqa: E402
from rlhf_ray.rollout.sampler import DialogueParams, Sampler, SamplingParams  # noqa: E402


class FixedUser:
    """Always the same message, of `words` words."""

    def __init__(self, words: int):
        self.content = " ".join(["please"] * words)

    def reply(self, prompt, turns):
        return Reply("user", self.content)


def build_model(tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=256, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ends = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[ends] = -1e9  # every turn runs to its budget
    model.set_output_embeddings(biased)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ends
    return model


def zero_reward(prompts, responses):
    return np.zeros(len(prompts))


def carried(model, tokenizer, prompts, args, user):
    params = SamplingParams(max_new_tokens=args.turn_tokens, greedy=True,
                            dialogue=DialogueParams(user, max_turns=args.turns, max_env_tokens=args.env_tokens))
    episodes = Sampler(model, tokenizer, zero_reward, params).generate(prompts, list(range(len(prompts))))
    return [e.response_ids.tolist() for e in episodes]


def user_tokens(tokenizer, user) -> list[int]:
    fmt = ChatFormat.of(tokenizer)
    return tokenizer(fmt.after_turn(None) + fmt.message("user", user.content), add_special_tokens=False)["input_ids"]


def reprefill(model, tokenizer, prompts, args, user, use_generate: bool):
    """Each turn decoded from the whole conversation so far; the user's tokens appended between turns."""
    reply = user_tokens(tokenizer, user)
    conversations = [list(p) for p in prompts]
    responses = [[] for _ in prompts]
    params = SamplingParams(max_new_tokens=args.turn_tokens, greedy=True)
    sampler = Sampler(model, tokenizer, zero_reward, params)
    for turn in range(args.turns):
        if use_generate:
            width = max(len(c) for c in conversations)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in conversations])
            mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in conversations])[:, None])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=args.turn_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            turns = out[:, width:].tolist()
        else:
            turns = [e.response_ids.tolist() for e in sampler.generate(conversations, list(range(len(prompts))))]
        for conversation, response, new in zip(conversations, responses, turns):
            added = new + (reply if turn + 1 < args.turns else [])
            conversation.extend(added)
            response.extend(added)
    return responses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--env-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tokenizer = build_task_tokenizer()
    model = build_model(tokenizer)
    marks = len(user_tokens(tokenizer, FixedUser(0)))
    user = FixedUser(args.env_tokens - marks)
    assert len(user_tokens(tokenizer, user)) == args.env_tokens
    rng = np.random.default_rng(0)
    words = [t for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids]
    prompts = [rng.choice(words, size=args.prompt_tokens).tolist() for _ in range(args.batch)]
    sides = {"carried": lambda: carried(model, tokenizer, prompts, args, user),
             "re-prefill": lambda: reprefill(model, tokenizer, prompts, args, user, use_generate=False),
             "generate re-prefill": lambda: reprefill(model, tokenizer, prompts, args, user, use_generate=True)}
    outputs = {name: run() for name, run in sides.items()}  # warm-up, and the tokens to compare
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    expected = args.turns * args.turn_tokens + (args.turns - 1) * args.env_tokens
    tokens = args.batch * args.turns * args.turn_tokens
    report = {"batch": args.batch, "turns": args.turns, "turn_tokens": args.turn_tokens, "env_tokens": args.env_tokens,
              "prompt_tokens": args.prompt_tokens, "threads": args.threads, "sides": {}}
    print(f"multi-turn rollouts: batch {args.batch}, {args.turns} turns of {args.turn_tokens} assistant + "
          f"{args.env_tokens} user tokens, prompt {args.prompt_tokens}, GPT-2 4x256, {args.threads} threads")
    print("| side | s (median) | assistant tokens/s | vs re-prefill | same tokens as carried |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["re-prefill"])
    for name in sides:
        lengths = {len(r) for r in outputs[name]}
        assert lengths == {expected}, f"{name}: responses of {lengths} tokens, expected {expected}"
        same = np.mean([a == b for a, b in zip(outputs[name], outputs["carried"])])
        seconds = statistics.median(times[name])
        report["sides"][name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "same_tokens": float(same)}
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x | {same:.2f} |")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        from pathlib import Path

        write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
