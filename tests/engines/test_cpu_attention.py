import ctypes
import logging
import platform
import shutil

import pytest
import torch

from builder.engines.transformers.cpu import attention as cpu_attention


needs_kernel = pytest.mark.skipif(cpu_attention.library() is None, reason="no C compiler to build the kernel with")


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference(query, key, value, mask, prefix_keys, prefix_values, scaling):
    """The same attention in torch, as `cascade_attention`'s own path computes it."""
    own = (query @ key.mT) * scaling
    if mask is not None:
        own = own.masked_fill(~mask, float("-inf"))
    shared = torch.einsum("bhgd,hpd->bhgp", query, prefix_keys) * scaling
    weights = torch.softmax(torch.cat([shared, own], -1), -1)
    length = prefix_keys.shape[1]
    return torch.einsum("bhgp,hpd->bhgd", weights[..., :length], prefix_values) + weights[..., length:] @ value


# (groups, head dim, prefix, columns): the benchmark's 4 x 64; head dims off the 16-lane vectors and group counts
# off the 4-head blocks run the plain-C paths; one column and one prefix column are the edges.
SHAPES = [(4, 64, 53, 100), (1, 16, 5, 7), (2, 80, 3, 33), (8, 128, 20, 17), (7, 24, 1, 1), (4, 64, 2, 40)]


@needs_kernel
@pytest.mark.parametrize("groups, dim, prefix, columns", SHAPES)
def test_the_kernel_computes_the_attention_torch_computes(groups, dim, prefix, columns):
    torch.manual_seed(groups * 1000 + dim)
    batch, kv_heads, buffer = 5, 3, 150
    # The rows' columns are a window of a wider buffer, as in the slot cache: strided, not contiguous.
    key_buffer, value_buffer = torch.randn(batch, kv_heads, buffer, dim), torch.randn(batch, kv_heads, buffer, dim)
    key, value = key_buffer[:, :, 10 : 10 + columns], value_buffer[:, :, 10 : 10 + columns]
    query = torch.randn(batch, kv_heads, groups, dim)
    prefix_keys, prefix_values = torch.randn(kv_heads, prefix, dim), torch.randn(kv_heads, prefix, dim)
    mask = torch.rand(batch, 1, 1, columns) < 0.6  # with holes, not only left padding
    mask[..., -1] = True
    for row_mask in (mask, None, mask[:1]):  # a mask per row, none, one broadcast to every row
        got = cpu_attention.decode_attention(query, key, value, row_mask, prefix_keys, prefix_values, dim**-0.5)
        expected = reference(query, key, value, row_mask, prefix_keys, prefix_values, dim**-0.5)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None, reason="needs an x86-64 C compiler"
)
def test_the_plain_c_path_for_processors_without_avx512_computes_the_same(monkeypatch, tmp_path):
    # This machine has AVX-512, so the kernel it builds takes the intrinsics; built for x86-64-v3 (AVX2), the same
    # source takes the plain C loops every other processor runs.
    target = tmp_path / "plain.so"
    flags = tuple("-march=x86-64-v3" if flag == "-march=native" else flag for flag in cpu_attention.FLAGS)
    cpu_attention._compile(["cc"], target, flags)
    monkeypatch.setattr(cpu_attention, "library", lambda: cpu_attention.bind(ctypes.CDLL(str(target))))
    for groups, dim, prefix, columns in SHAPES[:3]:
        test_the_kernel_computes_the_attention_torch_computes(groups, dim, prefix, columns)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch_or_the_masked_columns_around_it():
    torch.manual_seed(1)
    batch, kv_heads, groups, dim, columns, prefix = 6, 2, 4, 64, 40, 9
    query = torch.randn(batch, kv_heads, groups, dim)
    key, value = torch.randn(batch, kv_heads, columns, dim), torch.randn(batch, kv_heads, columns, dim)
    prefix_keys, prefix_values = torch.randn(kv_heads, prefix, dim), torch.randn(kv_heads, prefix, dim)
    mask = torch.arange(columns)[None, :] >= torch.tensor([0, 30, 12, 39, 5, 20])[:, None]
    together = cpu_attention.decode_attention(
        query, key, value, mask[:, None, None, :], prefix_keys, prefix_values, 0.125
    )
    for row in range(batch):
        start = int((~mask[row]).sum())
        # The row alone, and only its live columns: bit for bit the same.
        alone = cpu_attention.decode_attention(
            query[row : row + 1],
            key[row : row + 1, :, start:],
            value[row : row + 1, :, start:],
            None,
            prefix_keys,
            prefix_values,
            0.125,
        )
        assert torch.equal(alone[0], together[row])


@needs_kernel
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_cascade_attention_runs_the_kernel_unless_told_and_both_agree(backend, monkeypatch, one_thread):
    from types import SimpleNamespace

    from builder.engines.transformers.generation import SharedPrefix, _decode_prefix, cascade_attention

    monkeypatch.setenv("MAGPIE_CPU_ATTENTION", backend)
    calls = []
    kernel = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(2)
    batch, heads, kv_heads, dim, own, length = 5, 8, 2, 16, 9, 6
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, dim)
    prefix = SharedPrefix(length, [(torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim))])
    mask = (torch.arange(own)[None, :] >= torch.tensor([0, 5, 8, 2, 7])[:, None])[:, None, None, :]
    token = _decode_prefix.set(prefix)
    try:
        got, _ = cascade_attention(module, query, keys, values, mask, scaling=0.3)
        # Two torch threads: torch's matmuls, which use them.
        torch.set_num_threads(2)
        threaded, _ = cascade_attention(module, query, keys, values, mask, scaling=0.3)
    finally:
        _decode_prefix.reset(token)
    assert len(calls) == (backend == "kernel")
    torch.testing.assert_close(got, threaded, atol=2e-6, rtol=1e-5)


def test_a_bad_backend_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("MAGPIE_CPU_ATTENTION", "avx")
    with pytest.raises(ValueError, match="MAGPIE_CPU_ATTENTION='avx' is not one of kernel, torch"):
        cpu_attention.requested_backend()


@pytest.mark.parametrize("compiler, reason", [("/nonexistent/cc", "no C compiler"), ("false", "could not build")])
def test_without_a_working_compiler_attention_falls_back_to_torch_with_a_warning(
    compiler, reason, monkeypatch, tmp_path, caplog, one_thread
):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("MAGPIE_BUILDER_CACHE", str(tmp_path))
    cpu_attention.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="magpie_builder"):
            assert cpu_attention.library() is None
        query = key = value = torch.randn(2, 2, 3, 16)
        assert not cpu_attention.usable(query, key, value, None)
    finally:
        cpu_attention.library.cache_clear()
    assert reason in caplog.text and "runs in torch" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind


@needs_kernel
def test_the_kernel_is_built_once_into_the_cache_named_by_source_flags_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("MAGPIE_BUILDER_CACHE", str(tmp_path))
    cpu_attention.library.cache_clear()
    try:
        assert cpu_attention.library() is not None
        kernels = tmp_path / "kernels"
        built = list(kernels.glob("cpu_attention-*.so"))
        assert len(built) == 1 and not list(kernels.glob("tmp*"))
        stamp = built[0].stat().st_mtime_ns
        cpu_attention.library.cache_clear()
        assert cpu_attention.library() is not None
        assert [p.stat().st_mtime_ns for p in kernels.glob("cpu_attention-*.so")] == [stamp]  # reused, not rebuilt
    finally:
        cpu_attention.library.cache_clear()


def test_only_single_threaded_fp32_cpu_steps_with_a_boolean_row_mask_use_the_kernel(one_thread):
    query, key = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    built = cpu_attention.library() is not None
    assert cpu_attention.usable(query, key, key, mask) == built
    assert not cpu_attention.usable(query.bfloat16(), key.bfloat16(), key.bfloat16(), mask)
    assert not cpu_attention.usable(query, key, key, torch.zeros(2, 1, 1, 5))  # an additive float mask
    assert not cpu_attention.usable(query, key, key, torch.ones(2, 2, 1, 5, dtype=torch.bool))  # one per head
    assert not cpu_attention.usable(query, key.mT.contiguous().mT, key, mask)  # columns not contiguous
