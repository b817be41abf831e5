"""build(config) -> DatasetDict. The whole build is the list in `stages_for`; the runner does the rest.

Adding a stage is one module that declares it (`pipeline/stage.py`) and one entry in that list.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from datasets import DatasetDict

from .config import BuildConfig
from .models import ModelInfo, ModelSpec, model_info
from .pipeline import runner
from .pipeline.ledger import Ledger
from .pipeline.ranks import Ranks
from .pipeline.stage import Column, Stage
from .sources import magpie, multi_turn, prompts
from .stages import filters, language, near_dedup, pairs, responses, rewards, safety, select, tags
from .templates import (
    LaterTurn,
    PreQuery,
    derive_next_user_header,
    derive_pre_query,
    render_chat,
    response_stops,
)


logger = logging.getLogger("magpie_builder")


@dataclass(frozen=True)
class BuildModels:
    """The build's models, checked before any weights load, and what was derived from them."""

    generator: ModelSpec
    reward: ModelSpec | None
    generator_revision: str
    reward_revision: str | None
    pre_query: PreQuery
    judge: ModelSpec | None = None
    judge_revision: str | None = None
    guard: ModelSpec | None = None
    guard_revision: str | None = None
    embedder: ModelSpec | None = None
    embedder_revision: str | None = None
    judge_stop_ids: tuple[int, ...] = ()  # the end of the judge's turn, where its generated tags stop
    judge_stop_strings: tuple[str, ...] = ()  # the same where text ends the judge's turn
    prompts_revision: str | None = None  # the prompt dataset's commit, or a hash of its local files
    later_turn: LaterTurn | None = None  # what opens a later user turn (multi-turn), token-exact
    follow_up_system_prompt: str | None = None  # None where the template takes no system message


def stages_for(config: BuildConfig, models: BuildModels) -> list[Stage]:
    """The build, in order: each entry is one stage, declared in its own module."""
    stages = [
        # The source: a prompt dataset's prompts, or instructions the generator writes from the pre-query alone.
        prompts.prompts(config, models.prompts_revision)
        if config.prompt_dataset
        else magpie.instructions(config, models),
        filters.prompt_length_filter(config, models)
        if config.prompt_dataset
        else filters.prompt_filter(config, models),
        filters.exact_duplicates(config),
        # Curation, each stage switched on in the config. Near-duplicates go first (the judges then see fewer
        # rows), the judge's tags last (another judge then recomputes only the tags and what follows them).
        near_dedup.embed(config, models) if config.near_dedup else None,
        near_dedup.near_duplicates(config) if config.near_dedup else None,
        language.language(config) if config.detect_language else None,
        safety.safety(config, models) if config.guard_model else None,
        tags.tags(config, models) if config.tag_instructions else None,  # task category, difficulty, quality
        tags.explanations(config, models) if config.tag_explanations else None,  # intent, knowledge, ...
        select.select(config) if config.selects else None,  # rules, then select_max by task category
        multi_turn.later_turns(config, models) if config.num_turns > 1 else None,  # Magpie-MT: turns 2..n
        responses.responses(config, models),  # N answers through the normal chat template
        rewards.judge_rewards(config, models) if config.reward_judge else rewards.rewards(config, models),
        pairs.binarize(config),  # chosen = highest reward, rejected = lowest
        pairs.to_sft(config) if config.output_format == "sft" else None,  # messages = prompt + chosen
        pairs.train_test_split(config),
    ]
    return [stage for stage in stages if stage is not None]


@dataclass
class BuildResult:
    dataset: DatasetDict
    ledger: Ledger
    columns: list[Column]  # the published columns, in order, as the stages declare them
    pre_query: PreQuery
    config: BuildConfig
    reward_revision: str | None
    built_at: str
    models: BuildModels | None = None


def model_specs(config: BuildConfig, ranks: Ranks = Ranks()) -> tuple[ModelSpec, ModelSpec | None]:
    device = config.device
    if ranks.world_size > 1 and device == "auto" and config.engine != "vllm":
        from .devices import visible_gpus

        # One process per GPU across nodes: this process's GPU is its local rank (vLLM picks its block itself).
        device = f"cuda:{ranks.local_rank}" if visible_gpus() else "cpu"
    if ranks.world_size > 1 and device == "sharded" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "`device` is sharded with several processes per node: each would load a full copy over every GPU. "
            "Launch one process per node, or use device auto (one GPU per process) or engine vllm."
        )
    common = {"dtype": config.dtype, "device": device, "attn_implementation": config.attn_implementation}
    generator = ModelSpec(
        config.generator_model,
        config.generator_revision,
        config.generator_trust_remote_code,
        engine=config.engine if config.engine != "auto" else resolve_engine(config).engine,
        tensor_parallel_size=config.tensor_parallel_size,
        workers=config.num_proc,
        max_model_len=config.max_prompt_tokens + config.max_response_tokens,
        **common,
    )
    reward = None
    if not config.reward_judge:
        reward_common = common | {"device": config.reward_device}
        if ranks.world_size > 1 and config.reward_device == "auto":
            reward_common["device"] = device
        reward = ModelSpec(
            config.reward_model, config.reward_revision, config.reward_trust_remote_code, **reward_common
        )
    return generator, reward


def curation_specs(config: BuildConfig, generator: ModelSpec) -> dict[str, ModelSpec | None]:
    """The judge (default: the generator itself, the same loaded model), the guard and the embedder, where used.
    Another judge and the guard run on the transformers engine, with the generator's dtype and device."""

    def like_generator(role: str) -> ModelSpec:
        name, revision, remote = (
            getattr(config, f"{role}_{field}") for field in ("model", "revision", "trust_remote_code")
        )
        return ModelSpec(
            name,
            revision,
            remote,
            dtype=generator.dtype,
            device=generator.device,
            attn_implementation=generator.attn_implementation,
        )

    judge = None
    if config.tag_instructions or config.reward_judge:
        own_judge = config.judge_model and config.judge_model != config.generator_model
        judge = like_generator("judge") if own_judge else generator
    guard = like_generator("guard") if config.guard_model else None
    embedder = None
    if config.near_dedup:
        embedder = ModelSpec(
            config.embedding_model,
            config.embedding_revision,
            config.embedding_trust_remote_code,
            device=generator.device if generator.device != "sharded" else "auto",
        )
    return {"judge": judge, "guard": guard, "embedder": embedder}


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
        instruction_stop=config.instruction_stop,
        needs_instruction_stop=not config.prompt_dataset or config.num_turns > 1,
    )


def later_turns_of(config: BuildConfig, tokenizer, model_name: str) -> dict:
    """The later-turn header and the follow-up system prompt of multi-turn builds (or none, for one turn)."""
    if config.num_turns == 1:
        return {}
    header = derive_next_user_header(tokenizer, model_name, config.chat_template_date)
    system = multi_turn.FOLLOW_UP_SYSTEM_PROMPT
    try:
        rendered = render_chat(
            tokenizer,
            [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
            add_generation_prompt=False,
            day=config.chat_template_date,
        )
    except Exception:  # the template refuses system messages (Gemma): follow-ups are written without one
        rendered = ""
    if system not in rendered:
        logger.info("%s takes no system message: later turns are written without the follow-up prompt", model_name)
        system = None
    return {"later_turn": header, "follow_up_system_prompt": system}


ROLES = {"judge": "judge", "guard": "guard", "embedder": "embedding"}  # how errors name each model's config fields


def check_models(config: BuildConfig, ranks: Ranks = Ranks()) -> BuildModels:
    """Every model (ids, remote-code opt-in, chat templates) and the pre-query, before any weights load."""
    generator, reward = model_specs(config, ranks)
    generator_info = model_info(generator, "generator")
    reward_revision = model_info(reward, "reward").revision if reward else None
    pre_query = pre_query_of(config, generator, generator_info)
    logger.info("pre-query template (%s): %r", pre_query.source, pre_query.text)
    logger.info("an instruction ends at %s", pre_query.instruction_stop)
    curation = curation_specs(config, generator)
    infos = {
        role: (generator_info if spec is generator else model_info(spec, ROLES[role])) if spec else None
        for role, spec in curation.items()
    }
    revisions = {role: info.revision if info else None for role, info in infos.items()}
    judge_stop_ids, judge_stop_strings = (), ()
    if config.tag_explanations:
        judge, name = infos["judge"], curation["judge"].name_or_path
        ids, strings = response_stops(judge.tokenizer, list(judge.eos_ids), name, config.chat_template_date)
        judge_stop_ids, judge_stop_strings = tuple(ids), tuple(strings)
    return BuildModels(
        generator,
        reward,
        generator_info.revision,
        reward_revision,
        pre_query,
        judge=curation["judge"],
        judge_revision=revisions["judge"],
        guard=curation["guard"],
        guard_revision=revisions["guard"],
        embedder=curation["embedder"],
        embedder_revision=revisions["embedder"],
        judge_stop_ids=judge_stop_ids,
        judge_stop_strings=judge_stop_strings,
        **later_turns_of(config, generator_info.tokenizer, generator.name_or_path),
        prompts_revision=(
            prompts.dataset_revision(config.prompt_dataset, config.prompt_dataset_revision)
            if config.prompt_dataset
            else None
        ),
    )


def resolve_engine(config: BuildConfig) -> BuildConfig:
    """The config with `engine: auto` decided (vLLM where CUDA GPUs are visible and vLLM is installed, else
    transformers), without initialising CUDA in this process, and the shard size that suits the engine."""
    engine, why = config.engine, "set in the config"
    if engine == "auto":
        import importlib.util

        from .devices import visible_gpus

        gpus = [] if config.device == "cpu" else visible_gpus()
        if not gpus:
            engine, why = "transformers", "no CUDA GPU is visible"
        elif importlib.util.find_spec("vllm") is None:
            engine, why = "transformers", "vLLM is not installed: pip install 'magpie-builder[vllm]'"
        else:
            engine, why = "vllm", f"{len(gpus)} CUDA GPU(s) visible and vLLM installed"
    logger.info("generation engine: %s (%s)", engine, why)
    shard_size = config.shard_size or (4096 if engine == "vllm" else 256)
    return dataclasses.replace(config, engine=engine, shard_size=shard_size)


def build(config: BuildConfig, ranks: Ranks = Ranks(), stages=stages_for) -> BuildResult | None:
    """Builds the dataset. Under several processes every rank works; rank 0 alone returns the result.

    Args:
        config (`BuildConfig`): the build.
        ranks (`Ranks`, *optional*): this process's place in a multi-process run.
        stages (`Callable`, defaults to `stages_for`): `(config, models) -> list[Stage]`, the build's stages.
    """
    config = resolve_engine(config)
    models = check_models(config, ranks)
    run = runner.run(
        stages(config, models), ranks=ranks, resume=config.resume, cache_dir=config.cache_dir, num_proc=config.num_proc
    )
    if run is None:
        return None
    built_at = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return BuildResult(
        run.dataset, run.ledger, run.columns, models.pre_query, config, models.reward_revision, built_at, models
    )
