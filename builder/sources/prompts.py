"""Prompts from an existing dataset: on-policy preference data, the policy's own answers to the user's prompts.

This is how princeton-nlp/llama3-ultrafeedback-armorm (the DPO data of Llama-3.1-8B-Magpie-Align) was made: the
prompts of HuggingFaceH4/ultrafeedback_binarized answered by the SFT model itself, then scored and binarized (SimPO's
`on_policy_data_gen/`). A prompt is either a string (one user message) or a list of `{role, content}` messages,
system messages included; every prompt keeps its exact text, and one that cannot be used is a counted drop.
"""

import hashlib
import json
import uuid as uuid_lib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from ..models import public_model_name
from ..pipeline.stage import DROP_REASON, KEEP, PROVENANCE, ROW, ROWS, Column, Stage


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
ROLES = ("system", "user", "assistant")


def prompt_id(prompt) -> str:
    """A stable hash of the prompt: sha256 of the text, as ultrafeedback_binarized's `prompt_id`, or of the messages'
    canonical JSON."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def prompt_uuid(identifier: str) -> str:
    """The row's uuid, from its prompt: a prompt's samples do not depend on where it sits in the dataset."""
    return str(uuid_lib.UUID(bytes=bytes.fromhex(identifier)[:16], version=4))


def as_messages(value) -> tuple[list[dict] | None, str]:
    """(messages, KEEP) for a usable prompt, else (None, reason): "empty_prompt" or "malformed_prompt".

    A usable message list has string contents, an optional system message first, then user and assistant turns
    alternating, and ends with a user turn (the one the responses answer).
    """
    if isinstance(value, str):
        return ([{"role": "user", "content": value}], KEEP) if value.strip() else (None, "empty_prompt")
    if not isinstance(value, list) or not value:
        return None, "empty_prompt" if value in (None, []) else "malformed_prompt"
    if not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        return None, "malformed_prompt"
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or [m["role"] for m in turns] != expected or turns[-1]["role"] != "user":
        return None, "malformed_prompt"
    if any(not m["content"].strip() for m in turns):
        return None, "empty_prompt"
    return messages, KEEP


def load_prompt_split(path: str, config_name: str | None, split: str, column: str, revision: str | None = None):
    """One split of the prompt dataset, its prompt column only: a Hub id, a local folder, or data files."""
    from datasets import load_dataset

    suffix = Path(path.split("*")[0]).suffix if "*" in path else Path(path).suffix
    # datasets can serve a local file's old cached table after the file changed in place: read local files anew.
    local = {"download_mode": "force_redownload"} if Path(path).exists() or "*" in path else {}
    try:
        if suffix in DATA_FILE_BUILDERS and (Path(path).is_file() or "*" in path):
            rows = load_dataset(DATA_FILE_BUILDERS[suffix], data_files={split: path}, split=split, **local)
        else:
            rows = load_dataset(path, config_name, split=split, revision=revision, **local)
    except ValueError as error:
        if "split" in str(error).lower():
            raise ValueError(
                f"The prompt dataset {path!r} has no split {split!r} ({error}). Set `prompt_split` (and "
                "`prompt_test_split`) to one of its splits."
            ) from error
        raise
    if column not in rows.column_names:
        raise ValueError(
            f"The prompt dataset {path!r} (split {split}) has no column {column!r}; its columns are "
            f"{rows.column_names}. Set `prompt_column` to the one holding the prompts."
        )
    return rows.select_columns([column]).rename_column(column, "raw_prompt")


def prompt_rows(settings: "PromptSourceSettings") -> Dataset:
    """The source's rows: every prompt of the train split (and of the test split, when one is given), in order."""
    parts = []
    for split, name in (("train", settings.split), ("test", settings.test_split)):
        if name is None:
            continue
        hub_revision = None if settings.revision.startswith("local:") else settings.revision
        rows = load_prompt_split(settings.dataset, settings.config_name, name, settings.column, hub_revision)
        if settings.max_prompts is not None:
            rows = rows.select(range(min(settings.max_prompts, len(rows))))
        parts.append(rows.add_column("source_split", [split] * len(rows)))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def dataset_revision(path: str, revision: str | None = None) -> str:
    """What identifies the prompts: a hash of the local files' contents, or the dataset's commit on the Hub."""
    local = sorted(Path().glob(path)) if "*" in path else [Path(path)] if Path(path).exists() else []
    if local:
        digest = hashlib.blake2b(digest_size=16)
        files = [f for p in local for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
        for file in files:
            if ".cache" in file.parts or ".git" in file.parts:
                continue
            digest.update(str(file.relative_to(file.anchor)).encode())
            digest.update(file.read_bytes())
        return f"local:{digest.hexdigest()}"
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(path, revision=revision).sha or revision or "unknown"
    except Exception as error:  # offline, gated, or not a Hub dataset: load_dataset will say which
        raise ValueError(
            f"Cannot read the prompt dataset {path!r} ({type(error).__name__}: {error}). Set `prompt_dataset` to a "
            "Hub dataset id, a local folder, or data files (.jsonl, .json, .parquet, .csv)."
        ) from error


@dataclass(frozen=True)
class PromptSourceSettings:
    dataset: str
    config_name: str | None
    split: str
    test_split: str | None
    column: str
    max_prompts: int | None
    revision: str  # the dataset's commit on the Hub, or a hash of the local files


def read_prompts(batch: dict, *, settings: PromptSourceSettings) -> dict:
    """Input column: `raw_prompt`. Output columns: `uuid`, `prompt` (the messages to answer), `instruction` (the
    last user message), `prompt_id`, `prompt_source`, `drop_reason` ("empty_prompt", "malformed_prompt")."""
    out = {"uuid": [], "prompt": [], "instruction": [], "prompt_id": [], "prompt_source": [], DROP_REASON: []}
    source = {
        "dataset": public_model_name(settings.dataset),
        "config": settings.config_name,
        "revision": settings.revision,
    }
    for raw, split in zip(batch["raw_prompt"], batch["source_split"]):
        messages, reason = as_messages(raw)
        identifier = prompt_id(raw) if messages else hashlib.sha256(repr(raw).encode()).hexdigest()
        out["uuid"].append(prompt_uuid(identifier))
        out["prompt"].append(messages or [])
        out["instruction"].append(messages[-1]["content"] if messages else "")
        out["prompt_id"].append(identifier)
        name = settings.split if split == "train" else settings.test_split
        out["prompt_source"].append({**source, "split": name})
        out[DROP_REASON].append(reason)
    return out


def prompts(config, revision: str) -> Stage:
    """The prompts of `prompt_dataset` (its `prompt_split`, and `prompt_test_split` for the test split)."""
    settings = PromptSourceSettings(
        config.prompt_dataset,
        config.prompt_dataset_config,
        config.prompt_split,
        config.prompt_test_split,
        config.prompt_column,
        config.max_prompts,
        revision,
    )
    return Stage(
        name="prompts",
        kind=ROWS,
        desc="Reading prompts",
        apply=read_prompts,
        start=partial(prompt_rows, settings),
        reads=("raw_prompt", "source_split"),
        writes=(
            Column("raw_prompt", "The prompt as the dataset holds it."),
            Column("source_split", "`train` or `test`: the split of the prompt dataset the prompt came from."),
            Column("uuid", "Stable id of the row (from its prompt).", ROW),
            Column("prompt_id", "sha256 of the prompt (of its text, as ultrafeedback_binarized's `prompt_id`).", ROW),
            Column("instruction", "The last user message of the prompt.", ROW),
            Column("prompt", "The conversation to answer: the dataset's prompt as messages.", ROW),
            Column("prompt_source", "The prompt dataset, its config, revision and split.", PROVENANCE),
        ),
        settings=settings,
        drop_reasons=("empty_prompt", "malformed_prompt"),
        if_none_left="check prompt_column: it must hold strings or lists of {role, content} messages",
    )
