"""Reward-model scoring: right-padded, length-sorted batches, and a shared prefix for the N responses of one
instruction.

The N (instruction, response) inputs of a row share their prompt: the chat template, any system block and the
instruction. For a stock transformers sequence classifier each prompt runs once, and then the responses of all
instructions of the batch run in length-sorted batches, each on its own prompt's keys and values: every token is
scored once and padding stays small. Custom-code reward models (ArmoRM reads gating features off the prompt's own
tokens) are always scored on whole sequences.
"""

import math

import torch

from .generation import cache_argument, common_prefix_length, new_cache, pad_batch, prefill, shared_prefix


MIN_SHARED_PREFIX = 8  # below this, one batched pass over whole sequences is cheaper than two passes


def reward_batches(token_ids: list[list[int]], pad_token_id: int, batch_size: int) -> list[list[int]]:
    """Indices of `token_ids` in length-sorted batches, so padding stays small.

    Sequence classifiers read the score at the last token that is not `pad_token_id`. A sequence that itself ends
    with that id (a reward tokenizer without a pad token, padded with EOS) would be read one token early, so such
    sequences only share a batch with others of the same length: they are never padded.
    """
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    safe = [i for i in order if token_ids[i][-1] != pad_token_id]
    batches = [safe[s : s + batch_size] for s in range(0, len(safe), batch_size)]
    by_length: dict[int, list[int]] = {}
    for i in order:
        if token_ids[i][-1] == pad_token_id:
            by_length.setdefault(len(token_ids[i]), []).append(i)
    for group in by_length.values():
        batches += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    return batches


def _read_scores(output, count: int) -> list[float]:
    # ArmoRM-style custom code returns `.score`; a stock sequence classifier returns `.logits`.
    values = output.score if getattr(output, "score", None) is not None else output.logits
    return values.float().reshape(count, -1)[:, 0].tolist()


def score_sequences(model, token_ids: list[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    """One reward per sequence, scored in right-padded batches under `torch.inference_mode`."""
    scores = [math.nan] * len(token_ids)
    with torch.inference_mode():
        for chunk in reward_batches(token_ids, pad_token_id, batch_size):
            input_ids, attention_mask = pad_batch(
                [token_ids[i] for i in chunk], pad_token_id, left=False, device=model.device
            )
            output = model(input_ids=input_ids, attention_mask=attention_mask)
            for i, value in zip(chunk, _read_scores(output, len(chunk))):
                scores[i] = value
    return scores


def shares_prefix(model) -> bool:
    """Only transformers' own classifiers are known to take a KV cache and pool the last token of the input."""
    return type(model).__module__.startswith("transformers.models.") and type(model).__name__.endswith(
        "ForSequenceClassification"
    )


def _prefix_cache(model, prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], capacity: int):
    """A cache holding one prefix per row (per layer: keys, values), left-padded to the longest, with room for
    `capacity` positions in all; and its 2D mask."""
    width = max(lengths)
    cache = new_cache(model, capacity)
    for index, layer in enumerate(cache.layers):
        like = prefixes[0][index][0]
        keys = like.new_zeros((len(prefixes), like.shape[0], capacity, like.shape[-1]))
        layer.hold(keys, torch.zeros_like(keys), width)
        for row, (prefix, length) in enumerate(zip(prefixes, lengths)):
            layer.key_buffer[row, :, width - length : width], layer.value_buffer[row, :, width - length : width] = (
                prefix[index]
            )
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)  # on the CPU, like the caller's suffix mask
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return cache, mask


@torch.inference_mode()
def score_with_shared_prefixes(
    model, groups: list[list[list[int]]], pad_token_id: int, batch_size: int
) -> list[list[float]]:
    """Scores groups of sequences that each start with their group's common prefix.

    The prefix all groups share (the template's system block and user header) runs once; each group's prefix runs
    once on top of it (in length-sorted, left-padded batches); then the suffixes of all groups
    run in length-sorted batches, each on its own group's prefix keys and values (left-padded to the longest prefix
    of the batch), so neither the prefixes nor the suffixes pay for each other's lengths.
    """
    device = model.device
    prefix_lengths = [common_prefix_length(group) for group in groups]
    prefix_ids = [group[0][:n] for group, n in zip(groups, prefix_lengths)]
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in groups]  # per group, per layer
    # What all prompts start with (the reward template's system block and user header) runs once.
    root = shared_prefix(model, prefix_ids, minimum=MIN_SHARED_PREFIX) if len(groups) > 1 else None
    skip = root.length if root else 0
    for chunk in reward_batches([p[skip:] for p in prefix_ids], -1, batch_size):
        cache, _ = prefill(model, [prefix_ids[g][skip:] for g in chunk], pad_token_id, root, causal_lm=False)
        width = cache.layers[0].length
        for row, g in enumerate(chunk):
            columns = slice(width - prefix_lengths[g], width)
            prefixes[g] = [
                (layer.key_buffer[row, :, columns].clone(), layer.value_buffer[row, :, columns].clone())
                for layer in cache.layers
            ]

    items = [(g, j) for g, group in enumerate(groups) for j in range(len(group))]
    suffixes = [groups[g][j][prefix_lengths[g] :] for g, j in items]
    scores = [[math.nan] * len(group) for group in groups]
    for chunk in reward_batches(suffixes, pad_token_id, batch_size):
        owners = [items[i][0] for i in chunk]
        input_ids, suffix_mask = pad_batch([suffixes[i] for i in chunk], pad_token_id, left=False)
        width = input_ids.shape[-1]
        lengths = [prefix_lengths[g] for g in owners]
        cache, prefix_mask = _prefix_cache(model, [prefixes[g] for g in owners], lengths, max(lengths) + width)
        position_ids = torch.tensor(lengths)[:, None] + torch.arange(width)
        attention_mask = torch.cat([prefix_mask, suffix_mask], dim=-1)
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            **cache_argument(model, cache),
        )
        for i, value in zip(chunk, _read_scores(output, len(chunk))):
            g, j = items[i]
            scores[g][j] = value
    return scores


def score_groups(model, groups: list[list[list[int]]], pad_token_id: int, batch_size: int) -> list[list[float]]:
    """One reward per sequence, grouped as given (the N responses of one instruction per group)."""
    shared = []
    if shares_prefix(model):
        # A suffix ending in the pad id would be read one token early (see reward_batches).
        shared = [
            g
            for g, group in enumerate(groups)
            if len(group) > 1
            and common_prefix_length(group) >= MIN_SHARED_PREFIX
            and all(s[-1] != pad_token_id for s in group)
        ]
    scores: list[list[float] | None] = [None] * len(groups)
    for g, group_scores in zip(
        shared,
        score_with_shared_prefixes(model, [groups[g] for g in shared], pad_token_id, batch_size) if shared else [],
    ):
        scores[g] = group_scores
    rest = [g for g in range(len(groups)) if scores[g] is None]
    flat = score_sequences(model, [s for g in rest for s in groups[g]], pad_token_id, batch_size) if rest else []
    offset = 0
    for g in rest:
        scores[g], offset = flat[offset : offset + len(groups[g])], offset + len(groups[g])
    return scores
