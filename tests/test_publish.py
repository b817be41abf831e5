import dataclasses
import logging
import os
import re

import numpy as np
import pytest
import yaml
from datasets import load_dataset
from huggingface_hub import DatasetCard

from builder.build import build
from builder.publish.card import PLOT_FILE, render_card
from builder.publish.folder import write_folder
from builder.publish.hub import PushError, push_to_hub

from conftest import HUB_TOKENS, small_config


ALICE = "hf_test_alice_0123456789"


@pytest.fixture(scope="module")
def result():
    return build(small_config(num_instructions=24, pretty_name="Tiny Magpie DPO"))


def rows(dataset_dict):
    return {name: split.to_list() for name, split in dataset_dict.items()}


def card_number(text: str, row_name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {row_name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def expected(values) -> list[str]:
    values = np.asarray(values, dtype=float)
    return [f"{v:.4g}" for v in [values.mean(), *np.percentile(values, [0, 25, 50, 75, 100])]]


def test_card_numbers_equal_what_the_dataset_holds(result, tmp_path):
    folder = write_folder(result, tmp_path)
    text = (folder / "README.md").read_text()
    data = load_dataset(str(folder))
    everything = [row for split in data.values() for row in split]
    assert card_number(text, "chosen score") == expected([r["chosen_score"] for r in everything])
    assert card_number(text, "rejected score") == expected([r["rejected_score"] for r in everything])
    assert card_number(text, "reward margin") == expected([r["reward_margin"] for r in everything])
    assert card_number(text, "instruction tokens") == expected([r["instruction_tokens"] for r in everything])
    assert card_number(text, "response tokens") == expected([t for r in everything for t in r["response_tokens"]])
    reasons = [x for r in everything for x in r["response_finish_reasons"]]
    assert f"({reasons.count('length')} of {len(reasons)})" in text
    for stage in result.ledger.stages:
        assert re.search(rf"\| {stage.name} \| {stage.rows_in} \| {stage.rows_out} \|", text)
    assert f"`train` {len(data['train'])} rows, `test` {len(data['test'])} rows" in text


def test_card_contents(result, tmp_path):
    folder = write_folder(result, tmp_path)
    card = DatasetCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["task_categories"] == ["text-generation"]
    assert set(meta["tags"]) >= {"dpo", "preference", "synthetic", "magpie", "trl"}
    assert meta["size_categories"] == ["n<1K"] and meta["pretty_name"] == "Tiny Magpie DPO"
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*"},
        {"split": "test", "path": "data/test-*"},
    ]
    assert [f["name"] for f in meta["dataset_info"]["features"]][:5] == [
        "uuid",
        "instruction",
        "prompt",
        "chosen",
        "rejected",
    ]
    body = card.text
    assert "Conversational · Preference · explicit prompt" in body
    assert "`tiny:chat-llama-3.1`" in body and "`tiny:reward-armo`" in body
    assert r"<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\nCutting" in body  # escaped
    assert "temperature 1.0, top_p 1.0" in body and "4 per instruction, temperature 0.8" in body
    assert f"![Reward margins and chosen vs rejected scores]({PLOT_FILE})" in body
    assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accelerate launch --config_file training/accelerate_configs/zero3.yaml training/dpo.py" in body
    assert "xu2024magpie" in body and "vonwerra2022trl" in body
    assert "wang2024interpretable" not in body  # the tiny stand-in is not ArmoRM
    armo = dataclasses.replace(
        result, config=dataclasses.replace(result.config, reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1")
    )
    assert "wang2024interpretable" in str(render_card(armo))
    config_in_card = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config_in_card == yaml.safe_load((folder / "build_config.yaml").read_text())
    assert config_in_card["num_responses"] == 4 and "output_dir" not in config_in_card
    # Rebuilding with the published config must not push to the author's repo.
    pushing = dataclasses.replace(
        result, config=dataclasses.replace(result.config, push_to_hub=True, repo_id="alice/x")
    )
    published = yaml.safe_load(str(render_card(pushing)).split("```yaml\n", 1)[1].split("```", 1)[0])
    assert not {"push_to_hub", "repo_id", "private", "hub_revision", "force_push", "cache_dir"} & set(published)
    # Long strings are cut in the examples.
    examples = body.split("## Examples", 1)[1].split("## Usage", 1)[0]
    assert all(len(s) <= 302 + 2 for s in re.findall(r'"(?:[^"\\]|\\.)*"', examples))


def test_card_has_no_local_paths(tiny_model, tmp_path):
    local = tiny_model("chat-llama-3")
    result = build(small_config(generator_model=local, num_instructions=12, output_dir=str(tmp_path)))
    folder = write_folder(result, tmp_path)
    for name in ("README.md", "build_config.yaml"):
        text = (folder / name).read_text()
        assert local not in text and os.path.expanduser("~") not in text and str(tmp_path) not in text
    assert "`chat-llama-3`" in (folder / "README.md").read_text()
    assert load_dataset(str(folder), split="train")[0]["gen_input_configs"]["input_generator"] == "chat-llama-3"


def test_push_then_load_dataset_by_repo_id(result, hub, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    url = push_to_hub(result, "alice/tiny-dpo", folder=write_folder(result, tmp_path))
    assert url == f"{hub.url}/datasets/alice/tiny-dpo"
    loaded = load_dataset("alice/tiny-dpo")
    assert rows(loaded) == rows(result.dataset)
    files = hub.files("alice/tiny-dpo")
    assert {"README.md", PLOT_FILE, "build_config.yaml", "build_summary.json"} <= set(files)
    assert all(
        hub.state.repos["alice/tiny-dpo"]["commits"][hub.head("alice/tiny-dpo")]["files"][p]["lfs"]
        for p in files
        if p.endswith(".parquet")
    )  # shards went through LFS
    card = DatasetCard(files["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["configs"][0]["config_name"] == "default"
    assert meta["dataset_info"]["splits"] == [
        {
            "name": "train",
            "num_bytes": meta["dataset_info"]["splits"][0]["num_bytes"],
            "num_examples": len(result.dataset["train"]),
        },
        {
            "name": "test",
            "num_bytes": meta["dataset_info"]["splits"][1]["num_bytes"],
            "num_examples": len(result.dataset["test"]),
        },
    ]
    assert "## Pipeline accounting" in card.text and 'load_dataset("alice/tiny-dpo")' in card.text
    # The local folder got the very card the Hub has.
    assert (tmp_path / "README.md").read_bytes() == files["README.md"]
    # The token is in no uploaded file and no log line.
    for token in HUB_TOKENS:
        assert all(token.encode() not in content for content in files.values())
        assert token not in caplog.text and token not in capsys.readouterr().err


def test_repush_is_idempotent(result, hub):
    push_to_hub(result, "alice/tiny-dpo")
    first = hub.files("alice/tiny-dpo")
    push_to_hub(result, "alice/tiny-dpo")
    assert hub.files("alice/tiny-dpo") == first


def test_push_over_another_schema_needs_force(result, hub):
    other = build(small_config(num_instructions=12, implicit_prompt=True))
    push_to_hub(other, "alice/tiny-dpo")
    head = hub.head("alice/tiny-dpo")
    with pytest.raises(PushError, match="another schema.*force_push"):
        push_to_hub(result, "alice/tiny-dpo")
    assert hub.head("alice/tiny-dpo") == head
    push_to_hub(result, "alice/tiny-dpo", force=True)
    assert rows(load_dataset("alice/tiny-dpo")) == rows(result.dataset)


def test_a_server_error_once_is_retried(result, hub):
    hub.fail_next(1)
    push_to_hub(result, "alice/tiny-dpo")
    assert rows(load_dataset("alice/tiny-dpo")) == rows(result.dataset)


def test_a_server_that_always_fails_leaves_the_repo_unchanged(result, hub, monkeypatch):
    monkeypatch.setattr("builder.publish.hub.time.sleep", lambda seconds: None)
    push_to_hub(result, "alice/tiny-dpo")
    before = hub.files("alice/tiny-dpo")
    other = build(small_config(num_instructions=12, seed=99))
    hub.fail_always()
    with pytest.raises(PushError, match="failed 3 times.*left as it was"):
        push_to_hub(other, "alice/tiny-dpo")
    hub.recover()
    assert hub.files("alice/tiny-dpo") == before


def test_private_repo_on_a_branch(result, hub, monkeypatch):
    url = push_to_hub(result, "alice/private-dpo", private=True, revision="v1")
    assert url.endswith("/datasets/alice/private-dpo/tree/v1")
    assert rows(load_dataset("alice/private-dpo", revision="v1")) == rows(result.dataset)
    assert "data/train-00000-of-00001.parquet" not in hub.files("alice/private-dpo", "main")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    assert HfApi(token=ALICE).repo_info("alice/private-dpo", repo_type="dataset").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token="hf_test_bob_9876543210").repo_info("alice/private-dpo", repo_type="dataset")


@pytest.mark.parametrize(
    "repo_id, token, message",
    [
        ("not a repo id!", ALICE, "not a valid Hub repo id"),
        ("tiny-dpo", ALICE, "needs a namespace"),
        ("bob/tiny-dpo", ALICE, "belongs to 'bob'.*only to alice"),
        ("alice/tiny-dpo", "hf_wrong_token", "rejected the token"),
        ("alice/tiny-dpo", None, "No Hugging Face token"),
    ],
)
def test_push_errors_are_clear(result, hub, monkeypatch, repo_id, token, message):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(PushError, match=message):
        push_to_hub(result, repo_id)
    assert hub.state.repos == {}


def test_unreachable_server_is_a_clear_error(result, hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("builder.publish.hub.time.sleep", lambda seconds: None)
    with pytest.raises(PushError, match="failed 3 times against http://127.0.0.1:9"):
        push_to_hub(result, "alice/tiny-dpo")


def test_cli_pushes_and_prints_the_url(hub, tmp_path, capsys):
    from builder.cli import main

    assert (
        main(
            [
                "--config",
                "dataset_scripts/demo_tiny.yaml",
                "--num_instructions",
                "12",
                "--output_dir",
                str(tmp_path),
                "--push_to_hub",
                "--repo_id",
                "alice/demo",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"Dataset pushed to {hub.url}/datasets/alice/demo"
    assert load_dataset("alice/demo")["train"].num_rows == load_dataset(str(tmp_path))["train"].num_rows


def test_card_renders_without_a_repo(result):
    assert 'load_dataset("path/to/output_dir")' in str(render_card(result))


def test_a_card_commit_that_fails_says_the_data_landed(result, hub, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr("builder.publish.hub.time.sleep", lambda seconds: None)
    real_commit = HfApi.create_commit

    def failing_card_commit(self, repo_id, operations, **kwargs):
        if any(op.path_in_repo == "README.md" for op in operations) and "card" in kwargs["commit_message"]:
            hub.fail_always()
        return real_commit(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", failing_card_commit)
    with pytest.raises(PushError, match="data landed in alice/tiny-dpo .* but its card did not"):
        push_to_hub(result, "alice/tiny-dpo")
    hub.recover()
    monkeypatch.setattr(HfApi, "create_commit", real_commit)
    push_to_hub(result, "alice/tiny-dpo")
    assert PLOT_FILE in hub.files("alice/tiny-dpo")


def test_license_other_carries_its_name_and_link(result):
    other = dataclasses.replace(
        result,
        config=dataclasses.replace(
            result.config, license="other", license_name="my-license", license_link="https://example.org/LICENSE"
        ),
    )
    card = render_card(other)
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other",
        "my-license",
        "https://example.org/LICENSE",
    )
    with pytest.raises(ValueError, match="license_name/link go with license: other"):
        small_config(license="apache-2.0", license_name="x")
