"""The vLLM engine adapter against a stand-in that implements exactly the vLLM calls the adapter makes.

vLLM needs a GPU and cannot be installed here; the stand-in checks the contract: prompts go in as token ids,
one SamplingParams per prompt with n, temperature, top_p, max_tokens, stop_token_ids and seed, and outputs come
back with token_ids and finish_reason.
"""

import random
import sys
import types
from dataclasses import dataclass, field

import pytest

from builder.build import build, model_specs, pre_query_of
from builder.engines import vllm as vllm_engine

from conftest import small_config


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list = field(default_factory=list)
    stop: list | None = None
    seed: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True


def fake_logprob(prefix: list[int], token: int) -> float:
    """The stand-in model's log-probability of `token` after `prefix`: any fixed function of both will do."""
    return -(((sum(prefix) * 31 + len(prefix) * 7 + token) % 97) + 1) / 10


@dataclass
class TokensPrompt:
    prompt_token_ids: list


class LLM:
    instances: list = []

    def __init__(
        self, model, revision=None, dtype="auto", tensor_parallel_size=1, trust_remote_code=False, max_model_len=None
    ):
        self.kwargs = dict(
            model=model,
            revision=revision,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            max_model_len=max_model_len,
        )
        self.calls = []
        self.shut_down = False
        LLM.instances.append(self)

    def shutdown(self):  # vLLM's LLM.shutdown: the engine core and its workers stop, their GPU memory is freed
        self.shut_down = True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        if not isinstance(sampling_params, list):  # one SamplingParams for every prompt, as vLLM allows
            sampling_params = [sampling_params] * len(prompts)
        assert len(prompts) == len(sampling_params)
        self.calls.append((prompts, sampling_params))
        outputs = []
        assert not self.shut_down, "an engine that was shut down was used again"
        for prompt, params in zip(prompts, sampling_params):
            if params.prompt_logprobs is not None:
                # Like vLLM: None for the first prompt token, then a dict holding each token's own log-probability.
                ids = prompt.prompt_token_ids
                logprobs = [None] + [
                    {ids[i]: types.SimpleNamespace(logprob=fake_logprob(ids[:i], ids[i]))} for i in range(1, len(ids))
                ]
                sample = types.SimpleNamespace(token_ids=[5], finish_reason="length")
                outputs.append(types.SimpleNamespace(outputs=[sample], prompt_logprobs=logprobs))
                continue
            assert isinstance(prompt, TokensPrompt) and all(isinstance(t, int) for t in prompt.prompt_token_ids)
            rng = random.Random(params.seed)
            samples = []
            for _ in range(params.n):
                length = rng.randint(1, params.max_tokens)
                tokens = [rng.randint(20, 400) for _ in range(length)]
                if length < params.max_tokens:  # ended by a stop token, which vLLM keeps in token_ids
                    tokens.append(params.stop_token_ids[0])
                samples.append(
                    types.SimpleNamespace(
                        token_ids=tokens, finish_reason="stop" if length < params.max_tokens else "length"
                    )
                )
            outputs.append(types.SimpleNamespace(outputs=samples))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = LLM, SamplingParams, TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", module)
    LLM.instances.clear()
    vllm_engine.release_vllm()
    yield module
    vllm_engine.release_vllm()


def test_build_with_the_vllm_engine(fake_vllm):
    config = small_config(engine="vllm", tensor_parallel_size=4, num_instructions=12, num_responses=3)
    result = build(config)
    (llm,) = LLM.instances  # one engine per process, reused by both generation stages
    assert llm.kwargs["tensor_parallel_size"] == 4 and llm.kwargs["model"].endswith("chat-llama-3.1")
    instruction_calls = [call for call in llm.calls if call[1][0].n == 1]
    response_calls = [call for call in llm.calls if call[1][0].n == 3]
    assert len(instruction_calls) + len(response_calls) == len(llm.calls)
    generator, _ = model_specs(config)
    pre_query = pre_query_of(config, generator)
    prompts = [p for call in instruction_calls for p in call[0]]
    params = [p for call in instruction_calls for p in call[1]]
    assert len(prompts) == 12
    assert [p.prompt_token_ids for p in prompts] == [pre_query.token_ids] * 12  # token-exact, one BOS
    assert {(p.n, p.temperature, p.top_p, p.max_tokens) for p in params} == {(1, 1.0, 1.0, 64)}
    assert all(p.stop_token_ids == pre_query.instruction_stop_ids for p in params)
    assert len({p.seed for p in params}) == len(params)
    response_params = [p for _, ps in response_calls for p in ps]
    assert {(p.n, p.temperature, p.max_tokens) for p in response_params} == {(3, 0.8, 32)}
    assert all(p.stop_token_ids == pre_query.response_stop_ids for p in response_params)
    train = result.dataset["train"]
    assert all(len(r) == 3 for r in train["responses"])
    assert {r for row in train["response_finish_reasons"] for r in row} <= {"stop", "length"}


def test_vllm_adapter_strips_the_stop_token_and_maps_finish_reasons(fake_vllm):
    from builder.engines import SamplingParams as Params

    llm = LLM("m")
    completions = vllm_engine.sample_vllm(llm, [[1, 2, 3]], [11, 12], Params(1.0, 1.0, 8, (999,)), num_samples=2)
    assert len(completions) == 2
    for c in completions:
        assert 999 not in c.token_ids
        assert (c.finish_reason == "length") == (len(c.token_ids) == 8)


def test_stop_strings_go_to_vllm_with_its_text_on(fake_vllm):
    from builder.engines import SamplingParams as Params

    llm = LLM("m")
    vllm_engine.sample_vllm(llm, [[1, 2, 3]], [11], Params(1.0, 1.0, 8, (999,)))
    vllm_engine.sample_vllm(llm, [[1, 2, 3]], [11], Params(1.0, 1.0, 8, (999,), ("### Response:",)))
    plain, with_text = [call[1][0] for call in llm.calls]
    assert plain.stop is None and plain.detokenize is False  # ids only: no text to check
    assert with_text.stop == ["### Response:"] and with_text.detokenize is True


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="`engine` is 'sglang'"):
        small_config(engine="sglang")


def test_vllm_label_scoring_sums_the_prompt_log_probabilities_of_each_label(fake_vllm):
    llm = LLM("m")
    prompts, labels = [[1, 2, 3], [4, 5]], [[7], [8, 9, 10]]
    scores = vllm_engine.continuation_logprobs_vllm(llm, prompts, labels)
    for prompt, row in zip(prompts, scores):
        for label, score in zip(labels, row):
            sequence = prompt + label
            expected = sum(fake_logprob(sequence[:i], sequence[i]) for i in range(len(prompt), len(sequence)))
            assert score == pytest.approx(expected)
    (requests, params), *_ = llm.calls
    assert [r.prompt_token_ids for r in requests] == [p + c for p in prompts for c in labels]
    assert params[0].prompt_logprobs == 1 and params[0].max_tokens == 1 and params[0].detokenize is False


def test_build_with_tags_and_the_judge_reward_on_vllm(fake_vllm):
    config = small_config(engine="vllm", num_instructions=8, num_responses=2, tag_instructions=True, reward_judge=True)
    train = build(config).dataset["train"]
    (llm,) = LLM.instances  # the judge is the generator: the same engine
    assert any(p.prompt_logprobs == 1 for _, params in llm.calls for p in params)
    assert all(label in ("very easy", "easy", "medium", "hard", "very hard") for label in train["difficulty"])
    assert all(1 <= r <= 10 for row in train["rewards"] for r in row)


def test_the_engine_is_shut_down_before_the_reward_model_loads(fake_vllm, monkeypatch):
    from builder import models

    seen = []
    load = models.load_reward_model

    def watching(spec, rank=None):
        seen.append([llm.shut_down for llm in LLM.instances])
        return load(spec, rank)

    monkeypatch.setattr(models, "load_reward_model", watching)
    monkeypatch.setattr("builder.stages.rewards.load_reward_model", watching)
    config = small_config(engine="vllm", num_instructions=8, num_responses=2)
    build(config)
    (llm,) = LLM.instances
    assert seen and all(states == [True] for states in seen)
    assert llm.kwargs["max_model_len"] == config.max_prompt_tokens + config.max_response_tokens
