"""Rewards: every response scored by the reward model, through the reward model's own chat template."""

from dataclasses import dataclass

from ..engines.transformers.scoring import score_groups
from ..models import ModelSpec, load_reward_model, public_model_name
from ..pipeline.stage import CANDIDATES, MODEL, PROVENANCE, ROW_STATS, Column, Stage
from ..templates import bos_prefix, encode_chat_text, render_chat


@dataclass(frozen=True)
class RewardSettings:
    max_length: int | None
    day: str
    reward_revision: str


def reward_max_length(model, tokenizer, requested: int | None) -> int:
    limits = [requested, getattr(model.config, "max_position_embeddings", None)]
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limit for limit in limits if limit)


def score_responses(
    batch: dict, rank: int | None, *, reward: ModelSpec, settings: RewardSettings, batch_size: int = 16
):
    """Scores every (prompt, response) pair with the reward model, through its own chat template.

    Input columns: `prompt`, `responses`. Output columns: `rewards` (N floats), `reward_inputs_truncated` (how
    many of the row's N inputs were cut to the reward model's maximum length), `reward_model`.
    """
    model, tokenizer = load_reward_model(reward, rank)
    max_length = reward_max_length(model, tokenizer, settings.max_length)
    bos = bos_prefix(tokenizer)
    sequences, truncated = [], []
    for prompt, responses in zip(batch["prompt"], batch["responses"]):
        cut = 0
        for response in responses:
            chat = [*prompt, {"role": "assistant", "content": response}]
            ids = encode_chat_text(
                tokenizer, render_chat(tokenizer, chat, add_generation_prompt=False, day=settings.day), bos
            )
            if len(ids) > max_length:
                ids, cut = ids[:max_length], cut + 1
            sequences.append(ids)
        truncated.append(cut)
    sizes = [len(r) for r in batch["responses"]]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    groups = [sequences[s : s + n] for s, n in zip(starts, sizes)]
    return {
        "rewards": score_groups(model, groups, tokenizer.pad_token_id, batch_size),
        "reward_inputs_truncated": truncated,
        "reward_model": [public_model_name(reward.name_or_path)] * len(sizes),
    }


def truncations(rows) -> tuple[int, dict]:
    return 0, {"reward_inputs_truncated": sum(rows["reward_inputs_truncated"])}


def rewards(config, models) -> Stage:
    return Stage(
        name="rewards",
        kind=MODEL,
        desc="Scoring responses",
        apply=score_responses,
        reads=("prompt", "responses"),
        writes=(
            Column("rewards", "The reward of each response, aligned with `responses`.", CANDIDATES),
            Column(
                "reward_inputs_truncated",
                "How many of the row's reward-model inputs were cut to the reward model's maximum.",
                ROW_STATS,
            ),
            Column("reward_model", "The reward model that scored the responses.", PROVENANCE),
        ),
        settings=RewardSettings(config.reward_max_length, config.chat_template_date, models.reward_revision),
        models={"reward": models.reward},
        runtime={"batch_size": config.reward_batch_size},
        batch_size=config.shard_size,
        tally=truncations,
    )
