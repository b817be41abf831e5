"""Resume after a crash: every finished batch of a model stage is kept on disk and reused by the next run.

A batch's file lives in the folder of the stage key (`keys.py`: upstream key, settings, models, code) and is named
by the content of the columns the stage reads, so it is reused only for the same input under the same key. It is
written to a temporary name and renamed, so a file exists only whole, and it carries a checksum and its row count,
so a damaged one is recomputed. A run killed mid-stage redoes only the batches that had not finished, and a
changed config never reuses stale work.

Rows do not depend on their batch (every sample has its own seed), so a rerun with another batch size or
process count gets the rows of the first run up to float rounding (a near-tie token can flip: see the README).
A batch reruns exactly as it first ran, so a resumed build is exact; with `look_ahead` a batch's last bits depend
on the batch before it, which a resumed run may not have run.
"""

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .stage import check_outputs


logger = logging.getLogger("magpie_builder")


class BatchCache:
    """Finished batches of one stage: a file per batch, named by the content of the columns the stage reads.

    Args:
        root (`str`, *optional*): the cache folder; None disables caching.
        key (`str`): the stage key (`keys.stage_key`), the name of the stage's folder.
    """

    def __init__(self, root: str | None, key: str):
        self.folder = Path(root) / key if root else None

    def path(self, batch: dict) -> Path:
        payload = json.dumps([[name, batch[name]] for name in sorted(batch)], ensure_ascii=False)
        return self.folder / f"{hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()}.json"

    def load(self, batch: dict, rows: int, columns: tuple[str, ...] | None = None) -> dict | None:
        """The outputs of a finished batch, or None. A file that fails its checksum, its row count or the stage's
        `columns` (a disk that filled up, a file cut short by a copy) is reported and recomputed, never reused."""
        if self.folder is None:
            return None
        path = self.path(batch)
        if not path.exists():
            return None
        try:
            header, body = path.read_bytes().split(b"\n", 1)
            header = json.loads(header)
            if header["blake2b"] != hashlib.blake2b(body, digest_size=16).hexdigest() or header["rows"] != rows:
                raise ValueError("its checksum or row count does not match")
            outputs = json.loads(body)
            if any(len(values) != rows for values in outputs.values()):
                raise ValueError("a column has the wrong number of rows")
            if columns is not None and sorted(outputs) != sorted(columns):
                raise ValueError(f"it holds the columns {sorted(outputs)}, not the stage's {sorted(columns)}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("Resume cache: %s is damaged (%s); recomputing that batch", path, error)
            return None
        return outputs

    def has(self, batch: dict) -> bool:
        return self.folder is not None and self.path(batch).exists()

    def save(self, batch: dict, rows: int, outputs: dict) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(batch)
        body = json.dumps(outputs).encode()
        header = json.dumps({"rows": rows, "blake2b": hashlib.blake2b(body, digest_size=16).hexdigest()}).encode()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_bytes(header + b"\n" + body)
        except OSError as error:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise no_space_explained(error, self.folder) from error
        os.replace(tmp, path)  # atomic: a killed run leaves a whole file or none


def no_space_explained(error: OSError, folder) -> OSError:
    """A full disk's error, saying which folder is full and what uses it; any other error as it is."""
    import errno

    if error.errno != errno.ENOSPC:
        return error
    return OSError(
        errno.ENOSPC,
        f"No space left for {folder} (the resume cache; cache_dir or MAGPIE_BUILDER_CACHE choose where it goes). "
        "Free space there, or point it at a larger disk, and run the same command again: finished batches are kept",
    )


@dataclass(frozen=True)
class NextBatch:
    """Finds the batch a `Dataset.map` worker gets after the current one, so a generation stage can start it in the
    rows the current one's tail frees (the rows mapped, `map`'s `batch_size` and `num_proc`).

    `map` gives worker `rank` the contiguous shard `rows.shard(num_proc, rank, contiguous=True)` and its batches in
    order; the indices it passes are positions in `rows`. Work started for a batch that then does not come (another
    layout than this one) is dropped unused: a row's output never depends on it."""

    rows: object  # datasets.Dataset
    batch_size: int
    num_proc: int | None = None

    def after(self, indices: list[int], rank: int | None) -> dict | None:
        start, end = 0, len(self.rows)
        workers = min(self.num_proc or 1, end)
        if workers > 1 and rank is not None:
            size, extra = divmod(end, workers)
            start = size * rank + min(rank, extra)
            end = start + size + (rank < extra)
        begin = indices[-1] + 1
        if not (start <= indices[0] and begin <= end) or begin == end:
            return None
        return self.rows[begin : min(begin + self.batch_size, end)]


def cached_batch(
    batch: dict,
    indices: list[int],
    rank,
    *,
    function,
    reads: tuple[str, ...],
    writes: tuple[str, ...],
    stage_name: str,
    cache_root: str | None,
    key: str,
    next_batch: NextBatch | None = None,
    **kwargs,
) -> dict:
    """Runs `function(batch, rank, **kwargs)` on the batch's `reads` columns, unless this stage already wrote the
    output of a batch with the same content. The function must return exactly the `writes` columns. With
    `next_batch`, the function also gets the worker's next batch (`next_batch=`), unless that one is in the cache.

    The output carries a `cached_batch` column (True where reused) that the runner counts and removes.
    """
    inputs = {name: batch[name] for name in reads}  # a stage sees what it declares, and that names its batch
    rows = len(batch[next(iter(batch))])
    cache = BatchCache(cache_root, key)
    outputs = cache.load(inputs, rows, writes)
    reused = outputs is not None
    if not reused:
        if next_batch is not None:
            upcoming = next_batch.after(indices, rank)
            upcoming = {name: upcoming[name] for name in reads} if upcoming else None
            kwargs["next_batch"] = upcoming if upcoming and not cache.has(upcoming) else None
        outputs = check_outputs(stage_name, function(inputs, rank, **kwargs), writes)
        cache.save(inputs, rows, outputs)
    return {**outputs, "cached_batch": [reused] * rows}


def count_reused(dataset, stage: str) -> int:
    """Rows of `dataset` whose batch came from the cache; logged, so a resumed run says what it reused."""
    flags = Counter(dataset["cached_batch"])
    if flags[True]:
        logger.info(
            "%s: reused %d of %d rows from finished batches of an earlier run", stage, flags[True], len(dataset)
        )
    return flags[True]
