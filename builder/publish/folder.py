"""Writing a build to a local folder that `load_dataset(folder)` reads exactly as it would the Hub repo.

Both hold the same files: `data/{split}-*.parquet`, README.md (the card), the reward plot (and the curation plot when
curation ran), `build_config.yaml` and `build_summary.json`.
"""

import io
import logging
import math
from pathlib import Path

import yaml
from datasets import DatasetDict

from .card import CONFIG_FILE, PLOT_FILE, plot_rewards, public_config, render_card
from .curation import CURATION_PLOT_FILE, curated_columns, plot_curation


logger = logging.getLogger("magpie_builder")

MAX_SHARD_BYTES = 500 * 1024 * 1024  # what `push_to_hub` uses, so local and Hub shards match
SUMMARY_FILE = "build_summary.json"
README = "README.md"


def shard_paths(split: str, num_shards: int) -> list[str]:
    return [f"data/{split}-{i:05d}-of-{num_shards:05d}.parquet" for i in range(num_shards)]


def write_parquet_shards(dataset: DatasetDict, folder: Path) -> list[str]:
    """data/{split}-0000i-of-0000n.parquet for every split, the layout `push_to_hub` writes."""
    written = []
    for split, data in dataset.items():
        num_shards = max(1, math.ceil(data.data.nbytes / MAX_SHARD_BYTES))
        for index, path in enumerate(shard_paths(split, num_shards)):
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            data.shard(num_shards, index, contiguous=True).to_parquet(folder / path)
            written.append(path)
    return written


def card_files(result, card) -> dict[str, bytes]:
    """README.md, the plot, the build config and the summary: the files beside the data, local and on the Hub."""
    plot = io.BytesIO()
    plot_rewards(result.dataset, plot)
    config_yaml = yaml.safe_dump(public_config(result.config), sort_keys=False, allow_unicode=True)
    files = {
        README: str(card).encode(),
        PLOT_FILE: plot.getvalue(),
        CONFIG_FILE: config_yaml.encode(),
        SUMMARY_FILE: result.ledger.to_json().encode(),
    }
    if curated_columns(result.dataset):
        curation = io.BytesIO()
        plot_curation(result.dataset, curation)
        files[CURATION_PLOT_FILE] = curation.getvalue()
    return files


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (folder / name).write_bytes(content)


def write_folder(result, folder: str | Path) -> Path:
    """Writes the data shards, the card and its files into `folder` (replacing old shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in (folder / "data").glob("*.parquet"):
        old.unlink()  # a smaller rebuild must not leave stale shards that load_dataset would pick up
    write_parquet_shards(result.dataset, folder)
    write_files(folder, card_files(result, render_card(result, repo_id=None)))
    if result.config.save_to_disk:
        result.dataset.save_to_disk(str(folder / "arrow"))
    logger.info("wrote %s", folder)
    return folder
