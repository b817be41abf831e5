"""Resume after a crash: every finished batch of a model stage is kept on disk and reused by the next run.

A batch's file is named by the stage key (everything that changes the stage's output: model id and revision,
template, sampling parameters, seed, upstream settings, the builder's code) and the uuids of its rows; it is
written to a temporary name and renamed, so a file exists only whole. A run killed mid-stage redoes only the
batches that had not finished, and a changed config never reuses stale work: its key differs.

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
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger("magpie_builder")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the builder's own source: a code change invalidates cached work."""
    from . import __version__

    digest = hashlib.blake2b(__version__.encode(), digest_size=8)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_key(stage: str, *parts) -> str:
    payload = json.dumps([stage, code_version(), parts], sort_keys=True, default=repr)
    return f"{stage}-{hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()}"


class BatchCache:
    """Args:
    root (`str`, *optional*): the cache folder; None disables caching.
    key (`str`): the stage key from `stage_key`.
    """

    def __init__(self, root: str | None, key: str):
        self.folder = Path(root) / key if root else None

    def path(self, uuids: list[str]) -> Path:
        name = hashlib.blake2b("\n".join(uuids).encode(), digest_size=16).hexdigest()
        return self.folder / f"{name}.json"

    def load(self, uuids: list[str]) -> dict | None:
        if self.folder is None:
            return None
        path = self.path(uuids)
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def has(self, uuids: list[str]) -> bool:
        return self.folder is not None and self.path(uuids).exists()

    def save(self, uuids: list[str], outputs: dict) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(uuids)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(outputs))
        os.replace(tmp, path)  # atomic: a killed run leaves a whole file or none


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


def cached_batch(batch: dict, indices: list[int], rank, *, function, cache_root: str | None, key: str,
                 next_batch: NextBatch | None = None, **kwargs) -> dict:
    """Runs `function(batch, rank, **kwargs)` unless this stage already wrote this batch's output. With
    `next_batch`, the function also gets the worker's next batch (`next_batch=`), unless that one is in the cache.

    The output carries a `cached_batch` column (True where reused) that the build counts and removes.
    """
    cache = BatchCache(cache_root, key)
    outputs = cache.load(batch["uuid"])
    reused = outputs is not None
    if not reused:
        if next_batch is not None:
            upcoming = next_batch.after(indices, rank)
            kwargs["next_batch"] = upcoming if upcoming and not cache.has(upcoming["uuid"]) else None
        outputs = function(batch, rank, **kwargs)
        cache.save(batch["uuid"], outputs)
    return {**outputs, "cached_batch": [reused] * len(batch["uuid"])}


def count_reused(dataset, stage: str) -> int:
    """Rows of `dataset` whose batch came from the cache; logged, so a resumed run says what it reused."""
    flags = Counter(dataset["cached_batch"])
    if flags[True]:
        logger.info("%s: reused %d of %d rows from finished batches of an earlier run", stage, flags[True],
                    len(dataset))
    return flags[True]
