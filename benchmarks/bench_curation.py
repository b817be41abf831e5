"""What curation costs: the tagging stages next to the response stage, and near-deduplication at the DPO recipe's size.

    python benchmarks/bench_curation.py                      # both parts (~6 min here)
    python benchmarks/bench_curation.py --tagging 256        # tags vs responses only, K instructions
    python benchmarks/bench_curation.py --tagging 64 --generator packaged:smollm2-135m-instruct --max-response-tokens 512
                                                             # the same on a real chat model (and its tokenizer)
    python benchmarks/bench_curation.py --dedup 100000       # near-dedup only, N random 768-d embeddings
    python benchmarks/bench_curation.py --dedup 1000000 --index ivf   # the approximate index, for millions

Part 1 builds K instructions on the small model (hidden 512, 8 layers) with every curation stage on, the judge
being the generator (label scoring: prefill only) and a small guard model, then 5 responses each of at most 128
tokens, and prints each stage's seconds from the build's ledger and the curation stages' share of the response
stage's (target: the judge's and the guard's stages together at most a quarter). lingua's one-time model load is
timed apart from the language stage (it is paid once per process, whatever the number of rows).

Part 2 runs the near-dedup stage's function on N random unit vectors of 768 dimensions (all-mpnet-base-v2's size)
with 20 planted near-copies, with the flat (exact) or the IVF (approximate) faiss index, and prints the seconds, the
peak RSS and whether every planted copy was found (target: under two minutes for 100K with the flat index).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import peak_rss_mb  # noqa: E402


CURATION_STAGES = ("tags", "safety", "language", "embed", "near_dedup", "select")


def tagging(num_instructions: int, max_response_tokens: int, generator: str) -> None:
    from builder.build import build
    from builder.config import BuildConfig
    from builder.stages import language

    start = time.perf_counter()
    language.detector().detect_language_of("Loads the models of every language.")
    lingua_load = time.perf_counter() - start
    config = BuildConfig(
        generator_model=generator,
        reward_model="tiny:reward@small",
        num_instructions=num_instructions,
        max_instruction_tokens=64,
        max_response_tokens=max_response_tokens,
        num_responses=5,
        generation_batch_size=256,
        reward_batch_size=8,
        shard_size=num_instructions,
        test_size=0.1,
        seed=1,
        resume=False,
        tag_instructions=True,
        guard_model="tiny:guard@small",
        detect_language=True,
        near_dedup=True,
        embedding_model="tiny:embedder@small",
        select_safe_only=True,
    )
    # The models built and loaded once, so the timed build measures work, not first use.
    build(dataclasses.replace(config, num_instructions=8, shard_size=8, select_safe_only=False))
    result = build(config)
    seconds = {record.name: record.seconds for record in result.ledger.stages}
    rows = {record.name: record.rows_in for record in result.ledger.stages}
    responses = seconds["responses"]
    tokens = next(r.tokens for r in result.ledger.stages if r.name == "responses")
    print(f"\n## Tagging vs responses: {generator}, K={num_instructions} instructions, one thread")
    print(f"responses: 5 each, at most {max_response_tokens} tokens ({tokens / rows['responses'] / 5:.0f} on average)")
    print(f"lingua's model load, once per process: {lingua_load:.1f} s (not in the language stage below)")
    print(f"{'stage':<12} {'rows':>6} {'seconds':>9} {'of responses':>13}")
    for name in (*CURATION_STAGES, "responses"):
        if name in seconds:
            print(f"{name:<12} {rows[name]:>6} {seconds[name]:>9.2f} {seconds[name] / responses:>12.1%}")
    judged = seconds["tags"] + seconds["safety"]
    every = sum(seconds[name] for name in CURATION_STAGES)
    print(f"tags + safety (label scoring): {judged:.2f} s = {judged / responses:.1%} of the response stage")
    print(f"every curation stage: {every:.2f} s = {every / responses:.1%} of the response stage")


def dedup(count: int, index: str, k: int) -> None:
    import numpy as np
    from datasets import Dataset

    from builder.pipeline.stage import DROP_REASON
    from builder.stages.near_dedup import NeighbourSettings, find_near_duplicates

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, 768), dtype=np.float32)
    planted = 20
    for i in range(planted):  # the last rows are near-copies of the first ones
        vectors[count - 1 - i] = vectors[i] + 0.05 * rng.standard_normal(768, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = Dataset.from_dict({"uuid": [f"{i:07d}" for i in range(count)], "embedding": vectors})
    del vectors
    start = time.perf_counter()
    out = find_near_duplicates(rows, settings=NeighbourSettings(k=k, distance=0.05, index=index, nprobe=16))
    seconds = time.perf_counter() - start
    dropped = {u for u, r in zip(out["uuid"], out[DROP_REASON]) if r == "near_duplicate"}
    expected = {f"{count - 1 - i:07d}" for i in range(planted)}
    print(f"\n## Near-dedup: {count} random 768-d unit embeddings, {index} index, k={k}")
    print(
        f"{seconds:.1f} s ({count / seconds:.0f} rows/s), peak RSS {peak_rss_mb():.0f} MB; planted copies found: "
        f"{len(dropped & expected)}/{planted}, other rows dropped: {len(dropped - expected)}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tagging", type=int, nargs="?", const=256, default=None, metavar="K")
    parser.add_argument("--dedup", type=int, nargs="?", const=100_000, default=None, metavar="N")
    parser.add_argument("--max-response-tokens", type=int, default=128, help="as bench.py's comparisons")
    parser.add_argument("--index", choices=("flat", "ivf"), default="flat")
    parser.add_argument(
        "--generator", default="tiny:chat-llama-3.1@small", help="generator and judge of the tagging part"
    )
    parser.add_argument("--k", type=int, default=100, help="neighbours searched per row (the config's default)")
    args = parser.parse_args()
    both = args.tagging is None and args.dedup is None
    if both or args.tagging:
        tagging(args.tagging or 256, args.max_response_tokens, args.generator)
    if both or args.dedup:
        dedup(args.dedup or 100_000, args.index, args.k)


if __name__ == "__main__":
    main()
