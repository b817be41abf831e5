"""The GPU path, checked on a GPU machine in one run (benchmarks/gpu_check.sh calls it; at most about 8 minutes).

On the small random-weight model of the Llama-3.1 architecture (`tiny:chat-llama-3.1@small`, the real chat template)
and the tiny ArmoRM (the builder's own scorer), it builds the same small dataset with `engine: vllm` and
`engine: transformers`, on one GPU and on all of them (`num_proc` = GPUs), and for each build checks every
instruction is there once (uuids unique, rows in = rows out + drops, stage by stage) and prints the response stage's
tokens/s and the peak GPU memory. Next to them: vLLM's own throughput on the same prompts (one `LLM.generate` of
them all), so the builder's overhead on vLLM shows.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpu_count() -> int:
    from builder.devices import visible_gpus

    return len(visible_gpus())


def build_once(engine: str, num_proc: int, instructions: int) -> dict:
    """One build in its own process (a fresh CUDA state each time); its summary and peak GPU memory."""
    code = f"""
import json, torch
from builder.build import build
from builder.config import BuildConfig
config = BuildConfig(generator_model="tiny:chat-llama-3.1@small", reward_model="tiny:reward-armo@small",
    engine={engine!r}, num_proc={num_proc}, num_instructions={instructions}, max_instruction_tokens=128,
    num_responses=5, max_response_tokens=512, generation_batch_size=256, resume=False, seed=3)
result = build(config)
rows = [r for split in result.dataset.values() for r in split]
peak = max((torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), default=0) / 2**30
print("RESULT " + json.dumps({{"ledger": json.loads(result.ledger.to_json()), "uuids": [r["uuid"] for r in rows],
    "peak_gib": peak}}))
"""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - start
    line = next((text for text in done.stdout.splitlines() if text.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return {"error": (done.stdout[-1500:] + done.stderr[-3000:]).strip(), "seconds": seconds}
    return {**json.loads(line[len("RESULT ") :]), "seconds": seconds}


def kv_estimate_gib() -> float:
    """`kv_cache_bytes` for these builds: 256 rows, prompts capped at max_prompt_tokens (1800), 512 new tokens."""
    from transformers import AutoConfig

    from builder.engines.transformers.generation import kv_cache_bytes
    from builder.testing.tiny import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path("tiny:chat-llama-3.1@small"))
    return kv_cache_bytes(config, 256, 1800, 512, 2) / 2**30


def check_rows(result: dict) -> str:
    stages = result["ledger"]["stages"]
    problems = [
        s["name"] for s in stages if "rows_out" in s and s["rows_in"] != s["rows_out"] + sum(s["drops"].values())
    ]
    uuids = result["uuids"]
    if len(set(uuids)) != len(uuids):
        problems.append("duplicate rows")
    return "every row once" if not problems else f"FAILED: {', '.join(problems)}"


def vllm_own_throughput(prompts: int) -> str:
    """vLLM alone on the generator: the same number of prompts x 5 samples of at most 512 tokens."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return "vLLM not installed"
    from builder.testing.tiny import resolve_model_path

    llm = LLM(model=resolve_model_path("tiny:chat-llama-3.1@small"), max_model_len=2048)
    params = SamplingParams(n=5, temperature=0.8, max_tokens=512, seed=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}] * prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return f"{tokens / seconds:.0f} tokens/s ({tokens} tokens in {seconds:.1f} s)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=int, default=256)
    args = parser.parse_args()
    gpus = gpu_count()
    print(f"GPUs visible: {gpus}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    try:
        import vllm

        engines = ["vllm", "transformers"]
        print(f"vLLM {vllm.__version__}")
    except ImportError:
        engines = ["transformers"]
        print("vLLM is not installed and could not be: only the transformers engine runs")
    print(f"KV cache estimate of the transformers engine, per worker: {kv_estimate_gib():.2f} GiB (bf16)")
    print(f"{'engine':<13} {'num_proc':>8} {'seconds':>8} {'resp tok/s':>11} {'peak GiB':>9}  rows")
    for engine in engines:
        for num_proc in sorted({1, max(gpus, 1)}):
            result = build_once(engine, num_proc, args.instructions)
            if "error" in result:
                print(f"{engine:<13} {num_proc:>8} {result['seconds']:>8.1f}  ERROR\n{result['error']}")
                continue
            responses = next(s for s in result["ledger"]["stages"] if s["name"] == "responses")
            rate = responses["tokens"] / max(responses["seconds"], 1e-9)
            print(
                f"{engine:<13} {num_proc:>8} {result['seconds']:>8.1f} {rate:>11.0f} {result['peak_gib']:>9.2f}  "
                f"{check_rows(result)}"
            )
    if "vllm" in engines:
        print(f"vLLM alone, same prompt count: {vllm_own_throughput(args.instructions)}")


if __name__ == "__main__":
    main()
