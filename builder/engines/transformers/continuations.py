"""Label scoring: the log-likelihood of a fixed set of continuations (a tag's labels) after each prompt.

Each prompt is prefilled once (the prefix every prompt starts with, the judge's instructions, once per call). Then
all labels run in one pass on top of the prompt's keys and values, packed in one row as a tree (a prefix several
labels share is fed once): a token sees the prompt and its own ancestors only (a 4D mask), at the position it would
have right after the prompt. The first token of every label is read off the prompt's own last logits. It costs a prefill, never
fails to parse, and gives the numbers that scoring every prompt + label on its own gives, up to float rounding.
"""

import torch

from .generation import cache_argument, prefill, shared_prefix


MIN_SHARED_PREFIX = 8


def _label_tree(continuations: list[list[int]]):
    """The labels' tokens (each but its last) as a tree: a prefix that several labels share ("Difficulty:", "unsafe
    S") is one node, fed once. Returns the nodes' tokens, depths, which node each node sees (itself and its
    ancestors), and per scored token (node, the token it predicts, its label)."""
    nodes: dict[tuple[int, ...], int] = {}
    tokens, depths, parents = [], [], []
    reads, predicted, labels = [], [], []
    for j, continuation in enumerate(continuations):
        for t in range(len(continuation) - 1):
            prefix = tuple(continuation[: t + 1])
            if prefix not in nodes:
                nodes[prefix] = len(tokens)
                tokens.append(continuation[t])
                depths.append(t)
                parents.append(nodes[prefix[:-1]] if t else -1)
            reads.append(nodes[prefix])
            predicted.append(continuation[t + 1])
            labels.append(j)
    sees = torch.eye(len(tokens), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            sees[node] |= sees[parent]  # parents come before their children
    return tokens, torch.tensor(depths), sees, (torch.tensor(reads), torch.tensor(predicted), torch.tensor(labels))


def _grown(cache, extra: int) -> None:
    """Room for `extra` more positions in every layer of a prefilled cache."""
    for layer in cache.layers:
        width = layer.length
        buffers = []
        for buffer in (layer.key_buffer, layer.value_buffer):
            grown = buffer.new_empty((*buffer.shape[:2], width + extra, buffer.shape[-1]))
            grown[:, :, :width] = buffer[:, :, :width]
            buffers.append(grown)
        layer.hold(*buffers, width)


@torch.inference_mode()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[int]], pad_token_id: int, max_rows: int = 256
) -> list[list[float]]:
    """For every prompt, the summed log-probability of each continuation (the same continuations for all prompts).

    Args:
        model: a causal LM in eval mode (sdpa or eager attention: the labels are packed under a 4D mask).
        prompts (`list[list[int]]`): token ids, each ending where the continuations start.
        continuations (`list[list[int]]`): the labels' token ids, each at least one token.
        pad_token_id (`int`): the id padding is filled with (masked everywhere).
        max_rows (`int`, defaults to 256): prompts x labels per pass (the prompts of a pass: `max_rows // labels`).
    """
    if not continuations or any(not c for c in continuations):
        raise ValueError("Label scoring needs at least one continuation, each of at least one token.")
    device = model.device
    count = len(continuations)
    first = torch.tensor([c[0] for c in continuations], device=device)
    fed, depths, among_labels, (reads, predicted, owner) = _label_tree(continuations)

    root = shared_prefix(model, prompts, minimum=MIN_SHARED_PREFIX) if len(prompts) > 1 else None
    skip = root.length if root else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding within a pass
    per_pass = max(1, max_rows // count)
    scores: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(order), per_pass):
        chunk = order[start : start + per_pass]
        rows = len(chunk)
        cache, last_logits = prefill(model, [prompts[i][skip:] for i in chunk], pad_token_id, root)
        total = torch.log_softmax(last_logits.float(), dim=-1)[:, first]  # [rows, labels]
        if fed:
            width = cache.layers[0].length
            lengths = torch.tensor([len(prompts[i]) for i in chunk])
            seen_prompt = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # real tokens, not padding
            allowed = torch.cat(
                [seen_prompt[:, None, :].expand(rows, len(fed), width), among_labels.expand(rows, -1, -1)], dim=-1
            )
            dtype = model.dtype if model.dtype.is_floating_point else torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            _grown(cache, len(fed))
            out = model(
                input_ids=torch.tensor([fed] * rows, device=device),
                attention_mask=mask[:, None].to(device),
                position_ids=(lengths[:, None] + depths[None, :]).to(device),
                use_cache=True,
                **cache_argument(model, cache),
            )
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            picked = logprobs[:, reads.to(device), predicted.to(device)]  # [rows, scored tokens]
            per_label = torch.zeros((rows, count), device=device).index_add_(1, owner.to(device), picked)
            total = total + per_label
        for row, i in enumerate(chunk):
            scores[i] = total[row].tolist()
    return scores
