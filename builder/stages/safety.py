"""Safety of every instruction by a guard model (Llama-Guard-3 style), by label scoring.

The instruction is rendered as the user's turn through the guard's own chat template, which asks for "safe" or
"unsafe" and then the violated category. "safe" and "unsafe" are scored as the guard's answer; for an unsafe
instruction each category the template lists (`S1: ...`) is scored after "unsafe\n", and the most likely one names it.
"""

import re
from dataclasses import dataclass

from ..engines import score_continuations
from ..models import ModelSpec, load_tokenizer
from ..pipeline.stage import MODEL, ROW_STATS, Column, Stage
from ..templates import bos_prefix, encode_chat_text, render_chat
from .tags import normalise


CATEGORY = re.compile(r"^(S\d+):", re.MULTILINE)


@dataclass(frozen=True)
class SafetySettings:
    day: str
    guard_revision: str


def guard_prompt(tokenizer, instruction: str, day: str, bos: list[int]) -> tuple[list[int], str, list[str]]:
    """(ids, text, categories): the guard's prompt for one user turn, and the categories its policy lists."""
    text = render_chat(tokenizer, [{"role": "user", "content": instruction}], add_generation_prompt=True, day=day)
    # Llama-Guard-3's template prints a space before its BOS; the tokenizer's own BOS rule puts exactly one in front.
    if tokenizer.bos_token and text.lstrip().startswith(tokenizer.bos_token):
        text = text.lstrip()
    return encode_chat_text(tokenizer, text, bos), text, CATEGORY.findall(text)


def answer_prefix(prompt_text: str) -> str:
    # Llama-3 style headers end at <|end_header_id|> and the model writes the blank line itself; the template
    # leaves it out of the prompt, so it is part of every scored answer.
    return "\n\n" if prompt_text.endswith("<|end_header_id|>") else ""


def classify(batch: dict, rank: int | None, *, guard: ModelSpec, settings: SafetySettings, max_rows: int = 256):
    """Input columns: `instruction`. Output columns: `safety` ("safe" or "unsafe:S<k>"), `safety_confidence`
    (the probability of safe, or of unsafe, between the two)."""
    tokenizer = load_tokenizer(guard)
    bos = bos_prefix(tokenizer)
    rendered = [guard_prompt(tokenizer, text, settings.day, bos) for text in batch["instruction"]]
    categories = rendered[0][2]
    if not categories:
        raise ValueError(
            f"The guard model {guard.name_or_path}'s chat template lists no categories ('S1: ...'): it is not a "
            "Llama-Guard-style safety classifier. Set `guard_model` to one (meta-llama/Llama-Guard-3-8B)."
        )
    prefix = answer_prefix(rendered[0][1])
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def ids(text: str, closed: bool) -> list[int]:
        return tokenizer(prefix + text, add_special_tokens=False)["input_ids"] + (end if closed else [])

    # The end-of-turn after a category keeps "S1" from taking the probability of "S10"..."S14".
    continuations = [ids("safe", False), ids("unsafe", False)] + [ids(f"unsafe\n{c}", True) for c in categories]
    scores = score_continuations(guard, rank, [r[0] for r in rendered], continuations, max_rows=max_rows)
    labels, confidences = [], []
    for row in scores:
        safe, unsafe = normalise(row[:2])
        if safe >= unsafe:
            labels.append("safe")
        else:
            by_category = row[2:]
            labels.append(f"unsafe:{categories[max(range(len(by_category)), key=by_category.__getitem__)]}")
        confidences.append(max(safe, unsafe))
    return {"safety": labels, "safety_confidence": confidences}


def safety(config, models) -> Stage:
    return Stage(
        name="safety",
        kind=MODEL,
        desc="Classifying safety",
        apply=classify,
        reads=("instruction",),
        writes=(
            Column("safety", "The guard model's verdict on the instruction: `safe` or `unsafe:S<k>`.", ROW_STATS),
            Column("safety_confidence", "The guard's probability of that verdict (safe vs unsafe).", ROW_STATS),
        ),
        settings=SafetySettings(config.chat_template_date, models.guard_revision),
        models={"guard": models.guard},
        runtime={"max_rows": config.judge_batch_size},
        batch_size=config.shard_size,
    )
