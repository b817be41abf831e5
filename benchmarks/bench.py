"""Speed of the build against a naive baseline, compute utilisation, and scaling with the number of instructions.

    python benchmarks/bench.py                       # both sizes, K = 16 and 64, scaling table (~8 min)
    python benchmarks/bench.py --instructions 16 64 256   # adds the steady-state comparison (~17 min)
    python benchmarks/bench.py --sizes tiny --scaling 64 256 1024 4096
    python benchmarks/bench.py --sizes small --instructions 64 256 --procs 2 --scaling   # the whole 2-core machine
    python benchmarks/bench.py --sizes small --instructions --scaling 512 1024 --look-ahead   # shards into each other

For each model size (tiny, and small: hidden 512, 8 layers, 8/2 query/key-value heads, vocab 8k, 30.5M
parameters), in one process and on identical work (the same instructions, N responses each, the same token caps):
- ours: `build(config)`, timed per stage by its own ledger;
- naive: the way the public research scripts do it, stock transformers models (torch's default kernels), one
  `generate` per instruction, one per response, one reward call per response.
It prints tokens/s, seconds per instruction, peak RSS, the length distributions, the our/naive ratio per stage and
overall, and compute utilisation: model FLOPs per generated token x tokens / time, divided by the fp32 matmul
throughput measured in the same run: the best of torch.mm (MKL) and oneDNN, each the best of a measurement before
and one after the build. `MAGPIE_CPU_GEMM=torch` runs ours on torch's default kernels too, which shows what the
kernel choice is worth; `MAGPIE_CPU_ATTENTION=torch` keeps decode attention in torch rather than the C kernel
(`builder/cpu_attention.py`; the header line says which ran). With `--procs N` the build runs N worker processes of
one thread each (`num_proc`), the naive baseline N torch threads, and the matmul throughput is measured with N
threads (peak RSS is then the parent's only). Scaling runs each K in its own process (so peak RSS is that run's
own), and prints its response stage's utilisation too (the steady state at large K), the peak of anonymous memory
beside peak RSS (which also counts the pages of memory-mapped Arrow files and libraries), and the generation stages'
decode steps with the share of them run with the batch under half full (each shard's tail: what `--look-ahead`
removes, and what a GPU, where a step costs about the same at any batch size, would pay for in full).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (`VmHWM`, `RssAnon`, ...), in MB; None off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over `exec`, so a
    scaling child would report its parent's peak."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (RssAnon: tensors, Python objects, what the allocators
    keep), sampled every 50 ms in a thread. Peak RSS also counts file-backed pages: the memory-mapped Arrow files
    of the dataset and the shared libraries, which the kernel can drop at will."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_mb("RssAnon") or 0.0)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def matmul_gflops(size: int = 1024, repeats: int = 10, threads: int = 1) -> dict[str, float]:
    """Best fp32 matmul throughput with `threads` threads (the build's processes x their one thread each), per
    kernel: torch's default (`torch.mm`, MKL in the x86 wheels) and oneDNN's, which the build's CPU linears run on
    (`builder/cpu_gemm.py`). Utilisation is measured against the better of the two, what this machine's fp32
    matmuls reach from torch: against MKL's alone (half of oneDNN's on AMD processors) it would flatter."""
    import torch

    from builder.engines.transformers.cpu.gemm import _linear, onednn_available

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn_available():
        kernels["oneDNN"] = lambda: _linear(a, b, None)  # a @ b.T: the same FLOPs
    best = {}
    for name, kernel in kernels.items():
        kernel()
        best[name] = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            best[name] = max(best[name], 2 * size**3 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(previous)
    return best


def attention_backend() -> str:
    """Which decode attention ours runs on CPU: the C kernel, or torch's matmuls (and why)."""
    from builder.engines.transformers.cpu import attention as cpu_attention

    if cpu_attention.requested_backend() == "torch":
        return "attention in torch (MAGPIE_CPU_ATTENTION=torch)"
    return "attention C kernel" if cpu_attention.library() is not None else "attention in torch (no kernel built)"


def best_of(*measurements: dict[str, float]) -> dict[str, float]:
    """Per kernel, the best of several measurements (this VM's speed drifts by up to a third within minutes, and a
    slow reading would flatter the utilisation)."""
    return {name: max(m[name] for m in measurements) for name in measurements[0]}


def flops_per_token(model) -> float:
    """2 x the parameters a token goes through (every weight matrix; the embedding lookup is no matmul)."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 2.0 * params


def decode_step_seconds(model, batch: int, context: int, shared: int = 0, repeats: int = 5) -> float:
    """Best time of one decode step (forward and sampling) of `batch` rows over `context` cached positions, the
    first `shared` of them a prefix all rows share, read once as in the response stage (cascade attention): the
    stage's ceiling, every token decoded at full batch with no prefill and no tail."""
    import torch

    from builder.engines.transformers.generation import (
        SamplingParams,
        SharedPrefix,
        _decode_prefix,
        cache_argument,
        cascade_decoding,
        new_cache,
        sample_next_tokens,
    )

    kv_heads = model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    prefix = (
        SharedPrefix(
            shared,
            [
                (torch.randn(1, kv_heads, shared, head_dim), torch.randn(1, kv_heads, shared, head_dim))
                for _ in range(layers)
            ],
        )
        if shared
        else None
    )
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 1))
    positions = torch.full((batch, 1), context)
    seeds = torch.arange(batch)
    params = SamplingParams(0.8, 1.0, 1, ())
    best = float("inf")
    with cascade_decoding(model, prefix) as cascade:
        own = context - shared if cascade else context  # without cascade every row holds the prefix itself
        mask = torch.ones(batch, own + 1, dtype=torch.long)
        for _ in range(repeats + 1):
            cache = new_cache(model, own + 1)
            for layer in cache.layers:
                layer.hold(
                    torch.randn(batch, kv_heads, own + 1, head_dim),
                    torch.randn(batch, kv_heads, own + 1, head_dim),
                    own,
                )
            start = time.perf_counter()
            token = _decode_prefix.set(prefix if cascade else None)
            with torch.inference_mode():
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **cache_argument(model, cache),
                )
                sample_next_tokens(out.logits[:, -1], seeds, 0, params)
            _decode_prefix.reset(token)
            best = min(best, time.perf_counter() - start)
    return best


def shared_prompt_prefix(config, instructions: list[str]) -> int:
    """The number of tokens the response prompts of `instructions` share (the template's system block and header)."""
    from builder.build import model_specs
    from builder.engines.transformers.generation import common_prefix_length
    from builder.models import load_generator
    from builder.templates import encode_chat_text, render_chat

    _, tokenizer = load_generator(model_specs(config)[0])
    prompts = [
        encode_chat_text(
            tokenizer,
            render_chat(
                tokenizer,
                [{"role": "user", "content": instruction}],
                add_generation_prompt=True,
                day=config.chat_template_date,
            ),
        )
        for instruction in instructions
    ]
    return common_prefix_length(prompts) if len(prompts) > 1 else 0


LOOK_AHEAD = False  # --look-ahead: the build's `look_ahead` (shards start in the previous shard's tail)


def config_for(size: str, num_instructions: int, **overrides):
    from builder.config import BuildConfig

    suffix = "" if size == "tiny" else f"@{size}"
    values = dict(
        generator_model=f"tiny:chat-llama-3.1{suffix}",
        reward_model=f"tiny:reward{suffix}",
        num_instructions=num_instructions,
        max_instruction_tokens=64,
        max_response_tokens=128,
        num_responses=5,
        generation_batch_size=256,
        reward_batch_size=8,
        test_size=0.1,
        seed=1,
        resume=False,
        look_ahead=LOOK_AHEAD,
    )
    values.update(overrides)
    return BuildConfig(**values)


def percentiles(values) -> str:
    import numpy as np

    q = np.percentile(values, [0, 10, 50, 90, 100])
    return " / ".join(f"{v:.0f}" for v in q)


# ------------------------------------------------------------------------------------------------ naive baseline


def naive_baseline(config, instructions_kept: list[str], threads: int = 1) -> dict:
    """One generate per instruction and per response, one reward call per response (research-script style)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    from builder.build import model_specs, pre_query_of
    from builder.models import load_tokenizer
    from builder.templates import encode_chat_text, render_chat
    from builder.testing.tiny import resolve_model_path

    generator, reward = model_specs(config)
    # Stock transformers models, loaded the way a research script does: torch's default kernels (MKL), not the
    # oneDNN linears the builder's loader switches to on CPU.
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(generator.name_or_path), dtype=torch.float32
    ).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(reward.name_or_path), dtype=torch.float32
    ).eval()
    tokenizer, reward_tokenizer = load_tokenizer(generator), load_tokenizer(reward)
    # A research script takes torch's default: every core of the machine as threads.
    torch.set_num_threads(threads)
    pre_query = pre_query_of(config, generator)
    times, tokens = {}, {}

    def generate(ids, temperature, cap, stop_ids):
        gen_config = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=cap,
            eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=gen_config
        )
        return out[0, len(ids) :].tolist()

    torch.manual_seed(config.seed)
    start = time.perf_counter()
    generated = [
        generate(
            pre_query.token_ids,
            config.instruction_temperature,
            config.max_instruction_tokens,
            pre_query.instruction_stop_ids,
        )
        for _ in range(config.num_instructions)
    ]
    times["instructions"], tokens["instructions"] = time.perf_counter() - start, sum(map(len, generated))

    start = time.perf_counter()
    responses = []
    for instruction in instructions_kept:
        text = render_chat(
            tokenizer,
            [{"role": "user", "content": instruction}],
            add_generation_prompt=True,
            day=config.chat_template_date,
        )
        ids = encode_chat_text(tokenizer, text)
        for _ in range(config.num_responses):
            out = generate(ids, config.response_temperature, config.max_response_tokens, pre_query.response_stop_ids)
            responses.append((instruction, tokenizer.decode(out, skip_special_tokens=True)))
            tokens["responses"] = tokens.get("responses", 0) + len(out)
    times["responses"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode():
        for instruction, response in responses:
            chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
            ids = encode_chat_text(
                reward_tokenizer,
                render_chat(reward_tokenizer, chat, add_generation_prompt=False, day=config.chat_template_date),
            )
            reward_model(input_ids=torch.tensor([ids]))
    times["rewards"] = time.perf_counter() - start
    torch.set_num_threads(1)
    return {"seconds": times, "tokens": tokens}


# ------------------------------------------------------------------------------------------------ one comparison


def compare(size: str, num_instructions: int, procs: int = 1) -> dict:
    from builder.build import build, model_specs
    from builder.models import load_generator

    config = config_for(size, num_instructions, num_proc=procs)
    load_generator(model_specs(config)[0])  # load (and build) the models before any timing
    # The machine's matmul throughput, before and after the build; the best of the two is the denominator.
    gflops_before = matmul_gflops(threads=procs)
    peak_before = peak_rss_mb()
    start = time.perf_counter()
    result = build(config)
    ours_total = time.perf_counter() - start
    ledger = result.ledger
    ours = {r.name: r.seconds for r in ledger.stages}
    rows = [row for split in result.dataset.values() for row in split]
    kept = sorted({row["instruction"] for row in rows})
    # The naive run answers exactly the instructions that reached the response stage.
    naive = naive_baseline(config, _instructions_after_filter(result, kept), threads=procs)
    naive_total = sum(naive["seconds"].values())
    model, _ = load_generator(model_specs(config)[0])
    kernels = best_of(gflops_before, matmul_gflops(threads=procs))
    gflops = max(kernels.values())
    per_token = flops_per_token(model)
    response_record = ledger.get("responses")
    utilisation = response_record.tokens * per_token / response_record.seconds / (gflops * 1e9)
    # The prompts prefilled in the response stage, once per instruction (kept rows' mean x rows generated for).
    prompt_tokens = [row["prompt_tokens"] for row in rows]
    prefilled = sum(prompt_tokens) / max(1, len(prompt_tokens)) * response_record.rows_in
    utilisation_all = (response_record.tokens + prefilled) * per_token / response_record.seconds / (gflops * 1e9)
    # The typical cached length of a decode step: a prompt and half a response.
    context = round(
        sum(prompt_tokens) / max(1, len(prompt_tokens))
        + sum(t for row in rows for t in row["response_tokens"])
        / max(1, 2 * sum(len(row["response_tokens"]) for row in rows))
    )
    shared = shared_prompt_prefix(config, kept)
    step = decode_step_seconds(model, config.generation_batch_size, context, shared)
    # A step runs on one thread.
    one_thread = gflops if procs == 1 else max(best_of(matmul_gflops(), matmul_gflops()).values())
    return {
        "size": size,
        "instructions": num_instructions,
        "procs": procs,
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "ours_seconds": ours,
        "ours_total": ours_total,
        "naive_seconds": naive["seconds"],
        "naive_total": naive_total,
        "ours_tokens": {r.name: r.tokens for r in ledger.stages if r.tokens},
        "naive_tokens": naive["tokens"],
        "matmul_gflops": gflops,
        "matmul_kernels": kernels,
        "flops_per_token": per_token,
        "response_utilisation": utilisation,
        "response_utilisation_with_prompts": utilisation_all,
        "decode_step": {
            "batch": config.generation_batch_size,
            "context": context,
            "shared": shared,
            "seconds": step,
            "utilisation": config.generation_batch_size * per_token / step / (one_thread * 1e9),
        },
        "instruction_lengths": percentiles([row["instruction_tokens"] for row in rows]),
        "response_lengths": percentiles([t for row in rows for t in row["response_tokens"]]),
        "responses_at_cap": sum(r == "length" for row in rows for r in row["response_finish_reasons"])
        / max(1, sum(len(row["response_finish_reasons"]) for row in rows)),
        "peak_rss_mb": max(peak_before, peak_rss_mb()),
    }


def _instructions_after_filter(result, kept) -> list[str]:
    # Pairs dropped at binarize still had their responses generated; count them in so the work is identical.
    n = result.ledger.get("responses").rows_in
    return (kept * (n // max(1, len(kept)) + 1))[:n]


def print_comparison(c: dict) -> None:
    machine = (
        "1 thread"
        if c["procs"] == 1
        else (f"ours {c['procs']} processes x 1 thread (num_proc), naive {c['procs']} threads")
    )
    print(
        f"\n== {c['size']} model ({c['params_millions']:.1f}M parameters), {c['instructions']} instructions x 5 "
        f"responses, caps 64/128 tokens, fp32, {machine}, {attention_backend()}"
        + (", look_ahead" if LOOK_AHEAD else "")
    )
    print(f"{'stage':<14}{'ours s':>9}{'naive s':>9}{'ratio':>8}{'ours tok/s':>12}{'naive tok/s':>12}")
    for stage in ("instructions", "responses", "rewards"):
        ours, naive = c["ours_seconds"][stage], c["naive_seconds"][stage]
        ours_tps = c["ours_tokens"].get(stage, 0) / ours if ours else 0
        naive_tps = c["naive_tokens"].get(stage, 0) / naive if naive else 0
        print(f"{stage:<14}{ours:>9.2f}{naive:>9.2f}{naive / ours:>7.1f}x{ours_tps:>12.0f}{naive_tps:>12.0f}")
    print(
        f"{'end to end':<14}{c['ours_total']:>9.2f}{c['naive_total']:>9.2f}{c['naive_total'] / c['ours_total']:>7.1f}x"
    )
    print(
        f"seconds per instruction: ours {c['ours_total'] / c['instructions']:.3f}, naive "
        f"{c['naive_total'] / c['instructions']:.3f}"
    )
    kernels = ", ".join(f"{name} {value:.1f}" for name, value in c["matmul_kernels"].items())
    print(
        f"fp32 matmul throughput measured: {c['matmul_gflops']:.1f} GFLOP/s ({kernels}); response stage "
        f"{c['response_utilisation']:.0%} of it ({c['flops_per_token'] / 1e6:.1f} MFLOP per generated token); "
        f"{c['response_utilisation_with_prompts']:.0%} counting the prompt tokens it prefills too"
    )
    d = c["decode_step"]
    print(
        f"ceiling: one decode step alone (batch {d['batch']}, {d['context']} cached tokens of which {d['shared']} "
        f"shared, sampling included) takes "
        f"{d['seconds'] * 1e3:.0f} ms, {d['utilisation']:.0%} of one thread's matmul throughput"
    )
    print(
        f"lengths (min / p10 / median / p90 / max): instructions {c['instruction_lengths']}, responses "
        f"{c['response_lengths']}; responses at the cap {c['responses_at_cap']:.1%}"
    )
    print(f"peak RSS {c['peak_rss_mb']:.0f} MB")


# ------------------------------------------------------------------------------------------------ scaling


class DecodeSteps:
    """Counts the decode steps of the generation stages (in this process), and those whose batch is under half its
    rows: the tail of each shard, where the batch empties. On CPU a step costs about its rows' worth of work, so
    the tail costs little; on a GPU, where a step costs about the same at any batch size, the share of such steps
    is about the share of decode time that `look_ahead` can win back (all shards' tails but the last)."""

    def __enter__(self):
        from builder.engines.transformers import generation

        self.steps, self.half_empty = 0, 0
        self._original = original = generation.SlotCache.decode_mask

        def counting(cache):
            self.steps += 1
            self.half_empty += cache.layers[0].batch < cache.rows / 2
            return original(cache)

        generation.SlotCache.decode_mask = counting
        return self

    def __exit__(self, *exc):
        from builder.engines.transformers import generation

        generation.SlotCache.decode_mask = self._original


def scaling_run(size: str, num_instructions: int) -> dict:
    from builder.build import build, model_specs
    from builder.models import load_generator

    config = config_for(size, num_instructions)
    model, _ = load_generator(model_specs(config)[0])
    gflops_before = matmul_gflops()
    start = time.perf_counter()
    with AnonymousPeak() as anonymous, DecodeSteps() as steps:
        result = build(config)
    seconds = time.perf_counter() - start
    responses = result.ledger.get("responses")
    utilisation = (
        responses.tokens
        * flops_per_token(model)
        / responses.seconds
        / (max(best_of(gflops_before, matmul_gflops()).values()) * 1e9)
    )
    # The stages' own time: the per-build set-up (template derivation, tokenizer loads) is a constant that would
    # make small K look slower per instruction.
    stage_seconds = sum(record.seconds for record in result.ledger.stages)
    return {
        "size": size,
        "k": num_instructions,
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "per_instruction": stage_seconds / num_instructions,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anonymous_mb": anonymous.peak,
        "response_utilisation": utilisation,
        "decode_steps": steps.steps,
        "half_empty_steps": steps.half_empty,
    }


def scaling(size: str, ks: list[int]) -> list[dict]:
    out = []
    for k in ks:
        done = subprocess.run(
            [sys.executable, __file__, "--scaling-run", size, str(k)] + (["--look-ahead"] if LOOK_AHEAD else []),
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def print_scaling(size: str, runs: list[dict]) -> None:
    base = runs[0]["per_instruction"]
    print(f"\n== scaling, {size} model, {attention_backend()}" + (", look_ahead" if LOOK_AHEAD else ""))
    print(
        f"{'K':>6}{'wall s':>9}{'stages s':>10}{'s/instruction':>15}{'vs K=' + str(runs[0]['k']):>10}"
        f"{'peak RSS MB':>13}{'anonymous MB':>14}{'responses util':>16}{'decode steps':>14}{'half-empty':>12}"
    )
    for run in runs:
        print(
            f"{run['k']:>6}{run['seconds']:>9.1f}{run['stage_seconds']:>10.1f}{run['per_instruction']:>15.4f}"
            f"{run['per_instruction'] / base - 1:>+10.1%}{run['peak_rss_mb']:>13.0f}{run['peak_anonymous_mb']:>14.0f}"
            f"{run['response_utilisation']:>16.0%}{run['decode_steps']:>14}"
            f"{run['half_empty_steps'] / max(1, run['decode_steps']):>12.0%}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument(
        "--instructions",
        nargs="*",
        type=int,
        default=[16, 64],
        help="K values of the baseline comparison (16: the issue's setting, all tail; 64: a full continuous batch)",
    )
    parser.add_argument(
        "--procs",
        nargs="+",
        type=int,
        default=[1],
        help="processes of the build (num_proc, one thread each) against a naive baseline with as many "
        "threads; 2 uses both cores of the CI machine",
    )
    parser.add_argument(
        "--scaling",
        nargs="*",
        type=int,
        default=None,
        help="K values of the scaling table (default 64 256 1024, plus 4096 on tiny)",
    )
    parser.add_argument("--scaling-run", nargs=2, metavar=("SIZE", "K"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--look-ahead",
        action="store_true",
        help="build with look_ahead: each shard's samples start in the previous shard's tail",
    )
    args = parser.parse_args()
    global LOOK_AHEAD
    LOOK_AHEAD = args.look_ahead

    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if args.scaling_run:
        print(json.dumps(scaling_run(args.scaling_run[0], int(args.scaling_run[1]))))
        return
    for size in args.sizes:
        for procs in args.procs:
            for k in args.instructions:
                print_comparison(compare(size, k, procs))
    for size in args.sizes:
        ks = args.scaling if args.scaling is not None else [64, 256, 1024] + ([4096] if size == "tiny" else [])
        if ks:
            print_scaling(size, scaling(size, ks))


if __name__ == "__main__":
    main()
