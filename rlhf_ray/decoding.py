"""The model side of batched decoding: padding, a preallocated KV cache that rows can join and leave,
ready-made attention masks, and malloc settings for the per-step (B, V) tensors.

`DecodeBatch` is what the rollout sampler (`rlhf_ray.rollout.sampler`) steps; `left_pad` and
`position_ids_from_mask` are shared with the policy server's engine (`rlhf_ray.serve.engine`).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch


def keep_freed_memory(max_chunk: int = 32 << 20) -> bool:
    """Have glibc's malloc serve blocks of up to `max_chunk` bytes from its heap and keep freed ones.

    Every decoding step allocates and frees (B, V) logits and log-probs (6 MB at B = 32, V = 50k). Past
    glibc's mmap threshold each such block is a fresh mmap, whose pages the kernel zeroes and faults in
    on first touch, on every step: about 20% of a greedy step of a 16M-parameter GPT-2 on CPU. Served from
    the heap, the freed block of one step is the next step's. (Intel's PyTorch CPU tuning guide advises
    jemalloc or tcmalloc for the same reason.) Process-wide: rollout workers and the policy server call it;
    32 MB is the largest threshold glibc accepts on 64-bit. False where this is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, max_chunk)) and bool(mallopt(m_trim_threshold, 4 * max_chunk))


def left_pad(sequences: list[np.ndarray] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) token ids and attention mask of variable-length sequences."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))  # (B,)
    width = int(lengths.max())
    mask = np.arange(width)[None, :] >= (width - lengths)[:, None]  # (B, T) True on real tokens
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    # boolean assignment fills row by row, left to right: the order of the concatenated sequences
    ids[mask] = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences])
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as HF `generate` does for left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# Model types whose forward builds its attention mask with `create_causal_mask` alone (full attention:
# no sliding window, no extra mask functions). Under SDPA, HF's mask for a one-token decoding step is
# then the boolean padding mask as (B, 1, 1, kv), and a 4D mask is used as given: the sampler hands a
# view of one preallocated mask over instead of having the model rebuild it every step.
PLAIN_CAUSAL_MASK_MODEL_TYPES = frozenset({"gpt2", "llama"})


@functools.lru_cache(maxsize=None)
def forward_parameters(model_class: type) -> frozenset[str]:
    """The argument names of a model class's `forward`, looked up once per class, not per call."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def takes_ready_decode_mask(model) -> bool:
    """Whether `model` can be given a prebuilt (B, 1, 1, kv) boolean mask in one-token decoding steps."""
    config = getattr(model, "config", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "model_type", None) in PLAIN_CAUSAL_MASK_MODEL_TYPES)


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers sized for the whole episode: a
        step writes its new positions in place instead of copying the whole cache with `torch.cat`
        (a copy per layer per step that grows with the sequence)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity  # positions the buffers hold: prompt width + max_new_tokens

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                batch, heads, _, key_dim = key_states.shape  # (B, H, T, D)
                self.device = key_states.device
                self._key_buffer = key_states.new_empty((batch, heads, self.capacity, key_dim))
                self._value_buffer = value_states.new_empty(
                    (batch, value_states.shape[1], self.capacity, value_states.shape[-1]))
                self.length = 0
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"the KV cache holds {self.capacity} positions; a step asked for {end}")
            self._key_buffer[:, :, self.length:end] = key_states
            self._value_buffer[:, :, self.length:end] = value_states
            self.length = end
            self._refresh_views()
            return self.keys, self.values

        def _refresh_views(self) -> None:
            self.keys = self._key_buffer[:, :, :self.length]  # (B, H, length, D) views
            self.values = self._value_buffer[:, :, :self.length]

        def write_rows(self, rows: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Copy another cache's (k, H, w, D) keys and values into `rows`, columns [start, start + w)."""
            end = start + keys.shape[-2]
            self._key_buffer[rows, :, start:end] = keys
            self._value_buffer[rows, :, start:end] = values

        def drop_front(self, columns: int) -> None:
            """Forget the first `columns` positions of every row (no row attends to them any more)."""
            keep = self.length - columns
            self._key_buffer[:, :, :keep] = self._key_buffer[:, :, columns:self.length].clone()
            self._value_buffer[:, :, :keep] = self._value_buffer[:, :, columns:self.length].clone()
            self.length = keep
            self._refresh_views()

        def keep_rows(self, rows: torch.Tensor) -> None:
            """Keep only the batch rows `rows`, in that order."""
            self._key_buffer, self._value_buffer = self._key_buffer[rows], self._value_buffer[rows]
            self._refresh_views()

    return PreallocatedLayer


def preallocated_cache(model, capacity: int):
    """A `DynamicCache` for `model` whose layers write into buffers of `capacity` positions, or None
    (the model then makes its own cache) where this transformers version or model has other layers."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=config)
    except (ImportError, TypeError, ValueError, AttributeError):  # older transformers, unusual configs
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):  # sliding window, linear attention...
        return None
    cache.layers = [_preallocated_layer_class()(capacity) for _ in layers]
    return cache


class DecodeBatch:
    """The model side of B episodes decoded together: KV cache, attention mask and next positions.

    Columns are shared by all rows (column j of every row's cache was written by the same forward pass);
    a row's real tokens are the columns its mask marks. `refill` puts a new prompt into a row whose episode
    has ended: the prompt is prefilled in its own forward pass and its keys and values are copied into
    the row, right-aligned to the current last column, so the row continues with the next decoding step.
    When the cache is full, the leading columns no live row attends to are dropped (`capacity` must leave
    room for one prompt and one response beyond the oldest live row's start). Models whose cache layers
    are not plain full-attention layers (sliding windows...) cannot be refilled (`refillable` is False).
    """

    def __init__(self, model, pad_id: int, capacity: int):
        self.model, self.pad_id, self.capacity = model, pad_id, capacity
        params = forward_parameters(type(model))
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are sampled from: skips the (B, P, V) output layer in the prefill,
        # as HF `generate` does
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.ready_mask = takes_ready_decode_mask(model)
        self.cache = preallocated_cache(model, capacity)
        self.refillable = self.cache is not None
        self.device = next(model.parameters()).device

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache}, **self.extra)
        cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return out.logits[:, -1, :].float(), cache  # (B, V)

    def prefill(self, prompt_ids: list) -> torch.Tensor:
        """Start every row with its prompt; the next-token logits (B, V)."""
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (B, P)
        batch, width = input_ids.shape
        # The mask of the whole cache, allocated once: step t attends to a view of the first columns instead
        # of a new tensor from torch.cat every step. Columns to the right of a row's prompt are 1: decoding
        # steps fill them. Rows whose episode ended keep attending; their filler tokens are never read.
        self.mask = torch.ones((batch, self.capacity), dtype=torch.long, device=self.device)  # (B, C)
        self.mask[:, :width] = prompt_mask
        # Under SDPA a one-token step of a plain causal model takes this boolean (B, 1, 1, C) mask as is,
        # where the model would rebuild it from the 2D mask every step.
        self.mask_4d = self.mask.bool()[:, None, None, :] if self.ready_mask else None
        lengths = prompt_mask.sum(-1)  # (B,)
        self.start = (width - lengths).to(self.device)  # (B,) first column of each row's tokens
        self.next_position = lengths.to(self.device)  # (B,) position id of each row's next token
        self.length = width  # columns written
        logits, self.cache = self._forward(input_ids.to(self.device), prompt_mask.to(self.device),
                                           position_ids_from_mask(prompt_mask).to(self.device), self.cache)
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step: every row's token (B,) in, the next-token logits (B, V) out."""
        if self.length == self.capacity:
            self._drop_leading_columns()
        width = self.length + 1
        mask = self.mask_4d[..., :width] if self.mask_4d is not None else self.mask[:, :width]
        logits, self.cache = self._forward(tokens[:, None], mask, self.next_position[:, None], self.cache)
        self.length = width
        self.next_position += 1
        return logits

    def refill(self, rows: np.ndarray, prompt_ids: list) -> torch.Tensor:
        """Start new episodes in `rows` (their old ones have ended); their next-token logits (k, V)."""
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (k, w)
        width = input_ids.shape[1]
        if width > self.length:
            raise ValueError(f"a refilled prompt of {width} tokens does not fit left of column {self.length}")
        prompt_mask = prompt_mask.to(self.device)
        logits, fresh = self._forward(input_ids.to(self.device), prompt_mask, position_ids_from_mask(prompt_mask),
                                      preallocated_cache(self.model, width))
        index = torch.as_tensor(rows, device=self.device)
        first = self.length - width
        for layer, new in zip(self.cache.layers, fresh.layers):
            layer.write_rows(index, first, new.keys, new.values)
        row_mask = torch.ones((len(rows), self.capacity), dtype=torch.long, device=self.device)
        row_mask[:, :first] = 0
        row_mask[:, first:self.length] = prompt_mask
        self.mask[index] = row_mask
        if self.mask_4d is not None:
            self.mask_4d[index] = row_mask.bool()[:, None, None, :]
        lengths = prompt_mask.sum(-1)
        self.start[index] = self.length - lengths
        self.next_position[index] = lengths
        return logits

    def retire(self, rows: np.ndarray) -> None:
        """Rows whose episode ended: their columns may be dropped."""
        self.start[torch.as_tensor(rows, device=self.device)] = self.capacity

    def keep_rows(self, rows: np.ndarray) -> None:
        """Go on with the batch rows `rows` only (the others' episodes have ended)."""
        index = torch.as_tensor(rows, device=self.device)
        for layer in self.cache.layers:
            layer.keep_rows(index)
        self.mask, self.start, self.next_position = self.mask[index], self.start[index], self.next_position[index]
        if self.mask_4d is not None:
            self.mask_4d = self.mask_4d[index]

    def _drop_leading_columns(self) -> None:
        drop = int(self.start.min().clamp(max=self.length))
        if drop == 0:
            raise RuntimeError(f"the KV cache of {self.capacity} positions is full of live tokens")
        for layer in self.cache.layers:
            layer.drop_front(drop)
        keep = self.length - drop
        self.mask[:, :keep] = self.mask[:, drop:self.length].clone()
        self.mask[:, keep:] = 1
        if self.mask_4d is not None:
            self.mask_4d.copy_(self.mask.bool()[:, None, None, :])
        self.start -= drop
        self.length = keep
