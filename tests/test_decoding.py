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


def test_tokens_the_environment_appends_to_live_rows_give_the_logits_of_each_whole_conversation(tiny):
    """Multi-turn: a row's turn ends, the environment's tokens (a user's reply, a tool's output) go into its
    cache with one forward pass over them alone, and decoding goes on; every row's logits at every step equal
    a forward pass over its whole conversation from scratch, whichever rows were extended."""
    model, tokenizer = tiny
    batch = DecodeBatch(model, tokenizer.pad_token_id, capacity=8, max_capacity=256)
    sequences = [prompt(3, 0), prompt(6, 1), prompt(4, 2)]
    checked = 0
    with torch.inference_mode():
        logits = batch.prefill(sequences)

        def step():
            nonlocal logits, checked
            for row, sequence in enumerate(sequences):
                torch.testing.assert_close(logits[row], alone(model, sequence), rtol=1e-4, atol=1e-4)
                checked += 1
            tokens = torch.argmax(logits, dim=-1)
            for row, sequence in enumerate(sequences):
                sequence.append(int(tokens[row]))
            logits = batch.decode(tokens)

        def environment(rows: list[int], replies: list[list[int]]):
            nonlocal logits
            for row, reply in zip(rows, replies):
                sequences[row].extend(reply)
            logits[rows] = batch.extend(np.array(rows), replies)

        for _ in range(2):
            step()
        environment([0], [prompt(5, 3)])  # one row's turn ends; the others are mid-turn
        step()
        environment([2, 1], [prompt(2, 4), prompt(11, 5)])  # two at once, of different lengths (holes for 2)
        for _ in range(3):
            step()
        environment([0], [prompt(1, 6)])
        for _ in range(12):  # the cache grows and drops columns nobody attends to
            step()
        batch.retire(np.array([1]))
        with pytest.raises(ValueError, match=r"rows \[1\] are not live"):
            batch.extend(np.array([1]), [prompt(2, 7)])
    assert checked == 3 * 18 and batch.capacity > 8


def test_holes_left_by_extends_are_compacted_and_every_row_keeps_its_logits(tiny):
    """Rows answered at different steps leave holes in each other's columns; when the cache is full and a
    quarter of the live columns are holes, `DecodeBatch` moves each row's columns together (positions are in
    the cached keys already), so the cache stays as wide as the longest conversation, and the logits of every
    row still equal a forward pass over its whole conversation. A retired row stays filler through it."""
    model, tokenizer = tiny
    batch = DecodeBatch(model, tokenizer.pad_token_id, capacity=16, max_capacity=96)
    sequences = [prompt(3, 0), prompt(4, 1), prompt(5, 2), prompt(2, 3)]
    appended = 0
    with torch.inference_mode():
        logits = batch.prefill(sequences)
        for step in range(24):
            for row, sequence in enumerate(sequences):
                if row != 3 or step < 2:
                    torch.testing.assert_close(logits[row], alone(model, sequence), rtol=1e-4, atol=1e-4)
            tokens = torch.argmax(logits, dim=-1)
            for row, sequence in enumerate(sequences):
                sequence.append(int(tokens[row]))
            if step == 2:
                batch.retire(np.array([3]))  # filler from now on
            logits = batch.decode(tokens)
            row = step % 3  # one row answered each step: every extend is a hole in the two others
            reply = prompt(4, 10 + step)
            sequences[row].extend(reply)
            appended += len(reply)
            logits[row] = batch.extend(np.array([row]), [reply])[0]
        longest = max(len(s) for s in sequences[:3])
    # without compaction the columns would hold every row's replies: the prompts, 24 steps and 96 appended
    # tokens, more than max_capacity
    assert longest <= batch.length <= 96 < 5 + 24 + appended
