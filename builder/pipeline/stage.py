"""A stage, declared once: what it reads and writes, its settings and models, the drops it can make, how it runs.

The runner (`runner.py`) reads the declaration and does the rest: the ledger, the progress bar, the fingerprint,
the key, resume, ranks. The declared columns are also the one place that names columns: the published column order
and the card's column table are read from them, and a stage that writes a column it does not declare fails.
"""

from collections.abc import Callable
from dataclasses import dataclass, field


# How a stage runs.
MODEL = (
    "model"  # batched `Dataset.map` with `with_rank`: one model per worker, every batch kept for resume, ranks' parts
)
ROWS = "rows"  # `Dataset.map` over the whole table on every rank: cheap per-row work (a tokenizer, a rule)
TABLE = "table"  # a function of the whole table: deduplication, selection, the split
KINDS = (MODEL, ROWS, TABLE)

# Where a published column goes, in this order: TRL's conversation and the row's id, the pair's scores, every
# candidate with its reward, per-candidate counts, per-row counts, and last where the row came from.
ROW, PAIR, CANDIDATES, CANDIDATE_STATS, ROW_STATS, PROVENANCE = SECTIONS = (
    "row",
    "pair",
    "candidates",
    "candidate_stats",
    "row_stats",
    "provenance",
)

KEEP = ""  # the `drop_reason` of a row that stays
DROP_REASON = "drop_reason"


class StageError(ValueError):
    """A stage that does not do what it declares; the message names the stage and the fix."""


def check_outputs(stage_name: str, outputs: dict, expected: tuple[str, ...]) -> dict:
    """The columns a stage's function returned are exactly the ones it declares (`expected`)."""
    if DROP_REASON in outputs and DROP_REASON not in expected:
        raise StageError(
            f"Stage {stage_name} returns `{DROP_REASON}` but declares no `drop_reasons`: declare every reason it can "
            "give, so the ledger and the card can name them."
        )
    undeclared = [c for c in outputs if c not in expected]
    if undeclared:
        raise StageError(
            f"Stage {stage_name} wrote {undeclared} without declaring them: add each to its `writes` with a "
            "one-line description (and a section, if it is published)."
        )
    missing = [c for c in expected if c not in outputs]
    if missing:
        raise StageError(
            f"Stage {stage_name} declares {missing} but did not write them: return them from its function, or take "
            "them out of its `writes` (a stage with `drop_reasons` returns a `drop_reason` column)."
        )
    return outputs


class DeclaredOutputs:
    """A row stage's function, checked: it returns exactly the columns its stage declares."""

    def __init__(self, function, stage_name: str, expected: tuple[str, ...]):
        self.function, self.stage_name, self.expected = function, stage_name, expected

    def __call__(self, *args, **kwargs) -> dict:
        return check_outputs(self.stage_name, self.function(*args, **kwargs), self.expected)


@dataclass(frozen=True)
class Column:
    """Args:
    name (`str`): the column's name.
    description (`str`): one line, shown in the dataset card.
    section (`str`, *optional*): where it goes in the published table (`SECTIONS`); None for a column that only
        later stages read, which the runner removes once no later stage reads it.
    """

    name: str
    description: str
    section: str | None = None

    @property
    def published(self) -> bool:
        return self.section is not None


@dataclass(frozen=True)
class Stage:
    """One step of the build.

    Args:
        name (`str`): its name in the ledger, the log, the card and its key.
        kind (`str`): `MODEL`, `ROWS` or `TABLE` (see above).
        apply (`Callable`): `MODEL`: `apply(batch, rank, *, settings, **models, **runtime) -> columns`;
            `ROWS`: `apply(batch_or_example, *, settings, **models, **runtime) -> columns`;
            `TABLE`: `apply(rows, *, settings) -> Dataset | DatasetDict`.
        reads (`tuple[str, ...]`): the columns it reads; a model stage is given only these.
        writes (`tuple[Column, ...]`): the columns it adds, each described.
        settings: a frozen dataclass of everything besides the models that changes its output (part of its key).
        models (`dict[str, ModelSpec]`): passed to `apply` by role; their identity is part of its key.
        drop_reasons (`tuple[str, ...]`): the reasons it may give in a `drop_reason` column, which the runner
            counts and removes with the dropped rows; a reason it does not declare is an error.
        removes (`tuple[str, ...]`): columns it takes out of the table.
        start (`Callable`, *optional*): a source's rows, `start() -> Dataset`; the first stage alone has one.
        runtime (`dict`): keyword arguments that change how it runs, not what it computes (batch sizes); not keyed.
        desc (`str`): the progress bar's text.
        batch_size (`int`, defaults to 1000): rows per `map` batch; for a model stage, the unit of resume.
        batched (`bool`, defaults to `True`): a `ROWS` stage's `apply` takes one example when False.
        look_ahead (`bool`): a model stage's `apply` also gets the worker's next batch (`next_batch=`).
        num_proc (`int`, *optional*): a model stage's worker processes, where not the run's `num_proc`.
        tally (`Callable`, *optional*): `tally(rows) -> (tokens, notes)`: what the ledger records of its output.
        if_none_left (`str`): what to change when no row survives it, said in the error.
    """

    name: str
    kind: str
    apply: Callable
    reads: tuple[str, ...] = ()
    writes: tuple[Column, ...] = ()
    settings: object = None
    models: dict = field(default_factory=dict)
    drop_reasons: tuple[str, ...] = ()
    removes: tuple[str, ...] = ()
    start: Callable | None = None
    runtime: dict = field(default_factory=dict)
    desc: str = ""
    batch_size: int = 1000
    batched: bool = True
    look_ahead: bool = False
    num_proc: int | None = None
    tally: Callable | None = None
    if_none_left: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Stage {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        for column in self.writes:
            if column.section is not None and column.section not in SECTIONS:
                raise ValueError(
                    f"Stage {self.name}: column {column.name} has section {column.section!r}; use one "
                    f"of {', '.join(SECTIONS)}, or None for a column no one publishes."
                )

    @property
    def written(self) -> list[str]:
        return [column.name for column in self.writes]

    def outputs(self, existing: list[str]) -> tuple[str, ...]:
        """What `apply` returns: its declared columns (less those a source's `start` made), and `drop_reason`."""
        made = existing if self.start is not None else []
        return (*(c for c in self.written if c not in made), *((DROP_REASON,) if self.drop_reasons else ()))
