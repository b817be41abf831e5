import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder.engines.transformers.generation import (
    SamplingParams,
    counter_uniform,
    inverse_cdf,
    prefill,
    sample,
    sample_next_tokens,
    shared_prefix,
    splitmix64,
)


MASK = (1 << 64) - 1


def reference_splitmix64(x: int) -> int:
    x &= MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_splitmix64_matches_the_unsigned_reference():
    values = [0, 1, 42, -1, -(1 << 63), (1 << 63) - 1, 123456789123456789]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & MASK for g in got] == [reference_splitmix64(v) for v in values]


def test_counter_uniform_is_uniform_and_a_pure_function():
    seeds = torch.arange(20000, dtype=torch.int64)
    u = counter_uniform(seeds, step=5)
    assert u.shape == (20000,) and bool(((u > 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12**-0.5) < 0.01
    assert torch.equal(u[7:8], counter_uniform(torch.tensor([7]), 5))  # a row does not depend on its batch
    assert not torch.equal(u, counter_uniform(seeds, 6))


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    params = SamplingParams(1.0, 1.0, 1, ())
    draws = torch.cat([sample_next_tokens(logits, torch.tensor([s]), 0, params) for s in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seeds = range(300)
    nucleus = SamplingParams(1.0, 0.7, 1, ())
    picked = {sample_next_tokens(logits, torch.tensor([s]), 0, nucleus).item() for s in seeds}
    assert picked == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.2 is cut
    greedy = SamplingParams(0.0, 1.0, 1, ())
    assert sample_next_tokens(logits, torch.tensor([9]), 0, greedy).item() == 0


def test_two_level_inverse_cdf_draws_what_one_cumulative_sum_draws():
    torch.manual_seed(0)
    for vocab in (3, 128, 1000, 8192):  # below, at and off a multiple of the block
        weights = torch.rand(64, vocab) ** 4
        weights[:, ::5] = 0.0  # tokens of weight 0 (filtered, or -inf logits) are never drawn
        for step in range(20):
            u = counter_uniform(torch.arange(64) * 7919, step)
            cdf = weights.double().cumsum(-1)
            reference = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1)
            drawn = inverse_cdf(weights, u)
            assert bool((drawn % 5 != 0).all()) and bool((drawn < vocab).all())
            # Float32 block sums against a float64 running sum: a draw may differ only at a rounding boundary.
            assert (drawn != reference).sum().item() <= 1, (vocab, step)
        # At the top of the range the target is the total itself, which the last block's running sum may miss by a
        # rounding error: the draw is still a token of positive weight, inside the vocabulary.
        top = inverse_cdf(weights, torch.full((64,), 1 - 2.0**-53, dtype=torch.float64))
        assert bool((top % 5 != 0).all()) and bool((top < vocab).all())


def test_sampling_leaves_the_callers_logits_unless_told():
    logits = torch.randn(4, 300)
    kept = logits.clone()
    params = SamplingParams(0.7, 1.0, 1, ())
    first = sample_next_tokens(logits, torch.arange(4), 3, params)
    assert torch.equal(logits, kept)
    assert torch.equal(sample_next_tokens(logits, torch.arange(4), 3, params, overwrite=True), first)
    assert not torch.equal(logits, kept)  # used as the work buffer


def load(tiny_model):
    path = tiny_model("chat-llama-3")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_rows_do_not_depend_on_their_batch(tiny_model):
    model, tokenizer = load(tiny_model)
    params = SamplingParams(1.0, 1.0, 24, (tokenizer.convert_tokens_to_ids("<|eot_id|>"),))
    prompts = [tokenizer("Write a poem about the ocean").input_ids, tokenizer("Hi").input_ids]
    together = sample(model, prompts, [11, 22], params, pad_token_id=tokenizer.pad_token_id)
    alone = [
        sample(model, [p], [s], params, pad_token_id=tokenizer.pad_token_id)[0] for p, s in zip(prompts, [11, 22])
    ]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_shared_prefill_equals_separate_prompts(tiny_model):
    model, tokenizer = load(tiny_model)
    params = SamplingParams(0.8, 1.0, 16, (tokenizer.convert_tokens_to_ids("<|eot_id|>"),))
    prompt = tokenizer("Explain the steps").input_ids
    shared = sample(model, [prompt], [1, 2, 3], params, num_samples=3, pad_token_id=tokenizer.pad_token_id)
    separate = sample(model, [prompt] * 3, [1, 2, 3], params, pad_token_id=tokenizer.pad_token_id)
    assert [c.token_ids for c in shared] == [c.token_ids for c in separate]
    assert len({tuple(c.token_ids) for c in shared}) > 1  # different seeds, different samples


def test_stop_and_length_finish_reasons(tiny_model):
    model, tokenizer = load(tiny_model)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt = tokenizer("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=True).input_ids
    capped = sample(
        model,
        [prompt],
        list(range(40)),
        SamplingParams(1.0, 1.0, 3, (eot,)),
        num_samples=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    for c in capped:
        assert eot not in c.token_ids
        assert (c.finish_reason == "length" and len(c.token_ids) == 3) or (
            c.finish_reason == "stop" and len(c.token_ids) < 3
        )
    assert {c.finish_reason for c in capped} == {"stop", "length"}


def test_a_stop_string_ends_the_sample_where_its_text_is_completed(tiny_model):
    from builder.engines.protocol import StopText, completion_text

    model, tokenizer = load(tiny_model)
    prompt = tokenizer("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=True).input_ids
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    free = sample(model, [prompt], [7], SamplingParams(1.0, 1.0, 24, (eot,)), pad_token_id=tokenizer.pad_token_id)[0]
    assert len(free.token_ids) >= 6
    # A stop string made of the text of the sample's 4th and 5th tokens: the text before it is what is kept.
    head = tokenizer.decode(free.token_ids[:3])
    stop = tokenizer.decode(free.token_ids[:5])[len(head) :]
    params = SamplingParams(1.0, 1.0, 24, (eot,), (stop,))
    stopped = sample(
        model, [prompt], [7], params, pad_token_id=tokenizer.pad_token_id, stop_text=StopText(tokenizer, [stop])
    )[0]
    full = tokenizer.decode(free.token_ids, skip_special_tokens=True)
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) <= 5
    assert stopped.finish_reason == "stop"
    text, reason = completion_text(tokenizer, stopped, (stop,))
    assert text == full[: full.index(stop)].strip() and reason == "stop"
    # The engine need not notice for the text to be right: the same cut applies to a sample that ran on.
    assert completion_text(tokenizer, free, (stop,)) == (text, "stop")


def test_continuous_batching_gives_the_same_samples_at_every_batch_size(tiny_model, monkeypatch):
    # Batch size 1 decodes every sample alone; 4 keeps refilling freed rows (prompts of different lengths join a
    # running batch); 64 takes everything at once and retires finished rows.
    from builder.engines.transformers import generation

    compactions = []
    reserve = generation.SlotCache.reserve_column

    def counting_reserve(cache, live_rows):
        compactions.append(cache.length == cache.columns)  # the write column reached the end: dead columns go
        reserve(cache, live_rows)

    monkeypatch.setattr(generation.SlotCache, "reserve_column", counting_reserve)
    moved = []
    move = generation.SlotCache.move_rows

    def counting_move(cache, sources, targets):
        assert all(t < s for s, t in zip(sources.tolist(), targets.tolist()))  # live rows move into free rows below
        moved.append(len(sources))
        move(cache, sources, targets)

    monkeypatch.setattr(generation.SlotCache, "move_rows", counting_move)
    model, tokenizer = load(tiny_model)
    params = SamplingParams(1.0, 1.0, 40, (tokenizer.convert_tokens_to_ids("<|eot_id|>"),))
    prompts = [
        tokenizer(text).input_ids
        for text in (
            "Hi",
            "Write a poem about the ocean and the sky, please",
            "Explain",
            "Tell me a long story about dragons",
            "Why?",
        )
    ]
    seeds = list(range(100, 115))
    runs = [
        sample(model, prompts, seeds, params, num_samples=3, pad_token_id=tokenizer.pad_token_id, max_batch_size=size)
        for size in (1, 4, 64)
    ]
    assert [c.token_ids for c in runs[1]] == [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[2]]
    assert [c.finish_reason for c in runs[1]] == [c.finish_reason for c in runs[0]]
    lengths = {len(c.token_ids) for c in runs[0]}
    assert min(lengths) < 20 and max(lengths) == 40  # ragged: rows finish at different steps
    assert any(compactions), "the column compaction ran and changed nothing"
    assert moved, "retiring finished rows moved live rows into their place and changed nothing"


def test_the_slot_cache_is_one_zeroed_block_from_the_first_prompt(tiny_model, monkeypatch):
    # Memory that does not depend on how far a shard got: every layer's keys and values are views of one block,
    # written in full (zeros) when the first prompt is copied in, not page by page as the write column advances.
    from builder.engines.transformers import generation

    seen = []
    fill = generation.SlotCache.fill_rows

    def first_fill(cache, rows, source, *args, **kwargs):
        fresh = not cache.layers[0].is_initialized
        fill(cache, rows, source, *args, **kwargs)
        if fresh:
            seen.append(
                [
                    (
                        layer.key_buffer.clone(),
                        layer.value_buffer.clone(),
                        layer.key_buffer.untyped_storage(),
                        cache.mask.clone(),
                    )
                    for layer in cache.layers
                ]
            )

    monkeypatch.setattr(generation.SlotCache, "fill_rows", first_fill)
    model, tokenizer = load(tiny_model)
    params = SamplingParams(1.0, 1.0, 8, (tokenizer.convert_tokens_to_ids("<|eot_id|>"),))
    sample(
        model, [tokenizer("Hi there").input_ids], [1, 2], params, num_samples=2, pad_token_id=tokenizer.pad_token_id
    )
    (layers,) = seen
    assert len(layers) == model.config.num_hidden_layers
    assert len({storage.data_ptr() for _, _, storage, _ in layers}) == 1  # one allocation for all layers
    block_bytes = layers[0][2].nbytes()
    assert block_bytes == sum(keys.nbytes + values.nbytes for keys, values, _, _ in layers)
    for keys, values, _, mask in layers:
        outside = ~mask[:, None, :, None].expand_as(keys)  # columns no prompt token was copied to
        assert bool((keys[outside] == 0).all()) and bool((values[outside] == 0).all())
        assert bool((keys[~outside] != 0).any())  # the prompts' keys are there


def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_shared_prefix_runs_once_and_matches_a_full_recompute(monkeypatch):
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from builder.engines.transformers import generation

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    ).eval()
    prefix = [1, 5, 9, 3, 4, 4, 8]
    prompts = [prefix + [2], prefix + [7, 7, 7, 7, 7, 8, 9, 10], prefix + [3, 11], prefix + [6, 6, 6, 6]]
    expected = [greedy_without_cache(model, p, 12) for p in prompts]
    widths = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[-1])
        return forward(*args, **kwargs)

    model.forward = spy
    cascade_steps = []
    cascade = generation.cascade_attention

    def cascade_spy(module, query, key, *args, **kwargs):
        if generation._decode_prefix.get() is not None:
            cascade_steps.append(key.shape[-2])  # the columns of the slot cache a decode step reads
        return cascade(module, query, key, *args, **kwargs)

    AttentionInterface.register(generation.CASCADE_ATTENTION, cascade_spy)
    # Batch 3 with 4 prompts: a refill joins a running batch.
    got = sample(model, prompts, [0, 1, 2, 3], SamplingParams(0.0, 1.0, 12, ()), max_batch_size=3)
    assert [c.token_ids for c in got] == expected
    # The shared prefix once, then every prompt's own tokens in one pass (shortest first, padded to the longest).
    assert [w for w in widths if w > 1] == [len(prefix), 8]
    # Decode steps read the prefix once (cascade attention); the slot cache holds the prompts' own tokens only.
    assert cascade_steps and max(cascade_steps) <= 8 + 12
    assert model.config._attn_implementation == "sdpa"  # switched back
    # Eager attention cannot switch: the prefix is copied into every row instead, with the same result.
    model.set_attn_implementation("eager")
    cascade_steps.clear()
    got = sample(model, prompts, [0, 1, 2, 3], SamplingParams(0.0, 1.0, 12, ()), max_batch_size=3)
    assert [c.token_ids for c in got] == expected and not cascade_steps
    model.set_attn_implementation("sdpa")
    AttentionInterface.register(generation.CASCADE_ATTENTION, cascade)
    # Prefill passes of at most 4 padded tokens: the prompts are staged in several passes, as refills need them.
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 4)
    widths.clear()
    got = sample(model, prompts, [0, 1, 2, 3], SamplingParams(0.0, 1.0, 12, ()), max_batch_size=3)
    assert [c.token_ids for c in got] == expected
    assert widths[0] == len(prefix) and sorted(w for w in widths[1:] if w > 1) == [2, 4, 8]
    model.forward = forward

    # The prefilled keys, values and logits themselves: right-aligned, they equal a prefill of the whole prompts.
    shared = shared_prefix(model, prompts)
    with torch.no_grad():
        on_prefix, logits = prefill(model, [p[len(prefix) :] for p in prompts], 0, shared)
        whole, whole_logits = prefill(model, prompts, 0)
    assert shared.length == len(prefix)
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(on_prefix.layers, whole.layers):
        for p, prompt in enumerate(prompts):
            # Left of the prompt: padding, zeros (no reader relies on what a kernel does with masked values).
            assert not a.key_buffer[p, :, : a.key_buffer.shape[2] - len(prompt)].any()
            assert not a.value_buffer[p, :, : a.value_buffer.shape[2] - len(prompt)].any()
            columns = slice(-len(prompt), None)
            torch.testing.assert_close(a.key_buffer[p, :, columns], b.key_buffer[p, :, columns], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                a.value_buffer[p, :, columns], b.value_buffer[p, :, columns], atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("value_dim", [16, 12])  # 12: value heads smaller than query heads, as MLA models have
@pytest.mark.parametrize("masked", [True, False])
def test_cascade_attention_equals_attention_over_the_prefix_copied_into_every_row(masked, value_dim):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from builder.engines.transformers.generation import SharedPrefix, _decode_prefix, cascade_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, own, length = 5, 8, 2, 16, 9, 6
    module = SimpleNamespace(layer_idx=1, num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, value_dim)
    prefix = SharedPrefix(
        length, [(None, None), (torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, value_dim))]
    )
    # Rows see their last 9, 4, 1, 7 and 2 own columns (left padding of a continuous batch).
    mask = torch.arange(own)[None, :] >= torch.tensor([0, 5, 8, 2, 7])[:, None]
    mask = mask[:, None, None, :] if masked else None
    token = _decode_prefix.set(prefix)
    try:
        got, _ = cascade_attention(module, query, keys, values, mask, scaling=0.3)
    finally:
        _decode_prefix.reset(token)
    prefix_keys, prefix_values = prefix.layers[1]
    full_mask = None if mask is None else torch.cat([torch.ones(batch, 1, 1, length, dtype=torch.bool), mask], -1)
    expected, _ = sdpa_attention_forward(
        module,
        query,
        torch.cat([prefix_keys.expand(batch, -1, -1, -1), keys], 2),
        torch.cat([prefix_values.expand(batch, -1, -1, -1), values], 2),
        full_mask,
        scaling=0.3,
    )
    assert got.shape == expected.shape == (batch, 1, heads, value_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Outside a decode step it is plain SDPA.
    plain, _ = cascade_attention(module, query, keys, values, mask, scaling=0.3)
    torch.testing.assert_close(plain, sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)[0])


def test_sliding_window_attention_matches_a_full_recompute():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)

    def model_with(window):
        torch.manual_seed(0)
        return MistralForCausalLM(
            MistralConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=window,
                max_position_embeddings=128,
            )
        ).eval()

    prompts = [[1, 5, 9, 3], [2, 7, 7, 7, 7, 7, 8, 9, 10], [3]]
    model = model_with(5)
    got = sample(model, prompts, [0, 1, 2], SamplingParams(0.0, 1.0, 20, ()), max_batch_size=2)
    assert [c.token_ids for c in got] == [greedy_without_cache(model, p, 20) for p in prompts]
    # The window matters here: without it the model writes something else.
    assert [c.token_ids for c in got] != [greedy_without_cache(model_with(None), p, 20) for p in prompts]


def test_a_model_with_non_attention_cache_layers_is_refused_with_the_fix():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM(
        Qwen3NextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        )
    ).eval()
    with pytest.raises(ValueError, match="Qwen3NextForCausalLM has LinearAttentionLayer.*engine: vllm"):
        sample(model, [[1, 2, 3]], [0], SamplingParams(1.0, 1.0, 4, ()))


def test_hybrid_and_indexed_layers_are_refused_though_they_subclass_dynamic_layer():
    from transformers import LlamaConfig

    from builder.engines.transformers.generation import _attention_layers_sliding

    class HybridModel:
        config = LlamaConfig(num_hidden_layers=3, sliding_window=4)

    HybridModel.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    assert _attention_layers_sliding(HybridModel()) == [False, True, False]
    HybridModel.config.layer_types = ["full_attention", "hybrid", "indexed_attention"]
    with pytest.raises(ValueError, match="HybridModel has DynamicIndexedLayer, LinearAttentionAndFullAttentionLayer"):
        _attention_layers_sliding(HybridModel())


def test_the_next_calls_work_starts_in_this_calls_tail_and_is_taken_up(tiny_model, monkeypatch):
    # `then`: the next shard's completions fill the rows this shard's tail frees; the next call takes them up where
    # they stand, and gets what it would have got alone. Other work in the next call drops the carried batch.
    from builder.engines.transformers import generation

    model, tokenizer = load(tiny_model)
    params = SamplingParams(1.0, 1.0, 40, (tokenizer.convert_tokens_to_ids("<|eot_id|>"),))
    first = [tokenizer(t).input_ids for t in ("Hi", "Write a poem about the ocean", "Explain")]
    second = [tokenizer(t).input_ids for t in ("Tell me a long story about dragons", "Why?")]
    seeds_first, seeds_second = list(range(12)), list(range(50, 58))
    kw = dict(num_samples=4, pad_token_id=tokenizer.pad_token_id, max_batch_size=5)
    alone = [sample(model, first, seeds_first, params, **kw), sample(model, second, seeds_second, params, **kw)]
    assert generation._carried is None

    started = []
    submit = generation.ContinuousBatch.submit

    def counting_submit(batch, prompts, seeds, num_samples):
        started.append((id(batch), len(seeds)))
        return submit(batch, prompts, seeds, num_samples)

    monkeypatch.setattr(generation.ContinuousBatch, "submit", counting_submit)
    got_first = sample(model, first, seeds_first, params, then=(second, seeds_second), **kw)
    carried = generation._carried
    assert carried is not None and carried.jobs[0].seeds == seeds_second
    assert any(carried.generated[c] for c in carried.jobs[0].completions), "the second job's samples had started"
    got_second = sample(model, second, seeds_second, params, **kw)
    assert generation._carried is None
    assert [(b, n) for b, n in started] == [(id(carried), 12), (id(carried), 8)]  # one batch for both calls
    assert [c.token_ids for c in got_first] == [c.token_ids for c in alone[0]]
    assert [c.token_ids for c in got_second] == [c.token_ids for c in alone[1]]
    assert [c.finish_reason for c in got_second] == [c.finish_reason for c in alone[1]]

    # The next call asks for something else: the carried work is dropped and the call computes its own.
    sample(model, first, seeds_first, params, then=(second, seeds_second), **kw)
    other = sample(model, first, seeds_first, params, **kw)
    assert generation._carried is None
    assert [c.token_ids for c in other] == [c.token_ids for c in alone[0]]


def test_a_next_call_with_uneven_seeds_is_refused_and_nothing_is_carried(tiny_model):
    from builder.engines.transformers import generation

    model, tokenizer = load(tiny_model)
    params = SamplingParams(1.0, 1.0, 8, ())
    prompts = [tokenizer("Hi").input_ids, tokenizer("Why?").input_ids]
    with pytest.raises(
        ValueError,
        match=r"sample\(then=...\) needs the same number of seeds for every prompt: "
        r"got 3 for 2 prompts",
    ):
        sample(model, prompts, [1, 2], params, then=(prompts, [5, 6, 7]))
    assert generation._carried is None
    # An empty next call is no next call: nothing stays running.
    assert len(sample(model, prompts, [1, 2], params, then=([], []))) == 2
    assert generation._carried is None
