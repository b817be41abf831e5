"""Writing a build: a local folder that `load_dataset(folder)` reads exactly as it would the Hub repo."""

import logging
import math
from pathlib import Path

import yaml
from datasets import DatasetDict

logger = logging.getLogger("magpie_builder")

MAX_SHARD_BYTES = 500 * 1024 * 1024  # what `push_to_hub` uses, so local and Hub shards match
CONFIG_FILE = "build_config.yaml"
SUMMARY_FILE = "build_summary.json"


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


def write_build_config(config, folder: Path) -> None:
    with open(folder / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False, allow_unicode=True)


def write_folder(result, folder: str | Path) -> Path:
    """Writes the data shards, the build config and the build summary into `folder` (replacing old shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in (folder / "data").glob("*.parquet"):
        old.unlink()  # a smaller rebuild must not leave stale shards that load_dataset would pick up
    write_parquet_shards(result.dataset, folder)
    write_build_config(result.config, folder)
    result.ledger.save(folder / SUMMARY_FILE)
    if result.config.save_to_disk:
        result.dataset.save_to_disk(str(folder / "arrow"))
    logger.info("wrote %s", folder)
    return folder
