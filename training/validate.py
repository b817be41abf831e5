"""Does DPO learn from a built dataset? A short CPU run that says so, with numbers from the run itself.

    python training/validate.py --dataset_name out/demo                      # take a built dataset
    python training/validate.py --build_config dataset_scripts/demo.yaml --dataset_name out/demo   # build it first

Trains the tiny-cpu-validation recipe (the real recipe's settings on a tiny policy, fp32, a few steps; any field
can be overridden, or pass another --config), evaluates on `test` before and after, and writes
`validation_report.json` and `validation_report.md` into `output_dir`. When the dataset is a local folder the
report is also attached to its dataset card (README.md).
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path


HERE = Path(__file__).resolve().parent
DEFAULT_RECIPE = HERE / "recipes" / "tiny-cpu-validation" / "config.yaml"
sys.path.insert(0, str(HERE))  # training/dpo.py, when run as a script

REPORT_METRICS = [
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
]


@dataclass
class ValidationArguments:
    build_config: str | None = field(
        default=None, metadata={"help": "Build the dataset first from this magpie-build config, into dataset_name."}
    )


MIN_TEST_ROWS = 50  # below this a difference in eval loss says more about the rows drawn than about the data


def report_from_history(log_history: list[dict], trainer_metrics: dict) -> dict:
    """Before/after eval metrics and the run's size, read off the trainer's own log."""
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if len(evals) < 2:
        raise ValueError(
            "The run logged fewer than two evaluations; the recipe needs eval_on_start: true and an eval strategy."
        )
    before, after = evals[0], evals[-1]
    train_logs = [entry for entry in log_history if "loss" in entry and "eval_loss" not in entry]
    return {
        "steps": trainer_metrics["global_step"],
        "train_runtime_seconds": trainer_metrics["train_runtime"],
        "train_loss_first": train_logs[0]["loss"] if train_logs else None,
        "train_loss_last": train_logs[-1]["loss"] if train_logs else None,
        "before": {key: before[key] for key in REPORT_METRICS if key in before},
        "after": {key: after[key] for key in REPORT_METRICS if key in after},
        "learned": after["eval_loss"] < before["eval_loss"],
    }


def verdict(report: dict) -> str:
    """What the numbers say, with the row counts they stand on."""
    before, after = report["before"]["eval_loss"], report["after"]["eval_loss"]
    rows = report.get("test_rows")
    moved = f"eval loss {before:.4f} -> {after:.4f} on {rows} test pairs"
    if rows is not None and rows < MIN_TEST_ROWS:
        return f"{moved}: too few test pairs to judge whether DPO learns from this data (at least {MIN_TEST_ROWS})"
    return f"{moved}: {'it went down' if report['learned'] else 'it did not go down'}"


def report_markdown(report: dict, dataset_name: str, model: str) -> str:
    trained = f" on {report['train_rows']} training pairs" if report.get("train_rows") is not None else ""
    lines = [
        f"DPO validation of `{dataset_name}` on `{model}`: {report['steps']} steps{trained} in "
        f"{report['train_runtime_seconds']:.1f} s; {verdict(report)}.",
        "",
        "| metric | before | after |",
        "|---|---:|---:|",
    ]
    for key in REPORT_METRICS:
        if key in report["before"]:
            lines.append(f"| {key} | {report['before'][key]:.4f} | {report['after'][key]:.4f} |")
    if report["train_loss_first"] is not None:
        lines.append(
            f"| train loss (first, last step) | {report['train_loss_first']:.4f} | {report['train_loss_last']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    script_args, training_args, model_args, validation_args = TrlParser(
        (ScriptArguments, DPOConfig, ModelConfig, ValidationArguments)
    ).parse_args_and_config(argv)

    if validation_args.build_config:
        from builder.cli import main as build_main

        build_main(["--config", validation_args.build_config, "--output_dir", script_args.dataset_name])

    import dpo

    dpo_argv = [a for i, a in enumerate(argv) if a != "--build_config" and (i == 0 or argv[i - 1] != "--build_config")]
    trainer = dpo.main(dpo_argv)
    if not trainer.accelerator.is_main_process:
        return {}
    state = trainer.state
    metrics = {
        "global_step": state.global_step,
        "train_runtime": next(e["train_runtime"] for e in state.log_history if "train_runtime" in e),
    }
    report = report_from_history(state.log_history, metrics)
    report |= {
        "train_rows": len(trainer.train_dataset),
        "test_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else None,
        "dataset": script_args.dataset_name,
        "model": model_args.model_name_or_path,
        "learning_rate": training_args.learning_rate,
        "beta": training_args.beta,
    }
    output = Path(training_args.output_dir)
    (output / "validation_report.json").write_text(json.dumps(report, indent=2))
    from builder.models import public_model_name

    # A local folder is shown by its name alone: the report goes into a card, which holds no local paths.
    markdown = report_markdown(report, public_model_name(script_args.dataset_name), model_args.model_name_or_path)
    (output / "validation_report.md").write_text(markdown)

    folder = Path(script_args.dataset_name)
    if (folder / "README.md").exists():
        from builder.publish.card import attach_validation_report

        shutil.copy(output / "validation_report.json", folder / "validation_report.json")
        attach_validation_report(folder / "README.md", markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
    import dpo

    dpo.close_process_group()
