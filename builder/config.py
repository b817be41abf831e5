"""The build config: one dataclass, validated in `__post_init__`, loadable from YAML with command-line overrides.

`magpie-build --config recipe.yaml --num_instructions 64` follows TRL's `TrlParser` conventions: the YAML's keys are
exactly the field names, the YAML replaces the defaults, the command line replaces the YAML.
"""

import dataclasses
from dataclasses import dataclass, field
from datetime import date


DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("auto", "transformers", "vllm")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class BuildConfig:
    # Models
    generator_model: str | None = _help(
        "The aligned chat model that writes instructions and responses: a Hub id, "
        "a local folder, or `tiny:<name>` for the built-in tiny models.",
        default=None,
    )
    generator_revision: str | None = _help("Branch, tag or commit of the generator on the Hub.", default=None)
    generator_trust_remote_code: bool = _help("Run the generator's own code. Opt-in only.", default=False)
    reward_model: str | None = _help(
        "The reward model that scores every response: a sequence classifier with one "
        "label, or custom code whose output has `.score` (ArmoRM). Not used with `reward_judge`.",
        default=None,
    )
    reward_revision: str | None = _help("Branch, tag or commit of the reward model on the Hub.", default=None)
    reward_trust_remote_code: bool = _help(
        "Run the reward model's own code (ArmoRM needs it). Opt-in only.", default=False
    )
    dtype: str = _help(
        "Model dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.", default="auto"
    )
    device: str = _help(
        "auto (cuda:{rank %% n_gpus} when CUDA is there, else cpu), sharded (one model over all "
        "GPUs), or a torch device.",
        default="auto",
    )
    attn_implementation: str | None = _help(
        "sdpa, flash_attention_2, eager; the library default otherwise.", default=None
    )
    # Pre-query template
    pre_query_template: str | None = _help(
        "Override the derived pre-query template: an alias (llama3, qwen2, ...) or a raw string.", default=None
    )
    keep_default_system: bool = _help(
        "Keep a system block the chat template inserts by itself (Llama-3.1's "
        "'Cutting Knowledge Date', Qwen's default prompt). false strips it.",
        default=True,
    )
    system_prompt: str | None = _help(
        "A custom system prompt for instruction generation (task-specific Magpie).", default=None
    )
    instruction_stop: str | None = _help(
        "What ends the user's turn, overriding what the chat template shows: a control token (<|eot_id|>) "
        "or text ('### Response:'), cut from the instruction.",
        default=None,
    )
    chat_template_date: str = _help(
        "The date (YYYY-MM-DD) templates see as today, so builds are reproducible.", default="2024-07-26"
    )
    # Prompts from a dataset instead of the pre-query template (on-policy preference data)
    prompt_dataset: str | None = _help(
        "Answer the prompts of this dataset instead of sampling instructions: a Hub id "
        "(HuggingFaceH4/ultrafeedback_binarized), a local folder, or data files (.jsonl, .json, .parquet, .csv).",
        default=None,
    )
    prompt_dataset_config: str | None = _help(
        "The prompt dataset's config (subset) name, if it has several.", default=None
    )
    prompt_dataset_revision: str | None = _help(
        "Branch, tag or commit of the prompt dataset on the Hub.", default=None
    )
    prompt_split: str = _help("The split whose prompts are answered.", default="train")
    prompt_test_split: str | None = _help(
        "A split whose prompts make the `test` split (ultrafeedback_binarized: test_prefs) instead of a random share.",
        default=None,
    )
    prompt_column: str = _help(
        "The column of prompts: a string (one user message) or a list of {role, content} messages, system "
        "messages included, ending with the user's turn.",
        default="prompt",
    )
    max_prompts: int | None = _help("Use only the first N prompts of each split (a trial run).", default=None)
    # Instructions
    num_instructions: int = _help("How many instructions to sample (before filtering).", default=1000)
    instruction_temperature: float = _help("Sampling temperature of instructions (Magpie: 1.0).", default=1.0)
    instruction_top_p: float = _help("Top-p of instructions (Magpie: 1.0).", default=1.0)
    max_instruction_tokens: int = _help(
        "Token cap of an instruction; one that hits it is dropped as truncated.", default=512
    )
    max_prompt_tokens: int = _help(
        "Drop instructions whose chat prompt is longer (the DPO recipe's 1800).", default=1800
    )
    num_turns: int = _help(
        "User turns per conversation (Magpie-MT): turns 2..n are written by the generator as the user, after one "
        "sampled answer to each turn before; the N responses answer the last turn.",
        default=1,
    )
    # Responses
    num_responses: int = _help("Responses per instruction (Magpie DPO: 5).", default=5)
    response_temperature: float = _help("Sampling temperature of responses (Magpie DPO: 0.8).", default=0.8)
    response_top_p: float = _help("Top-p of responses.", default=1.0)
    max_response_tokens: int = _help("Token cap of a response; its finish reason is then 'length'.", default=2048)
    # Rewards and pairs
    reward_max_length: int | None = _help(
        "Truncate reward inputs to this many tokens; default: the reward model's maximum.", default=None
    )
    min_reward_margin: float = _help("Drop pairs whose chosen - rejected reward is below this.", default=0.0)
    implicit_prompt: bool = _help(
        "Write Magpie's published form: chosen/rejected are [user, assistant] and there is no prompt column.",
        default=False,
    )
    reward_judge: bool = _help(
        "Score responses with the judge model instead of a reward model: its 1-10 rating by label scoring, the "
        "probability-weighted mean rating as the reward (for languages and domains no reward model serves).",
        default=False,
    )
    # Curation (Magpie's tags, near-duplicates and selection); every stage is off unless switched on
    judge_model: str | None = _help(
        "The chat model that tags instructions and, with `reward_judge`, rates responses; default: the generator.",
        default=None,
    )
    judge_revision: str | None = _help("Branch, tag or commit of the judge on the Hub.", default=None)
    judge_trust_remote_code: bool = _help("Run the judge's own code. Opt-in only.", default=False)
    tag_instructions: bool = _help(
        "Tag every instruction with task_category, difficulty and input_quality by the judge (label scoring).",
        default=False,
    )
    tag_explanations: bool = _help(
        "Also have the judge write Magpie's intent, knowledge and quality_explanation (short greedy texts; "
        "this generates, where the tags only score).",
        default=False,
    )
    max_explanation_tokens: int = _help("Token cap of each of those texts.", default=96)
    guard_model: str | None = _help(
        "A Llama-Guard-style safety classifier (meta-llama/Llama-Guard-3-8B): when set, every instruction gets "
        "`safety` = safe or unsafe:S<k>.",
        default=None,
    )
    guard_revision: str | None = _help("Branch, tag or commit of the guard model on the Hub.", default=None)
    guard_trust_remote_code: bool = _help("Run the guard model's own code. Opt-in only.", default=False)
    detect_language: bool = _help("Detect every instruction's language (ISO 639-1, lingua, offline).", default=False)
    near_dedup: bool = _help(
        "Embed every instruction and find its nearest neighbours: min_neighbor_distance, repeat_count, "
        "min_similar_uuid; later near-duplicates are dropped (see near_dedup_distance).",
        default=False,
    )
    embedding_model: str = _help(
        "The sentence-transformers model of near_dedup (Magpie: all-mpnet-base-v2).",
        default="sentence-transformers/all-mpnet-base-v2",
    )
    embedding_revision: str | None = _help("Branch, tag or commit of the embedding model on the Hub.", default=None)
    embedding_trust_remote_code: bool = _help("Run the embedding model's own code. Opt-in only.", default=False)
    near_dedup_distance: float = _help(
        "Squared L2 distance between unit embeddings under which two instructions are near-duplicates (Magpie: "
        "0.05, cosine above about 0.975); the later one is dropped. 0 drops nothing (repeat_count still uses 0.05).",
        default=0.05,
    )
    near_dedup_k: int = _help("Nearest neighbours searched per instruction.", default=100)
    near_dedup_index: str = _help(
        "flat (exact, fine for 100K on a CPU) or ivf (approximate, for millions of instructions).", default="flat"
    )
    near_dedup_nprobe: int = _help("Lists an ivf index searches per query (more: slower, more exact).", default=16)
    select_min_input_quality: str | None = _help(
        "Keep instructions of at least this input_quality (very poor, poor, average, good, excellent).", default=None
    )
    select_min_difficulty: str | None = _help(
        "Keep instructions of at least this difficulty (very easy, easy, medium, hard, very hard).", default=None
    )
    select_safe_only: bool = _help("Keep only instructions the guard model calls safe.", default=False)
    select_languages: list[str] = _help("Keep only instructions in these languages (ISO 639-1).", default_factory=list)
    select_min_neighbor_distance: float = _help(
        "Keep only instructions at least this far from their nearest neighbour (0: no rule).", default=0.0
    )
    select_max: int | None = _help(
        "Keep at most this many instructions after the rules, per task category as select_category_policy says.",
        default=None,
    )
    select_category_policy: str = _help(
        "How select_max is shared by task category: balanced (equal quotas), proportional (as the rows that "
        "passed the rules are), or shares (select_category_shares).",
        default="balanced",
    )
    select_category_shares: list[str] = _help(
        "With select_category_policy: shares, the share of each category as '<category>=<share>'.",
        default_factory=list,
    )
    select_order: list[str] = _help(
        "Which rows a category keeps first: columns compared in turn, best first (ordinal tags from their best "
        "label, numbers from the highest, text ascending).",
        default_factory=lambda: ["input_quality", "input_quality_confidence", "uuid"],
    )
    embedding_batch_size: int = _help("Instructions per embedding-model forward pass.", default=64)
    judge_batch_size: int = _help(
        "Prompts x labels per forward pass of label scoring (tags, safety, judge reward).", default=256
    )
    # Engine, batching, processes, resume
    engine: str = _help(
        "Sampling engine: auto (vLLM where CUDA GPUs are visible and vLLM is installed, else transformers; the "
        "log says which ran and why), transformers, or vllm (GPU only, `pip install magpie-builder[vllm]`).",
        default="auto",
    )
    tensor_parallel_size: int = _help("GPUs per vLLM engine (e.g. 4 or 8 for a 70B generator).", default=1)
    shard_size: int | None = _help(
        "Instructions per `Dataset.map` batch of the model stages: one generation queue, and the "
        "unit of resume (a crash redoes only unfinished shards). Default: 256 on transformers, 4096 on vLLM "
        "(whose scheduler would otherwise drain at every shard's end).",
        default=None,
    )
    generation_batch_size: int = _help(
        "Sequences sampled together by the transformers engine (continuous batching: a "
        "finished one's row goes to the next waiting one). KV memory grows with it.",
        default=64,
    )
    look_ahead: bool = _help(
        "Start each shard's samples in the rows the previous shard's tail frees (transformers "
        "engine), instead of letting the batch empty at every shard's end: fewer decode steps, which "
        "pays where a step costs about the same at any batch size (GPUs). The samples have the same "
        "distribution, but a row's "
        "last bits then depend on the shard before it, so a resumed build can differ from an "
        "uninterrupted one in a rare token.",
        default=False,
    )
    reward_batch_size: int = _help("Sequences per reward-model forward pass.", default=16)
    num_proc: int = _help("Worker processes for the model stages, one model each (one per GPU).", default=1)
    reward_device: str = _help(
        "Where the reward model runs: auto (one GPU per worker, data parallel), sharded, or a torch device.",
        default="auto",
    )
    reward_num_proc: int | None = _help(
        "Worker processes of the reward stage (default: num_proc): 8 scores on 8 GPUs after a vLLM generator "
        "with tensor_parallel_size 8 is released.",
        default=None,
    )
    resume: bool = _help(
        "Keep every finished batch of the model stages and reuse it when the same build runs "
        "again (after a crash, say).",
        default=True,
    )
    cache_dir: str | None = _help(
        "Where finished batches are kept; default $MAGPIE_BUILDER_CACHE/batches. Must be "
        "shared by all nodes of a multi-node run.",
        default=None,
    )
    # Output
    test_size: float = _help("Share of pairs in the test split (Magpie DPO: 0.02).", default=0.02)
    seed: int = _help("Seed of sampling and of the split; the same seed gives the same dataset.", default=42)
    output_dir: str | None = _help(
        "Folder to write: data/{split}-*.parquet, README.md, build config and summary.", default=None
    )
    overwrite_output_dir: bool = _help(
        "Replace the contents of an output_dir that holds files magpie-builder did not write (refused otherwise).",
        default=False,
    )
    save_to_disk: bool = _help("Also write `DatasetDict.save_to_disk` under output_dir/arrow.", default=False)
    dry_run: bool = _help(
        "Print the stages, the models and where each runs, the pre-query and stop ids, and the estimated tokens "
        "and KV memory, without loading any weights or writing anything.",
        default=False,
    )
    output_format: str = _help(
        "dpo: TRL's preference format (prompt, chosen, rejected); sft: TRL's conversational language-modeling "
        "format (`messages`, the chosen answer as the last turn), as Magpie's multi-turn and filtered sets are.",
        default="dpo",
    )
    # Card and Hub
    pretty_name: str | None = _help("Name shown on the dataset card.", default=None)
    license: str = _help(
        "Dataset license, a Hub license id (the generator's license usually binds it: llama3.1, apache-2.0); other "
        "with license_name and license_link for one the Hub does not list.",
        default="other",
    )
    license_name: str | None = _help(
        "With license: other, the license's short name (the Hub asks for it).", default=None
    )
    license_link: str | None = _help(
        "With license: other, a link to the license's text (the Hub asks for it).", default=None
    )
    language: list[str] = _help("Languages of the data.", default_factory=lambda: ["en"])
    source_datasets: list[str] = _help("Datasets the prompts came from, if any.", default_factory=list)
    push_to_hub: bool = _help("Push the dataset and its card to the Hub after building.", default=False)
    repo_id: str | None = _help("Hub repo id (user/name) to push to.", default=None)
    private: bool = _help("Create the Hub repo as private.", default=False)
    hub_revision: str | None = _help("Branch to push to (created if missing).", default=None)
    force_push: bool = _help("Push even if the repo holds a dataset with another schema.", default=False)

    def __post_init__(self):
        def fail(name: str, problem: str, fix: str):
            raise ValueError(f"`{name}` {problem}. {fix}")

        # YAML reads `1` as an int: the same setting must be the same value (and key) however it is spelled.
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.type in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, spec.name, float(value))

        for name in ("generator_model",) + (() if self.reward_judge else ("reward_model",)):
            if not getattr(self, name):
                fail(name, "is not set", "Give a Hub id, a local folder, or tiny:<name> (e.g. tiny:chat-llama-3.1).")
        if self.shard_size is not None and (not isinstance(self.shard_size, int) or self.shard_size < 1):
            fail("shard_size", f"is {self.shard_size!r}", "Use a positive integer, or leave it unset.")
        for name in (
            "num_instructions",
            "max_instruction_tokens",
            "max_prompt_tokens",
            "max_response_tokens",
            "generation_batch_size",
            "reward_batch_size",
            "num_proc",
            "tensor_parallel_size",
            "near_dedup_k",
            "near_dedup_nprobe",
            "embedding_batch_size",
            "judge_batch_size",
            "max_explanation_tokens",
            "num_turns",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, f"is {getattr(self, name)!r}", "Use a positive integer.")
        if not isinstance(self.num_responses, int) or isinstance(self.num_responses, bool):
            fail("num_responses", f"is {self.num_responses!r}", "Use a whole number of responses, 2 or more.")
        if self.num_responses < 2:
            fail("num_responses", f"is {self.num_responses}", "Chosen and rejected need at least 2 responses.")
        for name in ("instruction_temperature", "response_temperature"):
            if getattr(self, name) < 0:
                fail(name, f"is {getattr(self, name)}", "Use 0 (greedy) or a positive temperature.")
        for name in ("instruction_top_p", "response_top_p"):
            if not 0 < getattr(self, name) <= 1:
                fail(name, f"is {getattr(self, name)}", "Use a value in (0, 1].")
        if self.reward_max_length is not None and self.reward_max_length < 2:
            fail("reward_max_length", f"is {self.reward_max_length}", "Use at least 2, or leave it unset.")
        if self.min_reward_margin < 0:
            fail("min_reward_margin", f"is {self.min_reward_margin}", "Use 0 or a positive margin.")
        if not 0 < self.test_size < 1:
            fail("test_size", f"is {self.test_size}", "Use a share in (0, 1), e.g. 0.02.")
        if self.engine not in ENGINES:
            fail("engine", f"is {self.engine!r}", "Use auto, transformers or vllm.")
        if self.shard_size is None and self.engine != "auto":  # auto: set once the engine is known (build.py)
            self.shard_size = 4096 if self.engine == "vllm" else 256
        if self.reward_num_proc is not None and (
            not isinstance(self.reward_num_proc, int) or self.reward_num_proc < 1
        ):
            fail("reward_num_proc", f"is {self.reward_num_proc!r}", "Use a positive integer, or leave it unset.")
        if self.response_temperature == 0 and self.num_responses > 1:
            fail(
                "response_temperature",
                "is 0 with num_responses > 1",
                "Greedy decoding gives N copies of one answer, so no pair can be made (vLLM refuses it too): use a "
                "positive temperature (Magpie DPO: 0.8).",
            )
        for name in ("instruction_temperature", "response_temperature"):
            if getattr(self, name) > 2:
                fail(name, f"is {getattr(self, name)}", "Use at most 2 (vLLM refuses more; Magpie: 1.0 and 0.8).")
        if self.device == "sharded" and self.num_proc > 1:
            fail(
                "device",
                f"is sharded with num_proc {self.num_proc}",
                "sharded spreads one model over every GPU, so each worker would load a full copy: use num_proc 1, "
                "or device auto (one GPU per worker), or engine vllm with tensor_parallel_size.",
            )
        if self.dtype not in DTYPES:
            fail("dtype", f"is {self.dtype!r}", f"Use one of {', '.join(DTYPES)}.")
        if isinstance(self.chat_template_date, date):
            fail(
                "chat_template_date",
                f"is the YAML date {self.chat_template_date}",
                f'Quote it, so it stays text: chat_template_date: "{self.chat_template_date.isoformat()}"',
            )
        try:
            date.fromisoformat(self.chat_template_date)
        except (TypeError, ValueError):
            fail(
                "chat_template_date",
                f"is {self.chat_template_date!r}",
                'Use a date as "YYYY-MM-DD" (e.g. "2024-07-26").',
            )
        if self.system_prompt and self.pre_query_template:
            fail(
                "system_prompt",
                "is set together with pre_query_template",
                "Put the system prompt into the raw pre_query_template, or drop the override.",
            )
        self._check_curation(fail)
        if self.output_format not in ("dpo", "sft"):
            fail("output_format", f"is {self.output_format!r}", "Use dpo or sft.")
        if self.output_format == "sft" and self.implicit_prompt:
            fail("implicit_prompt", "is set with output_format: sft", "The SFT format has no prompt column; drop one.")
        if self.max_prompts is not None and (not isinstance(self.max_prompts, int) or self.max_prompts < 1):
            fail("max_prompts", f"is {self.max_prompts!r}", "Use a positive integer, or leave it unset.")
        if self.prompt_test_split and not self.prompt_dataset:
            fail(
                "prompt_test_split",
                "is set but prompt_dataset is not",
                "Set prompt_dataset, or drop prompt_test_split.",
            )
        if self.prompt_test_split and self.prompt_test_split == self.prompt_split:
            fail(
                "prompt_test_split", f"is the train split {self.prompt_split!r}", "Name another split of the dataset."
            )
        if (self.license_name or self.license_link) and self.license != "other":
            fail("license_name", f"is set with license {self.license!r}", "license_name/link go with license: other.")
        if self.license_link and not self.license_link.startswith(("https://", "http://", "LICENSE")):
            fail(
                "license_link", f"is {self.license_link!r}", "Give a URL to the license's text, or a file in the repo."
            )
        if self.push_to_hub and not self.repo_id:
            fail("repo_id", "is not set but push_to_hub is", "Give repo_id as user/name.")
        if isinstance(self.language, str):
            self.language = [self.language]

    def _check_curation(self, fail):
        from .stages.select import POLICIES, parse_shares
        from .stages.tags import ORDINAL

        if self.near_dedup_index not in ("flat", "ivf"):
            fail("near_dedup_index", f"is {self.near_dedup_index!r}", "Use flat or ivf.")
        if not 0 <= self.near_dedup_distance <= 4:
            fail("near_dedup_distance", f"is {self.near_dedup_distance}", "Use a squared L2 distance in [0, 4].")
        for name, tag in (("select_min_input_quality", "input_quality"), ("select_min_difficulty", "difficulty")):
            value = getattr(self, name)
            if value is not None and value not in ORDINAL[tag]:
                fail(name, f"is {value!r}", f"Use one of {', '.join(ORDINAL[tag])}.")
        if self.select_category_policy not in POLICIES:
            fail("select_category_policy", f"is {self.select_category_policy!r}", f"Use one of {', '.join(POLICIES)}.")
        shares = parse_shares(self.select_category_shares)
        if self.select_category_policy == "shares" and not any(share > 0 for _, share in shares):
            fail("select_category_shares", "gives no positive share", "Give '<category>=<share>' entries.")
        if any(share < 0 for _, share in shares):
            fail("select_category_shares", "has a negative share", "Use shares of 0 or more.")
        if self.tag_explanations and not self.tag_instructions:
            fail("tag_explanations", "is set but tag_instructions is not", "Switch on tag_instructions too.")
        if self.select_max is not None and (not isinstance(self.select_max, int) or self.select_max < 1):
            fail("select_max", f"is {self.select_max!r}", "Use a positive integer, or leave it unset.")
        if isinstance(self.select_languages, str):
            self.select_languages = [self.select_languages]
        needs = {
            "select_min_input_quality": ("tag_instructions", self.tag_instructions),
            "select_min_difficulty": ("tag_instructions", self.tag_instructions),
            "select_safe_only": ("guard_model", bool(self.guard_model)),
            "select_languages": ("detect_language", self.detect_language),
            "select_min_neighbor_distance": ("near_dedup", self.near_dedup),
            "select_max": ("tag_instructions", self.tag_instructions),
        }
        for name, (stage, on) in needs.items():
            if getattr(self, name) and not on:
                fail(name, f"is set but {stage} is not", f"Switch on {stage}, or drop {name}.")

    @property
    def selects(self) -> bool:
        """Whether any selection rule or cap is set (the select stage runs)."""
        return bool(
            self.select_min_input_quality
            or self.select_min_difficulty
            or self.select_safe_only
            or self.select_languages
            or self.select_min_neighbor_distance
            or self.select_max
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# A recipe's `env:` block would set these for the whole process (TrlParser copies it into the environment): a shared
# recipe could send the user's token and data to another server, or carry a token itself.
REFUSED_ENV = ("TOKEN", "ENDPOINT", "HF_", "HUGGING_FACE", "HUGGINGFACE")


def parse_config(args: list[str] | None = None) -> BuildConfig:
    """`--config recipe.yaml` plus command-line overrides, as TRL's scripts parse them."""
    import sys

    from trl import TrlParser

    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        index = args.index("--config")
        if index + 1 == len(args) or args[index + 1].startswith("--"):
            raise ValueError("`--config` needs the path of a recipe YAML, e.g. --config dataset_scripts/demo.yaml.")
        check_recipe(args[index + 1])
    parser = TrlParser(BuildConfig)

    def refuse(message: str):  # argparse would print the whole usage (every field) above the one line that matters
        raise ValueError(f"{message}. `magpie-build --help` lists the fields.")

    parser.error = refuse
    (config,) = parser.parse_args_and_config(args)
    return config


def check_recipe(path: str) -> None:
    """A recipe that exists, is YAML, and sets no credentials or Hub endpoint through `env:`."""
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"The recipe {path} does not exist: give the path of a YAML file to --config.")
    try:
        recipe = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"The recipe {path} is not valid YAML ({' '.join(str(error).split())}).") from error
    env = (recipe or {}).get("env") if isinstance(recipe, dict) else None
    refused = [key for key in (env or {}) if any(part in str(key).upper() for part in REFUSED_ENV)]
    if refused:
        raise ValueError(
            f"The recipe {path} sets {', '.join(refused)} in its `env:` block; credentials and Hub endpoints never "
            "come from a config file. Remove them, and set them in your shell (HF_TOKEN) or with `hf auth login`."
        )
