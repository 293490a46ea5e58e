"""The one decoder (`DecodeBatch`): rows that join mid-flight, wider prompts, growth and dropped columns give
every row the logits of its own sequence alone."""

import numpy as np
import pytest
import torch

from rlhf_ray.decoding import DecodeBatch
from rlhf_ray.models import build_tiny_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    torch.set_num_threads(1)
    return build_tiny_model(request.param, seed=3)


def alone(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits (V,) of one sequence, from a forward pass over all of it without a cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def prompt(length: int, offset: int) -> list[int]:
    return [5 + (offset * 7 + i * 3) % 40 for i in range(length)]


def test_rows_joining_leaving_and_growing_keep_the_logits_of_each_sequence_alone(tiny):
    model, tokenizer = tiny
    batch = DecodeBatch(model, tokenizer.pad_token_id, capacity=4, max_capacity=256)
    sequences = {0: prompt(3, 0), 1: prompt(5, 1)}  # row -> its tokens so far
    rows = {0: 0, 1: 1}  # sequence -> row
    with torch.inference_mode():
        logits = batch.prefill([sequences[0], sequences[1]])
        checked = 0

        def step():
            nonlocal logits, checked
            for sequence, row in rows.items():
                torch.testing.assert_close(logits[row], alone(model, sequences[sequence]), rtol=1e-4, atol=1e-4)
                checked += 1
            tokens = torch.full((batch.rows,), tokenizer.pad_token_id)
            for sequence, row in rows.items():
                tokens[row] = int(torch.argmax(logits[row]))
                sequences[sequence].append(int(tokens[row]))
            logits = batch.decode(tokens)

        for _ in range(3):
            step()
        # sequence 0 ends; its row takes a prompt wider than every column written so far (the batch shifts right)
        batch.retire(np.array([0]))
        del rows[0]
        sequences[2] = prompt(12, 2)
        assert len(sequences[2]) > batch.length
        logits[0] = batch.refill(np.array([0]), [sequences[2]])[0]
        rows[2] = 0
        # a new row at the end, with a short prompt
        new = batch.add_rows(1)
        sequences[3] = prompt(2, 3)
        logits = torch.cat([logits, batch.refill(new, [sequences[3]])])
        rows[3] = int(new[0])
        for _ in range(20):  # far beyond the first capacity: the cache grows and drops columns
            step()
        assert batch.capacity > 4 and batch.rows == 3
        # sequence 1 ends: go on with rows 0 and 2 only
        batch.retire(np.array([rows.pop(1)]))
        batch.keep_rows(np.array([0, 2]))
        logits = logits[[0, 2]]
        rows = {2: 0, 3: 1}
        for _ in range(5):
            step()
    assert checked == 2 * 3 + 3 * 20 + 2 * 5


def test_a_full_cache_that_cannot_grow_says_so(tiny):
    model, tokenizer = tiny
    batch = DecodeBatch(model, tokenizer.pad_token_id, capacity=6)
    with torch.inference_mode():
        batch.prefill([prompt(4, 0)])
        batch.decode(torch.tensor([7]))
        batch.decode(torch.tensor([7]))
        with pytest.raises(RuntimeError, match="holds at most 6 positions"):
            batch.decode(torch.tensor([7]))
