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
from conftest import ROOT, same_rows, small_config

BIN = Path(sys.executable).parent
DEMO = str(ROOT / "dataset_scripts" / "demo.yaml")


def rows(dataset_dict):
    return {name: split.to_list() for name, split in dataset_dict.items()}


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_num_proc_workers_give_every_row_exactly_once():
    one = build(small_config(num_instructions=30))
    two = build(small_config(num_instructions=30, num_proc=2))
    assert same_rows(two.dataset, one.dataset)
    uuids = [u for split in two.dataset.values() for u in split["uuid"]]
    assert len(uuids) == len(set(uuids)) == two.ledger.get("binarize").rows_out


def test_batch_and_shard_sizes_do_not_change_the_rows():
    # 3 sequences at a time in shards of 5 refills rows constantly; 32 in one shard of 24 never refills.
    assert same_rows(build(small_config(shard_size=5, generation_batch_size=3)).dataset,
                     build(small_config(shard_size=24, generation_batch_size=32)).dataset)


def test_two_processes_under_accelerate_merge_to_the_one_process_dataset(tmp_path):
    args = ["--config", DEMO, "--num_instructions", "40", "--test_size", "0.1", "--resume", "false",
            "--cache_dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29533",
         "-m", "builder.cli", *args, "--output_dir", str(tmp_path / "two")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "two" / "rank1").exists()
    from builder.config import parse_config

    single = build(parse_config(args))
    assert same_rows(load_dataset(str(tmp_path / "two")), single.dataset)
    parts = list((tmp_path / "cache" / "parts").rglob("rank-00001"))
    assert parts, "each rank wrote its own part"


def test_kill_dash_nine_mid_stage_then_resume(tmp_path):
    cache, output = tmp_path / "cache", tmp_path / "out"
    command = [str(BIN / "magpie-build"), "--config", DEMO, "--num_instructions", "160", "--shard_size",
               "4", "--max_response_tokens", "96", "--test_size", "0.05", "--cache_dir", str(cache), "--output_dir",
               str(output)]
    process = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        done = [p for p in cache.glob("responses-*/*.json")]
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

    config = BuildConfig(**(dict(__import__("yaml").safe_load((output / "build_config.yaml").read_text()),
                                 resume=False)))
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
