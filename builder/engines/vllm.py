"""The vLLM engine (`pip install magpie-builder[vllm]`, GPU only).

One `LLM` per process with `tensor_parallel_size` GPUs; `SamplingParams(n=N, temperature, top_p, max_tokens,
stop_token_ids, seed)` per prompt, the seed taken from the prompt's first sample seed, so a prompt's N samples do
not depend on its batch either. vLLM's sampler is not the transformers engine's: the same seed gives other (equally
distributed) text across engines.
"""

from ..models import ModelSpec
from ..testing.tiny import resolve_model_path
from .protocol import Completion, SamplingParams


_engines: dict = {}  # this process's engine, by its spec: one at a time


def load_vllm(spec: ModelSpec, rank: int | None = None):
    """One engine per process, on this worker's own block of `tensor_parallel_size` GPUs."""
    if spec in _engines:
        return _engines[spec]
    release_vllm()  # another model: its engine goes first
    from ..devices import claim_gpus

    if spec.device in ("auto", "sharded"):
        # Before vLLM (or anything) initialises CUDA in this process, so the block and spawn apply.
        claim_gpus(rank, spec.workers, spec.tensor_parallel_size)
    from vllm import LLM

    _engines[spec] = LLM(
        model=resolve_model_path(spec.name_or_path),
        revision=spec.revision,
        dtype="auto" if spec.dtype == "auto" else spec.dtype,
        tensor_parallel_size=spec.tensor_parallel_size,
        trust_remote_code=spec.trust_remote_code,
        max_model_len=spec.max_model_len,
    )
    return _engines[spec]


def release_vllm() -> bool:
    """Shuts this process's engine down and gives its GPU memory back (the reward model loads next). Returns
    whether there was one."""
    if not _engines:
        return False
    import gc

    (llm,) = _engines.values()
    _engines.clear()
    engine = getattr(llm, "llm_engine", None)
    for owner in (llm, engine, getattr(engine, "engine_core", None)):
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            break
    del llm, engine
    gc.collect()
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return True


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
            # The builder decodes the token ids itself; stop strings need vLLM's text, and it cuts the text alone
            # (the ids run to the token that completed the stop string, as the transformers engine's do).
            stop=list(params.stop_strings) or None,
            detokenize=bool(params.stop_strings),
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
            reason = sample_output.finish_reason
            if reason not in ("stop", "length"):  # "abort", "error": a sample vLLM did not finish
                raise RuntimeError(
                    f"vLLM ended a sample with finish reason {reason!r}, not stop or length: the engine failed or "
                    "was stopped. Rerun the same command to resume from the finished shards."
                )
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
