"""run(stages) -> the splits: the one place that counts, keys, resumes and checks what every stage declared.

Stage by stage: the key chained from the upstream key (`keys.py`), the map (model stages with resume, `with_rank`
and ranks' parts; row stages on every rank; table steps), the drops counted by reason into the ledger, and the
columns checked against the declaration. Columns no later stage reads and no one publishes are removed as soon as
they are spent; at the end the published columns are put in their declared order.
"""

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

from ..paths import cache_root
from .keys import digest, stage_key
from .ledger import Ledger
from .ranks import Ranks, fresh_tables_folder, keep_only_tables_of
from .resume import NextBatch, cached_batch, count_reused
from .stage import (
    DROP_REASON,
    KEEP,
    MODEL,
    ROWS,
    SECTIONS,
    TABLE,
    Column,
    DeclaredOutputs,
    Stage,
    StageError,
    check_outputs,
)


logger = logging.getLogger("magpie_builder")


@dataclass
class RunResult:
    dataset: DatasetDict
    ledger: Ledger
    columns: list[Column]  # the published ones, in order


def published_columns(stages: list[Stage]) -> list[Column]:
    """Every published column the stages declare, in section order, then in the order the stages first declare them;
    a column a later stage declares again (an overwrite) is described as that stage says."""
    columns: dict[str, Column] = {}
    for stage in stages:
        for column in stage.writes:
            if column.published:
                columns[column.name] = column
    return sorted(columns.values(), key=lambda column: SECTIONS.index(column.section))


def final_columns(stages: list[Stage]) -> list[str]:
    """The columns the published dataset will have, read off the declarations before anything runs."""
    present: set[str] = set()
    for stage in stages:
        present.update(stage.written)
        present.difference_update(stage.removes)
    return [column.name for column in published_columns(stages) if column.name in present]


def check_declarations(stages: list[Stage]) -> None:
    """Before anything runs: names are unique, only the first stage is a source, and every column read is written
    by a stage before it."""
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise StageError(f"Stage names repeat in {names}: give each stage its own name.")
    if not stages or stages[0].start is None:
        raise StageError("The first stage must be a source (a stage with `start`) that makes the rows.")
    available: set[str] = set()
    for stage in stages:
        if stage.start is not None and stage is not stages[0]:
            raise StageError(f"Stage {stage.name} has `start`, but only the first stage may make rows.")
        if stage.start is not None:
            available.update(stage.reads)  # the source's rows, checked against its `writes` when they are made
        missing = [column for column in (*stage.reads, *stage.removes) if column not in available]
        if missing:
            raise StageError(
                f"Stage {stage.name} reads {missing}, which no stage before it writes: put it after the "
                "stage that writes them, or declare them in that stage's `writes`."
            )
        available.update(stage.written)
        available.difference_update(stage.removes)


def _check_columns(stage: Stage, before: list[str], after: list[str]) -> None:
    """The table after a stage holds what it declares: every written column, and no other new or removed one."""
    added = [c for c in after if c not in before and c != DROP_REASON]
    check_outputs(stage.name, dict.fromkeys([*added, *(c for c in stage.written if c in after)]), stage.written)
    removed = [c for c in before if c not in after]
    if sorted(removed) != sorted(stage.removes):
        raise StageError(
            f"Stage {stage.name} removed {removed} but declares `removes={list(stage.removes)}`: declare every "
            "column it takes out of the table in `removes`, and no other."
        )


def _count_drops(stage: Stage, rows: Dataset, record) -> Dataset:
    """Counts `drop_reason` into the ledger record, keeps the rows tagged KEEP, and removes the column."""
    if DROP_REASON not in rows.column_names:
        if stage.drop_reasons:
            raise StageError(f"Stage {stage.name} declares drop reasons but wrote no `{DROP_REASON}` column.")
        return rows
    reasons = rows[DROP_REASON]
    counts = Counter(reasons)
    unknown = sorted(set(counts) - {KEEP, *stage.drop_reasons})
    if unknown:
        raise StageError(
            f"Stage {stage.name} dropped rows as {unknown}, which it does not declare in "
            "`drop_reasons`: declare them, so the card and the ledger can name them."
        )
    record.drops.update({k: v for k, v in sorted(counts.items()) if k != KEEP})
    keep = [i for i, reason in enumerate(reasons) if reason == KEEP]
    kept = rows.select(keep) if len(keep) < len(rows) else rows
    return kept.remove_columns(DROP_REASON)


def _on_file(rows: Dataset, tables: Path, name: str) -> Dataset:
    """A table made in memory, written to the tables folder, so later maps write files and not RAM."""
    if rows.cache_files:
        return rows
    rows.save_to_disk(str(tables / name))
    return load_from_disk(str(tables / name))


def _model_stage(
    stage: Stage, rows: Dataset, key: str, ranks: Ranks, resume_dir: str | None, num_proc: int
) -> Dataset:
    rows = ranks.part(rows)
    num_proc = stage.num_proc or num_proc
    workers = num_proc if num_proc > 1 and len(rows) > 1 else None
    rows = rows.map(
        cached_batch,
        batched=True,
        batch_size=stage.batch_size,
        with_indices=True,
        with_rank=True,
        num_proc=workers,
        fn_kwargs={
            "function": stage.apply,
            "reads": stage.reads,
            "writes": stage.outputs(rows.column_names),
            "stage_name": stage.name,
            "cache_root": resume_dir,
            "key": key,
            "next_batch": NextBatch(rows, stage.batch_size, workers) if stage.look_ahead else None,
            "settings": stage.settings,
            **stage.models,
            **stage.runtime,
        },
        desc=stage.desc or stage.name,
        # The key says everything that changes the output; hashing the model specs is all a fingerprint needs.
        new_fingerprint=digest("map", key, ranks.rank, rows._fingerprint),
    )
    if stage.look_ahead:
        from ..engines import release_carried_work

        release_carried_work()  # in this process: work started for a batch that never came
    rows = ranks.gather(rows, key)
    count_reused(rows, stage.desc or stage.name)
    return rows.remove_columns("cached_batch")


def _apply(stage: Stage, rows: Dataset | None, key: str, ranks: Ranks, resume_dir: str | None, num_proc: int):
    if stage.kind == MODEL:
        return _model_stage(stage, rows, key, ranks, resume_dir, num_proc)
    if stage.kind == ROWS:
        return rows.map(
            DeclaredOutputs(stage.apply, stage.name, stage.outputs(rows.column_names)),
            batched=stage.batched,
            batch_size=stage.batch_size,
            desc=stage.desc or stage.name,
            fn_kwargs={"settings": stage.settings, **stage.models, **stage.runtime},
            new_fingerprint=digest("map", key, rows._fingerprint),
        )
    assert stage.kind == TABLE
    return stage.apply(rows, settings=stage.settings)


def run(
    stages: list[Stage],
    *,
    ranks: Ranks = Ranks(),
    resume: bool = True,
    cache_dir: str | None = None,
    num_proc: int = 1,
) -> RunResult | None:
    """Runs the stages in order. Under several processes every rank runs the stages up to the last model stage and
    rank 0 alone the rest; it alone returns the result.

    Args:
        stages (`list[Stage]`): the build, in order; the first is the source, the last gives the splits.
        ranks (`Ranks`, *optional*): this process's place in a multi-process run.
        resume (`bool`, defaults to `True`): keep and reuse every finished batch of the model stages.
        cache_dir (`str`, *optional*): where finished batches are kept; default `$MAGPIE_BUILDER_CACHE/batches`.
        num_proc (`int`, defaults to 1): worker processes for the model stages.
    """
    check_declarations(stages)
    resume_dir = str(Path(cache_dir or cache_root() / "batches")) if resume else None
    last_model = max((i for i, stage in enumerate(stages) if stage.kind == MODEL), default=-1)
    ledger, key = Ledger(), ""
    internal = {column.name for stage in stages for column in stage.writes if not column.published}
    tables = fresh_tables_folder(ranks.rank)
    rows: Dataset | DatasetDict | None = None
    for index, stage in enumerate(stages):
        key = stage_key(key, stage)
        if stage.start is not None:
            rows = _on_file(stage.start(), tables, stage.name)
            undeclared = [c for c in rows.column_names if c not in stage.written]
            if undeclared:
                raise StageError(f"The source {stage.name} made {undeclared} without declaring them in `writes`.")
        if isinstance(rows, DatasetDict):
            raise StageError(f"Stage {stage.name} comes after the split: the split must be the last stage.")
        with ledger.stage(stage.name, rows_in=len(rows)) as record:
            before = rows.column_names
            out = _apply(stage, rows, key, ranks, resume_dir, num_proc)
            if isinstance(out, DatasetDict):
                _check_columns(stage, before, next(iter(out.values())).column_names)
                record.rows_out = sum(len(split) for split in out.values())
            else:
                out = _on_file(out, tables, stage.name)
                out = out.remove_columns([c for c in stage.removes if c in out.column_names])
                _check_columns(stage, before, out.column_names)
                out = _count_drops(stage, out, record)
                record.rows_out = len(out)
            if stage.tally:
                record.tokens, notes = stage.tally(out)
                record.notes.update(notes)
            if record.rows_out == 0:
                raise ValueError(
                    f"No rows survived the {stage.name} stage (drops so far: {ledger.drops()}). To keep "
                    f"rows: {stage.if_none_left or 'check its settings'}, or raise num_instructions."
                )
        rows = _spend_columns(out, stages[index + 1 :], internal)
        if stage.kind == MODEL:
            from ..engines import release_models

            # What the next model stage does not use goes, so it has the memory (a vLLM engine holds most of every
            # GPU); a model used again later is loaded again then.
            upcoming = next((later for later in stages[index + 1 :] if later.kind == MODEL), None)
            release_models(stage.models.values(), upcoming.models.values() if upcoming else [])
        if index == last_model and ranks.rank != 0:
            shutil.rmtree(tables, ignore_errors=True)  # this rank's parts are in the shared parts folder
            return None
    if not isinstance(rows, DatasetDict):
        raise StageError(f"The last stage ({stages[-1].name}) must give the splits (a DatasetDict).")
    columns = [column for column in published_columns(stages) if column.name in rows[next(iter(rows))].column_names]
    dataset = DatasetDict({name: split.select_columns([c.name for c in columns]) for name, split in rows.items()})
    freed = keep_only_tables_of(dataset, tables)
    # Under several ranks the splits are in the shared parts folder (the gathered parts), not in `tables`.
    folders = sorted({str(Path(f["filename"]).parent) for split in dataset.values() for f in split.cache_files})
    logger.info(
        "tables of the finished dataset in %s (%.1f MB of earlier stages' tables deleted)",
        ", ".join(folders),
        freed / 2**20,
    )
    logger.info("build summary\n%s", ledger.summary())
    return RunResult(dataset, ledger, columns)


def _spend_columns(rows, later: list[Stage], internal: set[str]):
    """Removes the unpublished columns that no later stage reads."""
    needed = {column for stage in later for column in (*stage.reads, *stage.removes)}
    names = next(iter(rows.values())).column_names if isinstance(rows, DatasetDict) else rows.column_names
    spent = [c for c in names if c in internal and c not in needed]
    return rows.remove_columns(spent) if spent else rows
