import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_dataset
from safetensors.torch import load_file

from builder.cli import main as build_main

from conftest import ROOT, free_port


TRAINING = ROOT / "training"
SEED_RECIPE = TRAINING / "recipes" / "llama-3.1-8b-magpie-dpo" / "config_full.yaml"
CPU_RECIPE = TRAINING / "recipes" / "tiny-cpu-validation" / "config.yaml"
RECIPES = sorted(TRAINING.glob("recipes/*/*.yaml"))
ACCELERATE_CONFIGS = sorted(TRAINING.glob("accelerate_configs/*.yaml"))
BIN = Path(sys.executable).parent

sys.path.insert(0, str(TRAINING))
import dpo  # noqa: E402
import validate  # noqa: E402


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built")
    build_main(
        [
            "--config",
            str(ROOT / "dataset_scripts" / "demo_tiny.yaml"),
            "--num_instructions",
            "40",
            "--test_size",
            "0.2",
            "--output_dir",
            str(folder),
        ]
    )
    return folder


def parse(recipe: Path, *overrides: str):
    raw = yaml.safe_load(recipe.read_text())
    # The full recipe is bf16 on GPUs; this machine has none, and DPOConfig refuses bf16 without one.
    extra = ["--bf16", "false", "--use_cpu", "true"] if raw.get("bf16") else []
    return dpo.make_parser().parse_args_and_config(["--config", str(recipe), *extra, *overrides])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses_with_the_launchers_parser(recipe):
    script_args, training_args, model_args = parse(recipe)
    assert script_args.dataset_test_split == "test"
    assert training_args.beta == 0.01


def test_seed_recipe_values_are_the_published_ones():
    raw = yaml.safe_load(SEED_RECIPE.read_text())
    assert raw["bf16"] is True
    _, args, model_args = parse(SEED_RECIPE)
    assert (args.beta, args.learning_rate, args.lr_scheduler_type.value) == (0.01, 1e-6, "cosine")
    assert args.warmup_steps == 0.1 and args.num_train_epochs == 1
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 16)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 256
    assert args.max_length == 2048 and args.activation_checkpointing and args.seed == 42
    assert args.optim.value == "adamw_torch" and args.eval_strategy.value == "steps"
    assert model_args.dtype == "bfloat16"
    assert "max_prompt_length" not in raw and "1800" in SEED_RECIPE.read_text()


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs(config):
    raw = yaml.safe_load(config.read_text())
    expected = {
        "ddp": ("MULTI_GPU", 8, "bf16"),
        "zero3": ("DEEPSPEED", 8, "bf16"),
        "cpu_ddp": ("MULTI_GPU", 2, "no"),
    }[config.stem]
    assert (raw["distributed_type"], raw["num_processes"], raw["mixed_precision"]) == expected
    if config.stem == "zero3":
        assert raw["deepspeed_config"]["zero_stage"] == 3


def trainable_changed(initial_folder: str, trained_folder: Path) -> dict[str, bool]:
    before = load_file(str(Path(initial_folder) / "model.safetensors"))
    after = load_file(str(trained_folder / "model.safetensors"))
    assert set(before) == set(after)
    return {name: not torch.equal(before[name], after[name]) for name in before}


def run(command: list[str], cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.mark.slow  # subprocesses
def test_accelerate_launch_two_processes_trains_every_parameter(dataset_folder, tmp_path, tiny_model):
    output = tmp_path / "run"
    run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(TRAINING / "accelerate_configs" / "cpu_ddp.yaml"),
            "--main_process_port",
            str(free_port()),
            str(TRAINING / "dpo.py"),
            "--config",
            str(CPU_RECIPE),
            "--dataset_name",
            str(dataset_folder),
            "--output_dir",
            str(output),
            "--max_steps",
            "4",
            "--eval_steps",
            "4",
        ]
    )
    changed = trainable_changed(tiny_model("chat-llama-3.1"), output)
    assert all(changed.values()), [name for name, moved in changed.items() if not moved]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) >= 2 and all("eval_rewards/margins" in entry for entry in evals)
    assert json.loads((output / "eval_results.json").read_text())["eval_samples"] == 8
    # Two ranks split the data: each one's epoch is half as many batches as one process would have.
    train_rows = json.loads((output / "train_results.json").read_text())["train_samples"]
    batches_per_rank = math.ceil(math.ceil(train_rows / 2) / 2)
    assert state["log_history"][-1]["epoch"] == pytest.approx(4 / batches_per_rank, abs=1e-3)


@pytest.mark.slow  # subprocesses
def test_trl_cli_runs_the_cpu_recipe(dataset_folder, tmp_path, tiny_model):
    output = tmp_path / "trl"
    run(
        [
            str(BIN / "trl"),
            "dpo",
            "--config",
            str(CPU_RECIPE),
            "--model_name_or_path",
            tiny_model("chat-llama-3.1"),
            "--dataset_name",
            str(dataset_folder),
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--eval_steps",
            "2",
        ]
    )
    assert (output / "model.safetensors").exists()
    assert any(trainable_changed(tiny_model("chat-llama-3.1"), output).values())


def test_validation_report_comes_from_the_run(dataset_folder, tmp_path):
    output = tmp_path / "validation"
    report = validate.main(["--dataset_name", str(dataset_folder), "--output_dir", str(output)])
    written = json.loads((output / "validation_report.json").read_text())
    assert {k: written[k] for k in ("before", "after", "steps")} == {
        k: report[k] for k in ("before", "after", "steps")
    }
    state_evals = [
        entry
        for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
        if "eval_loss" in entry
    ]
    assert written["before"]["eval_loss"] == state_evals[0]["eval_loss"]
    assert written["after"]["eval_loss"] == state_evals[-1]["eval_loss"]
    assert written["after"]["eval_rewards/margins"] == state_evals[-1]["eval_rewards/margins"]
    assert written["steps"] == 8 and written["learned"] == (state_evals[-1]["eval_loss"] < state_evals[0]["eval_loss"])
    markdown = (output / "validation_report.md").read_text()
    assert f"| eval_loss | {state_evals[0]['eval_loss']:.4f} | {state_evals[-1]['eval_loss']:.4f} |" in markdown
    # The demo's test split is a handful of pairs: the report gives the numbers and says that is too few to judge.
    test_rows = len(load_dataset(str(dataset_folder), split="test"))
    assert written["test_rows"] == test_rows < validate.MIN_TEST_ROWS
    assert f"on {test_rows} test pairs: too few test pairs to judge" in markdown and "went down" not in markdown
    readme = (dataset_folder / "README.md").read_text()
    assert "## Validation run" in readme and markdown.strip() in readme and str(dataset_folder) not in readme
    assert readme.index("## Validation run") < readme.index("## Build config")


def test_quantization_is_honoured_with_peft_and_refused_without(monkeypatch):
    parser = dpo.make_parser()
    common = ["--config", str(CPU_RECIPE), "--dataset_name", "x"]
    _, _, model_args = parser.parse_args_and_config([*common, "--load_in_4bit", "true"])
    with pytest.raises(ValueError, match="use_peft: true"):
        dpo.quantization_of(model_args)
    _, _, model_args = parser.parse_args_and_config([*common, "--load_in_4bit", "true", "--use_peft", "true"])
    passed = []
    monkeypatch.setattr("trl.get_quantization_config", lambda args: passed.append(args) or "4bit-config")
    assert dpo.quantization_of(model_args) == "4bit-config" and passed == [model_args]
    _, _, model_args = parser.parse_args_and_config(common)
    assert dpo.quantization_of(model_args) is None


def test_the_verdict_names_the_rows_and_judges_only_a_test_split_large_enough():
    report = {"before": {"eval_loss": 0.69}, "after": {"eval_loss": 0.55}, "learned": True, "test_rows": 400}
    assert validate.verdict(report) == "eval loss 0.6900 -> 0.5500 on 400 test pairs: it went down"
    assert "too few test pairs to judge" in validate.verdict(report | {"test_rows": 2})
    assert validate.verdict(report | {"learned": False}).endswith("it did not go down")
