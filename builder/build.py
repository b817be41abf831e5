"""build(config) -> DatasetDict: every stage in order, readable top to bottom."""

import logging
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from . import stages
from .config import BuildConfig
from .generation import SamplingParams
from .ledger import Ledger
from .card import build_date
from .models import ModelSpec, generation_eos_ids, load_generator, load_reward_model, revision_of
from .templates import PreQuery, derive_pre_query

logger = logging.getLogger("magpie_builder")

# The order of the published columns: TRL's first, then Magpie's metadata, then the build's own accounting.
COLUMN_ORDER = [
    "uuid", "instruction", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "reward_margin",
    "responses", "rewards", "response_finish_reasons", "response_tokens", "instruction_tokens", "prompt_tokens",
    "reward_inputs_truncated", "gen_input_configs", "gen_response_configs", "reward_model",
]


@dataclass
class BuildResult:
    dataset: DatasetDict
    ledger: Ledger
    pre_query: PreQuery
    config: BuildConfig
    reward_revision: str
    built_at: str


def model_specs(config: BuildConfig) -> tuple[ModelSpec, ModelSpec]:
    common = {"dtype": config.dtype, "device": config.device, "attn_implementation": config.attn_implementation}
    generator = ModelSpec(config.generator_model, config.generator_revision, config.generator_trust_remote_code,
                          **common)
    reward = ModelSpec(config.reward_model, config.reward_revision, config.reward_trust_remote_code, **common)
    return generator, reward


def pre_query_of(config: BuildConfig, generator: ModelSpec) -> PreQuery:
    model, tokenizer = load_generator(generator)
    return derive_pre_query(
        tokenizer, generation_eos_ids(model), model_name=generator.name_or_path, day=config.chat_template_date,
        pre_query_template=config.pre_query_template, keep_default_system=config.keep_default_system,
        system_prompt=config.system_prompt,
    )


def _map(dataset: Dataset, function, config: BuildConfig, desc: str, fn_kwargs: dict, batch_size: int, **kwargs):
    """`Dataset.map` with the build's conventions: batched, a progress bar, one model per worker process."""
    return dataset.map(
        function, batched=True, batch_size=batch_size, with_rank=True, num_proc=config.num_proc if config.num_proc > 1
        else None, fn_kwargs=fn_kwargs, desc=desc,
        new_fingerprint=stages.fingerprint(dataset._fingerprint, desc, fn_kwargs, batch_size), **kwargs,
    )


def _require_rows(rows: Dataset, ledger: Ledger, stage: str, fix: str) -> None:
    if len(rows) == 0:
        raise ValueError(f"No rows survived the {stage} (drops so far: {ledger.drops()}). To keep rows: {fix}, "
                         "or raise num_instructions.")


def build(config: BuildConfig) -> BuildResult:
    ledger = Ledger()
    generator, reward = model_specs(config)
    # Load both models up front, so a wrong id or a missing opt-in fails before hours of generation.
    reward_revision = revision_of(load_reward_model(reward)[0], reward)
    pre_query = pre_query_of(config, generator)
    logger.info("pre-query template (%s): %r", pre_query.source, pre_query.text)

    # 1. Instructions from the pre-query template alone.
    with ledger.stage("instructions", rows_in=config.num_instructions) as record:
        rows = Dataset.from_dict({"uuid": stages.make_uuids(config.seed, config.num_instructions)})
        settings = stages.InstructionSettings(
            tuple(pre_query.token_ids), pre_query.text,
            SamplingParams(config.instruction_temperature, config.instruction_top_p, config.max_instruction_tokens,
                           tuple(pre_query.instruction_stop_ids)),
            config.seed,
        )
        rows = _map(rows, stages.generate_instructions, config, "Generating instructions",
                    {"generator": generator, "settings": settings}, config.generation_batch_size)
        record.rows_out = len(rows)
        record.tokens = sum(rows["instruction_tokens"])

    # 2. Filters: empty, truncated, prompt too long, exact duplicates.
    with ledger.stage("filter", rows_in=len(rows)) as record:
        rows = rows.map(
            stages.tag_instruction, batched=True, desc="Filtering instructions",
            fn_kwargs={"generator": generator, "day": config.chat_template_date,
                       "max_prompt_tokens": config.max_prompt_tokens},
            new_fingerprint=stages.fingerprint(rows._fingerprint, "filter", config.max_prompt_tokens,
                                               config.chat_template_date),
        )
        reasons = stages.mark_duplicates(rows["instruction"], rows["drop_reason"])
        rows = rows.remove_columns("drop_reason").add_column("drop_reason", reasons)
        rows = stages.drop_tagged(rows, record).remove_columns("instruction_finish_reason")
        _require_rows(rows, ledger, "instruction filters", "raise max_instruction_tokens or max_prompt_tokens")

    # 3. N responses per instruction, through the normal chat template.
    with ledger.stage("responses", rows_in=len(rows)) as record:
        settings = stages.ResponseSettings(
            SamplingParams(config.response_temperature, config.response_top_p, config.max_response_tokens,
                           tuple(pre_query.response_stop_ids)),
            config.num_responses, config.seed,
        )
        rows = _map(rows, stages.generate_responses, config, "Generating responses",
                    {"generator": generator, "settings": settings}, config.generation_batch_size)
        rows = rows.remove_columns("prompt_token_ids")
        record.rows_out = len(rows)
        record.tokens = sum(map(sum, rows["response_tokens"]))
        reasons = [r for row in rows["response_finish_reasons"] for r in row]
        record.notes["responses_truncated"] = reasons.count("length")

    # 4. Rewards for every response.
    with ledger.stage("rewards", rows_in=len(rows)) as record:
        settings = stages.RewardSettings(config.reward_max_length, config.reward_batch_size,
                                         config.chat_template_date)
        rows = _map(rows, stages.score_responses, config, "Scoring responses",
                    {"reward": reward, "settings": settings}, config.generation_batch_size)
        record.rows_out = len(rows)
        record.notes["reward_inputs_truncated"] = sum(rows["reward_inputs_truncated"])

    # 5. Binarize: chosen = highest reward, rejected = lowest.
    with ledger.stage("binarize", rows_in=len(rows)) as record:
        rows = rows.map(
            stages.binarize_example, desc="Binarizing",
            fn_kwargs={"min_reward_margin": config.min_reward_margin, "implicit_prompt": config.implicit_prompt},
            new_fingerprint=stages.fingerprint(rows._fingerprint, "binarize", config.min_reward_margin,
                                               config.implicit_prompt),
        )
        rows = stages.drop_tagged(rows, record)
        _require_rows(rows, ledger, "binarize", "lower min_reward_margin, or check the reward model's scores")
        rows = rows.select_columns([c for c in COLUMN_ORDER if c in rows.column_names])

    # 6. Split.
    with ledger.stage("split", rows_in=len(rows)) as record:
        dataset = stages.split(rows, config.test_size, config.seed)
        record.rows_out = sum(len(split) for split in dataset.values())
        record.notes.update({f"{name}_rows": len(split) for name, split in dataset.items()})

    logger.info("build summary\n%s", ledger.summary())
    return BuildResult(dataset, ledger, pre_query, config, reward_revision, build_date())
