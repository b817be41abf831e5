"""The engine protocol: the same call for the transformers engine (`transformers/generation.py`) and vLLM.

`sample_completions(spec, rank, prompts, seeds, params, num_samples)` is what the stages call. Prompts are token
ids in both engines, so the pre-query ids stay token-exact (vLLM would otherwise re-tokenize text and could add a
second BOS).
"""

from ..models import ModelSpec, load_generator, load_tokenizer
from .protocol import Completion, SamplingParams, StopText


ENGINES = ("transformers", "vllm")
__all__ = ["ENGINES", "Completion", "SamplingParams", "sample_completions", "score_continuations"]


def sample_completions(
    spec: ModelSpec,
    rank: int | None,
    prompts: list[list[int]],
    seeds: list[int],
    params: SamplingParams,
    num_samples: int = 1,
    same_prompt: bool = False,
    max_batch_size: int = 64,
    then: tuple[list[list[int]], list[int]] | None = None,
    prompt_cap: int | None = None,
):
    """(completions, tokenizer): `len(prompts) * num_samples` completions, grouped by prompt.

    `same_prompt` says every prompt is the same (the instruction stage): transformers then holds it once and
    prefills it once per call; vLLM finds the shared prefix in its own prefix cache. `max_batch_size` is the transformers engine's
    continuous batch (vLLM schedules its own). `then` is the next shard's `(prompts, seeds)`, which transformers starts
    in the rows this shard's tail frees (`generation.sample`); vLLM runs one shard per call and ignores it.
    """
    if spec.engine == "vllm":
        from .vllm import load_vllm, sample_vllm

        return sample_vllm(load_vllm(spec, rank), prompts, seeds, params, num_samples), load_tokenizer(spec)
    if spec.engine != "transformers":
        raise ValueError(f"Unknown engine {spec.engine!r}: use one of {', '.join(ENGINES)}.")
    from .transformers.generation import sample

    model, tokenizer = load_generator(spec, rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if same_prompt and num_samples == 1:
        prompts, num_samples = prompts[:1], len(prompts)
        then = (then[0][:1], then[1]) if then else None
    completions = sample(
        model,
        prompts,
        seeds,
        params,
        num_samples=num_samples,
        pad_token_id=pad_id,
        max_batch_size=max_batch_size,
        then=then,
        prompt_cap=prompt_cap,
        stop_text=StopText(tokenizer, params.stop_strings) if params.stop_strings else None,
    )
    return completions, tokenizer


def score_continuations(
    spec: ModelSpec, rank: int | None, prompts: list[list[int]], continuations: list[list[int]], max_rows: int = 256
) -> list[list[float]]:
    """Label scoring: for every prompt, the summed log-probability of each continuation (token ids both).

    transformers prefills each prompt once and runs the continuations on its repeated keys and values
    (`transformers/continuations.py`); vLLM reads them off its prompt log-probabilities.
    """
    if spec.engine == "vllm":
        from .vllm import continuation_logprobs_vllm, load_vllm

        return continuation_logprobs_vllm(load_vllm(spec, rank), prompts, continuations)
    if spec.engine != "transformers":
        raise ValueError(f"Unknown engine {spec.engine!r}: use one of {', '.join(ENGINES)}.")
    from .transformers.continuations import continuation_logprobs

    model, tokenizer = load_generator(spec, rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return continuation_logprobs(model, prompts, continuations, pad_id, max_rows=max_rows)


def release_models(done, later) -> None:
    """Frees the models of a finished stage that `later` does not name (model specs): vLLM's engine holds most of
    every GPU it runs on, and the next stage's model loads next."""
    import gc
    import sys

    later = set(later)
    freed = False
    vllm = sys.modules.get(f"{__name__}.vllm")
    if vllm is not None and any(spec.engine == "vllm" and spec not in later for spec in done):
        freed |= vllm.release_vllm()
    from .. import models

    for cache in (models.load_generator, models.load_reward_model):
        cached = getattr(cache, "cache_info", None)  # lru_cache'd loaders (a test may wrap them)
        if cached and cached().currsize and not later & {spec for spec in done if spec.engine != "vllm"}:
            cache.cache_clear()
            freed = True
    if freed:
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def release_carried_work() -> None:
    """Drops work an engine started for a next batch that never came (`look_ahead`), in this process."""
    import sys

    generation = sys.modules.get(f"{__name__}.transformers.generation")
    if generation is not None:
        generation.release_carried_batch()
