"""Pairs: chosen = the highest reward, rejected = the lowest, in TRL's preference format; then the split."""

import math
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from ..pipeline.stage import DROP_REASON, KEEP, PAIR, ROW, ROWS, TABLE, Column, Stage


@dataclass(frozen=True)
class BinarizeSettings:
    min_reward_margin: float
    implicit_prompt: bool


def binarize_example(example: dict, *, settings: BinarizeSettings) -> dict:
    """Chosen = highest reward, rejected = lowest (first occurrence on ties), in TRL's preference format.

    Input columns: `prompt`, `responses`, `rewards`. Output columns: `chosen`, `rejected` (the assistant's turn;
    with `implicit_prompt`, the prompt followed by it), `chosen_score`, `rejected_score`, `reward_margin`,
    `drop_reason` ("" keeps the pair; else "fewer_than_two_distinct_responses", "nan_reward",
    "all_rewards_equal", "margin_below_min").
    """
    responses, rewards = example["responses"], example["rewards"]
    reason = KEEP
    if len(set(responses)) < 2:
        reason = "fewer_than_two_distinct_responses"
    elif any(r is None or math.isnan(r) for r in rewards):
        reason = "nan_reward"
    elif max(rewards) == min(rewards):
        reason = "all_rewards_equal"
    elif max(rewards) - min(rewards) < settings.min_reward_margin:
        reason = "margin_below_min"
    if reason != KEEP:
        chosen_index = rejected_index = 0
    else:
        chosen_index = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        rejected_index = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    prompt = list(example["prompt"]) if settings.implicit_prompt else []
    return {
        "chosen": [*prompt, {"role": "assistant", "content": responses[chosen_index]}],
        "rejected": [*prompt, {"role": "assistant", "content": responses[rejected_index]}],
        "chosen_score": rewards[chosen_index],
        "rejected_score": rewards[rejected_index],
        "reward_margin": rewards[chosen_index] - rewards[rejected_index],
        DROP_REASON: reason,
    }


def binarize(config) -> Stage:
    """TRL's conversational preference format with an explicit prompt; `implicit_prompt` writes Magpie's published
    form (`chosen` = `[user, assistant]`, no `prompt` column)."""
    return Stage(
        name="binarize",
        kind=ROWS,
        desc="Binarizing",
        apply=binarize_example,
        batched=False,
        reads=("prompt", "responses", "rewards"),
        writes=(
            Column("chosen", "The highest-scored response, as conversation turns.", ROW),
            Column("rejected", "The lowest-scored response, as conversation turns.", ROW),
            Column("chosen_score", "Reward of `chosen`.", PAIR),
            Column("rejected_score", "Reward of `rejected`.", PAIR),
            Column("reward_margin", "`chosen_score - rejected_score`.", PAIR),
        ),
        drop_reasons=("fewer_than_two_distinct_responses", "nan_reward", "all_rewards_equal", "margin_below_min"),
        removes=("prompt",) if config.implicit_prompt else (),
        settings=BinarizeSettings(config.min_reward_margin, config.implicit_prompt),
        if_none_left="lower min_reward_margin, or check the reward model's scores",
    )


def sft_example(example: dict, *, settings=None) -> dict:
    """Input columns: `prompt`, `chosen`. Output column: `messages` (the prompt, then the chosen answer)."""
    return {"messages": [*example["prompt"], *example["chosen"]]}


def to_sft(config) -> Stage:
    """TRL's conversational language-modeling format: `messages` = the conversation with the best answer last."""
    return Stage(
        name="sft",
        kind=ROWS,
        desc="Writing SFT conversations",
        apply=sft_example,
        batched=False,
        reads=("prompt", "chosen"),
        writes=(Column("messages", "The conversation: the prompt's turns, then the highest-scored answer.", ROW),),
        removes=("prompt", "chosen", "rejected"),
    )


@dataclass(frozen=True)
class SplitSettings:
    test_size: float
    seed: int
    by_source: bool = False  # the prompt dataset's own test split makes `test`


def split(rows: Dataset, *, settings: SplitSettings) -> DatasetDict:
    """A seeded train/test split, the test split at least one pair; or, `by_source`, the rows of the prompt
    dataset's test split (column `source_split`) as `test`, in order."""
    if settings.by_source:
        sources = rows["source_split"]
        parts = {name: rows.select([i for i, s in enumerate(sources) if s == name]) for name in ("train", "test")}
        empty = [name for name, part in parts.items() if len(part) == 0]
        if empty:
            raise ValueError(
                f"No preference pair is left in the {empty[0]} split of the prompt dataset: check `prompt_split` / "
                "`prompt_test_split`, or relax `min_reward_margin` / `max_prompt_tokens`."
            )
        return DatasetDict(
            {name: part.flatten_indices().remove_columns("source_split") for name, part in parts.items()}
        )
    if len(rows) < 2:
        raise ValueError(
            f"Only {len(rows)} preference pair(s) survived the filters; a train/test split needs at least 2. "
            "Raise `num_instructions`, or relax `min_reward_margin` / `max_prompt_tokens`."
        )
    splits = rows.train_test_split(test_size=settings.test_size, seed=settings.seed)
    # Contiguous tables, so sizes (card, shard count) are the split's own and not the whole table's.
    return DatasetDict({name: part.flatten_indices() for name, part in splits.items()})


def split_sizes(dataset: DatasetDict) -> tuple[int, dict]:
    return 0, {f"{name}_rows": len(part) for name, part in dataset.items()}


def train_test_split(config) -> Stage:
    """A seeded `train` / `test` split (Magpie DPO: 98% / 2%)."""
    by_source = bool(config.prompt_dataset and config.prompt_test_split)
    return Stage(
        name="split",
        kind=TABLE,
        apply=split,
        reads=("source_split",) if by_source else (),
        removes=("source_split",) if by_source else (),
        settings=SplitSettings(config.test_size, config.seed, by_source),
        tally=split_sizes,
    )
