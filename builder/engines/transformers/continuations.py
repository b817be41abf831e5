"""Label scoring: the log-likelihood of a fixed set of continuations (a tag's labels) after each prompt.

Each prompt is prefilled once (the prefix every prompt starts with, the judge's instructions, once per call); its
keys and values are then repeated once per continuation and the continuations run on top of them in one batch. The
first token of every continuation is read off the prompt's own last logits. It costs prefill only, never fails to
parse, and gives the same numbers as scoring every prompt + continuation on its own, up to float rounding.
"""

import torch

from .generation import cache_argument, new_cache, pad_batch, prefill, shared_prefix


MIN_SHARED_PREFIX = 8


def _repeated_cache(model, cache, rows: int, repeats: int, extra: int):
    """A cache holding each of the `rows` prompts of `cache` `repeats` times, with room for `extra` positions."""
    width = cache.layers[0].length
    repeated = new_cache(model, width + extra)
    for layer, source in zip(repeated.layers, cache.layers):
        buffers = []
        for buffer in (source.key_buffer, source.value_buffer):
            grown = buffer.new_empty((rows * repeats, buffer.shape[1], width + extra, buffer.shape[-1]))
            grown[:, :, :width] = buffer[:rows, :, :width].repeat_interleave(repeats, dim=0)
            buffers.append(grown)
        layer.hold(*buffers, width)
    return repeated


@torch.inference_mode()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[int]], pad_token_id: int, max_rows: int = 64
) -> list[list[float]]:
    """For every prompt, the summed log-probability of each continuation (the same continuations for all prompts).

    Args:
        model: a causal LM in eval mode.
        prompts (`list[list[int]]`): token ids, each ending where the continuations start.
        continuations (`list[list[int]]`): the labels' token ids, each at least one token.
        pad_token_id (`int`): the id padding is filled with (masked everywhere).
        max_rows (`int`, defaults to 64): prompt x continuation rows per forward pass of the continuations.
    """
    if not continuations or any(not c for c in continuations):
        raise ValueError("Label scoring needs at least one continuation, each of at least one token.")
    device = model.device
    count = len(continuations)
    longest = max(len(c) for c in continuations)
    first = torch.tensor([c[0] for c in continuations], device=device)
    # Tokens 1.. of each continuation are read off the logits of tokens 0..-2 fed after the prompt.
    fed, fed_mask = pad_batch([c[:-1] or [pad_token_id] for c in continuations], pad_token_id, left=False)
    targets = torch.tensor([c[1:] + [0] * (longest - len(c)) for c in continuations], device=device)
    counted = torch.tensor([[1.0] * (len(c) - 1) + [0.0] * (longest - len(c)) for c in continuations], device=device)

    root = shared_prefix(model, prompts, minimum=MIN_SHARED_PREFIX) if len(prompts) > 1 else None
    skip = root.length if root else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding within a chunk
    per_chunk = max(1, max_rows // count)
    scores: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(order), per_chunk):
        chunk = order[start : start + per_chunk]
        rows = len(chunk)
        cache, last_logits = prefill(model, [prompts[i][skip:] for i in chunk], pad_token_id, root)
        total = torch.log_softmax(last_logits.float(), dim=-1)[:, first]  # [rows, count]
        if longest > 1:
            width = cache.layers[0].length
            prompt_mask = torch.zeros((rows, width), dtype=torch.long)
            for row, i in enumerate(chunk):
                prompt_mask[row, width - len(prompts[i]) :] = 1
            repeated = _repeated_cache(model, cache, rows, count, fed.shape[-1])
            del cache
            lengths = torch.tensor([len(prompts[i]) for i in chunk]).repeat_interleave(count)
            out = model(
                input_ids=fed.repeat(rows, 1).to(device),
                attention_mask=torch.cat([prompt_mask.repeat_interleave(count, 0), fed_mask.repeat(rows, 1)], -1).to(
                    device
                ),
                position_ids=(lengths[:, None] + torch.arange(fed.shape[-1])).to(device),
                use_cache=True,
                **cache_argument(model, repeated),
            )
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            picked = logprobs.gather(-1, targets.repeat(rows, 1)[:, :, None]).squeeze(-1)
            total = total + (picked * counted.repeat(rows, 1)).sum(-1).view(rows, count)
        for row, i in enumerate(chunk):
            scores[i] = total[row].tolist()
    return scores
