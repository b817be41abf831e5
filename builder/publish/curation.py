"""What curation did, for the card: the tag distributions of the published rows (one figure) and the selection table
(rows in, dropped per rule, rows out) from the build's ledger."""

from collections import Counter

import numpy as np
from datasets import DatasetDict

from ..models import public_model_name
from ..stages.tags import DIFFICULTY, INPUT_QUALITY, TASK_CATEGORY


CURATION_PLOT_FILE = "curation.png"
CURATION_COLUMNS = ("task_category", "difficulty", "input_quality", "safety", "language", "min_neighbor_distance")
CURATION_STAGES = ("tags", "safety", "language", "embed", "near_dedup", "select")


def _values(dataset: DatasetDict, column: str) -> list:
    return [value for split in dataset.values() for value in split[column]]


def curated_columns(dataset: DatasetDict) -> list[str]:
    names = next(iter(dataset.values())).column_names
    return [column for column in CURATION_COLUMNS if column in names]


def counts(dataset: DatasetDict, column: str, order: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(label, rows) of a tag over all splits: in the label set's order where it has one, else most common first."""
    counter = Counter(_values(dataset, column))
    if order:
        return [(label, counter.get(label, 0)) for label in order] + [
            (label, n) for label, n in counter.most_common() if label not in order
        ]
    return counter.most_common()


def plot_curation(dataset: DatasetDict, path) -> None:
    """One panel per curation column present: task categories, difficulty, input quality, safety, language, and the
    min-neighbour-distance histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = curated_columns(dataset)
    order = {
        "task_category": TASK_CATEGORY.labels,
        "difficulty": DIFFICULTY.labels,
        "input_quality": INPUT_QUALITY.labels,
    }
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        if column == "min_neighbor_distance":
            values = [v for v in _values(dataset, column) if v is not None]
            ax.hist(values or [0.0], bins=30, color="#8172b2")
            ax.set(title="Min neighbour distance", xlabel="squared L2 (unit embeddings)", ylabel="rows")
            continue
        pairs = counts(dataset, column, order.get(column, ()))
        labels, heights = [label for label, _ in pairs], [n for _, n in pairs]
        if column == "task_category":
            ax.barh(np.arange(len(labels)), heights, color="#4c72b0")
            ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set(title="Task category", xlabel="rows")
        else:
            ax.bar(np.arange(len(labels)), heights, color="#55a868")
            ax.set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=8)
            ax.set(title=column.replace("_", " ").capitalize(), ylabel="rows")
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def selection_table(ledger) -> list[dict] | None:
    """The select stage's record: rows in, rows dropped per rule, rows out; None when it did not run."""
    for record in ledger.stages:
        if record.name == "select":
            rules = [{"rule": reason.removeprefix("selection:"), "rows": n} for reason, n in record.drops.items()]
            return [{"rule": "rows in", "rows": record.rows_in}, *rules, {"rule": "rows out", "rows": record.rows_out}]
    return None


def curation_context(result) -> dict:
    """The card's curation section: the models, the tag counts, the selection table; empty when curation was off."""
    dataset, config = result.dataset, result.config
    columns = curated_columns(dataset)
    if not columns:
        return {"curation": None}
    models = result.models
    tables = {
        column: counts(dataset, column)
        for column in ("task_category", "difficulty", "input_quality", "safety", "language")
        if column in columns
    }
    return {
        "curation": {
            "judge": public_model_name(models.judge.name_or_path) if models and models.judge else None,
            "guard": public_model_name(config.guard_model) if config.guard_model else None,
            "embedder": public_model_name(config.embedding_model) if config.near_dedup else None,
            "near_dedup_distance": config.near_dedup_distance,
            "near_dedup_index": config.near_dedup_index,
            "tables": {column.replace("_", " "): rows for column, rows in tables.items()},
            "selection": selection_table(result.ledger),
            "plot_file": CURATION_PLOT_FILE,
        }
    }
