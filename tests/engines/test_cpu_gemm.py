import pytest
import torch
from transformers import AutoModelForCausalLM

from builder.engines.transformers.cpu import gemm as cpu_gemm
from builder.models import ModelSpec, load_generator
from builder.testing.tiny import resolve_model_path


needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN linear")


def fresh_model():
    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:chat-llama-3")).eval()


def macs(input, weight):
    return input.numel() * weight.shape[0]


def spy_on_onednn(monkeypatch, record=macs) -> list:
    """The oneDNN products run from here on, each as `record(input, weight)`."""
    calls = []
    linear = cpu_gemm._linear

    def spy(input, weight, bias):
        calls.append(record(input, weight))
        return linear(input, weight, bias)

    monkeypatch.setattr(cpu_gemm, "_linear", spy)
    return calls


@needs_onednn
def test_routed_linears_give_the_same_logits_and_keep_autograd(monkeypatch):
    monkeypatch.delenv("MAGPIE_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu_gemm, "ONEDNN_MIN_MACS", 0)  # every product through oneDNN, however small
    calls = spy_on_onednn(monkeypatch)
    model = fresh_model()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 3, 4, 4, 8, 2]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    assert cpu_gemm.route_linears(model) == linears > 0
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert len(calls) == linears  # one oneDNN product per layer
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # With autograd recording the layers run F.linear, so gradients still flow (and match).
    calls.clear()
    reference = fresh_model()
    model(input_ids=ids).logits.square().mean().backward()
    reference(input_ids=ids).logits.square().mean().backward()
    assert not calls
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad)
    # The same parameters and state dict: the model saves and loads as a stock one.
    assert model.state_dict().keys() == reference.state_dict().keys()


@needs_onednn
def test_small_products_stay_on_torch(monkeypatch):
    monkeypatch.delenv("MAGPIE_CPU_GEMM", raising=False)
    calls = spy_on_onednn(monkeypatch)
    layer = torch.nn.Linear(512, 512)
    cpu_gemm.route_linears(layer)
    with torch.inference_mode():
        small, large = torch.randn(4, 512), torch.randn(2, 16, 512)  # 4 x 512 x 512 MACs; 32 x 512 x 512
        torch.testing.assert_close(layer(small), torch.nn.functional.linear(small, layer.weight, layer.bias))
        assert not calls
        torch.testing.assert_close(
            layer(large), torch.nn.functional.linear(large, layer.weight, layer.bias), atol=1e-5, rtol=1e-5
        )
        assert calls == [32 * 512 * 512] and calls[0] >= cpu_gemm.ONEDNN_MIN_MACS > 4 * 512 * 512


@needs_onednn
def test_onednn_sees_a_few_row_counts_per_power_of_two(monkeypatch):
    # oneDNN compiles kernels per row count; hundreds of them grew the process (see cpu_gemm's docstring).
    monkeypatch.delenv("MAGPIE_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu_gemm, "ONEDNN_MIN_MACS", 0)
    rows_seen = spy_on_onednn(monkeypatch, record=lambda input, weight: input.shape[0])
    layer = torch.nn.Linear(64, 48)
    cpu_gemm.route_linears(layer)
    with torch.inference_mode():
        for shape in [
            (1, 64),
            (15, 64),
            (16, 64),
            (17, 64),
            (3, 7, 64),
            (2, 1, 64),
            (256, 1, 64),
            (257, 64),
            (999, 64),
        ]:
            x = torch.randn(shape)
            got = layer(x)
            assert got.shape == (*shape[:-1], 48)
            torch.testing.assert_close(
                got, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5
            )
    assert rows_seen == [1, 15, 16, 18, 22, 2, 256, 288, 1024]
    counts = {cpu_gemm.padded_row_count(rows) for rows in range(1, 4097)}
    assert len(counts) <= 8 * 12 + 8  # 1-8 as they are, then 8 per power of two
    assert all(rows <= cpu_gemm.padded_row_count(rows) < rows * 9 / 8 for rows in range(1, 4097))


def test_torch_gemm_on_request_and_a_bad_value_names_the_fix(monkeypatch):
    monkeypatch.setenv("MAGPIE_CPU_GEMM", "torch")
    model = fresh_model()
    assert cpu_gemm.route_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())
    monkeypatch.setenv("MAGPIE_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="MAGPIE_CPU_GEMM='mkl'.*MAGPIE_CPU_GEMM=torch"):
        cpu_gemm.route_linears(model)


def test_without_onednn_nothing_changes(monkeypatch):
    monkeypatch.delenv("MAGPIE_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: False)
    model = fresh_model()
    assert cpu_gemm.route_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())


@needs_onednn
def test_the_cpu_loader_routes_the_generator(monkeypatch):
    monkeypatch.delenv("MAGPIE_CPU_GEMM", raising=False)
    model, _ = load_generator(ModelSpec("tiny:chat-qwen2.5", device="cpu"))
    assert any(isinstance(m, cpu_gemm.OneDNNLinear) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
