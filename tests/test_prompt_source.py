"""Prompts from an existing dataset: every prompt once in the output or once in the drop counts, with its exact text;
the dataset's own test split as `test`; the recipes of the on-policy data."""

import hashlib
import json
import shutil

import pytest
import yaml
from datasets import load_dataset

from builder.build import build
from builder.cli import main as cli_main
from builder.config import parse_config
from builder.sources.prompts import as_messages, prompt_id

from conftest import ROOT, small_config


ULTRAFEEDBACK_SAMPLE = ROOT / "dataset_scripts" / "data" / "ultrafeedback_prompts"
RECIPE = ROOT / "dataset_scripts" / "llama3_ultrafeedback_armorm.yaml"
DEMO_ON_POLICY = ROOT / "dataset_scripts" / "demo_on_policy.yaml"

LONG = "Tell me everything about the history of this word: " + "repeat " * 400
PROMPTS = [
    "What is the boiling point of water at sea level?",
    "How do magnets work?",
    "Translate 'cat' into Spanish.",
    [{"role": "user", "content": "  Name three primary colours.\n"}],  # whitespace kept as the user wrote it
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Define entropy in one sentence."},
    ],
    [
        {"role": "user", "content": "Suggest a book."},
        {"role": "assistant", "content": "Try 'The Hobbit'."},
        {"role": "user", "content": "Something shorter?"},
    ],
    "What is the boiling point of water at sea level?",  # a duplicate of the first
    "   ",  # empty
    [{"role": "assistant", "content": "I start, which no prompt may."}],  # malformed
    [{"role": "user"}],  # malformed: no content
    LONG,  # over max_prompt_tokens
]


def write_jsonl(path, prompts):
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")


@pytest.fixture
def prompt_file(tmp_path):
    # A column has one type (Arrow's), so the string prompts and the message-list prompts go in two files.
    strings = [p for p in PROMPTS if isinstance(p, str)]
    lists = [p for p in PROMPTS if not isinstance(p, str)]
    write_jsonl(tmp_path / "strings.jsonl", strings)
    write_jsonl(tmp_path / "lists.jsonl", lists)
    return tmp_path


def prompt_config(path, **overrides):
    values = dict(prompt_dataset=str(path), max_prompt_tokens=300, num_responses=3, test_size=0.3)
    values.update(overrides)
    return small_config(**values)


def test_as_messages_keeps_exact_text_and_names_each_fault():
    assert as_messages("Hi there ") == ([{"role": "user", "content": "Hi there "}], "")
    assert as_messages("") == (None, "empty_prompt") and as_messages(None) == (None, "empty_prompt")
    assert as_messages([{"role": "user", "content": " "}]) == (None, "empty_prompt")
    assert as_messages({"text": "hi"})[1] == "malformed_prompt"
    assert (
        as_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])[1] == "malformed_prompt"
    )
    assert as_messages([{"role": "tool", "content": "a"}])[1] == "malformed_prompt"
    system = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_messages(system) == (system, "")
    assert prompt_id("abc") == hashlib.sha256(b"abc").hexdigest()  # ultrafeedback_binarized's prompt_id


@pytest.mark.parametrize("kind", ["strings", "lists"])
def test_every_prompt_is_in_the_output_or_in_the_drop_counts_once_with_its_exact_text(prompt_file, kind):
    expected = [p for p in PROMPTS if isinstance(p, str) == (kind == "strings")]
    result = build(prompt_config(prompt_file / f"{kind}.jsonl"))
    rows = [row for split in result.dataset.values() for row in split]
    drops = result.ledger.drops()
    assert len(rows) + sum(drops.values()) == len(expected)
    published = {json.dumps(row["prompt"]) for row in rows}
    assert len(published) == len(rows)  # no prompt twice
    kept = 0
    for prompt in {json.dumps(p): p for p in expected}.values():  # a duplicate is one prompt
        messages, reason = as_messages(prompt)
        if messages is not None and json.dumps(messages) in published:
            kept += 1
            row = next(r for r in rows if r["prompt"] == messages)
            assert row["prompt_id"] == prompt_id(prompt) and row["instruction"] == messages[-1]["content"]
            assert row["chosen"][0]["role"] == "assistant" and row["chosen_score"] >= row["rejected_score"]
    assert kept == len(rows)
    if kind == "strings":
        assert dict(drops) == {"duplicate": 1, "empty_prompt": 1, "prompt_too_long": 1}
    else:
        assert drops == {"malformed_prompt": 2}
        assert any(row["prompt"][0]["role"] == "system" for row in rows)


def test_the_prompt_test_split_makes_the_test_split(tmp_path):
    result = build(
        small_config(
            prompt_dataset=str(ULTRAFEEDBACK_SAMPLE),
            prompt_split="train_prefs",
            prompt_test_split="test_prefs",
            num_responses=2,
            max_response_tokens=16,
        )
    )
    expected = {
        name: [json.loads(line)["prompt"] for line in (ULTRAFEEDBACK_SAMPLE / "data" / f"{name}.jsonl").open()]
        for name in ("train_prefs", "test_prefs")
    }
    test_prompts = [row["prompt"][0]["content"] for row in result.dataset["test"]]
    dropped = sum(result.ledger.drops().values())
    assert set(test_prompts) <= set(expected["test_prefs"]) and test_prompts
    assert not set(expected["test_prefs"]) & {r["prompt"][0]["content"] for r in result.dataset["train"]}
    assert len(result.dataset["train"]) + len(result.dataset["test"]) + dropped == 38
    assert {r["prompt_source"]["split"] for r in result.dataset["test"]} == {"test_prefs"}
    assert "source_split" not in result.dataset["test"].column_names


def test_a_missing_split_or_column_is_named_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no split 'validation'.*prompt_split"):
        build(small_config(prompt_dataset=str(ULTRAFEEDBACK_SAMPLE), prompt_split="validation"))
    with pytest.raises(ValueError, match="no column 'question'.*prompt_column"):
        build(
            small_config(
                prompt_dataset=str(ULTRAFEEDBACK_SAMPLE), prompt_split="train_prefs", prompt_column="question"
            )
        )


def test_a_changed_prompt_file_is_never_served_stale_batches(tmp_path):
    folder = tmp_path / "prompts"
    shutil.copytree(ULTRAFEEDBACK_SAMPLE, folder)
    config = dict(
        prompt_dataset=str(folder),
        prompt_split="train_prefs",
        num_responses=2,
        resume=True,
        cache_dir=str(tmp_path / "c"),
    )
    first = build(small_config(**config)).dataset
    path = folder / "data" / "train_prefs.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"prompt": "A new first prompt about tea.", "prompt_id": "x", "messages": []})
    path.write_text("\n".join(lines) + "\n")
    second = build(small_config(**config)).dataset
    texts = {r["instruction"] for split in second.values() for r in split}
    assert "A new first prompt about tea." in texts
    assert texts != {r["instruction"] for split in first.values() for r in split}


def test_the_ultrafeedback_recipe_is_valid_and_exact_without_loading_models():
    config = parse_config(["--config", str(RECIPE)])
    assert config.prompt_dataset == "HuggingFaceH4/ultrafeedback_binarized"
    assert (config.prompt_split, config.prompt_test_split, config.prompt_column) == (
        "train_prefs",
        "test_prefs",
        "prompt",
    )
    assert config.generator_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert config.reward_model == "RLHFlow/ArmoRM-Llama3-8B-v0.1" and not config.reward_trust_remote_code
    assert (config.num_responses, config.response_temperature, config.response_top_p) == (5, 0.8, 0.95)
    assert config.max_response_tokens == 4096 and config.min_reward_margin == 0.0


def test_the_ultrafeedback_recipe_runs_on_tiny_models_and_a_local_prompt_set(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", RECIPE.with_suffix(".py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    overrides = [
        *("--generator_model", "tiny:chat-llama-3", "--reward_model", "tiny:reward-armo"),
        *("--prompt_dataset", str(ULTRAFEEDBACK_SAMPLE), "--max_prompts", "12"),
        *("--max_response_tokens", "24", "--dtype", "float32", "--output_dir", str(tmp_path)),
    ]
    assert recipe.main(overrides) == 0
    loaded = load_dataset(str(tmp_path))
    assert 0 < len(loaded["train"]) <= 12 and 0 < len(loaded["test"]) <= 8
    row = loaded["train"][0]
    assert set(row) >= {"prompt_id", "prompt", "chosen", "rejected", "responses", "rewards"}
    assert row["gen_response_configs"]["top_p"] == 0.95
    card = (tmp_path / "README.md").read_text()
    assert "An on-policy preference dataset" in card and "ultrafeedback_prompts" in card
    assert yaml.safe_load((tmp_path / "build_config.yaml").read_text())["prompt_test_split"] == "test_prefs"


def test_the_on_policy_demo_runs_offline(tmp_path):
    assert cli_main(["--config", str(DEMO_ON_POLICY), "--output_dir", str(tmp_path), "--resume", "false"]) == 0
    loaded = load_dataset(str(tmp_path))
    assert len(loaded["test"]) > 0 and len(loaded["train"]) > len(loaded["test"])
