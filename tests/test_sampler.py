"""The KV-cache sampler: same tokens as `generate`, log-probs as a fresh forward pass, seeded episodes."""

import sys

import numpy as np
import pytest
import torch

from envs.builtin import BUILTIN_PROMPTS, sentiment_reward
from rlhf_ray.decoding import keep_freed_memory
from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.forward import pack_episodes, response_logprobs
from rlhf_ray.rollout.sampler import Sampler, SamplingParams
from rlhf_ray.sampling import argmax_rows, episode_seed, filter_top_k_top_p, inverse_cdf_sample


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    model, tokenizer = build_tiny_model(request.param, seed=1)
    return model, tokenizer


def encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def seeds_for(n, run_seed=0):
    return [episode_seed(run_seed, 0, i) for i in range(n)]


def test_greedy_matches_model_generate(tiny):
    model, tokenizer = tiny
    prompts = BUILTIN_PROMPTS[:6]
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=10, greedy=True))
    episodes = sampler.generate(encode(tokenizer, prompts), seeds_for(len(prompts)))

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    generated = out[:, enc["input_ids"].shape[1]:]
    for episode, row in zip(episodes, generated.tolist()):
        expected = row[: len(episode.response_ids)]
        assert episode.response_ids.tolist() == expected
        if episode.eos:
            assert expected[-1] == tokenizer.eos_token_id
        else:
            assert len(episode.response_ids) == 10 and tokenizer.eos_token_id not in expected


@pytest.mark.parametrize("params,max_batch", [
    (SamplingParams(max_new_tokens=12, temperature=0.7), None),
    (SamplingParams(max_new_tokens=12, temperature=1.3, top_k=8, top_p=0.9), None),
    (SamplingParams(max_new_tokens=10, temperature=4.0), 2),  # continuous batching: 8 episodes through 2 rows
])
def test_behaviour_logprobs_equal_a_fresh_forward_pass(tiny, params, max_batch):
    model, tokenizer = tiny
    prompts = BUILTIN_PROMPTS[:8]
    episodes = Sampler(model, tokenizer, sentiment_reward, params, max_batch=max_batch).generate(
        encode(tokenizer, prompts), seeds_for(len(prompts)))
    batch = pack_episodes([e.prompt_ids for e in episodes], [e.response_ids for e in episodes],
                          tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = response_logprobs(model, batch, temperature=params.temperature)
    for row, episode in enumerate(episodes):
        n = len(episode.response_ids)
        torch.testing.assert_close(torch.as_tensor(episode.behaviour_logprobs), fresh[row, :n],
                                   atol=1e-5, rtol=0)


def test_episodes_do_not_depend_on_how_prompts_are_split(tiny):
    model, tokenizer = tiny
    prompts = BUILTIN_PROMPTS[:6]
    ids, seeds = encode(tokenizer, prompts), seeds_for(len(prompts), run_seed=7)
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=12, temperature=1.5))
    whole = sampler.generate(ids, seeds)
    split = sampler.generate(ids[4:], seeds[4:]) + sampler.generate(ids[:4], seeds[:4])
    split = split[2:] + split[:2]
    assert [e.response_ids.tolist() for e in whole] == [e.response_ids.tolist() for e in split]


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=5.0),  # hot: EOS is likely, so rows free up at different steps
    SamplingParams(max_new_tokens=12, temperature=5.0, top_k=45, top_p=0.98),
    SamplingParams(max_new_tokens=12, greedy=True),
])
def test_continuous_batching_gives_the_episodes_of_one_static_batch(tiny, params):
    model, tokenizer = tiny
    prompts = (BUILTIN_PROMPTS * 3)[:20]
    ids, seeds = encode(tokenizer, prompts), seeds_for(len(prompts), run_seed=3)
    static = Sampler(model, tokenizer, sentiment_reward, params).generate(ids, seeds)
    lengths = [len(e.response_ids) for e in static]
    if not params.greedy:  # the case this test is about: episodes end at different steps
        assert min(lengths) < max(lengths)
    # 20 episodes through 3 rows: rows are refilled many times and, with the cache full, its oldest
    # columns are dropped (capacity 2 x (prompt + response) columns < the ~80 steps taken)
    for max_batch in (3, 7):
        continuous = Sampler(model, tokenizer, sentiment_reward, params, max_batch=max_batch).generate(ids, seeds)
        assert [e.response_ids.tolist() for e in continuous] == [e.response_ids.tolist() for e in static]
        assert [(e.eos, e.reward, e.prompt, e.response) for e in continuous] == [
            (e.eos, e.reward, e.prompt, e.response) for e in static]
        for a, b in zip(continuous, static):
            torch.testing.assert_close(torch.as_tensor(a.behaviour_logprobs), torch.as_tensor(b.behaviour_logprobs),
                                       atol=1e-5, rtol=0)


def test_same_seed_same_episode_other_seed_other_episode(tiny):
    model, tokenizer = tiny
    ids = encode(tokenizer, ["the movie was"] * 2)
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=16, temperature=2.0))
    a, b = sampler.generate(ids, [5, 5])
    c, = sampler.generate(ids[:1], [6])
    assert a.response_ids.tolist() == b.response_ids.tolist()
    assert a.response_ids.tolist() != c.response_ids.tolist()


def test_episodes_end_at_eos_or_budget_and_carry_the_reward(tiny):
    model, tokenizer = tiny
    prompts = BUILTIN_PROMPTS * 2
    # a hot temperature makes EOS (1 of 54 tokens) likely within 16 steps for some episodes
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=16, temperature=5.0))
    episodes = sampler.generate(encode(tokenizer, prompts), seeds_for(len(prompts)))
    assert any(e.eos for e in episodes) and any(not e.eos for e in episodes)
    for e in episodes:
        tokens = e.response_ids.tolist()
        if e.eos:
            assert tokens[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in tokens[:-1]
        else:
            assert len(tokens) == 16 and tokenizer.eos_token_id not in tokens
        assert e.response == tokenizer.decode(tokens, skip_special_tokens=True)
        assert e.reward == pytest.approx(float(sentiment_reward([e.prompt], [e.response])[0]))
        assert len(e.behaviour_logprobs) == len(tokens)


def test_top_k_one_is_greedy(tiny):
    model, tokenizer = tiny
    ids = encode(tokenizer, BUILTIN_PROMPTS[:4])
    greedy = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=8, greedy=True))
    top1 = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=8, top_k=1))
    seeds = seeds_for(4)
    assert ([e.response_ids.tolist() for e in greedy.generate(ids, seeds)]
            == [e.response_ids.tolist() for e in top1.generate(ids, seeds)])


def test_argmax_rows_is_torch_argmax_with_its_first_index_on_ties():
    x = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0))  # blocks of 1024 and a short last one
    x[1, [7, 3000]] = 50.0  # a tie across blocks: the first
    x[2, [1030, 1040]] = 50.0  # a tie within a block
    x[3, 4999] = 50.0  # the very last column, in the short last block
    x[4, 4096] = 50.0  # the first column of the last block
    x[5, :] = 1.0  # all equal
    expected = [int(torch.argmax(x[0])), 7, 1030, 4999, 4096, 0]
    assert argmax_rows(x).tolist() == expected == torch.argmax(x, dim=-1).tolist()
    small = torch.randn(3, 54)
    assert argmax_rows(small).tolist() == torch.argmax(small, dim=-1).tolist()


def test_top_p_keeps_the_smallest_nucleus():
    # sorted probs 0.5, 0.3, 0.15, 0.05: mass before each is 0, 0.5, 0.8, 0.95
    # top_p 0.75 keeps tokens whose mass-before < 0.75: the first two (0.5 + 0.3 >= 0.75)
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = filter_top_k_top_p(probs, top_k=0, top_p=0.75)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5, 0.0, 0.3]]))
    kept = filter_top_k_top_p(probs, top_k=3, top_p=1.0)
    torch.testing.assert_close(kept, torch.tensor([[0.15, 0.5, 0.0, 0.3]]))


def test_inverse_cdf_sample_picks_the_interval_of_the_uniform():
    # cdf of [0.2, 0.0, 0.5, 0.3] is [0.2, 0.2, 0.7, 1.0]
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 4)
    uniforms = torch.tensor([0.1, 0.2, 0.69, 0.99])
    assert inverse_cdf_sample(probs, uniforms).tolist() == [0, 2, 2, 3]


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3]]).repeat(20000, 1)
    uniforms = torch.as_tensor(np.random.default_rng(0).random(20000), dtype=torch.float32)
    counts = torch.bincount(inverse_cdf_sample(probs, uniforms), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


def test_prompt_and_seed_counts_must_match(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        Sampler(model, tokenizer, sentiment_reward).generate([[3], [4]], [0])
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Sampler(model, tokenizer, sentiment_reward, max_batch=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_sets_glibc_malloc_and_sampling_is_unchanged(tiny):
    model, tokenizer = tiny
    ids, seeds = encode(tokenizer, BUILTIN_PROMPTS[:4]), seeds_for(4)
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=8, temperature=1.5))
    before = [e.response_ids.tolist() for e in sampler.generate(ids, seeds)]
    assert keep_freed_memory() is True
    assert [e.response_ids.tolist() for e in sampler.generate(ids, seeds)] == before
