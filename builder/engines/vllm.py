"""The vLLM engine (`pip install magpie-builder[vllm]`, GPU only).

One `LLM` per process with `tensor_parallel_size` GPUs; `SamplingParams(n=N, temperature, top_p, max_tokens,
stop_token_ids, seed)` per prompt, the seed taken from the prompt's first sample seed, so a prompt's N samples do
not depend on its batch either. vLLM's sampler is not the transformers engine's: the same seed gives other (equally
distributed) text across engines.
"""

import functools

from ..models import ModelSpec, resolve_device
from ..testing.tiny import resolve_model_path
from .protocol import Completion, SamplingParams


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
        model=resolve_model_path(spec.name_or_path),
        revision=spec.revision,
        dtype="auto" if spec.dtype == "auto" else spec.dtype,
        tensor_parallel_size=spec.tensor_parallel_size,
        trust_remote_code=spec.trust_remote_code,
    )


def sample_vllm(
    llm, prompts: list[list[int]], seeds: list[int], params: SamplingParams, num_samples: int = 1
) -> list[Completion]:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
    sampling = [
        VllmSamplingParams(
            n=num_samples,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            seed=seeds[i * num_samples] & 0x7FFFFFFF,
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


def continuation_logprobs_vllm(llm, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
    """Label scoring on vLLM: every prompt + continuation as one request of one token, whose prompt
    log-probabilities give each continuation token's log-probability after what precedes it."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm import TokensPrompt

    pairs = [(p, c) for p in prompts for c in continuations]
    requests = [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in pairs]
    # Each position's dict always holds the prompt token itself; 1 rather than 0, which early V1 read as "off".
    params = VllmSamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
    outputs = llm.generate(requests, params, use_tqdm=False)
    totals = []
    for output, (prompt, continuation) in zip(outputs, pairs):
        positions = output.prompt_logprobs[len(prompt) : len(prompt) + len(continuation)]
        if len(positions) != len(continuation) or any(
            p is None or t not in p for p, t in zip(positions, continuation)
        ):
            raise RuntimeError("vLLM returned no prompt log-probability for a label token.")
        totals.append(sum(p[t].logprob for p, t in zip(positions, continuation)))
    count = len(continuations)
    return [totals[i : i + count] for i in range(0, len(totals), count)]
