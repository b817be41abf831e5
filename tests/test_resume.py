"""Resume is exact and never stale: a rerun with any upstream setting changed gives what a fresh build gives, and
reuses exactly the stages upstream of the change."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from datasets import load_dataset

from builder.build import build
from builder.cli import main as cli_main
from builder.pipeline.resume import BatchCache

from conftest import ROOT, same_rows, small_config


DEMO = str(ROOT / "dataset_scripts" / "demo_tiny.yaml")
MODEL_STAGES = ("instructions", "responses", "rewards")


def reused_stages(caplog) -> set[str]:
    names = {
        "Generating instructions": "instructions",
        "Generating responses": "responses",
        "Scoring responses": "rewards",
    }
    return {
        stage
        for desc, stage in names.items()
        if any(f"{desc}: reused" in record.getMessage() for record in caplog.records)
    }


def test_the_issue_commands_give_the_fresh_dataset_of_the_second_config(tmp_path, caplog):
    # Two builds that differ only in the instruction temperature: the second must not pair its new instructions
    # with the responses of the old ones.
    common = ["--config", DEMO, "--num_instructions", "16", "--cache_dir", str(tmp_path / "cache")]
    assert cli_main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        assert cli_main([*common, "--output_dir", str(tmp_path / "b"), "--instruction_temperature", "0.7"]) == 0
    assert reused_stages(caplog) == set()
    assert (
        cli_main(
            [*common, "--output_dir", str(tmp_path / "fresh"), "--instruction_temperature", "0.7", "--resume", "false"]
        )
        == 0
    )
    a, b, fresh = (load_dataset(str(tmp_path / name)) for name in ("a", "b", "fresh"))
    assert same_rows(b, fresh)
    assert not same_rows(a, b)
    for row in b["train"]:
        assert row["prompt"] == [{"role": "user", "content": row["instruction"]}]
        assert row["gen_input_configs"]["temperature"] == 0.7
    # The same command again reuses every model stage, and says so.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        assert cli_main([*common, "--output_dir", str(tmp_path / "c"), "--instruction_temperature", "0.7"]) == 0
    assert reused_stages(caplog) == set(MODEL_STAGES)
    assert same_rows(load_dataset(str(tmp_path / "c")), fresh)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A cache that already holds every batch of the base build, as a user's would after a first run."""
    cache = tmp_path_factory.mktemp("resume-cache")
    build(small_config(resume=True, cache_dir=str(cache)))
    return cache


# Each model-stage input in turn, with the first model stage it must recompute (every later one too).
CHANGES = [
    ({"instruction_temperature": 0.7}, "instructions"),
    ({"instruction_top_p": 0.9}, "instructions"),
    ({"max_instruction_tokens": 40}, "instructions"),
    ({"keep_default_system": False}, "instructions"),
    ({"system_prompt": "You write short questions."}, "instructions"),
    ({"pre_query_template": "llama3"}, "instructions"),
    ({"seed": 8}, "instructions"),
    ({"generator_revision": "v2"}, "instructions"),
    ({"response_temperature": 0.5}, "responses"),
    ({"response_top_p": 0.9}, "responses"),
    ({"max_response_tokens": 20}, "responses"),
    ({"num_responses": 3}, "responses"),
    ({"max_prompt_tokens": 90}, "responses"),
    ({"chat_template_date": "2025-01-02"}, "responses"),
    ({"reward_max_length": 100}, "rewards"),
    ({"reward_revision": "v2"}, "rewards"),
    ({"min_reward_margin": 0.1}, None),  # after every model stage: all are reused
    ({"implicit_prompt": True}, None),
    ({"test_size": 0.3}, None),
]


@pytest.mark.parametrize("change, first_recomputed", CHANGES, ids=[next(iter(c)) for c, _ in CHANGES])
def test_a_changed_upstream_setting_gives_the_fresh_build(change, first_recomputed, shared_cache, tmp_path, caplog):
    cache = shutil.copytree(shared_cache, tmp_path / "cache")  # the base build's batches, and no other run's
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        resumed = build(small_config(resume=True, cache_dir=str(cache), **change))
    fresh = build(small_config(resume=False, **change))
    assert same_rows(resumed.dataset, fresh.dataset)
    cut = MODEL_STAGES.index(first_recomputed) if first_recomputed else len(MODEL_STAGES)
    assert reused_stages(caplog) == set(MODEL_STAGES[:cut])


def test_a_damaged_batch_file_is_recomputed_with_a_warning(tmp_path, caplog):
    config = small_config(resume=True, cache_dir=str(tmp_path))
    first = build(config)
    files = sorted((tmp_path).glob("responses-*/*.json"))
    assert len(files) >= 3
    files[0].write_bytes(files[0].read_bytes()[:-40])  # cut short
    header, body = files[1].read_bytes().split(b"\n", 1)
    files[1].write_bytes(header + b"\n" + body.replace(b'"stop"', b'"STOP"', 1))  # same length, wrong checksum
    files[2].write_text("{not json")
    # Whole and checksummed, but not what the stage writes (a file from another version of the stage, say).
    (scored,) = sorted(tmp_path.glob("rewards-*/*.json"))[:1]
    outputs = json.loads(scored.read_bytes().split(b"\n", 1)[1])
    del outputs["reward_model"]
    body = json.dumps(outputs).encode()
    check = hashlib.blake2b(body, digest_size=16).hexdigest()
    scored.write_bytes(json.dumps({"rows": len(outputs["rewards"]), "blake2b": check}).encode() + b"\n" + body)
    files.append(scored)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        again = build(config)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 4 and all("recomputing that batch" in m for m in damaged)
    assert any("not the stage's" in m for m in damaged)
    assert same_rows(again.dataset, first.dataset)
    for path in files[:4]:  # rewritten whole
        header = json.loads(path.read_bytes().split(b"\n", 1)[0])
        assert header["rows"] > 0


def test_a_batch_file_is_named_by_the_content_it_was_computed_from(tmp_path):
    cache = BatchCache(str(tmp_path), "responses-abc")
    batch = {"uuid": ["a", "b"], "prompt": [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]}
    cache.save(batch, 2, {"responses": [["1"], ["2"]]})
    assert cache.load(batch, 2) == {"responses": [["1"], ["2"]]}
    other = dict(batch, prompt=[[{"role": "user", "content": "x"}], [{"role": "user", "content": "z"}]])
    assert cache.load(other, 2) is None  # same uuids, another prompt: never reused
    assert cache.load(batch, 3) is None  # a row count that does not match
    assert Path(cache.path(batch)).parent == tmp_path / "responses-abc"
