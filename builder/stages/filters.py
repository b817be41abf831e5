"""Instruction filters: rows that cannot make a pair are dropped with a counted reason.

`prompt_filter` renders each prompt through the generator's chat template (as the response stage will) and drops
empty, truncated and over-long ones (a prompt dataset's: over-long ones); `exact_duplicates` drops every later copy
of a prompt after normalisation, over the whole table.
"""

import re
from dataclasses import dataclass

from datasets import Dataset

from ..models import ModelSpec, load_tokenizer
from ..pipeline.stage import DROP_REASON, KEEP, ROW_STATS, ROWS, TABLE, Column, Stage
from ..templates import bos_prefix, encode_chat_text, render_chat


@dataclass(frozen=True)
class PromptFilterSettings:
    max_prompt_tokens: int
    day: str


def chat_prompt_ids(tokenizer, prompt: list[dict], day: str, bos: list[int] | None = None) -> list[int]:
    """The ids the generator is fed to answer `prompt`: its chat template with the generation header."""
    return encode_chat_text(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True, day=day), bos)


def filter_prompts(batch: dict, *, generator: ModelSpec, settings: PromptFilterSettings):
    """Says why a row would be dropped.

    Input columns: `instruction`, `instruction_finish_reason`, `prompt`. Output columns: `prompt_tokens` (the chat
    prompt with the generation header, in generator tokens), `drop_reason` ("" keeps the row; else "empty",
    "truncated" or "prompt_too_long").
    """
    tokenizer = load_tokenizer(generator)
    bos = bos_prefix(tokenizer)
    lengths, reasons = [], []
    for instruction, finish_reason, prompt in zip(
        batch["instruction"], batch["instruction_finish_reason"], batch["prompt"]
    ):
        length = len(chat_prompt_ids(tokenizer, prompt, settings.day, bos))
        lengths.append(length)
        if not instruction:
            reasons.append("empty")
        elif finish_reason != "stop":
            reasons.append("truncated")
        elif length > settings.max_prompt_tokens:
            reasons.append("prompt_too_long")
        else:
            reasons.append(KEEP)
    return {"prompt_tokens": lengths, DROP_REASON: reasons}


def prompt_filter(config, models) -> Stage:
    return Stage(
        name="filter",
        kind=ROWS,
        desc="Filtering instructions",
        apply=filter_prompts,
        reads=("instruction", "instruction_finish_reason", "prompt"),
        writes=(
            Column(
                "prompt_tokens", "Length of the chat prompt (template + instruction) in generator tokens.", ROW_STATS
            ),
        ),
        drop_reasons=("empty", "truncated", "prompt_too_long"),
        settings=PromptFilterSettings(config.max_prompt_tokens, config.chat_template_date),
        models={"generator": models.generator},
        if_none_left="raise max_instruction_tokens or max_prompt_tokens",
    )


def filter_prompt_lengths(batch: dict, *, generator: ModelSpec, settings: PromptFilterSettings):
    """The prompt filter of a prompt dataset (no sampled instruction to check).

    Input column: `prompt`. Output columns: `prompt_tokens`, `drop_reason` ("" or "prompt_too_long").
    """
    tokenizer = load_tokenizer(generator)
    bos = bos_prefix(tokenizer)
    lengths = [len(chat_prompt_ids(tokenizer, prompt, settings.day, bos)) for prompt in batch["prompt"]]
    return {
        "prompt_tokens": lengths,
        DROP_REASON: ["prompt_too_long" if n > settings.max_prompt_tokens else KEEP for n in lengths],
    }


def prompt_length_filter(config, models) -> Stage:
    return Stage(
        name="filter",
        kind=ROWS,
        desc="Filtering prompts",
        apply=filter_prompt_lengths,
        reads=("prompt",),
        writes=(
            Column("prompt_tokens", "Length of the chat prompt (template + messages) in generator tokens.", ROW_STATS),
        ),
        drop_reasons=("prompt_too_long",),
        settings=PromptFilterSettings(config.max_prompt_tokens, config.chat_template_date),
        models={"generator": models.generator},
        if_none_left="raise max_prompt_tokens",
    )


def normalize_instruction(text: str) -> str:
    """The key for exact-duplicate detection: case, whitespace and surrounding punctuation do not count."""
    return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.!?,;:\"'")


def mark_duplicates(prompts: list[list[dict]]) -> list[str]:
    """ "duplicate" for every later copy of a prompt (every message after normalisation), KEEP for the first."""
    seen = set()
    marked = []
    for prompt in prompts:
        key = tuple((m["role"], normalize_instruction(m["content"])) for m in prompt)
        marked.append("duplicate" if key in seen else KEEP)
        seen.add(key)
    return marked


def drop_exact_duplicates(rows: Dataset, *, settings=None) -> Dataset:
    """Input column: `prompt`. Output column: `drop_reason`, over the whole table."""
    return rows.add_column(DROP_REASON, mark_duplicates(rows["prompt"]))


def exact_duplicates(config) -> Stage:
    return Stage(
        name="dedup",
        kind=TABLE,
        apply=drop_exact_duplicates,
        reads=("prompt",),
        drop_reasons=("duplicate",),
        if_none_left="raise num_instructions",
    )
