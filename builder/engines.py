"""Sampling engines: the same call for transformers (`generation.sample`) and vLLM.

`sample_completions(spec, rank, prompts, seeds, params, num_samples)` is what the stages call. Prompts are token
ids in both engines, so the pre-query ids stay token-exact (vLLM would otherwise re-tokenize text and could add a
second BOS).

vLLM (`pip install magpie-builder[vllm]`, GPU only): one `LLM` per process with `tensor_parallel_size` GPUs;
`SamplingParams(n=N, temperature, top_p, max_tokens, stop_token_ids, seed)` per prompt, the seed taken from the
prompt's first sample seed, so a prompt's N samples do not depend on its batch either. vLLM's sampler is not the
transformers engine's: the same seed gives other (equally distributed) text across engines.
"""

import functools

from .generation import Completion, SamplingParams, sample
from .models import ModelSpec, load_generator, load_tokenizer, resolve_device
from .tiny import resolve_model_path

ENGINES = ("transformers", "vllm")


@functools.lru_cache(maxsize=1)
def load_vllm(spec: ModelSpec, rank: int | None = None):
    import os

    from vllm import LLM

    if spec.device == "auto" and spec.tensor_parallel_size == 1:
        # One engine per worker process, each on its own GPU (the datasets multi-GPU recipe).
        device = resolve_device(spec, rank)
        if device.type == "cuda":
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(device.index))
    return LLM(
        model=resolve_model_path(spec.name_or_path), revision=spec.revision,
        dtype="auto" if spec.dtype == "auto" else spec.dtype, tensor_parallel_size=spec.tensor_parallel_size,
        trust_remote_code=spec.trust_remote_code,
    )


def sample_vllm(llm, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                num_samples: int = 1) -> list[Completion]:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
    sampling = [
        VllmSamplingParams(
            n=num_samples, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids), seed=seeds[i * num_samples] & 0x7FFFFFFF,
        )
        for i in range(len(prompts))
    ]
    stop_ids = set(params.stop_token_ids)
    completions = []
    for output in llm.generate(requests, sampling, use_tqdm=False):
        if len(output.outputs) != num_samples:
            raise RuntimeError(f"vLLM returned {len(output.outputs)} samples for a prompt, not {num_samples}")
        for sample_output in output.outputs:
            token_ids = list(sample_output.token_ids)
            if token_ids and token_ids[-1] in stop_ids:  # vLLM keeps the stop token that ended the sample
                token_ids = token_ids[:-1]
            reason = "length" if sample_output.finish_reason == "length" else "stop"
            completions.append(Completion(token_ids, reason))
    return completions


def sample_completions(spec: ModelSpec, rank: int | None, prompts: list[list[int]], seeds: list[int],
                       params: SamplingParams, num_samples: int = 1, same_prompt: bool = False,
                       max_batch_size: int = 64, then: tuple[list[list[int]], list[int]] | None = None):
    """(completions, tokenizer): `len(prompts) * num_samples` completions, grouped by prompt.

    `same_prompt` says every prompt is the same (the instruction stage): transformers then holds it once and
    prefills it once per call; vLLM finds the shared prefix in its own prefix cache. `max_batch_size` is the transformers engine's
    continuous batch (vLLM schedules its own). `then` is the next shard's `(prompts, seeds)`, which transformers starts
    in the rows this shard's tail frees (`generation.sample`); vLLM runs one shard per call and ignores it.
    """
    if spec.engine == "vllm":
        return sample_vllm(load_vllm(spec, rank), prompts, seeds, params, num_samples), load_tokenizer(spec)
    if spec.engine != "transformers":
        raise ValueError(f"Unknown engine {spec.engine!r}: use one of {', '.join(ENGINES)}.")
    model, tokenizer = load_generator(spec, rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if same_prompt and num_samples == 1:
        prompts, num_samples = prompts[:1], len(prompts)
        then = (then[0][:1], then[1]) if then else None
    completions = sample(model, prompts, seeds, params, num_samples=num_samples, pad_token_id=pad_id,
                         max_batch_size=max_batch_size, then=then)
    return completions, tokenizer
