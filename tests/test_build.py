import math
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from builder.build import build
from builder.cli import main as cli_main
from builder.config import BuildConfig, parse_config
from builder.publish.folder import write_folder

from conftest import ROOT, small_config


DEMO = str(ROOT / "dataset_scripts" / "demo_tiny.yaml")
SEED_RECIPE = ROOT / "dataset_scripts" / "magpie_llama31_pro_dpo_100k.yaml"


def rows(dataset_dict):
    return {name: split.to_list() for name, split in dataset_dict.items()}


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert (
        cli_main(["--config", DEMO, "--output_dir", str(folder), "--num_instructions", "32", "--resume", "false"]) == 0
    )
    return folder


def test_demo_end_to_end_through_the_cli(demo_folder):
    files = sorted(str(p.relative_to(demo_folder)) for p in demo_folder.rglob("*") if p.is_file())
    assert "data/train-00000-of-00001.parquet" in files and "data/test-00000-of-00001.parquet" in files
    assert "build_config.yaml" in files and "build_summary.json" in files
    written = yaml.safe_load((demo_folder / "build_config.yaml").read_text())
    assert written["num_instructions"] == 32  # the command-line override won over the YAML
    assert written["generator_model"] == "tiny:chat-llama-3.1"


def test_load_dataset_reads_the_folder_as_built(demo_folder):
    loaded = load_dataset(str(demo_folder))
    assert set(loaded) == {"train", "test"}
    assert len(loaded["test"]) >= 1 and len(loaded["train"]) > len(loaded["test"])
    config = BuildConfig(**yaml.safe_load((demo_folder / "build_config.yaml").read_text()))
    rebuilt = build(config).dataset  # same config and seed: the same rows, in the same order
    assert rows(loaded) == rows(rebuilt)


def test_output_is_trl_conversational_preference_data(demo_folder):
    from trl.data_utils import is_conversational

    train = load_dataset(str(demo_folder), split="train")
    row = train[0]
    assert is_conversational(row)
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"] == row["instruction"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    for row in train:
        assert len(row["responses"]) == 5 == len(row["rewards"]) == len(row["response_finish_reasons"])
        assert row["chosen"][0]["content"] == row["responses"][row["rewards"].index(max(row["rewards"]))]
        assert row["rejected"][0]["content"] == row["responses"][row["rewards"].index(min(row["rewards"]))]
        assert (
            row["reward_margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])
            and row["reward_margin"] > 0
        )
        assert row["gen_input_configs"]["input_generator"] == "tiny:chat-llama-3.1"
        assert row["gen_response_configs"]["temperature"] == 0.8
        assert row["reward_model"] == "tiny:reward-armo"
    assert len(set(train["uuid"])) == len(train)


def test_same_seed_same_dataset_other_seed_other_dataset():
    first = rows(build(small_config()).dataset)
    assert first == rows(build(small_config()).dataset)
    assert first != rows(build(small_config(seed=8)).dataset)


def test_implicit_prompt_option_writes_magpies_published_form(tmp_path):
    result = build(small_config(implicit_prompt=True))
    row = result.dataset["train"][0]
    assert "prompt" not in row
    assert [m["role"] for m in row["chosen"]] == ["user", "assistant"]
    assert row["chosen"][0]["content"] == row["instruction"]
    write_folder(result, tmp_path)
    assert load_dataset(str(tmp_path), split="train")[0]["chosen"] == row["chosen"]


def test_save_to_disk_on_request(tmp_path):
    from datasets import load_from_disk

    result = build(small_config(save_to_disk=True))
    write_folder(result, tmp_path)
    assert rows(load_from_disk(str(tmp_path / "arrow"))) == rows(result.dataset)


def test_stage_tables_are_files_and_only_the_final_splits_stay():
    # Started in memory, every stage's table would stay in RAM (growing with K); the build's tables are Arrow
    # files, and the earlier stages' ones are deleted once the splits are written.
    import os
    import socket
    import subprocess
    import sys

    from builder.paths import cache_root

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache_root() / "tables" / f"{socket.gethostname()}-pid{int(gone.stdout)}-rank0-crashed"
    (stale / "uuids").mkdir(parents=True, exist_ok=True)
    (stale / "uuids" / "cache-0.arrow").write_bytes(b"left by a killed build")
    live = cache_root() / "tables" / f"{socket.gethostname()}-pid{os.getpid()}-rank0-running"
    live.mkdir(parents=True, exist_ok=True)

    result = build(small_config())
    files = {Path(f["filename"]) for split in result.dataset.values() for f in split.cache_files}
    assert len(files) == 2  # train and test, each one file
    (folder,) = {path.parents[1] for path in files}
    assert folder.parent == cache_root() / "tables"
    assert {path for path in folder.rglob("*") if path.is_file()} == files
    assert not stale.exists() and live.exists()  # a dead process's folder goes, a running one's stays
    live.rmdir()


def test_summary_reports_every_stage():
    result = build(small_config())
    names = [r.name for r in result.ledger.stages]
    assert names == ["instructions", "filter", "dedup", "responses", "rewards", "binarize", "split"]
    summary = result.ledger.summary()
    for name in names:
        assert name in summary
    assert result.ledger.get("responses").tokens > 0 and result.ledger.get("responses").tokens_per_second > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"generator_model": None}, "`generator_model` is not set"),
        ({"num_instructions": 0}, "`num_instructions` is 0"),
        ({"num_responses": 1}, "`num_responses` is 1.*at least 2"),
        ({"instruction_top_p": 0.0}, "`instruction_top_p`"),
        ({"response_temperature": -1.0}, "`response_temperature`"),
        ({"test_size": 1.5}, "`test_size` is 1.5"),
        ({"dtype": "fp8"}, "`dtype` is 'fp8'"),
        ({"chat_template_date": "yesterday"}, "`chat_template_date`.*YYYY-MM-DD"),
        ({"push_to_hub": True}, "`repo_id` is not set"),
        ({"system_prompt": "x", "pre_query_template": "llama3"}, "`system_prompt` is set together"),
        ({"min_reward_margin": -1.0}, "`min_reward_margin`"),
        ({"shard_size": 0}, "`shard_size` is 0.*positive integer"),
        ({"generation_batch_size": -4}, "`generation_batch_size` is -4.*positive integer"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_yaml_with_command_line_overrides():
    config = parse_config(["--config", DEMO, "--num_instructions", "7", "--seed", "3"])
    assert (config.num_instructions, config.seed, config.num_responses) == (7, 3, 5)
    with pytest.raises(ValueError, match="no_such_field"):
        parse_config(["--config", DEMO, "--no_such_field", "1"])


def test_unknown_yaml_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(DEMO).read_text() + "num_instruction: 5\n")
    with pytest.raises(ValueError, match="num_instruction"):
        parse_config(["--config", str(recipe)])


def test_seed_recipe_config_is_valid_and_exact():
    config = parse_config(["--config", str(SEED_RECIPE)])
    assert config.generator_model == "meta-llama/Llama-3.1-70B-Instruct"
    assert config.reward_model == "RLHFlow/ArmoRM-Llama3-8B-v0.1" and not config.reward_trust_remote_code
    assert (config.engine, config.tensor_parallel_size, config.num_proc, config.reward_num_proc) == ("vllm", 8, 1, 8)
    assert config.device == "auto" and config.shard_size == 4096
    assert (config.num_instructions, config.num_responses, config.response_temperature) == (300_000, 5, 0.8)
    # Magpie's curation before the answers: tag, classify, detect, embed, then select 100K by category.
    assert config.tag_instructions and config.detect_language and config.near_dedup
    assert config.judge_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert config.guard_model == "meta-llama/Llama-Guard-3-8B"
    assert config.embedding_model == "sentence-transformers/all-mpnet-base-v2" and config.near_dedup_distance == 0.05
    assert (config.select_min_input_quality, config.select_safe_only, config.select_languages) == (
        "good",
        True,
        ["en"],
    )
    assert (config.select_max, config.select_category_policy) == (100_000, "balanced")
    assert (config.instruction_temperature, config.instruction_top_p) == (1.0, 1.0)
    assert config.test_size == 0.02 and config.max_prompt_tokens == 1800 and config.license == "llama3.1"


def test_seed_recipe_script_runs_on_tiny_models(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", SEED_RECIPE.with_suffix(".py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    overrides = [
        "--generator_model",
        "tiny:chat-llama-3.1",
        "--reward_model",
        "tiny:reward-armo",
        "--judge_model",
        "tiny:chat-llama-3",
        # A random-weight judge rates quality at random: the recipe's bar would drop every row here.
        "--select_min_input_quality",
        "very poor",
        "--guard_model",
        "tiny:guard",
        "--embedding_model",
        "tiny:embedder",
        "--select_max",
        "6",
        "--num_instructions",
        "16",
        "--max_instruction_tokens",
        "48",
        "--max_response_tokens",
        "24",
        "--engine",
        "transformers",
        "--reward_num_proc",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--test_size",
        "0.2",
        "--output_dir",
        str(tmp_path),
    ]
    assert recipe.main(overrides) == 0
    loaded = load_dataset(str(tmp_path))
    assert 0 < sum(len(s) for s in loaded.values()) <= 6
    for row in loaded["train"]:
        assert row["safety"] == "safe" and row["language"] == "en" and row["task_category"]
    # The recipe strips Llama-3.1's default system block, as Magpie did.
    assert (
        loaded["train"][0]["gen_input_configs"]["pre_query_template"]
        == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    )


def test_dpo_trainer_runs_two_steps_on_the_built_train_split(demo_folder, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train = load_dataset(str(demo_folder), split="train")
    path = tiny_model("chat-llama-3.1")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        beta=0.01,
        max_length=512,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert math.isfinite(result.training_loss)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("rewards/margins" in entry for entry in logged)


def test_cli_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--generator_model", "--num_responses", "--keep_default_system", "--push_to_hub"):
        assert flag in out


@pytest.mark.parametrize("field", ["generator_model", "reward_model"])
def test_a_model_that_cannot_be_found_is_a_clear_error(field, tmp_path):
    with pytest.raises(
        ValueError, match=f"The {field.split('_')[0]} model folder .*no-such-model does not exist. Set `{field}`"
    ):
        build(small_config(**{field: str(tmp_path / "no-such-model")}))
    with pytest.raises(
        ValueError, match=f"Cannot load the {field.split('_')[0]} model 'nobody/no-such-model'.*Set `{field}`"
    ):
        build(small_config(**{field: "nobody/no-such-model"}))
    with pytest.raises(ValueError, match="Unknown tiny model 'tiny:chat-llama-9'"):
        build(small_config(generator_model="tiny:chat-llama-9"))


def test_dry_run_says_what_would_run_without_loading_weights_or_writing(tmp_path, capsys, monkeypatch):
    from builder import models

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(models, "load_generator", no_weights)
    monkeypatch.setattr(models, "load_reward_model", no_weights)
    assert cli_main(["--config", DEMO, "--output_dir", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("instructions", "filter", "dedup", "responses", "rewards", "binarize", "split"):
        assert f"  {stage} " in out
    assert "generator tiny:chat-llama-3.1 (transformers on cpu, float32)" in out
    assert "Pre-query template (chat_template): '<|begin_of_text|>" in out and "Instruction stop ids: [" in out
    assert "KV cache: " in out and "GiB per worker" in out
    assert not (tmp_path / "out").exists()
