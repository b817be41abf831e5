"""Bad input and faults: one clear line and an exit code instead of a traceback, wrong models refused before any
generation, no stale reuse of a model changed in place, no credentials from recipes, a card user text cannot break."""

import logging
import re
import shutil

import pytest
import yaml
from huggingface_hub import DatasetCard

from builder.build import build
from builder.cli import main as cli_main

from conftest import ROOT, small_config


DEMO = ROOT / "dataset_scripts" / "demo_tiny.yaml"


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli_main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "recipe, fragments",
    [
        ("chat_template_date: 2024-07-26\n", ["Quote it", 'chat_template_date: "2024-07-26"']),
        ("num_responses: 2.5\n", ["`num_responses` is 2.5", "whole number"]),
        ("num_instruction: 5\n", ["num_instruction"]),
        ("env:\n  HF_ENDPOINT: http://127.0.0.1:9\n", ["HF_ENDPOINT", "never come from a config file"]),
        ("env:\n  HF_TOKEN: hf_abc\n", ["HF_TOKEN", "hf auth login"]),
        ("generator_model: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys, recipe, fragments):
    path = tmp_path / "recipe.yaml"
    base = "generator_model: tiny:chat-llama-3.1\nreward_model: tiny:reward\n"
    path.write_text(recipe if recipe.startswith("generator_model") else base + recipe)
    code, err = run_cli(["--config", path, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_line(err, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config"], ["`--config` needs the path"]),
        (["--config", "no/such/recipe.yaml"], ["does not exist"]),
        (["--config", DEMO, "--num_responses", "2.5"], ["invalid int value: '2.5'", "--help"]),
        (
            ["--config", DEMO, "--generator_model", "./no/such/folder"],
            ["model folder ./no/such/folder does not exist"],
        ),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, args, fragments):
    code, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line(err, *fragments)


def test_a_corrupt_model_config_names_the_file(tmp_path, capsys, tiny_model):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("chat-llama-3.1"), folder)
    (folder / "config.json").write_text("{not json")
    code, err = run_cli(["--config", DEMO, "--generator_model", folder], capsys)
    assert code == 2
    assert_one_line(err, "config.json", "generator_model")


def test_a_runtime_failure_is_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("the engine stopped")

    monkeypatch.setattr("builder.build.build", fail)
    code, err = run_cli(["--config", DEMO], capsys)
    assert code == 1
    assert_one_line(err, "the engine stopped", "--debug")
    with pytest.raises(RuntimeError, match="the engine stopped"):
        cli_main(["--config", str(DEMO), "--debug"])


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("builder.build.build", interrupted)
    code, err = run_cli(["--config", DEMO], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == (
        "interrupted: run the same command again to resume; every finished batch of the model stages is kept."
    )


def test_a_causal_lm_or_a_two_label_classifier_is_refused_as_reward_model_before_generating(tmp_path, tiny_model):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    with pytest.raises(ValueError, match="LlamaForCausalLM, not a reward model.*reward_judge"):
        build(small_config(reward_model="tiny:chat-llama-3.1", reward_trust_remote_code=False))
    two = tmp_path / "two-labels"
    config = LlamaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_model("reward")).save_pretrained(two)
    with pytest.raises(ValueError, match="has 2 labels; a reward model has one score"):
        build(small_config(reward_model=str(two), reward_trust_remote_code=False))


def test_a_local_model_changed_in_place_is_not_served_its_old_batches(tmp_path, tiny_model, caplog):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "generator"
    shutil.copytree(tiny_model("chat-llama-3.1"), folder)
    config = dict(generator_model=str(folder), num_instructions=8, resume=True, cache_dir=str(tmp_path / "cache"))
    first = build(small_config(**config)).dataset
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a fine-tune of the same shapes, saved over the old weights
    model.save_pretrained(folder)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        second = build(small_config(**config)).dataset
    assert not any("Generating instructions: reused" in r.getMessage() for r in caplog.records)
    assert first["train"]["instruction"] != second["train"]["instruction"]


def outside_code(markdown: str) -> str:
    """`markdown` outside code: fenced blocks (a fence closes only with at least as many backticks) and spans."""
    kept, fence = [], None
    for line in markdown.splitlines():
        run = len(line) - len(line.lstrip("`"))
        if fence is None and run >= 3:
            fence = run
        elif fence is not None and run >= fence and not line.strip("`"):
            fence = None
        elif fence is None:
            kept.append(line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(kept))  # and inline code spans, where HTML is text too


HOSTILE = "# Take over <script>alert(1)</script> | --- ```\n## Injected section"


def test_user_text_cannot_break_the_card(tmp_path):
    from builder.publish.card import public_config, render_card

    result = build(
        small_config(num_instructions=12, pretty_name=HOSTILE, system_prompt="Be brief.\n```\n---\n<b>x</b>")
    )
    card = str(render_card(result))
    # After the YAML metadata (where the name is data), and outside code blocks (text in a fence it cannot close).
    body = outside_code(card.split("\n---\n", 1)[1])
    assert "<script>" not in body and "<b>" not in body
    assert "\n## Injected section" not in body
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert "&lt;script&gt;" in title and "\n" not in title
    loaded = DatasetCard(card)
    assert loaded.data.pretty_name == HOSTILE  # the YAML metadata keeps the name exactly
    # The build config block parses back to the published config, however many backticks the prompt holds.
    block = card.split("## Build config", 1)[1]
    fence = re.search(r"\n(`{3,})yaml\n", block).group(1)
    assert len(fence) > 3  # the system prompt holds a run of three
    config_text = block.split(fence + "yaml\n", 1)[1].split("\n" + fence, 1)[0]
    assert yaml.safe_load(config_text) == yaml.safe_load(
        yaml.safe_dump(public_config(result.config), sort_keys=False, allow_unicode=True)
    )
    assert card.count("\n## Build config") == 1 and card.count("\n## Citation") == 1


@pytest.fixture(scope="module")
def small_result():
    return build(small_config(num_instructions=12))


def test_a_folder_the_builder_did_not_write_is_refused_before_building(tmp_path, capsys, monkeypatch):
    from datasets import load_dataset

    theirs = tmp_path / "their-dataset"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "train-00000-of-00001.parquet").write_bytes(b"their rows")
    (theirs / "README.md").write_text("their card")
    built = []
    monkeypatch.setattr("builder.build.build", lambda *a, **k: built.append(1))
    code, err = run_cli(["--config", DEMO, "--output_dir", theirs], capsys)
    assert code == 2 and not built
    assert_one_line(err, "holds files magpie-builder did not write (README.md, data)", "overwrite_output_dir: true")
    assert (theirs / "README.md").read_text() == "their card"  # untouched
    file = tmp_path / "a-file"
    file.write_text("x")
    code, err = run_cli(["--config", DEMO, "--output_dir", file], capsys)
    assert code == 2 and not built
    assert_one_line(err, "is a file")
    monkeypatch.undo()
    assert cli_main(["--config", str(DEMO), "--output_dir", str(theirs), "--overwrite_output_dir", "true"]) == 0
    assert (
        load_dataset(str(theirs), split="train").num_rows > 0
        and "their card" not in (theirs / "README.md").read_text()
    )


def test_a_rebuild_leaves_nothing_of_the_earlier_one(small_result, tmp_path):
    import dataclasses

    from datasets import load_dataset

    from builder.publish.folder import MARKER, write_folder

    folder = tmp_path / "out"
    with_arrow = dataclasses.replace(small_result, config=dataclasses.replace(small_result.config, save_to_disk=True))
    write_folder(with_arrow, folder)
    assert (folder / "arrow").is_dir() and (folder / MARKER).exists()
    (folder / "data" / "train-99999-of-99999.parquet").write_bytes(b"stray")  # would make the folder unloadable
    write_folder(small_result, folder)
    assert not (folder / "arrow").exists()
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    assert load_dataset(str(folder), split="train").num_rows == len(small_result.dataset["train"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or retired folder left


def test_a_write_that_fails_midway_leaves_the_earlier_dataset_whole(small_result, tmp_path, monkeypatch):
    from datasets import load_dataset

    from builder.publish import folder as folder_module

    folder = tmp_path / "out"
    folder_module.write_folder(small_result, folder)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    def killed(result, card):
        raise KeyboardInterrupt  # as a kill while the card is written

    monkeypatch.setattr(folder_module, "card_files", killed)
    with pytest.raises(KeyboardInterrupt):
        folder_module.write_folder(small_result, folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert load_dataset(str(folder), split="test").num_rows == len(small_result.dataset["test"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_output_dir_that_would_replace_home_or_the_working_folder_is_refused(capsys):
    for folder in ("~", ".", ".."):
        code, err = run_cli(["--config", DEMO, "--output_dir", folder, "--overwrite_output_dir", "true"], capsys)
        assert code == 2
        assert_one_line(err, "a folder of its own")


@pytest.mark.parametrize(
    "token, repo_id, fragments",
    [
        (None, "alice/x", ["No Hugging Face token found", "HF_TOKEN"]),
        ("hf_not_a_real_token_000000", "alice/x", ["rejected the token (401)"]),
        ("hf_test_alice_0123456789", "bob/x", ["belongs to 'bob'", "alice"]),
        ("hf_test_alice_0123456789", "alice/bad name!", ["not a valid Hub repo id"]),
    ],
)
def test_a_push_that_cannot_happen_is_refused_before_building(hub, monkeypatch, capsys, token, repo_id, fragments):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    built = []
    monkeypatch.setattr("builder.build.build", lambda *a, **k: built.append(1))
    code, err = run_cli(["--config", DEMO, "--push_to_hub", "true", "--repo_id", repo_id], capsys)
    assert code == 2 and not built
    assert_one_line(err, "Cannot push to the Hub", *fragments)


def test_an_unreachable_hub_is_found_before_building(hub, monkeypatch, capsys):
    monkeypatch.setattr("builder.publish.hub.time.sleep", lambda seconds: None)
    built = []
    monkeypatch.setattr("builder.build.build", lambda *a, **k: built.append(1))
    hub.fail_always()
    code, err = run_cli(["--config", DEMO, "--push_to_hub", "true", "--repo_id", "alice/x"], capsys)
    assert code == 2 and not built
    assert_one_line(err, "Cannot push to the Hub", "failed 3 times", "HTTP 500", "HF_ENDPOINT")
    assert not hub.state.repos


def test_a_truncated_weight_file_is_named_with_the_fix(tmp_path, tiny_model):
    folder = tmp_path / "generator"
    shutil.copytree(tiny_model("chat-llama-3.1"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="Cannot load the weights of the generator model .*download it again"):
        build(small_config(generator_model=str(folder), num_instructions=4))


def test_a_reward_template_that_fails_is_found_before_generating(tmp_path, tiny_model, monkeypatch):
    import json

    folder = tmp_path / "reward"
    shutil.copytree(tiny_model("reward"), folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('this template refuses every chat') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generated = []
    monkeypatch.setattr("builder.sources.magpie.sample_completions", lambda *a, **k: generated.append(1))
    with pytest.raises(ValueError, match="chat template of the reward model .* cannot render a chat"):
        build(small_config(reward_model=str(folder), reward_trust_remote_code=False))
    assert not generated


def test_a_full_disk_leaves_no_partial_files_and_says_which_folder(small_result, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from builder.pipeline.resume import BatchCache
    from builder.publish import folder as folder_module

    real_write = Path.write_bytes

    def full(self, data):
        real_write(self, data[: len(data) // 2])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    cache = BatchCache(str(tmp_path / "cache"), "stage-key")
    with pytest.raises(OSError, match="No space left for .*stage-key .*cache_dir or MAGPIE_BUILDER_CACHE"):
        cache.save({"uuid": ["a"]}, 1, {"x": [1]})
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    with pytest.raises(OSError, match=f"No space left in {tmp_path} to write the dataset"):
        folder_module.write_folder(small_result, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_repo_with_other_columns_is_refused_before_building(hub, small_result, monkeypatch, capsys):
    import dataclasses

    from builder.pipeline.runner import final_columns
    from builder.publish.hub import push_to_hub

    # The declarations say which columns a build publishes, before it runs.
    assert final_columns(build.__globals__["stages_for"](small_result.config, small_result.models)) == list(
        small_result.dataset["train"].column_names
    )
    implicit = dataclasses.replace(small_result, config=dataclasses.replace(small_result.config, implicit_prompt=True))
    implicit_rows = implicit.dataset.map(lambda row: row, remove_columns=["prompt"])
    push_to_hub(dataclasses.replace(implicit, dataset=implicit_rows), "alice/taken")
    capsys.readouterr()
    built = []
    monkeypatch.setattr("builder.build.build", lambda *a, **k: built.append(1))
    code, err = run_cli(["--config", DEMO, "--push_to_hub", "true", "--repo_id", "alice/taken"], capsys)
    assert code == 2 and not built
    assert_one_line(err, "already holds a dataset with other columns", "force_push: true")
    code, err = run_cli(
        ["--config", DEMO, "--push_to_hub", "true", "--repo_id", "alice/taken", "--force_push", "true"], capsys
    )
    assert built  # force_push lets it through to the build
