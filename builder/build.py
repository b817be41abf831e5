"""build(config) -> DatasetDict: every stage in order, readable top to bottom.

On one process the stages run over the whole dataset (with `num_proc` workers for the model stages, one model
each). Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1, one process per GPU across nodes) every rank runs
the model stages on its own part (`split_dataset_by_node`) and writes it to a shared folder; after a barrier the
parts are concatenated in rank order, which gives exactly the rows of a one-process run.
"""

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from . import stages
from .cache import NextBatch, cached_batch, count_reused, stage_key
from .card import build_date
from .config import BuildConfig
from .generation import SamplingParams, release_carried_batch
from .ledger import Ledger
from .models import ModelSpec, model_info
from .templates import PreQuery, derive_pre_query
from .tiny import cache_root

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


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a multi-process run: rank, world size and the shared folder for parts."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parts_dir: str | None = None
    barrier: object = None

    def part(self, rows: Dataset) -> Dataset:
        if self.world_size == 1:
            return rows
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(rows, rank=self.rank, world_size=self.world_size)

    def gather(self, rows: Dataset, stage: str) -> Dataset:
        """Every rank's part of a stage, in rank order, on every rank."""
        if self.world_size == 1:
            return rows
        folder = Path(self.parts_dir) / stage
        rows.save_to_disk(str(folder / f"rank-{self.rank:05d}"))
        self.barrier()
        parts = [load_from_disk(str(folder / f"rank-{r:05d}")) for r in range(self.world_size)]
        # A rank with no rows (more ranks than rows) mapped nothing and has none of the new columns.
        return concatenate_datasets([part for part in parts if len(part)])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def fresh_tables_folder(rank: int) -> Path:
    """A new folder for this build's Arrow tables: `$MAGPIE_BUILDER_CACHE/tables/<host>-pid<pid>-rank<r>-*`.

    Why: a dataset made in memory (`Dataset.from_dict`) keeps every `map` result in memory too, so the whole build
    (100K instructions x 5 responses, and a copy per stage) would sit in RAM and grow with K. Started from a file,
    every stage's output is an Arrow file that `map` writes batch by batch and the next stage memory-maps.
    Folders of this host whose process is gone (a crashed build, a finished one) are removed first; they hold no
    resume state (finished batches are kept under `cache_dir`)."""
    parent = cache_root() / "tables"
    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in parent.glob(f"{host}-pid*"):
        pid = old.name.removeprefix(f"{host}-pid").split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{host}-pid{os.getpid()}-rank{rank}-", dir=parent))


def keep_only_tables_of(dataset: DatasetDict, folder: Path) -> int:
    """Deletes the earlier stages' tables in `folder`, which the finished dataset does not read. Returns bytes freed."""
    kept = {Path(f["filename"]).resolve() for split in dataset.values() for f in split.cache_files}
    freed = 0
    for path in folder.rglob("*"):
        if path.is_file() and path.resolve() not in kept:
            freed += path.stat().st_size
            path.unlink()
    return freed


def model_specs(config: BuildConfig, ranks: Ranks = Ranks()) -> tuple[ModelSpec, ModelSpec]:
    device = config.device
    if ranks.world_size > 1 and device == "auto":
        import torch

        # One process per GPU across nodes: this process's GPU is its local rank.
        device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
    common = {"dtype": config.dtype, "device": device, "attn_implementation": config.attn_implementation}
    generator = ModelSpec(config.generator_model, config.generator_revision, config.generator_trust_remote_code,
                          engine=config.engine, tensor_parallel_size=config.tensor_parallel_size, **common)
    reward = ModelSpec(config.reward_model, config.reward_revision, config.reward_trust_remote_code, **common)
    return generator, reward


def model_identity(spec: ModelSpec) -> tuple:
    """What of a model spec changes its output (not where it runs), for the stage keys."""
    return spec.name_or_path, spec.revision, spec.trust_remote_code, spec.dtype, spec.engine


def pre_query_of(config: BuildConfig, generator: ModelSpec) -> PreQuery:
    info = model_info(generator, "generator")
    return derive_pre_query(
        info.tokenizer, list(info.eos_ids), model_name=generator.name_or_path, day=config.chat_template_date,
        pre_query_template=config.pre_query_template, keep_default_system=config.keep_default_system,
        system_prompt=config.system_prompt,
    )


def model_stage(rows: Dataset, function, config: BuildConfig, ranks: Ranks, desc: str, key: str, fn_kwargs: dict,
                batch_size: int, look_ahead: bool = False) -> Dataset:
    """A model stage as `Dataset.map`: batched, a progress bar, one model per worker (`with_rank`), and every
    finished batch kept for a resumed run. With `look_ahead` the function also gets the worker's next batch, which
    a generation stage starts in the rows the current batch's tail frees (`generation.sample(then=...)`)."""
    cache = str(Path(config.cache_dir or cache_root() / "batches")) if config.resume else None
    rows = ranks.part(rows)
    num_proc = config.num_proc if config.num_proc > 1 and len(rows) > 1 else None
    rows = rows.map(
        cached_batch, batched=True, batch_size=batch_size, with_indices=True, with_rank=True, num_proc=num_proc,
        fn_kwargs={"function": function, "cache_root": cache, "key": key,
                   "next_batch": NextBatch(rows, batch_size, num_proc) if look_ahead else None, **fn_kwargs},
        desc=desc,
        # The key says everything that changes the output; hashing the model specs is all a fingerprint needs.
        new_fingerprint=stage_key("map", key, ranks.rank, rows._fingerprint)[-24:],
    )
    release_carried_batch()  # in this process: work started for a batch that never came (a layout NextBatch missed)
    rows = ranks.gather(rows, key)
    count_reused(rows, desc)
    return rows.remove_columns("cached_batch")


def _require_rows(rows: Dataset, ledger: Ledger, stage: str, fix: str) -> None:
    if len(rows) == 0:
        raise ValueError(f"No rows survived the {stage} (drops so far: {ledger.drops()}). To keep rows: {fix}, "
                         "or raise num_instructions.")


def build(config: BuildConfig, ranks: Ranks = Ranks()) -> BuildResult | None:
    """Builds the dataset. Under several processes every rank works; rank 0 alone returns the result."""
    ledger = Ledger()
    generator, reward = model_specs(config, ranks)
    # Check both models (ids, remote-code opt-in, chat templates) before any generation; no weights load here.
    generator_revision = model_info(generator, "generator").revision
    reward_revision = model_info(reward, "reward").revision
    pre_query = pre_query_of(config, generator)
    logger.info("pre-query template (%s): %r", pre_query.source, pre_query.text)

    # 1. Instructions from the pre-query template alone.
    tables = fresh_tables_folder(ranks.rank)
    with ledger.stage("instructions", rows_in=config.num_instructions) as record:
        uuids = Dataset.from_dict({"uuid": stages.make_uuids(config.seed, config.num_instructions)})
        uuids.save_to_disk(str(tables / "uuids"))
        rows = load_from_disk(str(tables / "uuids"))  # every later table is a file beside this one
        settings = stages.InstructionSettings(
            tuple(pre_query.token_ids), pre_query.text,
            SamplingParams(config.instruction_temperature, config.instruction_top_p, config.max_instruction_tokens,
                           tuple(pre_query.instruction_stop_ids)),
            config.seed, generator_revision,
        )
        instruction_key = stage_key("instructions", model_identity(generator), settings)
        rows = model_stage(rows, stages.generate_instructions, config, ranks, "Generating instructions",
                           instruction_key, {"generator": generator, "settings": settings,
                                             "max_batch_size": config.generation_batch_size}, config.shard_size,
                           look_ahead=config.look_ahead)
        record.rows_out = len(rows)
        record.tokens = sum(rows["instruction_tokens"])

    # 2. Filters: empty, truncated, prompt too long, exact duplicates (on the whole set, on every rank alike).
    with ledger.stage("filter", rows_in=len(rows)) as record:
        rows = rows.map(
            stages.tag_instruction, batched=True, desc="Filtering instructions",
            fn_kwargs={"generator": generator, "day": config.chat_template_date,
                       "max_prompt_tokens": config.max_prompt_tokens},
            new_fingerprint=stage_key("filter", instruction_key, config.max_prompt_tokens, config.chat_template_date),
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
            config.num_responses, config.seed, generator_revision,
        )
        response_key = stage_key("responses", model_identity(generator), settings, config.chat_template_date)
        rows = model_stage(rows, stages.generate_responses, config, ranks, "Generating responses", response_key,
                           {"generator": generator, "settings": settings,
                            "max_batch_size": config.generation_batch_size}, config.shard_size,
                           look_ahead=config.look_ahead)
        rows = rows.remove_columns("prompt_token_ids")
        record.rows_out = len(rows)
        record.tokens = sum(map(sum, rows["response_tokens"]))
        reasons = [r for row in rows["response_finish_reasons"] for r in row]
        record.notes["responses_truncated"] = reasons.count("length")

    # 4. Rewards for every response.
    with ledger.stage("rewards", rows_in=len(rows)) as record:
        settings = stages.RewardSettings(config.reward_max_length, config.reward_batch_size,
                                         config.chat_template_date)
        reward_key = stage_key("rewards", response_key, model_identity(reward), reward_revision, settings)
        rows = model_stage(rows, stages.score_responses, config, ranks, "Scoring responses", reward_key,
                           {"reward": reward, "settings": settings}, config.shard_size)
        record.rows_out = len(rows)
        record.notes["reward_inputs_truncated"] = sum(rows["reward_inputs_truncated"])
    if ranks.rank != 0:
        shutil.rmtree(tables, ignore_errors=True)  # this rank's part is in the shared parts folder
        return None

    # 5. Binarize: chosen = highest reward, rejected = lowest.
    with ledger.stage("binarize", rows_in=len(rows)) as record:
        rows = rows.map(
            stages.binarize_example, desc="Binarizing",
            fn_kwargs={"min_reward_margin": config.min_reward_margin, "implicit_prompt": config.implicit_prompt},
            new_fingerprint=stage_key("binarize", reward_key, config.min_reward_margin, config.implicit_prompt),
        )
        rows = stages.drop_tagged(rows, record)
        _require_rows(rows, ledger, "binarize", "lower min_reward_margin, or check the reward model's scores")
        rows = rows.select_columns([c for c in COLUMN_ORDER if c in rows.column_names])

    # 6. Split.
    with ledger.stage("split", rows_in=len(rows)) as record:
        dataset = stages.split(rows, config.test_size, config.seed)
        record.rows_out = sum(len(split) for split in dataset.values())
        record.notes.update({f"{name}_rows": len(split) for name, split in dataset.items()})

    freed = keep_only_tables_of(dataset, tables)
    # Under several ranks the splits are in the shared parts folder (the gathered parts), not in `tables`.
    folders = sorted({str(Path(f["filename"]).parent) for split in dataset.values() for f in split.cache_files})
    logger.info("tables of the finished dataset in %s (%.1f MB of earlier stages' tables deleted)",
                ", ".join(folders), freed / 2**20)
    logger.info("build summary\n%s", ledger.summary())
    return BuildResult(dataset, ledger, pre_query, config, reward_revision, build_date())
