"""The build's transforms. Each is a pure function over one batch (or one example) that names its input and
output columns, beside a thin wrapper that applies it with `Dataset.map(batched=True, desc=...)`.

Models reach the transforms as a `ModelSpec` in `fn_kwargs` and are loaded once per process (`models.py`), never
through a closure. Each map gets an explicit fingerprint computed from everything that changes its output, so
fingerprints stay stable and cheap (hashing a 70B model to fingerprint it is not an option).
"""

import hashlib
import math
import re
import uuid as uuid_lib
from collections import Counter
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from .engines import sample_completions
from .generation import SamplingParams
from .models import ModelSpec, load_reward_model, load_tokenizer, public_model_name
from .scoring import score_groups
from .templates import bos_prefix, encode_chat_text, render_chat

KEEP = ""  # drop_reason of a row that stays


def row_seed(seed: int, stage: str, row_uuid: str, sample_index: int) -> int:
    """A signed int64 seed per sample: the same row gets the same text whatever batch or process it lands in."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{row_uuid}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def make_uuids(seed: int, count: int) -> list[str]:
    return [str(uuid_lib.UUID(bytes=hashlib.blake2b(f"magpie/{seed}/{i}".encode(), digest_size=16).digest(),
                              version=4)) for i in range(count)]


# --------------------------------------------------------------------------------------------------------------
# 1. instructions


@dataclass(frozen=True)
class InstructionSettings:
    pre_query_ids: tuple[int, ...]
    pre_query_text: str
    sampling: SamplingParams
    seed: int
    generator_revision: str


def generate_instructions(batch: dict, rank: int | None, *, generator: ModelSpec, settings: InstructionSettings,
                          max_batch_size: int = 64, next_batch: dict | None = None):
    """Samples one instruction per row from the pre-query template.

    Input columns: `uuid`. Output columns: `instruction`, `instruction_finish_reason` ("stop" or "length"),
    `instruction_tokens`, `gen_input_configs`. `next_batch` (this worker's next shard, when there is one) starts in
    the rows this shard's tail frees; it changes no output.
    """
    def work(rows: dict):
        seeds = [row_seed(settings.seed, "instruction", u, 0) for u in rows["uuid"]]
        return [list(settings.pre_query_ids)] * len(seeds), seeds

    prompts, seeds = work(batch)
    completions, tokenizer = sample_completions(generator, rank, prompts, seeds, settings.sampling, same_prompt=True,
                                                max_batch_size=max_batch_size,
                                                then=work(next_batch) if next_batch else None)
    config = {
        "input_generator": public_model_name(generator.name_or_path),
        "generator_revision": settings.generator_revision,
        "pre_query_template": settings.pre_query_text,
        "temperature": settings.sampling.temperature,
        "top_p": settings.sampling.top_p,
        "max_tokens": settings.sampling.max_new_tokens,
        "seed": settings.seed,
    }
    return {
        "instruction": [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in completions],
        "instruction_finish_reason": [c.finish_reason for c in completions],
        "instruction_tokens": [len(c.token_ids) for c in completions],
        "gen_input_configs": [config] * len(completions),
    }


# --------------------------------------------------------------------------------------------------------------
# 2. instruction filters


def normalize_instruction(text: str) -> str:
    """The key for exact-duplicate detection: case, whitespace and surrounding punctuation do not count."""
    return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.!?,;:\"'")


def tag_instruction(batch: dict, *, generator: ModelSpec, day: str, max_prompt_tokens: int):
    """Renders each instruction as the generator's chat prompt and says why a row would be dropped.

    Input columns: `instruction`, `instruction_finish_reason`. Output columns: `prompt_token_ids` (the chat prompt
    with the generation header, as the response stage feeds it), `prompt_tokens`, `drop_reason` ("" keeps the
    row; else "empty", "truncated" or "prompt_too_long").
    """
    tokenizer = load_tokenizer(generator)
    bos = bos_prefix(tokenizer)
    ids, reasons = [], []
    for instruction, finish_reason in zip(batch["instruction"], batch["instruction_finish_reason"]):
        messages = [{"role": "user", "content": instruction}]
        prompt_ids = encode_chat_text(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True, day=day),
                                      bos)
        ids.append(prompt_ids)
        if not instruction:
            reasons.append("empty")
        elif finish_reason != "stop":
            reasons.append("truncated")
        elif len(prompt_ids) > max_prompt_tokens:
            reasons.append("prompt_too_long")
        else:
            reasons.append(KEEP)
    return {"prompt_token_ids": ids, "prompt_tokens": [len(i) for i in ids], "drop_reason": reasons}


def mark_duplicates(instructions: list[str], reasons: list[str]) -> list[str]:
    """Marks every later copy of an instruction (after normalisation) among the kept rows as "duplicate"."""
    seen = set()
    marked = []
    for text, reason in zip(instructions, reasons):
        key = normalize_instruction(text)
        if reason == KEEP and key in seen:
            reason = "duplicate"
        elif reason == KEEP:
            seen.add(key)
        marked.append(reason)
    return marked


def drop_tagged(dataset: Dataset, record) -> Dataset:
    """Counts `drop_reason` into the ledger record, keeps the rows tagged KEEP, and removes the column."""
    reasons = dataset["drop_reason"]
    record.drops.update({k: v for k, v in sorted(Counter(reasons).items()) if k != KEEP})
    keep = [i for i, reason in enumerate(reasons) if reason == KEEP]
    kept = dataset.select(keep) if len(keep) < len(dataset) else dataset
    record.rows_out = len(kept)
    return kept.remove_columns("drop_reason")


# --------------------------------------------------------------------------------------------------------------
# 3. responses


@dataclass(frozen=True)
class ResponseSettings:
    sampling: SamplingParams
    num_responses: int
    seed: int
    generator_revision: str


def generate_responses(batch: dict, rank: int | None, *, generator: ModelSpec, settings: ResponseSettings,
                       max_batch_size: int = 64, next_batch: dict | None = None):
    """Samples N responses per instruction, all N from one shared prefill of the chat prompt.

    Input columns: `uuid`, `prompt_token_ids`. Output columns: `responses` (N strings), `response_finish_reasons`
    (N of "stop"/"length"), `response_tokens` (N ints), `gen_response_configs`. `next_batch` (this worker's next
    shard, when there is one) starts in the rows this shard's tail frees; it changes no output.
    """
    n = settings.num_responses

    def work(rows: dict):
        return rows["prompt_token_ids"], [row_seed(settings.seed, "response", u, j) for u in rows["uuid"]
                                          for j in range(n)]

    prompts, seeds = work(batch)
    completions, tokenizer = sample_completions(generator, rank, prompts, seeds, settings.sampling, num_samples=n,
                                                max_batch_size=max_batch_size,
                                                then=work(next_batch) if next_batch else None)
    config = {
        "output_generator": public_model_name(generator.name_or_path),
        "generator_revision": settings.generator_revision,
        "temperature": settings.sampling.temperature,
        "top_p": settings.sampling.top_p,
        "max_tokens": settings.sampling.max_new_tokens,
        "num_responses": n,
        "seed": settings.seed,
    }
    groups = [completions[i : i + n] for i in range(0, len(completions), n)]
    return {
        "responses": [[tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in g] for g in groups],
        "response_finish_reasons": [[c.finish_reason for c in g] for g in groups],
        "response_tokens": [[len(c.token_ids) for c in g] for g in groups],
        "gen_response_configs": [config] * len(groups),
    }


# --------------------------------------------------------------------------------------------------------------
# 4. rewards


@dataclass(frozen=True)
class RewardSettings:
    max_length: int | None
    batch_size: int
    day: str


def reward_max_length(model, tokenizer, requested: int | None) -> int:
    limits = [requested, getattr(model.config, "max_position_embeddings", None)]
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limit for limit in limits if limit)


def score_responses(batch: dict, rank: int | None, *, reward: ModelSpec, settings: RewardSettings):
    """Scores every (instruction, response) pair with the reward model, through its own chat template.

    Input columns: `instruction`, `responses`. Output columns: `rewards` (N floats), `reward_inputs_truncated`
    (how many of the row's N inputs were cut to the reward model's maximum length), `reward_model`.
    """
    model, tokenizer = load_reward_model(reward, rank)
    max_length = reward_max_length(model, tokenizer, settings.max_length)
    bos = bos_prefix(tokenizer)
    sequences, truncated = [], []
    for instruction, responses in zip(batch["instruction"], batch["responses"]):
        cut = 0
        for response in responses:
            chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
            ids = encode_chat_text(tokenizer, render_chat(tokenizer, chat, add_generation_prompt=False,
                                                          day=settings.day), bos)
            if len(ids) > max_length:
                ids, cut = ids[:max_length], cut + 1
            sequences.append(ids)
        truncated.append(cut)
    sizes = [len(r) for r in batch["responses"]]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    groups = [sequences[s : s + n] for s, n in zip(starts, sizes)]
    return {
        "rewards": score_groups(model, groups, tokenizer.pad_token_id, settings.batch_size),
        "reward_inputs_truncated": truncated,
        "reward_model": [public_model_name(reward.name_or_path)] * len(sizes),
    }


# --------------------------------------------------------------------------------------------------------------
# 5. binarize


def binarize_example(example: dict, *, min_reward_margin: float, implicit_prompt: bool) -> dict:
    """Chosen = highest reward, rejected = lowest (first occurrence on ties), in TRL's preference format.

    Input columns: `instruction`, `responses`, `rewards`. Output columns: `prompt` (absent with
    `implicit_prompt`), `chosen`, `rejected`, `chosen_score`, `rejected_score`, `reward_margin`, `drop_reason`
    ("" keeps the pair; else "fewer_than_two_distinct_responses", "nan_reward", "all_rewards_equal",
    "margin_below_min").
    """
    responses, rewards = example["responses"], example["rewards"]
    user = {"role": "user", "content": example["instruction"]}
    reason = KEEP
    if len(set(responses)) < 2:
        reason = "fewer_than_two_distinct_responses"
    elif any(r is None or math.isnan(r) for r in rewards):
        reason = "nan_reward"
    elif max(rewards) == min(rewards):
        reason = "all_rewards_equal"
    elif max(rewards) - min(rewards) < min_reward_margin:
        reason = "margin_below_min"
    if reason != KEEP:
        chosen_index = rejected_index = 0
    else:
        chosen_index = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        rejected_index = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    chosen = [{"role": "assistant", "content": responses[chosen_index]}]
    rejected = [{"role": "assistant", "content": responses[rejected_index]}]
    out = {
        "chosen": [user, *chosen] if implicit_prompt else chosen,
        "rejected": [user, *rejected] if implicit_prompt else rejected,
        "chosen_score": rewards[chosen_index],
        "rejected_score": rewards[rejected_index],
        "reward_margin": rewards[chosen_index] - rewards[rejected_index],
        "drop_reason": reason,
    }
    if not implicit_prompt:
        out["prompt"] = [user]
    return out


# --------------------------------------------------------------------------------------------------------------
# 6. split


def split(dataset: Dataset, test_size: float, seed: int) -> DatasetDict:
    """A seeded train/test split; the test split gets at least one pair."""
    if len(dataset) < 2:
        raise ValueError(
            f"Only {len(dataset)} preference pair(s) survived the filters; a train/test split needs at least 2. "
            "Raise `num_instructions`, or relax `min_reward_margin` / `max_prompt_tokens`."
        )
    splits = dataset.train_test_split(test_size=test_size, seed=seed)
    # Contiguous tables, so sizes (card, shard count) are the split's own and not the whole table's.
    return DatasetDict({name: split.flatten_indices() for name, split in splits.items()})
