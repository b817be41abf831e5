"""fp32 matrix products on CPU through oneDNN rather than torch's default BLAS.

Why: torch's x86 wheels run fp32 `F.linear` on MKL, which picks its kernels by processor vendor and ran AVX2 code
on the AMD processor of this project's CI, where oneDNN (bundled with torch, choosing by instruction set) runs
AVX-512. Both are fp32 with fp32 accumulation: results differ in the last bits, as they do between batch shapes.

Only inference goes this way, and only products of at least `ONEDNN_MIN_MACS` multiply-adds: below that, oneDNN's
set-up per call costs more than it saves. With autograd recording, on another dtype or device, `F.linear` runs as
before.

Memory: oneDNN compiles kernels for each row count it meets, and a build meets every one from 1 to a few hundred
(decode batches shrinking in the tail, prefill and reward widths); kept, they grow the process without bound. So
row counts are rounded up to one of `ONEDNN_ROWS_PER_OCTAVE` counts per power of two (zero rows added, their
outputs dropped; at most an eighth added), and both oneDNN's primitive cache and ideep's cache in front of it are
capped at 64. `MAGPIE_CPU_GEMM=torch` keeps torch's own for a whole process (for a CPU where it is faster: the
benchmark prints both kernels' throughput). The figures behind each choice are in `benchmarks/RESULTS.md`.
"""

import functools
import logging
import os

import torch
import torch.nn.functional as F


logger = logging.getLogger("magpie_builder")

GEMMS = ("onednn", "torch")
ONEDNN_MIN_MACS = 1 << 21  # rows x in_features x out_features below which F.linear runs
ONEDNN_ROWS_PER_OCTAVE = 8  # row counts oneDNN sees per power of two (see the module's docstring: memory)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")  # before oneDNN's first call in this process
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")  # ideep's, read likewise


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear (a private op, so it is tried rather than assumed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = _linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4))
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(out, torch.full((2, 4), 4.0))


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose inference forward is oneDNN's fp32 GEMM; the same parameters and state dict."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.numel() * self.out_features < ONEDNN_MIN_MACS
            or input.dtype != torch.float32
            or input.device.type != "cpu"
            or self.weight.dtype != torch.float32
            or torch.is_grad_enabled()
            and (input.requires_grad or self.weight.requires_grad)
        ):
            return F.linear(input, self.weight, self.bias)
        return linear_padded_rows(input, self.weight, self.bias)


def padded_row_count(rows: int) -> int:
    """`rows` rounded up to one of `ONEDNN_ROWS_PER_OCTAVE` counts per power of two: adds less than an eighth."""
    step = max(1, (1 << (rows.bit_length() - 1)) // ONEDNN_ROWS_PER_OCTAVE)
    return -(-rows // step) * step


def linear_padded_rows(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's `input @ weight.T + bias` with the rows padded with zeros to `padded_row_count` (the padded rows'
    outputs are dropped): oneDNN then compiles kernels for a few dozen row counts, not hundreds."""
    features = input.shape[-1]
    rows = input.numel() // features
    missing = padded_row_count(rows) - rows
    if not missing:
        return _linear(input, weight, bias)
    flat = input.reshape(rows, features)
    padded = torch.cat([flat, flat.new_zeros(missing, features)])
    return _linear(padded, weight, bias)[:rows].view(*input.shape[:-1], weight.shape[0])


def cpu_choice(variable: str, choices: tuple[str, ...], default_is: str, torch_keeps: str) -> str:
    """The value of an opt-out variable (its first choice when unset, "torch" to keep torch's own kernels); any other
    value is an error that names the allowed ones."""
    value = os.environ.get(variable, choices[0])
    if value not in choices:
        raise ValueError(
            f"{variable}={value!r} is not one of {', '.join(choices)}: unset it for {default_is}, or set "
            f"{variable}=torch to keep {torch_keeps}."
        )
    return value


def requested_gemm() -> str:
    return cpu_choice("MAGPIE_CPU_GEMM", GEMMS, "oneDNN", "torch's default BLAS")


def route_linears(model: torch.nn.Module) -> int:
    """Makes the fp32 CPU `nn.Linear` layers of `model` run on oneDNN (unless `MAGPIE_CPU_GEMM=torch`, or torch has
    no oneDNN). Returns how many layers it switched."""
    if requested_gemm() != "onednn" or not onednn_available():
        return 0
    switched = 0
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
        ):
            module.__class__ = OneDNNLinear
            switched += 1
    if switched:
        logger.info(
            "CPU: %d linear layers of %s run on oneDNN's fp32 GEMM (MAGPIE_CPU_GEMM=torch keeps torch's default)",
            switched,
            type(model).__name__,
        )
    return switched
