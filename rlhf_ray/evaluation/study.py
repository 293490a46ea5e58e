"""Blind side-by-side studies: two models' answers to a prompt set, in an order drawn per item and recorded,
as a queue of the feedback pages (`/ui/eval`), and their results for `rlhf-ray eval`.

    rlhf-ray study create NAME --a POLICY_A --b POLICY_B --prompts FILE [--db DB] ...
    rlhf-ray study results NAME [--db DB]

A side is a run folder (its trained policy), a policy folder, a model name, or a JSONL file of answers
already written (`{"prompt", "response"}` per line, matched to the study's prompts by their text). Each
item shows the two answers as A and B; which model is A is drawn with the study's seed and kept in the
item's meta (`first`), never sent to the page. Results count each judgement for model a: a win, a loss
or a tie (½), with the 95 % Wilson interval; Cohen's kappa on items two people judged.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_ray.data import DataError, format_prompt, iter_rows, use_chat_template

SAMPLING_BATCH = 32


def side_policy(side: str) -> str:
    """The policy a side names: a run folder's trained policy, else the folder or model name itself."""
    path = Path(side).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        from rlhf_ray.evaluation.cli import run_policy

        return str(run_policy(path))
    return side


def model_answers(policy: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """One answer of `policy` per prompt (in its chat template when it has one), seeded per prompt."""
    from rlhf_ray.models import load_policy
    from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed

    model, tokenizer = load_policy(policy)
    chat = use_chat_template(tokenizer, None)
    sampler = Sampler(model, tokenizer, lambda p, r: [0.0] * len(r),
                      SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature))
    answers = []
    for start in range(0, len(prompts), SAMPLING_BATCH):
        chunk = range(start, min(start + SAMPLING_BATCH, len(prompts)))
        ids = [tokenizer(format_prompt(tokenizer, prompts[i], chat), add_special_tokens=False)["input_ids"]
               for i in chunk]
        answers += [episode.response.strip() for episode in sampler.generate(ids, [episode_seed(seed, 0, i)
                                                                                    for i in chunk])]
    return answers


def file_answers(path: str, prompts: list[str]) -> list[str]:
    """The answers of a JSONL file of {prompt, response} to `prompts`; DataError naming a line or a prompt."""
    by_prompt = {}
    for row in iter_rows(path, ["prompt", "response"], format="jsonl"):
        if row.values is None:
            raise DataError(f"{row.where}: {row.problem}")
        if not isinstance(row.values.get("prompt"), str) or not isinstance(row.values.get("response"), str):
            raise DataError(f"{row.where}: expected text fields 'prompt' and 'response'")
        by_prompt[row.values["prompt"]] = row.values["response"]
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
        raise DataError(f"{path}: no answer to {len(missing)} of the study's {len(prompts)} prompts, "
                        f"the first {missing[0][:80]!r}")
    return [by_prompt[p] for p in prompts]


def answers_of(side: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    if side.endswith(".jsonl"):
        if not Path(side).is_file():
            raise DataError(f"{side}: answers file not found")
        return file_answers(side, prompts)
    return model_answers(side_policy(side), prompts, max_new_tokens, temperature, seed)


def study_items(prompts: list[str], answers_a: list[str], answers_b: list[str], seed: int) -> list[dict]:
    """One item per prompt; which model's answer is shown as A is drawn per item and recorded in meta."""
    rng = random.Random(seed)
    items = []
    for index, (prompt, a, b) in enumerate(zip(prompts, answers_a, answers_b, strict=True)):
        first = rng.choice("ab")
        shown = (a, b) if first == "a" else (b, a)
        items.append({"prompt": prompt, "response_a": shown[0], "response_b": shown[1],
                      "meta": {"first": first, "prompt_index": index}})
    return items


def format_results(results: dict) -> str:
    """The lines `rlhf-ray study results` prints."""
    models = results["models"]
    lines = [f"study {results['study']}: {models.get('a', 'a')} (a) vs {models.get('b', 'b')} (b); "
             f"{results['labels']} judgements of {results['items']} items"
             + ("" if results["complete"] else " (not complete)")]
    rate = results["win_rate"]
    if rate is None:
        return "\n".join(lines + ["no judgements yet"])
    lines.append(f"win rate of a: {rate['rate']:.3f} (95% Wilson interval {rate['low']:.3f}-{rate['high']:.3f}); "
                 f"{rate['wins']} wins, {rate['losses']} losses, {rate['ties']} ties (a tie counts 1/2)")
    for name, counts in results["per_annotator"].items():
        lines.append(f"  {name}: {counts['win']} wins, {counts['loss']} losses, {counts['tie']} ties")
    for pair in results["agreement"]:
        kappa = "undefined" if pair["kappa"] is None else f"{pair['kappa']:.3f}"
        lines.append(f"  agreement {' & '.join(pair['annotators'])}: {pair['agreed']}/{pair['items']} items, "
                     f"Cohen's kappa {kappa}")
    return "\n".join(lines)
