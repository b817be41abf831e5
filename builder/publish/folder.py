"""Writing a build to a local folder that `load_dataset(folder)` reads exactly as it would the Hub repo.

Both hold the same files: `data/{split}-*.parquet`, README.md (the card), the reward plot (and the curation plot when
curation ran), `build_config.yaml` and `build_summary.json`.
"""

import errno
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from datasets import DatasetDict

from .. import __version__
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


MARKER = ".magpie-builder.json"  # hidden: load_dataset and the Hub upload skip it


def check_output_dir(folder: str | Path, overwrite: bool = False) -> None:
    """Before anything is built: the folder can be written, and holds nothing but an earlier build of ours (or
    `overwrite_output_dir` says its contents may go). Raises `ValueError` naming the folder and the fix."""
    folder = Path(folder).expanduser()
    resolved = folder.resolve()
    precious = {Path.home().resolve(), Path("/"), Path.cwd().resolve(), *Path.cwd().resolve().parents}
    if resolved in precious:
        raise ValueError(
            f"`output_dir` {folder} is your home, the root or a folder above this one, which a build replaces whole. "
            "Give a folder of its own, e.g. out/my-dataset."
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`output_dir` {folder} is a file. Give a folder (it is created if missing).")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`output_dir` {folder} cannot be written ({parent} is not writable). Give another folder.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).exists() and not overwrite:
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"`output_dir` {folder} holds files magpie-builder did not write ({shown}). Choose an empty or new "
            "folder, or set `overwrite_output_dir: true` to replace its contents."
        )


def write_folder(result, folder: str | Path, overwrite: bool | None = None) -> Path:
    """Writes the data shards, the card and its files as `folder`, whole: they are written into a sibling folder
    that then takes `folder`'s place, so a reader (and `load_dataset`) sees the earlier complete dataset or the new
    complete one, never a mix; nothing an earlier build left (old shards, an `arrow/` copy, stray files) survives.
    A folder this builder did not write is refused unless `overwrite` (`overwrite_output_dir`)."""
    folder = Path(folder).expanduser()
    overwrite = result.config.overwrite_output_dir if overwrite is None else overwrite
    check_output_dir(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.writing-", dir=folder.parent))
    try:
        write_parquet_shards(result.dataset, staging)
        files = card_files(result, render_card(result, repo_id=None))
        write_files(staging, files)
        if result.config.save_to_disk:
            result.dataset.save_to_disk(str(staging / "arrow"))
        (staging / MARKER).write_text(json.dumps({"magpie_builder": __version__}))
        swap_into_place(staging, folder)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No space left in {folder.parent} to write the dataset; {folder} is as it was. Free space "
                "there or choose another output_dir, then run the same command (the finished batches are reused)",
            ) from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", folder)
    return folder


def swap_into_place(staging: Path, folder: Path) -> None:
    """`staging` becomes `folder`; the earlier `folder` is removed once the new one is in place."""
    retired = None
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(retired)
    staging.rename(folder)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
