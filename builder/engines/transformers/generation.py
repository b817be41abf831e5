"""The sampling engine behind the instruction and response stages (transformers models, one batch at a time).

Why not `model.generate`: three things a dataset builder needs that it does not give.
- Sampling parameters are exactly the ones asked for. `generate` merges the model's own generation config into
  the call, and a model that ships `temperature: 0.6, top_p: 0.9` (Llama-3 does) can quietly override Magpie's
  `temperature: 1.0, top_p: 1.0`.
- Every sample has its own seed, and the random numbers are a pure function of (seed, step, token id): a row's
  text does not depend on the batch it landed in, so batch size, `num_proc`, sharding across nodes and resuming
  after a crash give the same dataset, up to float rounding (a matmul's last bits depend on its shape, which can
  flip a near-tie token; how often is in `benchmarks/RESULTS.md`). A resumed shard runs exactly as it first did,
  so resuming is exact.
- The N responses of one instruction share one prefill (the KV cache is repeated, not recomputed), so does the
  prefix all prompts start with (the chat template's system block and user header), and finished sequences are
  retired from the batch instead of decoding padding until the longest one ends.
"""

import contextlib
import contextvars
import inspect
from collections import deque
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..protocol import Completion, SamplingParams
from .cpu import attention as cpu_attention


PREFILL_TOKENS = 512  # padded prompt tokens per prefill pass (with fewer rows the matmuls run far below peak)

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic; int64 multiplication wraps).
_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _wrap_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Logical shift on int64: an arithmetic shift, then clear the copies of the sign bit.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _C1
    x = x ^ _shift_right(x, 27)
    x = x * _C2
    return x ^ _shift_right(x, 31)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row, a pure function of (seed, step): float64, shape `[len(seeds)]`.

    `step` is one int for every row, or one per row (rows of a continuous batch are at different steps).
    """
    if isinstance(step, torch.Tensor):
        offset = (step.to(device=seeds.device, dtype=torch.int64) + 1) * _GOLDEN  # int64 multiplication wraps
    else:
        offset = _wrap_int64((step + 1) * _GOLDEN)
    bits = splitmix64(splitmix64(seeds.to(torch.int64) + offset))
    mantissa = _shift_right(bits, 11)  # 53 random bits
    return (mantissa.to(torch.float64) + 0.5) * (2.0**-53)


SAMPLING_BLOCK = 128  # tokens per block of the two-level CDF search


def sample_next_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    params: SamplingParams,
    *,
    overwrite: bool = False,
) -> torch.Tensor:
    """One token per row by inverse-CDF sampling of the temperature-scaled, top-p-filtered distribution.

    One random number per row (not one per vocabulary entry) keeps the cost of sampling far below the model's. The
    CDF is searched in two levels, block sums first, then the cumulative sum of the one block the number falls in:
    a cumulative sum over the whole vocabulary runs sequentially on CPU, and with the softmax's normalisation and
    the copies it was a large share of a decode step (`benchmarks/RESULTS.md`).
    The weights are the unnormalised `exp(logits / T - max)`: the target is scaled by their total instead.
    `overwrite=True` lets float32 `logits` be used as the work buffer (the decode loop's own, not needed after).
    """
    if params.temperature == 0:
        return logits.argmax(-1)
    weights = logits.float()
    weights = weights.div_(params.temperature) if overwrite or weights is not logits else weights / params.temperature
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
    order = None
    if params.top_p < 1.0:
        weights, order = weights.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: drop a token once the mass before it already does.
        mass = weights.cumsum(-1)
        weights = weights.masked_fill(mass - weights >= params.top_p * mass[:, -1:], 0.0)
    index = inverse_cdf(weights, counter_uniform(seeds, step))
    return index if order is None else order.gather(-1, index[:, None]).squeeze(-1)


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor, block: int = SAMPLING_BLOCK) -> torch.Tensor:
    """Per row of non-negative `weights` `[rows, vocab]`, the first index whose cumulative weight reaches
    `uniform` (in (0, 1)) times the row's total: a draw from the weights. A token of weight 0 is never drawn."""
    rows, vocab = weights.shape
    if vocab % block:
        weights = torch.nn.functional.pad(weights, (0, block - vocab % block))  # weight 0: never drawn
    blocks = weights.view(rows, -1, block)
    mass = blocks.sum(-1).cumsum(-1)  # [rows, blocks]: the CDF at each block's end
    target = (uniform.to(mass.dtype) * mass[:, -1])[:, None]
    chosen = torch.searchsorted(mass, target).clamp(max=mass.shape[-1] - 1)  # the block the target falls in
    before = torch.nn.functional.pad(mass, (1, 0))[:, :-1].gather(-1, chosen)  # the CDF at the block's start
    cdf = blocks.gather(1, chosen[:, :, None].expand(-1, 1, block)).squeeze(1).cumsum(-1) + before
    # The block's own sum, added up in another order, may fall a rounding error short of the target: then its last
    # token of positive weight is the one (the first index where the CDF reaches its end).
    index = torch.searchsorted(cdf, torch.minimum(target, cdf[:, -1:]))
    return (chosen * block + index).squeeze(-1)


class PrefillLayer(DynamicLayer):
    """A KV-cache layer for a prefill (of prompts, or of reward prompts): keys and values written in place into a
    buffer of fixed capacity, handed out as views. (`DynamicLayer` appends with `torch.cat`, which copied the whole
    cache at every decode step, which dominated a CPU step.) Sliding-window layers keep every
    position too: the sliding mask, built from positions, hides the old ones.
    """

    def __init__(self, capacity: int, is_sliding: bool = False):
        super().__init__()
        self.capacity = capacity
        self.is_sliding = is_sliding
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            shape = (*key_states.shape[:2], max(self.capacity, key_states.shape[-2]), key_states.shape[-1])
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty(shape[:-1] + (value_states.shape[-1],))
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"PrefillLayer of capacity {self.key_buffer.shape[-2]} cannot take {end} positions")
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def hold(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Takes the given buffers, their first `length` positions already filled (a prefix computed elsewhere)."""
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.device, self.is_initialized, self.length = key_buffer.device, True, length


def cache_argument(model, cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`: transformers renamed the argument in 5.x, and models
    with their own code may still take the old name."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _attention_layers_sliding(model) -> list[bool]:
    """Per layer: is it a sliding-window attention layer. Raises for any other kind of layer (linear attention,
    Mamba/SSM hybrids, indexed attention), which these caches cannot hold. The check is on the exact type: hybrid
    and indexed layers subclass `DynamicLayer` but keep state these caches would drop."""
    layers = DynamicCache(config=model.config).layers
    supported = (DynamicLayer, DynamicSlidingWindowLayer)
    unsupported = {type(layer).__name__ for layer in layers if type(layer) not in supported}
    if unsupported:
        raise ValueError(
            f"The transformers engine caches attention layers only; {type(model).__name__} has "
            f"{', '.join(sorted(unsupported))}. Use `engine: vllm` for this model."
        )
    return [bool(getattr(layer, "is_sliding", False)) for layer in layers]


def new_cache(model, capacity: int) -> DynamicCache:
    """A DynamicCache of `PrefillLayer`s with room for `capacity` positions."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PrefillLayer(capacity, sliding) for sliding in _attention_layers_sliding(model)]
    return cache


def pad_batch(
    sequences: list[list[int]], pad_token_id: int, *, left: bool, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the longest sequence, and the 0/1 mask of real tokens. Left padding for prompts to be
    continued (their last token is the last column); right padding for inputs a classifier reads at their last
    real token."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        input_ids[i, columns] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[i, columns] = 1
    return input_ids.to(device), attention_mask.to(device)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """The number of leading tokens all `sequences` share, leaving each at least one token of its own."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


@dataclass
class SharedPrefix:
    """Keys and values of the tokens every prompt of a call starts with (the chat template's system block and user
    header, typically half a short prompt), computed once: per layer `(keys, values)` of shape
    `[1, kv_heads, length, head_dim]`."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]


def shared_prefix(model, sequences: list[list[int]], minimum: int = 1) -> SharedPrefix | None:
    """Prefills the common prefix of `sequences` once, or None when it is shorter than `minimum` or the model has
    sliding-window layers: `prefill` pads between the prefix and each prompt's own tokens, and a sliding window
    counts columns, so it would see the prefix as further away than it is."""
    length = common_prefix_length(sequences)
    if length < minimum or any(_attention_layers_sliding(model)):
        return None
    cache = new_cache(model, length)
    model(
        input_ids=torch.tensor([sequences[0][:length]], device=model.device),
        use_cache=True,
        **cache_argument(model, cache),
    )
    return SharedPrefix(length, [(layer.key_buffer, layer.value_buffer) for layer in cache.layers])


def prefill(
    model,
    prompts: list[list[int]],
    pad_token_id: int,
    shared: SharedPrefix | None = None,
    causal_lm: bool = True,
    realign: bool = True,
):
    """Runs `prompts` in one left-padded batch, on top of `shared`'s keys and values when given (then `prompts` are
    the tokens after the shared prefix).

    Returns `(cache, logits)`: a cache of `PrefillLayer`s in which every row's whole prompt (shared prefix included)
    ends at the last column, with finite values in every column left of it; and the logits at each prompt's last
    token (None unless `causal_lm`). With `realign=False` the prefix stays in the first columns, where it was
    prefilled: a caller that keeps only the prompts' own columns (cascade decoding) has no use for the move.
    """
    input_ids, mask = pad_batch(prompts, pad_token_id, left=True, device=model.device)
    rows, width = input_ids.shape
    root = shared.length if shared else 0
    cache = new_cache(model, root + width)
    if shared:
        for layer, (keys, values) in zip(cache.layers, shared.layers):
            layer.hold(
                keys.new_empty((rows, keys.shape[1], root + width, keys.shape[-1])),
                values.new_empty((rows, values.shape[1], root + width, values.shape[-1])),
                root,
            )
            layer.key_buffer[:, :, :root], layer.value_buffer[:, :, :root] = keys, values
        mask = torch.cat([mask.new_ones((rows, root)), mask], dim=-1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, root:]
    kwargs = {"logits_to_keep": 1} if causal_lm else {}
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **kwargs,
        **cache_argument(model, cache),
    )
    if shared and realign:
        # Row i is [prefix | padding | own tokens]; move the prefix right, next to its own tokens. The columns left of
        # it are padding: zeros, so no reader depends on how a kernel treats a masked column's values.
        padding = width - mask[:, root:].sum(-1, keepdim=True)
        column = torch.arange(root + width, device=mask.device)[None, :]
        source = torch.where((column >= padding) & (column < padding + root), column - padding, column)
        left = (column < padding).to(cache.layers[0].key_buffer.device)[:, None, :, None]
        for layer in cache.layers:
            index = source.to(layer.device)[:, None, :, None].expand_as(layer.key_buffer)
            layer.key_buffer = layer.key_buffer.gather(2, index).masked_fill(left, 0)
            layer.value_buffer = layer.value_buffer.gather(2, index).masked_fill(left, 0)
    return cache, (out.logits[:, -1] if causal_lm else None)


# --------------------------------------------------------------------------------------------------------------
# Cascade attention: the shared prefix is read once per decode step, not once per row

CASCADE_ATTENTION = "magpie_cascade"
_decode_prefix: contextvars.ContextVar[SharedPrefix | None] = contextvars.ContextVar("decode_prefix", default=None)


def cascade_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """A decode step's attention over the shared prefix and each row's own columns, as one softmax.

    The rows' caches hold only their own tokens; the prefix's keys and values (`[1, kv_heads, P, dim]`, set for
    the step with `_decode_prefix`) are multiplied with all rows' queries in one matmul, instead of being copied
    into every row and read `rows` times.
    Scores and softmax are those of transformers' eager attention (softmax in float32); SDPA runs every other
    forward (prefills, and any call outside a decode step).
    """
    prefix = _decode_prefix.get()
    if prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    prefix_keys, prefix_values = prefix.layers[module.layer_idx]
    batch, heads, q_length, dim = query.shape
    kv_heads, length = key.shape[1], prefix_keys.shape[-2]
    if q_length != 1 or any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias")):
        # Not a plain decode step: put the prefix in front of every row and let SDPA do it (slow, always right).
        key = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:
            opened = (
                attention_mask.new_ones((*attention_mask.shape[:-1], length))
                if attention_mask.dtype == torch.bool
                else attention_mask.new_zeros((*attention_mask.shape[:-1], length))
            )
            attention_mask = torch.cat([opened, attention_mask], dim=-1)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = dim**-0.5 if scaling is None else scaling
    groups = heads // kv_heads
    value_dim = value.shape[-1]  # not the query's: MLA models (DeepSeek-V2/V3) have value heads of another size
    # Grouped-query heads of one key/value head become rows of one small matmul (no repeated keys).
    query = query.reshape(batch, kv_heads, groups, dim)
    if value_dim == dim and cpu_attention.usable(query, key, value, attention_mask):
        # fp32 on CPU: one pass in C over the prefix and each row's live columns (see cpu_attention.py).
        out = cpu_attention.decode_attention(
            query, key, value, attention_mask, prefix_keys[0], prefix_values[0], scaling
        )
        return out.reshape(batch, 1, heads, dim), None
    own = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # [batch, kv_heads, groups, columns]
    if attention_mask is not None:
        own = (
            own.masked_fill(~attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool
            else own + attention_mask
        )
    stacked = query.transpose(0, 1).reshape(kv_heads, batch * groups, dim)  # every row's queries, per head
    shared = torch.matmul(stacked, prefix_keys[0].transpose(-1, -2)).float() * scaling  # [kv_heads, batch*groups, P]
    shared = shared.view(kv_heads, batch, groups, length).transpose(0, 1)
    weights = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1).to(value.dtype)
    out = torch.matmul(weights[..., length:], value)
    on_prefix = weights[..., :length].transpose(0, 1).reshape(kv_heads, batch * groups, length)
    out += torch.matmul(on_prefix, prefix_values[0]).view(kv_heads, batch, groups, value_dim).transpose(0, 1)
    return out.reshape(batch, 1, heads, value_dim), None


AttentionInterface.register(CASCADE_ATTENTION, cascade_attention)
AttentionMaskInterface.register(CASCADE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def cascade_decoding(model, shared: SharedPrefix | None):
    """Switches `model` to `cascade_attention` for the block, yielding whether it did: only from SDPA (the masks
    and the fallback are SDPA's), with a shared prefix to read, and for models that can switch (transformers'
    attention interface). The model's implementation is restored on exit."""
    if (
        shared is None
        or model.config._attn_implementation != "sdpa"
        or not all(
            hasattr(module, "layer_idx") for name, module in model.named_modules() if name.endswith("self_attn")
        )
    ):
        yield False
        return
    model.set_attn_implementation(CASCADE_ATTENTION)
    try:
        yield model.config._attn_implementation == CASCADE_ATTENTION
    finally:
        model.set_attn_implementation("sdpa")


# --------------------------------------------------------------------------------------------------------------
# Continuous batching


class SlotLayer(DynamicLayer):
    """One layer's keys and values for the rows of a continuous batch: a buffer `[rows, heads, columns, dim]`.

    The owning `SlotCache` decides which rows and columns a forward sees; a decode step writes one column.
    """

    def __init__(self, is_sliding: bool):
        super().__init__()
        self.is_sliding = is_sliding
        self.batch, self.first, self.length = 0, 0, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[: self.batch, :, self.length : end] = key_states
        self.value_buffer[: self.batch, :, self.length : end] = value_states
        self.length = end
        return self.key_buffer[: self.batch, :, self.first : end], self.value_buffer[: self.batch, :, self.first : end]

    def get_seq_length(self) -> int:
        return self.length - self.first


def kv_cache_bytes(config, rows: int, longest_prompt: int, max_new_tokens: int, dtype_bytes: int) -> int:
    """What `SlotCache` allocates for a model config: every layer's keys and values, `rows` x columns (a sequence's
    span, the longest prompt plus the token cap, and half again for slack) x key/value heads x head size."""
    span = longest_prompt + max_new_tokens
    columns = span + max(16, span // 2)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * rows * config.num_key_value_heads * columns * head_dim * dtype_bytes


class SlotCache(DynamicCache):
    """The KV cache of a continuous batch: `rows` sequences that come and go.

    Every sequence's tokens sit in consecutive columns that end at the shared write column `length`; a new
    sequence takes a finished one's row with its prompt right-aligned there, and columns left of it are masked.
    So left padding is just masked columns, and column distance is token distance, which is what causal and
    sliding-window masks count (positions are passed explicitly, so rotary embeddings never see columns). A
    forward sees columns `[first, length)`: `first` is the oldest live sequence's first column.

    A sequence spans at most `longest_prompt + max_new_tokens` columns; the buffers hold half as many again, and
    when the write column reaches the end, the dead columns on the left are dropped (one copy per `slack` steps).
    """

    def __init__(self, model, rows: int, longest_prompt: int, max_new_tokens: int):
        super().__init__(config=model.config)
        self.layers = [SlotLayer(sliding) for sliding in _attention_layers_sliding(model)]
        span = longest_prompt + max_new_tokens
        self.rows, self.columns, self.longest_prompt = rows, span + max(16, span // 2), longest_prompt
        self.mask = torch.zeros((rows, self.columns), dtype=torch.bool, device=model.device)
        self.starts = [0] * rows  # per row: the column its prompt starts at

    @property
    def length(self) -> int:
        return self.layers[0].length

    def _allocate(self, source: DynamicCache) -> None:
        """The keys and values of every layer, shaped like `source`'s, as views of one zeroed block per device.

        One block: a buffer of each layer's size sits under glibc's adaptive mmap threshold once an earlier shard
        freed one as large, so it came from the heap, and the heap kept it after the shard (200+ MB of free heap
        on the benchmark's small model, a little more each shard). A block of all layers is mmapped and given back
        whole. Zeros, though every column a forward reads is written first (by `fill_rows` or a decode step): an
        untouched page costs nothing until the write column reaches it, so peak memory depended on how far each
        shard's steps got, and a build that fit its first shards could run out of memory in a later one. Written
        here, the whole footprint is there from the first step of the first shard, as on a GPU."""
        groups: dict[tuple, list[int]] = {}  # (device, dtype, kv heads, head dim) -> layer indices
        for index, prefilled in enumerate(source.layers):
            like = prefilled.key_buffer
            groups.setdefault((like.device, like.dtype, like.shape[1], like.shape[-1]), []).append(index)
        self._check_memory(groups)
        for (device, dtype, heads, dim), members in groups.items():
            block = torch.zeros((len(members), 2, self.rows, heads, self.columns, dim), dtype=dtype, device=device)
            for position, index in enumerate(members):
                layer = self.layers[index]
                layer.key_buffer, layer.value_buffer = block[position, 0], block[position, 1]
                layer.device, layer.is_initialized, layer.length = device, True, self.longest_prompt

    def _check_memory(self, groups: dict) -> None:
        """On a GPU, the block must fit in the free memory: else a clear error that says what would fit, before
        torch's out-of-memory, and before any of the shard's work."""
        import torch

        for (device, dtype, heads, dim), members in groups.items():
            if device.type != "cuda":
                continue
            per_row = len(members) * 2 * heads * self.columns * dim * dtype.itemsize
            free, _ = torch.cuda.mem_get_info(device)
            if per_row * self.rows > free:
                raise MemoryError(
                    f"The KV cache of the transformers engine needs {per_row * self.rows / 2**30:.1f} GiB on {device} "
                    f"(generation_batch_size {self.rows} x {self.columns} columns: the prompt cap plus "
                    f"max_response_tokens, and half again for slack), but {free / 2**30:.1f} GiB are free. Lower "
                    f"generation_batch_size to {max(1, free // per_row)} or less, or max_response_tokens / "
                    "max_prompt_tokens; or use engine: vllm, which pages its cache."
                )

    def fill_rows(
        self,
        rows: torch.Tensor,
        source: DynamicCache,
        source_rows: torch.Tensor,
        width: int,
        prompt_lengths: torch.Tensor,
        skip: int = 0,
    ) -> None:
        """Copies prefilled prompts (left-padded to `width` in `source`, after its first `skip` columns) into `rows`,
        ending at the write column. `prompt_lengths` counts the tokens copied."""
        if not self.layers[0].is_initialized:
            self._allocate(source)
        length = self.length
        start = length - width
        for layer, prefilled in zip(self.layers, source.layers):
            # With `device: sharded` each layer's keys live on its own GPU: index there.
            here, there = rows.to(layer.device), source_rows.to(layer.device)
            for name in ("key_buffer", "value_buffer"):
                buffer = getattr(layer, name)
                # Masked columns still enter attention as 0 x value, and 0 x NaN is NaN: no stale garbage there.
                buffer[here, :, :start] = 0
                buffer[here, :, start:length] = getattr(prefilled, name)[there, :, skip : skip + width]
        columns = torch.arange(self.columns, device=self.mask.device)
        self.mask[rows] = (columns >= length - prompt_lengths[:, None]) & (columns < length)
        for row, prompt_length in zip(rows.tolist(), prompt_lengths.tolist()):
            self.starts[row] = length - prompt_length

    def reserve_column(self, live_rows: list[int]) -> None:
        """Before a decode step: `first` moves to the oldest live row's first column, and the write column is free."""
        first = min(self.starts[r] for r in live_rows)
        length = self.length
        if length == self.columns:
            # Drop the dead columns on the left; the write column stays at or past the longest prompt, so any
            # waiting prompt still fits to its left.
            # Only the batch's rows: a row past it is either unused yet or retired, and `fill_rows` rewrites every
            # column of a row it hands out.
            new_length = max(length - first, self.longest_prompt)
            offset, batch = new_length - (length - first), self.layers[0].batch
            for layer in self.layers:
                layer.key_buffer[:batch, :, offset:new_length] = layer.key_buffer[:batch, :, first:length].clone()
                layer.value_buffer[:batch, :, offset:new_length] = layer.value_buffer[:batch, :, first:length].clone()
                layer.length = new_length
            self.mask[:batch, offset:new_length] = self.mask[:batch, first:length].clone()
            self.starts = [start - first + offset for start in self.starts]
            first = offset
        for layer in self.layers:
            layer.first = first

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copies the sequences of rows `sources` into the free rows `targets`: every column a forward reads, their
        masks and starts. Retiring finished rows this way moves only the live rows past the new batch's end into
        the free rows inside it, not the whole batch."""
        first, length = min(self.starts[r] for r in sources.tolist()), self.length
        for layer in self.layers:
            here, there = targets.to(layer.device), sources.to(layer.device)
            layer.key_buffer[here, :, first:length] = layer.key_buffer[there, :, first:length]
            layer.value_buffer[here, :, first:length] = layer.value_buffer[there, :, first:length]
        self.mask[targets] = self.mask[sources]
        for target, source in zip(targets.tolist(), sources.tolist()):
            self.starts[target] = self.starts[source]

    def set_batch(self, batch: int) -> None:
        for layer in self.layers:
            layer.batch = batch

    def decode_mask(self) -> torch.Tensor:
        """Opens the write column for every row and returns the 2D mask of the next decode step."""
        batch, first, length = self.layers[0].batch, self.layers[0].first, self.length
        self.mask[:batch, length] = True
        return self.mask[:batch, first : length + 1]


@dataclass
class Job:
    """One call's work in a `ContinuousBatch`: `len(prompts) * num_samples` completions, numbered from `first`."""

    prompts: list[list[int]]
    seeds: list[int]
    num_samples: int
    first: int

    @property
    def completions(self) -> range:
        return range(self.first, self.first + len(self.seeds))

    def is_for(self, prompts: list[list[int]], seeds: list[int], num_samples: int) -> bool:
        return self.num_samples == num_samples and self.seeds == seeds and self.prompts == prompts


class ContinuousBatch:
    """Up to `rows` sequences decoding together, fed from a queue of jobs (one per call of `sample`).

    When enough rows have finished, waiting completions take them, so the batch stays full until the queue runs dry;
    then finished rows are retired once they are a thirty-second of the batch (retiring at every finish would copy
    the live rows past the new end each time; waiting longer leaves rows dead). Prompts are
    prefilled once each (the N samples of a prompt share that prefill), shortest first within a job and a few
    hundred tokens per pass ahead of need, on top of the prefix all prompts share, which runs once. A completion's
    text does not depend on when it is admitted or what it shares a batch with: its random numbers are a function of
    its seed and step only.

    Jobs are admitted in order, so a second job's completions start as soon as the first's are all admitted: its
    rows fill the first job's tail (the steps in which the batch empties, every row waiting on its longest
    sample), and `run` returns the first job's completions while the second's keep their place.
    """

    def __init__(
        self,
        model,
        params: SamplingParams,
        prompts: list[list[int]],
        rows: int,
        pad_token_id: int,
        prompt_cap: int | None = None,
        stop_text=None,
    ):
        self.model, self.params, self.pad_token_id, self.rows = model, params, pad_token_id, rows
        self.stop_text = stop_text  # `StopText` where the params have stop strings
        self.device = model.device
        # The tokens every prompt starts with run once, not once per refill (half of a short chat prompt).
        self.shared = shared_prefix(model, prompts)
        self.root = self.shared.length if self.shared else 0
        self.prefix_tokens = prompts[0][: self.root]
        with cascade_decoding(model, self.shared) as cascade:
            self.cascade = cascade
        # With cascade attention the slot cache holds each prompt's own tokens only; the prefix is read once per step.
        self.kept = self.root if self.cascade else 0  # prompt columns the slot cache does not hold
        longest = max(map(len, prompts))
        if prompt_cap and self.device.type == "cuda":
            # Sized for any shard, not this one's longest prompt: a later shard cannot run out of memory hours in.
            longest = max(longest, prompt_cap)
        self.cache = SlotCache(model, rows, longest - self.kept, params.max_new_tokens)
        self.cache_kwarg = cache_argument(model, self.cache)
        self.stop_ids = torch.tensor(sorted(params.stop_token_ids), dtype=torch.long, device=self.device)
        self.holder: list[int | None] = [None] * rows  # the completion each batch row holds; None = free
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.batch = 0  # rows [0, batch) go through the model
        self.jobs: list[Job] = []  # unfinished, in order
        self.unfinished: dict[int, int] = {}  # job's first completion -> its completions not finished yet
        self.prompts: dict[int, list[int]] = {}  # prompt number -> tokens, until its last sample is admitted
        self.samples_left: dict[int, int] = {}  # prompt number -> its samples not admitted yet
        self.to_stage: deque[int] = deque()  # prompt numbers in admission order, not prefilled yet
        self.staged: dict[int, tuple[DynamicCache, int, torch.Tensor]] = {}  # prompt -> (prefill cache, row, logits)
        self.waiting: deque[int] = deque()  # completions in admission order
        self.prompt_of, self.seed_of, self.job_of = {}, {}, {}  # per completion
        self.generated: dict[int, list[int]] = {}
        self.finish: dict[int, str] = {}
        self.prompt_count = self.completion_count = 0

    def accepts(self, prompts: list[list[int]]) -> bool:
        """Whether `prompts` can join: they start with the prefix this batch shares, and fit its cache."""
        return (
            all(len(p) > self.root and p[: self.root] == self.prefix_tokens for p in prompts)
            and max(map(len, prompts)) - self.kept <= self.cache.longest_prompt
        )

    def submit(self, prompts: list[list[int]], seeds: list[int], num_samples: int) -> Job:
        job = Job(prompts, seeds, num_samples, self.completion_count)
        base = self.prompt_count
        # Prompts are admitted shortest first, so each staged prefill pads little.
        for local in sorted(range(len(prompts)), key=lambda p: len(prompts[p])):
            self.to_stage.append(base + local)
            self.waiting.extend(job.first + local * num_samples + j for j in range(num_samples))
        for local, prompt in enumerate(prompts):
            self.prompts[base + local], self.samples_left[base + local] = prompt, num_samples
        for completion, seed in zip(job.completions, seeds):
            self.prompt_of[completion] = base + (completion - job.first) // num_samples
            self.seed_of[completion], self.job_of[completion] = seed, job.first
            self.generated[completion], self.finish[completion] = [], "length"
        self.prompt_count += len(prompts)
        self.completion_count += len(seeds)
        self.jobs.append(job)
        self.unfinished[job.first] = len(seeds)
        return job

    def run(self) -> list[Completion]:
        """Decodes until the oldest job's completions have all finished, and returns them (grouped by prompt)."""
        job = self.jobs[0]
        with cascade_decoding(self.model, self.shared if self.cascade else None):
            while self.unfinished[job.first]:
                self._advance()
        self.jobs.pop(0)
        del self.unfinished[job.first]
        for completion in job.completions:
            del self.prompt_of[completion], self.seed_of[completion], self.job_of[completion]
        return [Completion(self.generated.pop(c), self.finish.pop(c)) for c in job.completions]

    def _advance(self) -> None:
        """One refill, or one decode step (after retiring finished rows when the queue is dry)."""
        live = [r for r in range(self.batch) if self.holder[r] is not None]
        free_rows = self.rows - len(live)
        # Refill once a sixty-fourth of the batch is free (or everything): a refill copies staged prefills in (they
        # run a few hundred tokens ahead), so it is cheap, and waiting for more leaves rows dead.
        if self.waiting and (not live or free_rows >= min(len(self.waiting), max(1, self.rows // 64))):
            self._admit()
            return
        if not live:
            raise RuntimeError("ContinuousBatch: unfinished completions but no live row and nothing waiting")
        if not self.waiting and self.batch - len(live) >= max(1, self.batch // 32):
            live = self._retire(live)
        self.cache.reserve_column(live)
        batch = self.batch
        prefix_token = _decode_prefix.set(self.shared if self.cascade else None)
        try:
            out = self.model(
                input_ids=self.next_tokens[:batch, None],
                attention_mask=self.cache.decode_mask(),
                position_ids=self.positions[:batch, None],
                use_cache=True,
                **self.cache_kwarg,
            )
        finally:
            _decode_prefix.reset(prefix_token)
        self.positions[:batch] += 1
        # All rows live (the steady state): a view, not a copy of the batch's logits.
        self._take_tokens(live, out.logits[:, -1] if len(live) == batch else out.logits[live, -1, :])

    def _take_tokens(self, batch_rows: list[int], logits: torch.Tensor) -> None:
        """Samples the next token of each of `batch_rows` and files it; finished rows are freed."""
        held = [self.holder[r] for r in batch_rows]
        steps = torch.tensor([len(self.generated[c]) for c in held], device=self.device)
        seeds = torch.tensor([self.seed_of[c] for c in held], dtype=torch.int64, device=self.device)
        tokens = sample_next_tokens(logits, seeds, steps, self.params, overwrite=True)
        self.next_tokens[batch_rows] = tokens
        for row, completion, token, stopped in zip(
            batch_rows, held, tokens.tolist(), torch.isin(tokens, self.stop_ids).tolist()
        ):
            if stopped:
                self.finish[completion] = "stop"
            else:
                self.generated[completion].append(token)
                if self.stop_text and self.stop_text(self.generated[completion]):
                    self.finish[completion] = "stop"
                elif len(self.generated[completion]) < self.params.max_new_tokens:
                    continue
            self.holder[row] = None
            self.unfinished[self.job_of[completion]] -= 1

    def _stage(self) -> None:
        """Prefills the next prompts in admission order together, `PREFILL_TOKENS` padded tokens' worth: refills
        free a few rows at a time, and a prefill of one or two prompts would waste the pass over the weights."""
        chunk = [self.to_stage.popleft()]
        longest = len(self.prompts[chunk[0]]) - self.root
        while self.to_stage:
            with_next = max(longest, len(self.prompts[self.to_stage[0]]) - self.root)
            if (len(chunk) + 1) * with_next > PREFILL_TOKENS:
                break
            chunk.append(self.to_stage.popleft())
            longest = with_next
        prefilled, logits = prefill(
            self.model,
            [self.prompts[p][self.root :] for p in chunk],
            self.pad_token_id,
            self.shared,
            realign=not self.cascade,
        )
        for row, p in enumerate(chunk):
            self.staged[p] = (prefilled, row, logits)

    def _admit(self) -> None:
        """Gives free rows to waiting completions: their prompts' staged prefills copied in (the N samples of a
        prompt share one), their first tokens sampled."""
        free = [r for r in range(self.rows) if self.holder[r] is None]
        taken = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        by_source: dict[int, list[tuple[int, int, int]]] = {}  # id(prefill cache) -> (row, completion, its row there)
        for row, completion in zip(free, taken):
            if self.prompt_of[completion] not in self.staged:
                self._stage()
            prefilled, source_row, _ = self.staged[self.prompt_of[completion]]
            by_source.setdefault(id(prefilled), []).append((row, completion, source_row))
        kept = self.kept
        for members in by_source.values():
            prefilled, _, logits = self.staged[self.prompt_of[members[0][1]]]
            targets = [row for row, _, _ in members]
            target_rows = torch.tensor(targets, device=self.device)
            source_rows = torch.tensor([source_row for _, _, source_row in members], device=self.device)
            lengths = torch.tensor([len(self.prompts[self.prompt_of[c]]) for _, c, _ in members], device=self.device)
            self.cache.fill_rows(
                target_rows, prefilled, source_rows, prefilled.layers[0].length - kept, lengths - kept, skip=kept
            )
            for row, completion, _ in members:
                self.holder[row] = completion
            self.positions[target_rows] = lengths
            self.batch = max(self.batch, max(targets) + 1)
            self.cache.set_batch(self.batch)
            self._take_tokens(targets, logits[source_rows])
        for completion in taken:  # a prompt's samples are admitted in order: after its last, its prefill can go
            prompt = self.prompt_of[completion]
            self.samples_left[prompt] -= 1
            if not self.samples_left[prompt]:
                del self.staged[prompt], self.prompts[prompt], self.samples_left[prompt]

    def _retire(self, live: list[int]) -> list[int]:
        """Shrinks the batch to its live rows: those past the new end take the free rows below it (row order does
        not matter)."""
        self.batch = batch = len(live)
        holes = [r for r in range(batch) if self.holder[r] is None]
        movers = [r for r in live if r >= batch]
        if movers:
            sources, targets = torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device)
            self.cache.move_rows(sources, targets)
            self.next_tokens[targets], self.positions[targets] = self.next_tokens[sources], self.positions[sources]
            for hole, mover in zip(holes, movers):
                self.holder[hole] = self.holder[mover]
        self.holder[batch:] = [None] * (self.rows - batch)
        self.cache.set_batch(batch)
        return list(range(batch))


# The batch a call of `sample` leaves running for the next call (its `then`): see `sample`.
_carried: ContinuousBatch | None = None


def release_carried_batch() -> None:
    """Drops the batch a `sample(..., then=...)` call left running (and its KV cache): call it when a stage ends
    before the work it started was asked for."""
    global _carried
    _carried = None


@torch.inference_mode()
def sample(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    params: SamplingParams,
    *,
    num_samples: int = 1,
    pad_token_id: int = 0,
    max_batch_size: int = 64,
    then: tuple[list[list[int]], list[int]] | None = None,
    prompt_cap: int | None = None,
    stop_text=None,
) -> list[Completion]:
    """Samples `num_samples` completions of every prompt, `len(prompts) * num_samples` in all, grouped by prompt,
    in a continuous batch (`ContinuousBatch`) of up to `max_batch_size` sequences.

    `then` is the next call's `(prompts, seeds)` (the next shard of a stage, as many seeds per prompt): its completions
    start in the rows this call's tail frees, and the batch stays running for that call, which takes up where it
    stands (and gets the same completions it would have got alone). A next call with other work drops it.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), on its device.
        prompts (`list[list[int]]`): token ids, unpadded.
        seeds (`list[int]`): one int64 seed per completion, in output order.
        params (`SamplingParams`): temperature, top_p, token cap and stop ids.
        num_samples (`int`, defaults to 1): completions per prompt.
        pad_token_id (`int`, defaults to 0): the id used for left padding (masked out).
        max_batch_size (`int`, defaults to 64): sequences decoded together.
        then (`tuple`, *optional*): the next call's prompts and seeds.
        prompt_cap (`int`, *optional*): the longest prompt any call can bring (`max_prompt_tokens`): on a GPU the
            KV cache is sized for it, and checked against the free memory, from the first call on.
        stop_text (`StopText`, *optional*): ends a sample whose text holds one of `params.stop_strings`.
    """
    global _carried
    then = then if then and then[1] else None
    if len(seeds) != len(prompts) * num_samples:
        raise ValueError(
            f"sample() needs one seed per completion: got {len(seeds)} for {len(prompts)} x {num_samples}"
        )
    then_samples = len(then[1]) // max(1, len(then[0])) if then else 0
    if then and len(then[1]) != len(then[0]) * then_samples:
        raise ValueError(
            f"sample(then=...) needs the same number of seeds for every prompt: got {len(then[1])} "
            f"for {len(then[0])} prompts"
        )
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if not seeds or params.max_new_tokens < 1:
        return [Completion([], "length") for _ in seeds]

    running, _carried = _carried, None
    if (
        running is None
        or running.model is not model
        or running.params != params
        or running.pad_token_id != pad_token_id
        or running.rows > max_batch_size
        or not running.jobs[0].is_for(prompts, seeds, num_samples)
    ):
        coming = len(then[1]) if then else 0
        running = ContinuousBatch(
            model,
            params,
            prompts + (then[0] if then else []),
            min(max_batch_size, len(seeds) + coming),
            pad_token_id,
            prompt_cap,
            stop_text,
        )
        running.submit(prompts, seeds, num_samples)
    if then and len(running.jobs) == 1 and running.accepts(then[0]):
        running.submit(*then, then_samples)
    completions = running.run()
    if running.jobs:
        _carried = running
    return completions
