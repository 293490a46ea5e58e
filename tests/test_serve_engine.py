"""The server's batched generation engine: same tokens as `generate`, per-row settings, stop strings,
seeds, incremental text. No Ray."""

import pytest
import torch

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.engine import GenerationEngine, GenerationRequest
from rlhf_ray.serve.text import IncrementalDetokenizer, find_stop, stop_prefix_length

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


def test_requests_joining_a_running_batch_get_what_they_get_alone(engine):
    """Continuous batching: at most 2 rows, 5 requests of other lengths, settings and budgets; each request's
    tokens are those it gets on its own."""
    requests = [request_for(engine, PROMPTS[i % 4] + " x" * i, seed=10 + i, max_new_tokens=3 + 4 * i,
                            temperature=[0, 0.8, 1.0, 1.5, 0][i], top_p=[1.0, 0.9, 1.0, 0.8, 1.0][i])
                for i in range(5)]
    alone = [engine.generate([r])[0] for r in requests]
    engine.max_rows = 2
    try:
        together = engine.generate(requests)
    finally:
        engine.max_rows = 16
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert together == alone


def test_a_request_joins_at_the_next_step_and_one_that_leaves_frees_its_row(engine):
    first = request_for(engine, PROMPTS[0], seed=1, max_new_tokens=20)
    second = request_for(engine, PROMPTS[1], seed=2, max_new_tokens=6)
    engine.step([("a", first)])
    engine.step()
    deltas = engine.step([("b", second)])  # joins while "a" runs
    assert [key for key, _ in deltas] == ["a", "b"] and engine.running == 2
    deltas = engine.step(leaving=["a"])
    assert [key for key, _ in deltas] == ["b"] and engine.running == 1
    while engine.running:
        engine.step()
    assert engine.step() == []


def test_the_server_and_the_rollout_sampler_make_the_same_completion_from_the_same_seed(engine):
    """One seed derivation and one draw: a request with `seed` s is the rollout episode of run seed s,
    iteration 0, prompt 0 (choice 0), for the same model and settings."""
    from rlhf_ray.rollout.sampler import Sampler, SamplingParams
    from rlhf_ray.sampling import episode_seed

    prompt_ids = tuple(engine.encode(PROMPTS[2]))
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        request = GenerationRequest(prompt_ids, 12, temperature, top_p, seed=episode_seed(1234, 0, 0))
        served = engine.generate([request])[0]
        sampler = Sampler(engine.model, engine.tokenizer, lambda p, r: [0.0] * len(p),
                          SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p))
        episode = sampler.generate([list(prompt_ids)], [episode_seed(1234, 0, 0)])[0]
        assert list(served.token_ids) == episode.response_ids.tolist()
        assert served.finish_reason == ("stop" if episode.eos else "length")


def test_an_end_of_turn_token_of_the_generation_config_ends_responses_and_episodes(engine):
    """One definition of where a response ends: the tokenizer's EOS and the model's end-of-turn ids."""
    from rlhf_ray.rollout.sampler import Sampler, SamplingParams

    request = request_for(engine, PROMPTS[3], temperature=0, max_new_tokens=12)
    first_token = engine.generate([request])[0].token_ids[0]
    model, tokenizer = engine.model, engine.tokenizer
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first_token]  # a chat model's <|im_end|>
    try:
        turn_engine = GenerationEngine(model, tokenizer)
        served = turn_engine.generate([request])[0]
        episode = Sampler(model, tokenizer, lambda p, r: [0.0] * len(p),
                          SamplingParams(max_new_tokens=12, greedy=True)).generate([list(request.prompt_ids)], [0])[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert served.token_ids == (first_token,) and served.finish_reason == "stop" and served.text == ""
    assert episode.response_ids.tolist() == [first_token] and episode.eos


def test_a_sliding_window_model_takes_new_requests_only_between_batches():
    """Sliding-window cache layers cannot take rows mid-flight (`DecodeBatch.refillable` is False): requests
    wait for the running batch to end, and each still gets what it gets alone."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from rlhf_ray.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=8, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    engine = GenerationEngine(AutoModelForCausalLM.from_config(config).eval(), tokenizer, max_rows=2)
    assert not engine.batch.refillable
    requests = [request_for(engine, prompt, temperature=0, max_new_tokens=n)
                for prompt, n in [("the movie was", 20), ("our team", 5), ("i think", 12)]]
    alone = [engine.generate([r])[0] for r in requests]
    engine.step([("a", requests[0])])
    assert engine.free_rows() == 0  # one row is free, but the cache cannot take it
    while engine.running:
        engine.step()
    assert engine.generate(requests) == alone
