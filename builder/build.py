"""build(config) -> DatasetDict. The whole build is the list in `stages_for`; the runner does the rest.

Adding a stage is one module that declares it (`pipeline/stage.py`) and one entry in that list.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from datasets import DatasetDict

from .config import BuildConfig
from .models import ModelInfo, ModelSpec, model_info
from .pipeline import runner
from .pipeline.ledger import Ledger
from .pipeline.ranks import Ranks
from .pipeline.stage import Column, Stage
from .sources import magpie
from .stages import filters, pairs, responses, rewards
from .templates import PreQuery, derive_pre_query


logger = logging.getLogger("magpie_builder")


@dataclass(frozen=True)
class BuildModels:
    """The build's models, checked before any weights load, and what was derived from them."""

    generator: ModelSpec
    reward: ModelSpec
    generator_revision: str
    reward_revision: str
    pre_query: PreQuery


def stages_for(config: BuildConfig, models: BuildModels) -> list[Stage]:
    """The build, in order: each entry is one stage, declared in its own module."""
    return [
        magpie.instructions(config, models),  # the source: instructions from the pre-query template alone
        filters.prompt_filter(config, models),  # empty, truncated, prompt too long
        filters.exact_duplicates(config),
        responses.responses(config, models),  # N answers through the normal chat template
        rewards.rewards(config, models),
        pairs.binarize(config),  # chosen = highest reward, rejected = lowest
        pairs.train_test_split(config),
    ]


@dataclass
class BuildResult:
    dataset: DatasetDict
    ledger: Ledger
    columns: list[Column]  # the published columns, in order, as the stages declare them
    pre_query: PreQuery
    config: BuildConfig
    reward_revision: str
    built_at: str


def model_specs(config: BuildConfig, ranks: Ranks = Ranks()) -> tuple[ModelSpec, ModelSpec]:
    device = config.device
    if ranks.world_size > 1 and device == "auto":
        import torch

        # One process per GPU across nodes: this process's GPU is its local rank.
        device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
    common = {"dtype": config.dtype, "device": device, "attn_implementation": config.attn_implementation}
    generator = ModelSpec(
        config.generator_model,
        config.generator_revision,
        config.generator_trust_remote_code,
        engine=config.engine,
        tensor_parallel_size=config.tensor_parallel_size,
        **common,
    )
    reward = ModelSpec(config.reward_model, config.reward_revision, config.reward_trust_remote_code, **common)
    return generator, reward


def pre_query_of(config: BuildConfig, generator: ModelSpec, info: ModelInfo | None = None) -> PreQuery:
    """The generator's pre-query template; `info` is its `model_info`, when the caller has it already."""
    info = info or model_info(generator, "generator")
    return derive_pre_query(
        info.tokenizer,
        list(info.eos_ids),
        model_name=generator.name_or_path,
        day=config.chat_template_date,
        pre_query_template=config.pre_query_template,
        keep_default_system=config.keep_default_system,
        system_prompt=config.system_prompt,
    )


def check_models(config: BuildConfig, ranks: Ranks = Ranks()) -> BuildModels:
    """Both models (ids, remote-code opt-in, chat templates) and the pre-query, before any weights load."""
    generator, reward = model_specs(config, ranks)
    generator_info = model_info(generator, "generator")
    reward_revision = model_info(reward, "reward").revision
    pre_query = pre_query_of(config, generator, generator_info)
    logger.info("pre-query template (%s): %r", pre_query.source, pre_query.text)
    return BuildModels(generator, reward, generator_info.revision, reward_revision, pre_query)


def build(config: BuildConfig, ranks: Ranks = Ranks(), stages=stages_for) -> BuildResult | None:
    """Builds the dataset. Under several processes every rank works; rank 0 alone returns the result.

    Args:
        config (`BuildConfig`): the build.
        ranks (`Ranks`, *optional*): this process's place in a multi-process run.
        stages (`Callable`, defaults to `stages_for`): `(config, models) -> list[Stage]`, the build's stages.
    """
    models = check_models(config, ranks)
    run = runner.run(
        stages(config, models), ranks=ranks, resume=config.resume, cache_dir=config.cache_dir, num_proc=config.num_proc
    )
    if run is None:
        return None
    built_at = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return BuildResult(
        run.dataset, run.ledger, run.columns, models.pre_query, config, models.reward_revision, built_at
    )
