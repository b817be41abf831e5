"""Where this process stands in a multi-process run, and the folders a build's tables live in.

On one process the stages run over the whole dataset (with `num_proc` workers for the model stages, one model
each). Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1, one process per GPU across nodes) every rank runs
the model stages on its own part (`split_dataset_by_node`) and writes it to a shared folder; once every rank's part
is there (a file barrier, `wait_for_parts`) the parts are concatenated in rank order, which gives exactly the rows
of a one-process run.
"""

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from ..paths import cache_root


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a multi-process run: rank, world size and the shared folder for parts."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parts_dir: str | None = None

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
        wait_for_parts(folder, self.rank, self.world_size)
        parts = [load_from_disk(str(folder / f"rank-{r:05d}")) for r in range(self.world_size)]
        # A rank with no rows (more ranks than rows) mapped nothing and has none of the new columns.
        return concatenate_datasets([part for part in parts if len(part)])


RANK_WAIT_SECONDS = 7 * 24 * 3600  # ranks of a resumed multi-day stage can finish days apart
POLL_SECONDS = 5.0


def wait_for_parts(folder: Path, rank: int, world_size: int, timeout: float = RANK_WAIT_SECONDS) -> None:
    """A barrier on files in the shared parts folder: this rank's part is marked done, then every rank's is awaited.

    Not NCCL's barrier, whose watchdog ends the job after 10 minutes: ranks that finish a multi-hour stage (or a
    resumed one) far apart are normal here. A rank that never comes is named in the error after `timeout`.
    """
    import time

    (folder / f"done-rank-{rank:05d}").write_text("")
    start = time.monotonic()
    while True:
        missing = [r for r in range(world_size) if not (folder / f"done-rank-{r:05d}").exists()]
        if not missing:
            return
        if time.monotonic() - start > timeout:
            raise TimeoutError(
                f"Ranks {missing} did not finish {folder.name} within {timeout / 3600:.0f} h (their parts go to "
                f"{folder}). Check those ranks' logs; rerunning the same command resumes every finished batch."
            )
        time.sleep(POLL_SECONDS)


def distributed_ranks(run_key: str, cache_dir: str | None) -> Ranks:
    """Ranks of an `accelerate launch` / `torchrun` job (WORLD_SIZE > 1), or the one-process default. `run_key`
    names the shared folder of this run's parts under `cache_dir`."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks()
    from accelerate import PartialState

    # gloo, on the CPU: the ranks only meet once at the start (the parts' barrier is files), and an NCCL group would
    # initialise CUDA in this process before each rank's engine has picked its own GPUs (`devices.py`).
    state = PartialState(cpu=True)
    parts = Path(cache_dir or cache_root() / "batches") / "parts" / run_key
    if state.is_main_process:
        # Markers of an earlier run of this command would let a rank read parts still being rewritten.
        for marker in parts.glob("*/done-rank-*"):
            marker.unlink(missing_ok=True)
    state.wait_for_everyone()  # once, at the start, when the ranks start together
    return Ranks(state.process_index, state.num_processes, state.local_process_index, str(parts))


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
