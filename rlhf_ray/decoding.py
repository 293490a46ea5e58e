"""The one decoder: the model side of batched decoding, shared by the rollout sampler and the policy server.

`DecodeBatch` holds B sequences decoded together: a preallocated KV cache that sequences join and leave
while the others go on (continuous batching), ready-made attention masks and each row's next position.
The rollout sampler (`rlhf_ray.rollout.sampler`) steps it for the environment's episodes, the server's
engine (`rlhf_ray.serve.engine`) for requests that arrive while others are being answered. What a
sequence's next token is (`rlhf_ray.sampling`) and where it ends are the caller's: this module only
turns tokens into next-token logits. Torch and numpy only: no Ray, no gymnasium.
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


def moved_columns(old: torch.Tensor, dim: int, capacity: int, first: int, length: int,
                  after: int | None = None) -> torch.Tensor:
    """A copy of the first `length` columns (along `dim`) of `old` in a tensor of `capacity` columns whose
    column 0 is the old column `first`: a positive `first` forgets the columns before it, a negative one adds
    -first zero columns on the left. Zeros, not uninitialised memory: a masked position of a KV cache still
    multiplies its value by a weight of 0. `after`: the value of the columns past the copied ones (None: left
    uninitialised, to be written before they are read)."""
    shape = list(old.shape)
    shape[dim] = capacity
    new = old.new_empty(shape)
    left, keep = max(-first, 0), length - max(first, 0)
    new.narrow(dim, 0, left).zero_()
    new.narrow(dim, left, keep).copy_(old.narrow(dim, max(first, 0), keep))
    if after is not None:
        new.narrow(dim, left + keep, capacity - left - keep).fill_(after)
    return new


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers with room for more positions: a step
        writes its new positions in place instead of copying the whole cache with `torch.cat` (a copy per
        layer per step that grows with the sequence)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity  # positions the buffers hold

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

        def start_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Begin with these (k, H, L, D) keys and values as columns [0, L) (copied)."""
            self.device = keys.device
            self._key_buffer = keys.new_empty((*keys.shape[:2], self.capacity, keys.shape[-1]))
            self._value_buffer = values.new_empty((*values.shape[:2], self.capacity, values.shape[-1]))
            self._key_buffer[:, :, :keys.shape[-2]] = keys
            self._value_buffer[:, :, :values.shape[-2]] = values
            self.length, self.is_initialized = keys.shape[-2], True
            self._refresh_views()

        def add_columns(self, width: int) -> None:
            """`width` more columns after the last one, zero in every row (`write_rows` fills some rows')."""
            end = self.length + width
            self._key_buffer[:, :, self.length:end] = 0
            self._value_buffer[:, :, self.length:end] = 0
            self.length = end
            self._refresh_views()

        def write_rows(self, rows: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Copy another cache's (k, H, w, D) keys and values into `rows`, columns [start, start + w)."""
            end = start + keys.shape[-2]
            self._key_buffer[rows, :, start:end] = keys
            self._value_buffer[rows, :, start:end] = values

        def gather_columns(self, index: torch.Tensor, keep: torch.Tensor) -> None:
            """Column j of row b becomes the old column index[b, j] (B, W), zero where `keep` (B, W) is False."""
            width = index.shape[1]
            for name in ("_key_buffer", "_value_buffer"):
                buffer = getattr(self, name)
                heads, dim = buffer.shape[1], buffer.shape[3]
                moved = torch.gather(buffer[:, :, :self.length], 2, index[:, None, :, None].expand(-1, heads, -1, dim))
                buffer[:, :, :width] = moved * keep[:, None, :, None].to(moved.dtype)
            self.length = width
            self._refresh_views()

        def resize(self, capacity: int, first: int) -> None:
            """Buffers of `capacity` positions whose column 0 is the old column `first` (`moved_columns`)."""
            for name in ("_key_buffer", "_value_buffer"):
                setattr(self, name, moved_columns(getattr(self, name), 2, capacity, first, self.length))
            self.capacity, self.length = capacity, self.length - first
            self._refresh_views()

        def keep_rows(self, rows: torch.Tensor) -> None:
            """Keep only the batch rows `rows`, in that order."""
            self._key_buffer, self._value_buffer = self._key_buffer[rows], self._value_buffer[rows]
            self._refresh_views()

        def add_rows(self, count: int) -> None:
            """`count` more rows at the end, zero (their real tokens are written by `write_rows`)."""
            self._key_buffer, self._value_buffer = (
                torch.cat([b, b.new_zeros((count, *b.shape[1:]))]) for b in (self._key_buffer, self._value_buffer))
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
    """The model side of B sequences decoded together: KV cache, attention mask and next positions.

    Columns are shared by all rows (column j of every row's cache was written by the same forward pass);
    a row's real tokens are the columns its mask marks. A row is live from its prompt until the caller
    `retire`s it, and `extend` appends tokens it did not sample (a multi-turn environment's) to it; a retired
    row is filler (decoded with the others, never read) until `refill` puts a new prompt into it or
    `keep_rows` drops it; `add_rows` makes more rows. `refill` prefills new prompts in a
    forward pass of their own and copies their keys and values into the rows, right-aligned to the last
    column written, so they continue with the next decoding step like the others; a prompt wider than the
    columns written shifts the batch to the right. The cache holds `capacity` columns to begin with; when
    it is full, the leading columns no live row attends to are dropped, and it grows (doubling, up to
    `max_capacity`) when that would leave it more than three quarters full. Models whose cache layers are
    not plain full-attention layers (sliding windows...) take no new rows once started (`refillable` is
    False).
    """

    def __init__(self, model, pad_id: int, capacity: int, max_capacity: int | None = None):
        self.model, self.pad_id = model, pad_id
        self.capacity = capacity  # columns of the next `prefill`'s cache
        self.max_capacity = max(capacity, max_capacity or capacity)
        params = forward_parameters(type(model))
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are sampled from: skips the (B, P, V) output layer in the prefill,
        # as HF `generate` does
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.ready_mask = takes_ready_decode_mask(model)
        self.device = next(model.parameters()).device
        self.rows, self.length = 0, 0  # rows and columns of the batch; 0 until `prefill`

    @functools.cached_property
    def refillable(self) -> bool:
        """Whether rows can join once the batch has started (the model's cache layers are plain ones)."""
        return preallocated_cache(self.model, 1) is not None

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache}, **self.extra)
        cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return out.logits[:, -1, :].float(), cache  # (B, V)

    def prefill(self, prompt_ids: list, capacity: int | None = None) -> torch.Tensor:
        """Start a new batch, one row per prompt (whatever the batch held is gone); the next-token logits
        (B, V). `capacity`: columns of its cache (default: the constructor's)."""
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (B, P)
        batch, width = input_ids.shape
        self.capacity = max(capacity or self.capacity, width)
        self.max_capacity = max(self.max_capacity, self.capacity)
        # The mask of the whole cache, allocated once: step t attends to a view of the first columns instead
        # of a new tensor from torch.cat every step. Columns to the right of a row's prompt are 1: decoding
        # steps fill them. Retired rows keep attending; their filler tokens are never read.
        self.mask = torch.ones((batch, self.capacity), dtype=torch.long, device=self.device)  # (B, C)
        self.mask[:, :width] = prompt_mask
        self._mask_changed()
        lengths = prompt_mask.sum(-1)  # (B,)
        self.start = (width - lengths).numpy()  # (B,) first column of each row's tokens
        self.live = np.ones(batch, dtype=bool)  # (B,) rows whose sequence goes on
        self.next_position = lengths.to(self.device)  # (B,) position id of each row's next token
        self.rows, self.length = batch, width
        cache = preallocated_cache(self.model, self.capacity)
        self.__dict__["refillable"] = cache is not None  # known now: `refillable` need not build a cache to tell
        logits, self.cache = self._forward(input_ids.to(self.device), prompt_mask.to(self.device),
                                           position_ids_from_mask(prompt_mask).to(self.device), cache)
        return logits

    def _mask_changed(self) -> None:
        # Under SDPA a one-token step of a plain causal model takes this boolean (B, 1, 1, C) mask as is,
        # where the model would rebuild it from the 2D mask every step.
        self.mask_4d = self.mask.bool()[:, None, None, :] if self.ready_mask else None

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step: every row's token (B,) in, the next-token logits (B, V) out."""
        self._reserve(1)
        width = self.length + 1
        mask = self.mask_4d[..., :width] if self.mask_4d is not None else self.mask[:, :width]
        logits, self.cache = self._forward(tokens[:, None], mask, self.next_position[:, None], self.cache)
        self.length = width
        self.next_position += 1
        return logits

    def refill(self, rows: np.ndarray, prompt_ids: list) -> torch.Tensor:
        """Start new sequences in `rows` (retired ones); their next-token logits (k, V)."""
        if not self.refillable:
            raise RuntimeError("this model's KV cache cannot take new rows once a batch has started")
        rows = np.asarray(rows, dtype=np.int64)
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (k, w)
        width = input_ids.shape[1]
        self.live[rows] = False
        self._reserve(0, width)
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
        self.start[rows] = self.length - lengths.cpu().numpy()
        self.live[rows] = True
        self.next_position[index] = lengths
        return logits

    def extend(self, rows: np.ndarray, token_ids: list) -> torch.Tensor:
        """Append tokens that were not sampled (the environment's: a user's reply, a tool's output, the next
        turn's header) to the live sequences in `rows`; their next-token logits (k, V).

        What the rows' cache holds stays: one forward pass over the new tokens of these rows alone, on a copy
        of their cache, whose new keys and values are written back. The new tokens are right-aligned to the
        new last column, like `refill`'s prompts; the new columns are holes in the other rows' masks, which go
        on with their next decoding step as before."""
        if not self.refillable:
            raise RuntimeError("this model's KV cache cannot take tokens into a row once a batch has started")
        rows = np.asarray(rows, dtype=np.int64)
        if not self.live[rows].all():
            raise ValueError(f"extend: rows {rows[~self.live[rows]].tolist()} are not live (retired or filler)")
        new_ids, new_mask = left_pad(token_ids, self.pad_id)  # (k, W)
        width = new_ids.shape[1]
        self._reserve(width)
        old, index, new_mask = self.length, torch.as_tensor(rows, device=self.device), new_mask.to(self.device)
        cache = preallocated_cache(self.model, old + width)
        for mine, layer in zip(cache.layers, self.cache.layers):
            mine.start_from(layer.keys[index], layer.values[index])  # (k, H, old, D)
        mask = torch.cat([self.mask[index, :old], new_mask], dim=1)  # (k, old + W)
        positions = (self.next_position[index, None] + new_mask.cumsum(-1) - 1).clamp(min=0)  # (k, W)
        logits, cache = self._forward(new_ids.to(self.device), mask, positions, cache)
        for layer, mine in zip(self.cache.layers, cache.layers):
            layer.add_columns(width)
            layer.write_rows(index, old, mine.keys[:, :, old:], mine.values[:, :, old:])
        self.mask[:, old:old + width] = 0
        self.mask[index, old:old + width] = new_mask
        self._mask_changed()
        self.next_position[index] += new_mask.sum(-1)
        self.length = old + width
        return logits

    def add_rows(self, count: int) -> np.ndarray:
        """`count` more rows at the end of the batch, retired until `refill` starts sequences in them; their
        indices."""
        if not self.refillable:
            raise RuntimeError("this model's KV cache cannot take new rows once a batch has started")
        for layer in self.cache.layers:
            layer.add_rows(count)
        self.mask = torch.cat([self.mask, self.mask.new_zeros((count, self.capacity))])
        self._mask_changed()
        self.start = np.concatenate([self.start, np.zeros(count, dtype=self.start.dtype)])
        self.live = np.concatenate([self.live, np.zeros(count, dtype=bool)])
        self.next_position = torch.cat([self.next_position, self.next_position.new_zeros(count)])
        self.rows += count
        return np.arange(self.rows - count, self.rows)

    def retire(self, rows: np.ndarray) -> None:
        """Rows whose sequence ended: their columns may be dropped, and they are filler until refilled.
        Their positions restart at 0, so that a filler row's positions stay within the model's table."""
        self.live[rows] = False
        self.next_position[torch.as_tensor(rows, device=self.device)] = 0

    def keep_rows(self, rows: np.ndarray) -> None:
        """Go on with the batch rows `rows` only, in that order (the others have ended)."""
        index = torch.as_tensor(rows, device=self.device)
        for layer in self.cache.layers:
            layer.keep_rows(index)
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        self.start, self.live = self.start[rows], self.live[rows]
        self.rows = len(rows)
        if self.mask_4d is not None:
            self.mask_4d = self.mask_4d[index]

    def _holes(self) -> bool:
        """Whether a quarter or more of the live rows' columns are holes (`extend`s of other rows)."""
        live = np.flatnonzero(self.live)
        if not live.size:
            return False
        span = int((self.length - self.start[live]).sum())
        real = int(self.mask[torch.as_tensor(live, device=self.device), :self.length].sum())
        return (span - real) * 4 >= span

    def _compact(self) -> None:
        """Drop the holes: each row's real columns move right-aligned, in order, to as few columns as the
        longest row needs. Exact: a cached key holds its own position (absolute or rotary) already, and
        attention does not depend on where a column sits. A filler row keeps its last column."""
        length = self.length
        real = self.mask[:, :length].bool().clone()  # (B, L)
        filler = torch.as_tensor(~self.live, device=self.device)
        real[filler] = False
        real[filler, length - 1] = True
        counts = real.sum(-1)  # (B,)
        width = int(counts.max())
        columns = torch.arange(length, device=self.device).expand_as(real)
        # the real columns of each row in order, right-aligned: sort keys put holes first, then real columns
        order = torch.argsort(torch.where(real, columns + length, columns), dim=1, stable=True)[:, length - width:]
        keep = torch.arange(width, device=self.device)[None, :] >= (width - counts)[:, None]  # (B, W)
        for layer in self.cache.layers:
            layer.gather_columns(order, keep)
        self.mask[:, :width] = keep.long()
        self.mask[:, width:] = 1  # as in `prefill`: decoding steps fill the columns to the right
        self._mask_changed()
        self.start = (width - counts).cpu().numpy()
        self.length = width

    def _reserve(self, right: int, width: int = 0) -> None:
        """Make room for `right` more columns after the last one written and for a prompt of `width` columns
        that ends at it: drop the holes of `extend` when they are many, drop the leading columns no live row
        attends to, shift the batch right, or grow."""
        if self.length + right <= self.capacity and width <= self.length:
            return
        if self._holes():
            self._compact()
            if self.length + right <= self.capacity and width <= self.length:
                return
        live_starts = self.start[self.live]
        dead = int(min(live_starts.min(), self.length)) if live_starts.size else self.length
        first = min(dead, self.length - width)  # the column that becomes column 0 (< 0: new columns on the left)
        needed = self.length - first + right
        capacity = self.capacity
        if needed > capacity * 3 // 4:  # keep a quarter free, so that the next resize is far off
            capacity = min(self.max_capacity, max(2 * capacity, needed))
        if needed > capacity:
            raise RuntimeError(f"the KV cache holds at most {self.max_capacity} positions and its live rows "
                               f"need {needed}")
        for layer in self.cache.layers:
            layer.resize(capacity, first)
        # columns to the right of the last one written are 1, as in `prefill`: decoding steps fill them
        self.mask = moved_columns(self.mask, 1, capacity, first, self.length, after=1)
        self._mask_changed()
        self.start -= first
        self.capacity, self.length = capacity, self.length - first
