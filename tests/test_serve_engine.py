"""The server's batched generation engine: same tokens as `generate`, per-row settings, stop strings,
seeds, incremental text. No Ray."""

import pytest
import torch

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.engine import (
    GenerationEngine, GenerationRequest, IncrementalDetokenizer, find_stop, stop_prefix_length,
)

PROMPTS = ["the movie was", "my day is very", "i think", "our team"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def engine(request):
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    model, tokenizer = build_tiny_model(request.param, seed=1)
    return GenerationEngine(model, tokenizer)


def request_for(engine, prompt, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    return GenerationRequest(tuple(engine.encode(prompt)), **kwargs)


def test_greedy_rows_equal_model_generate(engine):
    tokenizer = engine.tokenizer
    generations = engine.generate([request_for(engine, p, temperature=0) for p in PROMPTS])
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    out = engine.model.generate(**encoded, max_new_tokens=10, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for generation, row in zip(generations, out[:, encoded["input_ids"].shape[1]:].tolist()):
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
            assert generation.finish_reason == "stop"
        else:
            assert generation.finish_reason == "length" and generation.completion_tokens == 10
        assert generation.text.strip() == tokenizer.decode(row, skip_special_tokens=True)


def test_a_seeded_row_does_not_depend_on_its_batch(engine):
    alone = engine.generate([request_for(engine, PROMPTS[0], seed=42, temperature=1.3, top_p=0.9)])[0]
    others = [request_for(engine, p, seed=i, temperature=0.7, max_new_tokens=4 + i) for i, p in enumerate(PROMPTS)]
    together = engine.generate(others[:2] + [request_for(engine, PROMPTS[0], seed=42, temperature=1.3, top_p=0.9)]
                               + others[2:])[2]
    assert together == alone


def test_other_seed_other_text(engine):
    texts = {engine.generate([request_for(engine, PROMPTS[0], seed=s, max_new_tokens=12)])[0].text for s in range(4)}
    assert len(texts) > 1


def test_each_row_keeps_its_own_token_budget(engine):
    budgets = [1, 3, 7]
    generations = engine.generate([request_for(engine, PROMPTS[0], seed=i, max_new_tokens=b)
                                   for i, b in enumerate(budgets)])
    for generation, budget in zip(generations, budgets):
        if generation.finish_reason == "length":
            assert generation.completion_tokens == budget
        else:  # EOS came first
            assert generation.completion_tokens <= budget


def test_stop_string_cuts_the_text_and_finishes_with_stop(engine):
    full = engine.generate([request_for(engine, PROMPTS[1], temperature=0, max_new_tokens=12)])[0].text
    words = full.split()
    stop = " " + words[2]  # the third word, with its space: the text ends before it
    cut = engine.generate([request_for(engine, PROMPTS[1], temperature=0, max_new_tokens=12, stop=(stop,))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]


def test_streamed_deltas_add_up_to_the_text_and_never_show_a_stop_string(engine):
    full = engine.generate([request_for(engine, PROMPTS[1], temperature=0, max_new_tokens=12)])[0].text
    stop = " " + full.split()[3]
    request = request_for(engine, PROMPTS[1], temperature=0, max_new_tokens=12, stop=(stop,))
    shown = ""
    for deltas in engine.stream([request]):
        shown += deltas[0].text if deltas[0] else ""
        assert stop not in shown
    assert shown == engine.generate([request])[0].text == full[:full.index(stop)]


def test_stream_yields_none_for_rows_already_finished(engine):
    steps = list(engine.stream([request_for(engine, PROMPTS[0], max_new_tokens=2, seed=1),
                                request_for(engine, PROMPTS[0], max_new_tokens=5, seed=2)]))
    finished_at = next(i for i, deltas in enumerate(steps) if deltas[0].finish_reason)
    assert all(deltas[0] is None for deltas in steps[finished_at + 1:])
    assert steps[-1][1].finish_reason is not None


def test_prompt_that_does_not_fit_the_context_is_refused(engine):
    too_long = GenerationRequest(tuple([3] * engine.context_length), max_new_tokens=1)
    with pytest.raises(ValueError, match="exceed the context"):
        list(engine.stream([too_long]))


def test_chat_prompt_without_a_template_joins_roles(engine):
    prompt = engine.chat_prompt([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}])
    assert prompt == "system: be kind\nuser: hi\nassistant:"


def test_chat_prompt_uses_the_tokenizer_template_when_there_is_one(engine, monkeypatch):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    monkeypatch.setattr(engine.tokenizer, "chat_template", template, raising=False)
    assert engine.chat_prompt([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"


def test_stop_helpers():
    assert find_stop("abc def", ("de", "c"), 0) == 2
    assert find_stop("abc def", ("de",), 5) == -1
    assert stop_prefix_length("the mov", ("movie",)) == 3
    assert stop_prefix_length("the mov", ("x",)) == 0


def test_incremental_detokenizer_waits_for_whole_characters():
    class ByteTokenizer:  # decodes ids as UTF-8 bytes: one character may take several ids
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    detokenizer = IncrementalDetokenizer(ByteTokenizer(), tuple(b"ab"))
    pieces = [detokenizer.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_the_serving_engine_loads_neither_gymnasium_nor_the_environments():
    """A Serve replica imports the engine: the sampling math lives in `rlhf_ray.sampling`, not beside the env."""
    import subprocess
    import sys

    code = ("import sys, rlhf_ray.serve.engine, rlhf_ray.serve.app; "
            "print(sorted(m for m in ('gymnasium', 'envs', 'envs.vector') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
