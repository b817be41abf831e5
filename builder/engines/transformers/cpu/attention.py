"""A decode step's attention in C for fp32 on CPU, behind `generation.cascade_attention`.

Why: in a decode step each row's query heads meet that row's own cached columns, which torch runs as one small
matmul per row and key/value head, each paying a call's overhead and computing far below peak, over every column
of the batch's window, masked or not (`benchmarks/RESULTS.md` has what that cost). This kernel makes one pass per row and head over the shared prefix's columns (in cache:
every row reads the same) and the row's live columns (scores, softmax, weighted values), fetching the next head's
keys and values while it computes.

It is compiled on first use, with the machine's C compiler (`$CC`, else `cc`) and `-march=native`, into
`$MAGPIE_BUILDER_CACHE/kernels` (beside the tiny models and tables; default `~/.cache/magpie_builder`), named by a
hash of the source, the flags, the compiler and the CPU's model and flags, so a home folder shared by other machines
never loads a kernel built for another CPU.
With no compiler, a failed build or `MAGPIE_CPU_ATTENTION=torch`, attention runs in torch as before (a warning says
why). Only single-threaded fp32 CPU decode steps use it: a process given more torch threads keeps torch's matmuls,
which use them; GPUs keep SDPA or flash attention.

Numerics: fp32 throughout, sums in another order than torch's, so outputs differ in the last bits (the tests
bound it), as they do between batch shapes; a row's result from the kernel depends on that row alone.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ....paths import cache_root
from .gemm import cpu_choice


logger = logging.getLogger("magpie_builder")

SOURCE = Path(__file__).with_name("attention.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")
BACKENDS = ("kernel", "torch")


def requested_backend() -> str:
    return cpu_choice("MAGPIE_CPU_ATTENTION", BACKENDS, "the C kernel", "torch's matmuls")


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what `-march=native` compiles for), from /proc/cpuinfo on Linux."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep))) + platform.machine()


def _compile(compiler: list[str], target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """Builds the shared library into `target` through a temporary file in the same folder, renamed into place, so
    that worker processes building it at once never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        done = subprocess.run(
            [*compiler, *flags, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (after one warning) where it cannot be had."""
    command = shlex.split(os.environ.get("CC") or "cc")  # CC may carry flags, as in make
    compiler = shutil.which(command[0]) if command else None
    if compiler is None:
        logger.warning(
            "CPU attention: no C compiler (%s) found; decode attention runs in torch (slower). Install "
            "gcc or set CC, or set MAGPIE_CPU_ATTENTION=torch to silence this.",
            os.environ.get("CC", "cc"),
        )
        return None
    command[0] = compiler
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, *FLAGS, version, _cpu_identity()]).encode())
    target = cache_root() / "kernels" / f"cpu_attention-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(command, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning(
            "CPU attention: could not build the C kernel (%s); decode attention runs in torch (slower). "
            "Set MAGPIE_CPU_ATTENTION=torch to silence this.",
            error,
        )
        return None
    logger.info("CPU attention: decode steps run the C kernel %s", target)
    return bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the kernel's signature on a loaded library."""
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    lib.decode_attention.argtypes = [pointer] * 6 + [integer] * 18 + [ctypes.c_float, pointer]
    lib.decode_attention.restype = ctypes.c_int
    return lib


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether this decode step can run the kernel: fp32 CPU tensors with contiguous last dimensions, a boolean
    mask of one row per batch row (or none), one torch thread, and the kernel built."""
    tensors = (query, key, value)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 for t in tensors):
        return False
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or attention_mask.shape[1:3] != (1, 1)
        or attention_mask.shape[-1] != key.shape[2]
    ):
        return False
    return torch.get_num_threads() == 1 and requested_backend() == "kernel" and library() is not None


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The attention of each row's grouped query heads over the shared prefix and the row's own live columns, as one
    softmax of the scaled scores: `[batch, kv_heads, groups, dim]`.

    Args:
        query: `[batch, kv_heads, groups, dim]`, the grouped query heads of each key/value head.
        key, value: `[batch, kv_heads, columns, dim]`, the rows' own cached columns.
        attention_mask: boolean `[batch, 1, 1, columns]` (True = attend), or None for every column.
        prefix_keys, prefix_values: `[kv_heads, prefix, dim]`, the columns every row attends to first.
    """
    batch, kv_heads, groups, dim = query.shape
    columns, prefix = key.shape[2], prefix_keys.shape[1]
    query = query.contiguous()
    prefix_keys, prefix_values = prefix_keys.contiguous(), prefix_values.contiguous()
    out = query.new_empty((batch, kv_heads, groups, dim))
    mask = attention_mask.expand(batch, -1, -1, -1)[:, 0, 0, :] if attention_mask is not None else None
    mask_strides = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    failed = library().decode_attention(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        mask.data_ptr() if mask is not None else None,
        prefix_keys.data_ptr(),
        prefix_values.data_ptr(),
        batch,
        kv_heads,
        groups,
        dim,
        columns,
        prefix,
        *key.stride()[:3],
        *value.stride()[:3],
        *mask_strides,
        *prefix_keys.stride()[:2],
        *prefix_values.stride()[:2],
        scaling,
        out.data_ptr(),
    )
    if failed:
        raise MemoryError(f"CPU attention kernel: no memory for its scratch ({groups} x {prefix + columns} floats)")
    return out
