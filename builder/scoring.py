"""Reward-model scoring: right-padded, length-sorted batches, and a shared prefix for the N responses of one
instruction.

The N (instruction, response) inputs of a row share their prompt: the chat template, any system block and the
instruction. For a stock transformers sequence classifier that prompt runs once and its KV cache is repeated for
the N responses, which cuts the tokens scored by 2-3x with Magpie's lengths. Custom-code reward models (ArmoRM
reads gating features off the prompt's own tokens) are always scored on whole sequences.
"""

import math

import torch

from .generation import cache_argument, new_cache

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
    import torch

    scores = [math.nan] * len(token_ids)
    with torch.inference_mode():
        for chunk in reward_batches(token_ids, pad_token_id, batch_size):
            width = max(len(token_ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
                attention_mask[row, : len(token_ids[i])] = 1
            output = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device))
            for i, value in zip(chunk, _read_scores(output, len(chunk))):
                scores[i] = value
    return scores


def shares_prefix(model) -> bool:
    """Only transformers' own classifiers are known to take a KV cache and pool the last token of the input."""
    return type(model).__module__.startswith("transformers.models.") and \
        type(model).__name__.endswith("ForSequenceClassification")


def common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


@torch.inference_mode()
def score_with_shared_prefix(model, group: list[list[int]], pad_token_id: int) -> list[float]:
    """Scores sequences that start with the same tokens: the prefix once, then every suffix on its cache."""
    prefix_length = common_prefix_length(group)
    suffixes = [s[prefix_length:] for s in group]
    width = max(len(s) for s in suffixes)
    cache = new_cache(model, prefix_length + width)
    cache_kwarg = cache_argument(model, cache)
    device = model.device
    model(input_ids=torch.tensor([group[0][:prefix_length]], device=device), use_cache=True, **cache_kwarg)
    cache.batch_repeat_interleave(len(group))
    input_ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        input_ids[row, : len(suffix)] = torch.tensor(suffix)
        suffix_mask[row, : len(suffix)] = 1
    attention_mask = torch.cat([torch.ones((len(group), prefix_length), dtype=torch.long), suffix_mask], dim=-1)
    position_ids = torch.arange(prefix_length, prefix_length + width).expand(len(group), -1)
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   position_ids=position_ids.to(device), use_cache=True, **cache_kwarg)
    return _read_scores(output, len(group))


def score_groups(model, groups: list[list[list[int]]], pad_token_id: int, batch_size: int) -> list[list[float]]:
    """One reward per sequence, grouped as given (the N responses of one instruction per group)."""
    if shares_prefix(model):
        scores = []
        for group in groups:
            worth_it = len(group) > 1 and common_prefix_length(group) >= MIN_SHARED_PREFIX
            # A suffix ending in the pad id would be read one token early (see reward_batches).
            if worth_it and all(s[-1] != pad_token_id for s in group):
                scores.append(score_with_shared_prefix(model, group, pad_token_id))
            else:
                scores.append(score_sequences(model, group, pad_token_id, batch_size))
        return scores
    flat = score_sequences(model, [s for group in groups for s in group], pad_token_id, batch_size)
    starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    return [flat[start : start + len(group)] for start, group in zip(starts, groups)]
