"""Many processes, many nodes, other engines, and resuming after a crash."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset

from builder.build import build
from builder.config import BuildConfig

from conftest import ROOT, free_port, same_rows, small_config


BIN = Path(sys.executable).parent
DEMO = str(ROOT / "dataset_scripts" / "demo_tiny.yaml")


def rows(dataset_dict):
    return {name: split.to_list() for name, split in dataset_dict.items()}


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.mark.slow  # subprocesses
def test_num_proc_workers_give_every_row_exactly_once():
    one = build(small_config(num_instructions=30))
    two = build(small_config(num_instructions=30, num_proc=2))
    assert same_rows(two.dataset, one.dataset)
    uuids = [u for split in two.dataset.values() for u in split["uuid"]]
    assert len(uuids) == len(set(uuids)) == two.ledger.get("binarize").rows_out


def test_batch_and_shard_sizes_do_not_change_the_rows():
    # 3 sequences at a time in shards of 5 refills rows constantly; 32 in one shard of 24 never refills.
    assert same_rows(
        build(small_config(shard_size=5, generation_batch_size=3)).dataset,
        build(small_config(shard_size=24, generation_batch_size=32)).dataset,
    )


def test_look_ahead_carries_each_shard_into_the_next_and_keeps_every_row(monkeypatch):
    # With look_ahead, a shard's samples start in the rows the previous shard's tail frees: fewer continuous
    # batches than shards, and the same rows (at this scale not a token differs; see the config's help).
    from builder.engines.transformers import generation

    batches = []
    init = generation.ContinuousBatch.__init__

    def counting_init(batch, *args, **kwargs):
        batches.append(batch)
        init(batch, *args, **kwargs)

    monkeypatch.setattr(generation.ContinuousBatch, "__init__", counting_init)
    alone = build(small_config(shard_size=4, generation_batch_size=6))
    separate = len(batches)
    batches.clear()
    ahead = build(small_config(shard_size=4, generation_batch_size=6, look_ahead=True))
    assert separate >= 6 + 5  # 6 instruction shards, and the responses' shards
    assert len(batches) < separate / 2
    assert same_rows(ahead.dataset, alone.dataset)
    uuids = [u for split in ahead.dataset.values() for u in split["uuid"]]
    assert len(uuids) == len(set(uuids)) == ahead.ledger.get("binarize").rows_out
    assert generation._carried is None


@pytest.mark.slow  # subprocesses
def test_two_processes_under_accelerate_merge_to_the_one_process_dataset(tmp_path):
    args = [
        "--config",
        DEMO,
        "--num_instructions",
        "40",
        "--test_size",
        "0.1",
        "--resume",
        "false",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    done = subprocess.run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "builder.cli",
            *args,
            "--output_dir",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "two" / "rank1").exists()
    from builder.config import parse_config

    single = build(parse_config(args))
    assert same_rows(load_dataset(str(tmp_path / "two")), single.dataset)
    parts = list((tmp_path / "cache" / "parts").rglob("rank-00001"))
    assert parts, "each rank wrote its own part"


@pytest.mark.slow  # subprocesses
def test_kill_dash_nine_mid_stage_then_resume(tmp_path):
    cache, output = tmp_path / "cache", tmp_path / "out"
    command = [
        str(BIN / "magpie-build"),
        "--config",
        DEMO,
        "--num_instructions",
        "160",
        "--shard_size",
        "4",
        "--max_response_tokens",
        "96",
        "--test_size",
        "0.05",
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(output),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        done = list(cache.glob("responses-*/*.json"))
        if len(done) >= 3:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    finished_before = len(list(cache.glob("responses-*/*.json")))
    assert 3 <= finished_before < 40 and not (output / "README.md").exists()

    again = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Generating instructions: reused 160 of 160 rows" in again.stderr
    reused = int(again.stderr.split("Generating responses: reused ")[1].split(" ")[0])
    assert reused >= 4 * finished_before - 4  # whole batches of 4, the last one may be cut short by filters

    config = BuildConfig(
        **(dict(__import__("yaml").safe_load((output / "build_config.yaml").read_text()), resume=False))
    )
    assert same_rows(load_dataset(str(output)), build(config).dataset)


def test_a_changed_config_never_reuses_stale_work(tmp_path):
    first = build(small_config(resume=True, cache_dir=str(tmp_path)))
    keys = {p.name for p in tmp_path.iterdir()}
    assert {k.split("-")[0] for k in keys} == {"instructions", "responses", "rewards"}
    changed = build(small_config(resume=True, cache_dir=str(tmp_path), response_temperature=0.5))
    new_keys = {p.name for p in tmp_path.iterdir()} - keys
    assert {k.split("-")[0] for k in new_keys} == {"responses", "rewards"}  # instructions were reused
    assert rows(changed.dataset) != rows(first.dataset)
    assert rows(build(small_config(resume=True, cache_dir=str(tmp_path))).dataset) == rows(first.dataset)


def _record_batches(batch, indices, rank, *, next_batch):
    upcoming = next_batch.after(indices, rank)
    return {
        "seen": [
            [
                rank if rank is not None else -1,
                indices[0],
                len(indices),
                upcoming["i"][0] if upcoming else -1,
                len(upcoming["i"]) if upcoming else 0,
            ]
        ]
        * len(indices)
    }


@pytest.mark.parametrize("num_proc", [None, 2])
def test_next_batch_is_the_batch_map_hands_the_same_worker_next(num_proc):
    from datasets import Dataset

    from builder.pipeline.resume import NextBatch

    rows = Dataset.from_dict({"i": list(range(23))})
    mapped = rows.map(
        _record_batches,
        batched=True,
        batch_size=5,
        with_indices=True,
        with_rank=True,
        num_proc=num_proc,
        fn_kwargs={"next_batch": NextBatch(rows, 5, num_proc)},
    )
    calls = sorted({tuple(s) for s in mapped["seen"]}, key=lambda c: c[1])
    by_worker = {}
    for rank, first, size, next_first, next_size in calls:
        by_worker.setdefault(rank, []).append((first, size, next_first, next_size))
    assert len(by_worker) == (num_proc or 1)
    for batches in by_worker.values():
        for (_first, _size, next_first, next_size), following in zip(batches, batches[1:] + [None]):
            # Each batch's look-ahead is exactly the next batch this worker got, and the last one has none.
            assert (next_first, next_size) == ((following[0], following[1]) if following else (-1, 0))
    assert sorted(i for _, first, size, _, _ in calls for i in range(first, first + size)) == list(range(23))
