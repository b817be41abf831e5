"""Rewards: every response scored by the reward model, through the reward model's own chat template."""

from dataclasses import dataclass

from ..engines import score_continuations
from ..engines.transformers.scoring import score_groups
from ..models import ModelSpec, load_reward_model, load_tokenizer, public_model_name
from ..pipeline.stage import CANDIDATES, MODEL, PROVENANCE, ROW_STATS, Column, Stage
from ..templates import bos_prefix, encode_chat_text, render_chat
from .tags import chat_ids, label_texts, normalise


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


REWARD_COLUMNS = (
    Column("rewards", "The reward of each response, aligned with `responses`.", CANDIDATES),
    Column(
        "reward_inputs_truncated",
        "How many of the row's reward-model inputs were cut to the reward model's maximum.",
        ROW_STATS,
    ),
    Column("reward_model", "The reward model that scored the responses.", PROVENANCE),
)


def rewards(config, models) -> Stage:
    return Stage(
        name="rewards",
        kind=MODEL,
        desc="Scoring responses",
        apply=score_responses,
        reads=("prompt", "responses"),
        writes=REWARD_COLUMNS,
        settings=RewardSettings(config.reward_max_length, config.chat_template_date, models.reward_revision),
        models={"reward": models.reward},
        runtime={"batch_size": config.reward_batch_size},
        batch_size=config.shard_size,
        num_proc=config.reward_num_proc,
        tally=truncations,
    )


RATINGS = tuple(range(1, 11))


def rating_prompt(prompt: list[dict], response: str) -> str:
    """The judge's user message: the rubric first (shared by every prompt), then the conversation and the answer."""
    conversation = "\n\n".join(f"### {m['role'].capitalize()}\n{m['content']}" for m in prompt)
    return (
        "You rate how well an AI assistant answered a user, to build preference data. Judge helpfulness, "
        "correctness, completeness, clarity and safety. Answer with one line 'Rating: <n>', n from 1 (useless "
        "or harmful) to 10 (excellent).\n\n"
        f"## Conversation\n\n{conversation}\n\n## The assistant's answer to rate\n\n{response}"
    )


@dataclass(frozen=True)
class JudgeRewardSettings:
    day: str
    judge_revision: str


def judge_responses(batch: dict, rank: int | None, *, judge: ModelSpec, settings: JudgeRewardSettings, max_rows=256):
    """The judge's expected rating of every response, by label scoring over 1..10.

    Input columns: `prompt`, `responses`. Output columns: `rewards` (per response, the probability-weighted mean
    rating), `reward_inputs_truncated` (always 0: nothing is cut), `reward_model` ("judge:<model>").
    """
    tokenizer = load_tokenizer(judge)
    bos = bos_prefix(tokenizer)
    prompts = [
        chat_ids(tokenizer, rating_prompt(prompt, response), settings.day, bos)
        for prompt, responses in zip(batch["prompt"], batch["responses"])
        for response in responses
    ]
    labels = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in label_texts("Rating", RATINGS)]
    expected = [
        sum(p * k for p, k in zip(normalise(row), RATINGS))
        for row in score_continuations(judge, rank, prompts, labels, max_rows=max_rows)
    ]
    sizes = [len(r) for r in batch["responses"]]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {
        "rewards": [expected[s : s + n] for s, n in zip(starts, sizes)],
        "reward_inputs_truncated": [0] * len(sizes),
        "reward_model": [f"judge:{public_model_name(judge.name_or_path)}"] * len(sizes),
    }


def judge_rewards(config, models) -> Stage:
    """The judge's 1-10 rating of every response (label scoring) as its reward, where no reward model fits."""
    return Stage(
        name="rewards",
        kind=MODEL,
        desc="Rating responses",
        apply=judge_responses,
        reads=("prompt", "responses"),
        writes=REWARD_COLUMNS,
        settings=JudgeRewardSettings(config.chat_template_date, models.judge_revision),
        models={"judge": models.judge},
        runtime={"max_rows": config.judge_batch_size},
        batch_size=config.shard_size,
        tally=truncations,
    )
