"""The sampling engine behind the instruction and response stages (transformers models, one batch at a time).

Why not `model.generate`: three things a dataset builder needs that it does not give.
- Sampling parameters are exactly the ones asked for. `generate` merges the model's own generation config into
  the call, and a model that ships `temperature: 0.6, top_p: 0.9` (Llama-3 does) can quietly override Magpie's
  `temperature: 1.0, top_p: 1.0`.
- Every sample has its own seed, and the random numbers are a pure function of (seed, step, token id): a row's
  text does not depend on the batch it landed in, so batch size, `num_proc`, sharding across nodes and resuming
  after a crash all give the same dataset.
- The N responses of one instruction share one prefill (the KV cache is repeated, not recomputed), and finished
  sequences are retired from the batch instead of decoding padding until the longest one ends.
"""

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

# splitmix64 constants, as signed int64 (torch has no uint64 arithmetic; int64 multiplication wraps).
_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


@dataclass(frozen=True)
class SamplingParams:
    """Args:
    temperature (`float`): 0 means greedy.
    top_p (`float`): nucleus sampling; 1.0 keeps the whole distribution.
    max_new_tokens (`int`): the token cap; a sample that reaches it has finish reason "length".
    stop_token_ids (`tuple[int, ...]`): end-of-turn and EOS ids; a sample that writes one has finish reason "stop".
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]


@dataclass
class Completion:
    token_ids: list[int]  # without the stop token
    finish_reason: str  # "stop" or "length"


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


def counter_uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in (0, 1) per row, a pure function of (seed, step): float64, shape `[len(seeds)]`."""
    bits = splitmix64(splitmix64(seeds.to(torch.int64) + _wrap_int64((step + 1) * _GOLDEN)))
    mantissa = _shift_right(bits, 11)  # 53 random bits
    return (mantissa.to(torch.float64) + 0.5) * (2.0**-53)


def sample_next_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int, params: SamplingParams) -> torch.Tensor:
    """One token per row by inverse-CDF sampling of the temperature-scaled, top-p-filtered distribution.

    One random number per row (not one per vocabulary entry) keeps the cost of sampling far below the model's.
    """
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = (logits / params.temperature).softmax(-1)
    order = None
    if params.top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: drop a token once the mass before it already does.
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p, 0.0)
    cdf = probs.cumsum(-1)
    target = counter_uniform(seeds, step).to(cdf.dtype) * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None]).clamp(max=probs.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


class GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in a buffer with room for the whole generation.

    `DynamicLayer` appends each step with `torch.cat`, copying the whole cache every step (more than half of a
    decode step's time on CPU, measured); here a step writes in place and the layer hands out views.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            shape = (*key_states.shape[:2], max(self.capacity, key_states.shape[-2]), key_states.shape[-1])
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty(shape[:-1] + (value_states.shape[-1],))
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # past the planned capacity: grow by doubling
            self._resize(max(end, 2 * self.key_buffer.shape[-2]))
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _resize(self, size: int) -> None:
        grown_keys = self.key_buffer.new_empty(self.key_buffer.shape[:2] + (size, self.key_buffer.shape[-1]))
        grown_values = self.value_buffer.new_empty(self.value_buffer.shape[:2] + (size, self.value_buffer.shape[-1]))
        grown_keys[..., : self.length, :] = self.key_buffer[..., : self.length, :]
        grown_values[..., : self.length, :] = self.value_buffer[..., : self.length, :]
        self.key_buffer, self.value_buffer = grown_keys, grown_values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]


def cache_argument(model, cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`: transformers renamed the argument in 5.x, and models
    with their own code may still take the old name."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def new_cache(model, capacity: int):
    """A DynamicCache whose full-attention layers preallocate `capacity` positions (sliding-window layers, as
    Gemma-2 and Mistral have, keep their own type)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def sample(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    params: SamplingParams,
    *,
    num_samples: int = 1,
    pad_token_id: int = 0,
) -> list[Completion]:
    """Samples `num_samples` completions of every prompt, `len(prompts) * num_samples` in all, grouped by prompt.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), on its device.
        prompts (`list[list[int]]`): token ids, unpadded.
        seeds (`list[int]`): one int64 seed per completion, in output order.
        params (`SamplingParams`): temperature, top_p, token cap and stop ids.
        num_samples (`int`, defaults to 1): completions per prompt, sampled from one shared prefill.
        pad_token_id (`int`, defaults to 0): the id used for left padding (masked out).
    """
    if len(seeds) != len(prompts) * num_samples:
        raise ValueError(f"sample() needs one seed per completion: got {len(seeds)} for {len(prompts)} x {num_samples}")
    device = model.device
    input_ids, attention_mask = _left_pad(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model, input_ids.shape[-1] + params.max_new_tokens)
    cache_kwarg = cache_argument(model, cache)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=True, logits_to_keep=1, **cache_kwarg,
    )
    logits = out.logits[:, -1, :]
    next_positions = position_ids[:, -1] + 1
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        next_positions = next_positions.repeat_interleave(num_samples, dim=0)

    total = len(seeds)
    seed_tensor = torch.tensor(seeds, dtype=torch.int64, device=device)
    stop_ids = torch.tensor(sorted(params.stop_token_ids), device=device)
    rows = torch.arange(total, device=device)  # which completion each batch row holds
    done = torch.zeros(total, dtype=torch.bool, device=device)  # per batch row: finished, still in the batch
    generated: list[list[int]] = [[] for _ in range(total)]
    finish = ["length"] * total
    for step in range(params.max_new_tokens):
        tokens = sample_next_tokens(logits, seed_tensor[rows], step, params)
        stopped = torch.isin(tokens, stop_ids) & ~done
        for row, token, is_stop, is_done in zip(rows.tolist(), tokens.tolist(), stopped.tolist(), done.tolist()):
            if is_stop:
                finish[row] = "stop"
            elif not is_done:
                generated[row].append(token)
        done = done | stopped
        if step == params.max_new_tokens - 1 or done.all():
            break
        if done.sum() * 4 >= len(rows):
            # Retire finished rows once they are a quarter of the batch: the rest decode on a smaller batch and
            # cache. (Retiring at every finish would copy the whole cache each time.)
            index = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(index)
            rows, tokens, done = rows[index], tokens[index], done[index]
            attention_mask, next_positions = attention_mask[index], next_positions[index]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
        out = model(
            input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_positions[:, None],
            use_cache=True, **cache_kwarg,
        )
        logits = out.logits[:, -1, :]
        next_positions = next_positions + 1
    return [Completion(ids, reason) for ids, reason in zip(generated, finish)]
