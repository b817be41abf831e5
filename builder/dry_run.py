"""`magpie-build --dry_run`: what a build would do, read off the config, the tokenizers and the model configs, with
no weights loaded and nothing written."""

from .build import check_models, resolve_engine, stages_for
from .config import BuildConfig
from .models import public_model_name


def _on_gpu(spec) -> bool:
    from .devices import visible_gpus

    return spec.device.startswith("cuda") or (spec.device in ("auto", "sharded") and bool(visible_gpus()))


def _where(spec, config: BuildConfig) -> str:
    if spec.engine == "vllm":
        return f"vLLM, tensor_parallel_size {spec.tensor_parallel_size}, {spec.workers} worker(s)"
    device = spec.device if spec.device not in ("auto",) else ("cuda:{rank}" if _on_gpu(spec) else "cpu")
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if _on_gpu(spec) else "float32")
    return f"transformers on {device}, {dtype}"


def kv_estimate(config: BuildConfig, models) -> str:
    if models.generator.engine == "vllm":
        return "vLLM pages its own KV cache within its gpu_memory_utilization"
    from transformers import AutoConfig

    from .engines.transformers.generation import kv_cache_bytes
    from .testing.tiny import resolve_model_path

    spec = models.generator
    model_config = AutoConfig.from_pretrained(
        resolve_model_path(spec.name_or_path), revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    dtype_bytes = 4 if spec.dtype == "float32" or (spec.dtype == "auto" and not _on_gpu(spec)) else 2
    size = kv_cache_bytes(
        model_config, config.generation_batch_size, config.max_prompt_tokens, config.max_response_tokens, dtype_bytes
    )
    return (
        f"{size / 2**30:.2f} GiB per worker (generation_batch_size {config.generation_batch_size} x "
        f"(max_prompt_tokens {config.max_prompt_tokens} + max_response_tokens {config.max_response_tokens}), "
        f"{dtype_bytes} bytes a value; on a GPU it is allocated, and checked, in full from the first shard)"
    )


def describe(config: BuildConfig) -> str:
    config = resolve_engine(config)
    models = check_models(config)
    lines = ["Stages, in order:"]
    for stage in stages_for(config, models):
        used = ", ".join(
            f"{role} {public_model_name(spec.name_or_path)} ({_where(spec, config)})"
            for role, spec in stage.models.items()
        )
        writes = ", ".join(column.name for column in stage.writes) or "-"
        drops = ", ".join(stage.drop_reasons) or "-"
        lines.append(
            f"  {stage.name:<13} {stage.kind:<6} writes {writes}; drops {drops}" + (f"; {used}" if used else "")
        )
    pre = models.pre_query
    if not config.prompt_dataset:
        lines += [
            f"Pre-query template ({pre.source}): {pre.text!r}",
            f"  ids {pre.token_ids}",
        ]
    lines += [
        f"An instruction ends at {pre.instruction_stop}",
        f"Instruction stop ids: {pre.instruction_stop_ids}; response stop ids: {pre.response_stop_ids}",
    ]
    if pre.instruction_stop_strings or pre.response_stop_strings:
        lines.append(
            f"Instruction stop strings: {pre.instruction_stop_strings}; response stop strings: "
            f"{pre.response_stop_strings}"
        )
    prompts = "the prompt dataset's prompts" if config.prompt_dataset else f"{config.num_instructions} instructions"
    most = config.num_responses * config.max_response_tokens
    lines += [
        f"Tokens at most: {prompts}"
        + ("" if config.prompt_dataset else f" x {config.max_instruction_tokens}")
        + f"; then {config.num_responses} responses x {config.max_response_tokens} = {most} per prompt",
        f"KV cache: {kv_estimate(config, models)}",
    ]
    return "\n".join(lines)
