"""Loading the generator and the reward model: device, dtype, remote code; one load per process.

Stages receive a `ModelSpec` (small, picklable, part of the fingerprint) and call `load_generator` /
`load_reward_model`, which cache the loaded model per process. So `Dataset.map(num_proc=n, with_rank=True)` loads
one model per worker on `cuda:{rank % n}`, and the stages never close over a model (closures break fingerprints).
"""

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .testing.tiny import resolve_model_path


@dataclass(frozen=True)
class ModelSpec:
    """Args:
    name_or_path (`str`): a Hub id, a local folder, or `tiny:<name>` for the built-in tiny models.
    revision (`str`, *optional*): branch, tag or commit on the Hub.
    trust_remote_code (`bool`, defaults to `False`): run the model's own code (ArmoRM needs it). Opt-in only.
    dtype (`str`, defaults to `"auto"`): "auto" is bfloat16 on a GPU that supports it and float32 on CPU.
    device (`str`, defaults to `"auto"`): "auto" is `cuda:{rank % n_gpus}` when CUDA is there, else "cpu";
        "sharded" spreads one model over all visible GPUs (`device_map="auto"`), for models too big for one.
    attn_implementation (`str`, *optional*): "sdpa", "flash_attention_2", ...; the library's default otherwise.
    engine (`str`, defaults to `"transformers"`): "transformers" or "vllm" (generator only).
    tensor_parallel_size (`int`, defaults to 1): GPUs per vLLM engine (a 70B model needs several).
    workers (`int`, defaults to 1): the `num_proc` workers that each load it, so each takes its own GPUs.
    max_model_len (`int`, *optional*): vLLM's context limit: the prompt cap plus the response cap.
    """

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str | None = None
    engine: str = "transformers"
    tensor_parallel_size: int = 1
    workers: int = 1
    max_model_len: int | None = None


def resolve_device(spec: ModelSpec, rank: int | None):
    import torch

    if spec.device == "sharded":
        return None
    if spec.device != "auto":
        return torch.device(spec.device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{(rank or 0) % torch.cuda.device_count()}")
    return torch.device("cpu")


def resolve_dtype(spec: ModelSpec, device):
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if device is None or device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # bf16 and fp16 are far slower than fp32 on CPUs without native support for them.
    return torch.float32


def _config_json(path: str, revision: str | None) -> dict:
    """A model's config.json, read without executing anything (locally, or that one file from the Hub)."""
    if Path(path).is_dir():
        config_file = Path(path) / "config.json"
    else:
        # On the Hub: read config.json alone, without executing anything.
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(path, "config.json", revision=revision))
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: it is not a transformers model folder.")
    return json.loads(config_file.read_text())


def builtin_reward_class(spec: "ModelSpec"):
    """The builder's own implementation of a reward model that ships remote code (ArmoRM), or None."""
    from .engines.transformers.armorm import ARCHITECTURE, ArmoRMRewardModel

    config = _config_json(resolve_model_path(spec.name_or_path), spec.revision)
    return ArmoRMRewardModel if ARCHITECTURE in (config.get("architectures") or []) else None


def check_remote_code(spec: ModelSpec, auto_class: str, role: str) -> None:
    """Refuses a model whose config maps `auto_class` to its own code unless remote code was opted into.

    Without the opt-in transformers would load the stock class instead and silently initialise the missing head
    at random (ArmoRM's gating and regression layers): a reward model that scores noise.
    """
    if spec.trust_remote_code:
        return
    if auto_class == "AutoModelForSequenceClassification" and builtin_reward_class(spec):
        return  # the builder's own code loads it (ArmoRM); its remote code never runs
    auto_map = _config_json(resolve_model_path(spec.name_or_path), spec.revision).get("auto_map", {})
    if auto_class in auto_map:
        raise ValueError(
            f"The {role} {spec.name_or_path} implements {auto_class} in its own code ({auto_map[auto_class]}). "
            f"Review that code, then set `{role}_trust_remote_code: true` to run it."
        )


def public_model_name(name_or_path: str) -> str:
    """How a model is named in data and cards: a Hub id or `tiny:` name as is, a local folder by its own name
    only (a local path, with its home directory, must not be published)."""
    if name_or_path.startswith("tiny:"):
        return name_or_path
    if name_or_path.startswith("packaged:"):
        from .testing.packaged import packaged_model

        return packaged_model(name_or_path).hub_id
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or name_or_path.startswith((".", "~")) or path.is_dir():
        return path.name
    return name_or_path


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.name_or_path)
    return AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)


@dataclass(frozen=True)
class ModelInfo:
    """What the build needs to know of a model before any weights load: the tokenizer, EOS ids, revision."""

    tokenizer: object
    eos_ids: tuple[int, ...]
    revision: str


def model_info(spec: ModelSpec, role: str) -> ModelInfo:
    """Checks a model without loading its weights (the main process of a multi-GPU run holds none)."""
    from huggingface_hub.utils import HFValidationError
    from transformers import AutoConfig, GenerationConfig

    auto_class = {"reward": "AutoModelForSequenceClassification", "embedding": "AutoModel"}.get(
        role, "AutoModelForCausalLM"
    )
    name = spec.name_or_path
    looks_local = name.startswith(("/", ".", "~")) or (os.sep in name and name.count("/") != 1)
    if looks_local and not Path(name).expanduser().exists():
        raise ValueError(
            f"The {role} model folder {name} does not exist. Set `{role}_model` to a model folder or a Hub id."
        )
    try:
        check_remote_code(spec, auto_class, role)
        path = resolve_model_path(name)
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, HFValidationError) as error:  # a missing folder, a malformed or unknown Hub id, no network
        raise ValueError(
            f"Cannot load the {role} model {name!r} ({type(error).__name__}: {' '.join(str(error).split())}). Set "
            f"`{role}_model` to a Hub id, a local model folder, or tiny:<name> (e.g. tiny:chat-llama-3.1)."
        ) from error
    except ValueError as error:  # a config.json that is not JSON, a model type transformers does not know
        if "trust_remote_code" in str(error):
            raise ValueError(
                f"The {role} model {name} needs its own code to load. Review that code, then set "
                f"`{role}_trust_remote_code: true` to run it."
            ) from error
        raise ValueError(
            f"The {role} model {name!r} has a config.json that cannot be read ({' '.join(str(error).split())}). "
            f"Check that folder's config.json, or set `{role}_model` to another model."
        ) from error
    if role == "reward":
        check_reward_head(spec, config)
    eos = config.eos_token_id
    if auto_class == "AutoModelForCausalLM":
        try:
            generation_eos = GenerationConfig.from_pretrained(path, revision=spec.revision).eos_token_id
            eos = generation_eos if generation_eos is not None else eos
        except OSError:  # no generation_config.json: the model config's EOS is all there is
            pass
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    tokenizer = load_tokenizer(spec)
    if role in ("reward", "judge", "guard") and tokenizer.chat_template is None:
        raise ValueError(
            f"The {role} model {spec.name_or_path} has no chat template, so its inputs cannot be rendered the way "
            f"it was trained. Use a {role} model that ships one."
        )
    if role in ("reward", "judge", "guard"):
        check_template_renders(tokenizer, spec.name_or_path, role)
    revision = getattr(config, "_commit_hash", None) or spec.revision
    return ModelInfo(tokenizer, eos_ids, revision or local_revision(resolve_model_path(name)))


def check_template_renders(tokenizer, name: str, role: str) -> None:
    """The chat template renders a (user, assistant) chat in the sandbox, before anything is generated: a template
    that fails would otherwise stop the build at its first reward batch, hours in."""
    import jinja2

    from .templates import render_chat

    chat = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Snow falls."}]
    try:
        render_chat(tokenizer, chat[:1] if role == "guard" else chat, add_generation_prompt=False, day="2024-07-26")
    except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
        raise ValueError(
            f"The chat template of the {role} model {name} cannot render a chat ({type(error).__name__}: {error}). "
            f"Use a {role} model whose template works, or fix its chat_template."
        ) from error


def check_reward_head(spec: ModelSpec, config) -> None:
    """A reward model scores with one output: a sequence classifier with one label, ArmoRM, or custom code whose
    output has `.score`. A classifier of two labels would be read at its label 0, and a causal LM would get a newly
    initialised (random) score head: both are refused before anything is generated."""
    if builtin_reward_class(spec) or spec.trust_remote_code:
        return
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"The reward model {spec.name_or_path} is a {architectures[0]}, not a reward model: its score head would "
            "be created at random. Set `reward_model` to a sequence classifier with one label (a reward model), or "
            "use `reward_judge: true` to let a chat model rate the answers."
        )
    if getattr(config, "num_labels", 1) != 1:
        raise ValueError(
            f"The reward model {spec.name_or_path} has {config.num_labels} labels; a reward model has one score. "
            "Set `reward_model` to a reward model (one label), or use `reward_judge: true`."
        )


def local_revision(path: str) -> str:
    """What identifies a local model folder, so that one changed in place never reuses cached work: a hash of its
    small files (config, tokenizer, template) whole, and of each large (weight) file its size, its safetensors header
    (every tensor's name, shape and offsets) and 16 slices of 64 KiB spread over it: a fine-tune changes every
    slice, and reading 1 MiB a file keeps a 140 GB model's check to a second."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        return "local"
    digest = hashlib.blake2b(digest_size=12)
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(str(file.relative_to(folder)).encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as handle:
            if size <= 8 * 2**20:
                digest.update(handle.read())
                continue
            if file.suffix == ".safetensors":
                digest.update(handle.read(8 + int.from_bytes(handle.read(8), "little")))
            for start in range(0, size, max(1, size // 16)):
                handle.seek(start)
                digest.update(handle.read(2**16))
    return f"local:{digest.hexdigest()}"


def _load(spec: ModelSpec, rank: int | None, auto_class, role: str):
    import torch

    check_remote_code(spec, auto_class.__name__, role)
    path = resolve_model_path(spec.name_or_path)
    remote = spec.trust_remote_code
    builtin = builtin_reward_class(spec) if role == "reward" else None
    if builtin:
        auto_class, remote = builtin, False  # the builder's own ArmoRM: the checkpoint's code never runs
    device = resolve_device(spec, rank)
    if device is not None and device.type == "cpu":
        # One torch thread per process on CPU is faster and much steadier than several on few cores; raise it
        # with MAGPIE_CPU_THREADS, or run num_proc workers.
        torch.set_num_threads(int(os.environ.get("MAGPIE_CPU_THREADS", "1")))
    tokenizer = load_tokenizer(spec)  # the one `model_info` already loaded in this process
    try:
        model = load_weights(auto_class, path, spec, remote, device)
    except Exception as error:  # safetensors' own error type included
        if "out of memory" in str(error).lower():
            raise
        raise ValueError(
            f"Cannot load the weights of the {role} model {spec.name_or_path} ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}). A weight file may be incomplete or damaged: download it again."
        ) from error
    model.eval()
    if device is not None and device.type == "cpu":
        from .engines.transformers.cpu.gemm import route_linears

        route_linears(model)  # MKL's fp32 GEMM runs at half speed on AMD processors; see cpu_gemm.py
    return model, tokenizer


def load_weights(auto_class, path: str, spec: ModelSpec, remote: bool, device):
    return auto_class.from_pretrained(
        path,
        revision=spec.revision,
        trust_remote_code=remote,
        dtype=resolve_dtype(spec, device),
        attn_implementation=spec.attn_implementation,
        # Straight onto the device: not a full copy in host RAM first, once per worker.
        device_map="auto" if device is None else {"": device},
    )


@functools.lru_cache(maxsize=2)
def load_generator(spec: ModelSpec, rank: int | None = None):
    """(model, tokenizer) for a causal chat model, in eval mode on its device. Cached per process."""
    from transformers import AutoModelForCausalLM

    return _load(spec, rank, AutoModelForCausalLM, "generator")


@functools.lru_cache(maxsize=2)
def load_reward_model(spec: ModelSpec, rank: int | None = None):
    """(model, tokenizer) for a reward model: `AutoModelForSequenceClassification` with one label, or custom
    code whose output has `.score` (ArmoRM). Right padding, a pad token always set. Cached per process."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _load(spec, rank, AutoModelForSequenceClassification, "reward")
    if tokenizer.pad_token_id is None:
        # Llama-3 tokenizers ship without one. Sequences that end with EOS are then never padded
        # (`scoring.reward_batches`), so the classifier still reads their last token.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model, tokenizer
