import math

import pytest

from builder.build import build, model_specs, pre_query_of
from builder.engines import SamplingParams
from builder.models import ModelSpec, load_reward_model
from builder.sources import magpie
from builder.stages import filters, pairs, responses, rewards

from conftest import small_config


GENERATOR = ModelSpec("tiny:chat-llama-3.1")
ARMO = ModelSpec("tiny:reward-armo", trust_remote_code=True)


def instruction_batch(config, count=6):
    generator, _ = model_specs(config)
    pre_query = pre_query_of(config, generator)
    settings = magpie.InstructionSettings(
        tuple(pre_query.token_ids),
        pre_query.text,
        SamplingParams(1.0, 1.0, config.max_instruction_tokens, tuple(pre_query.instruction_stop_ids)),
        config.seed,
        "local",
    )
    batch = {"uuid": magpie.make_uuids(config.seed, count)}
    return batch | magpie.generate_instructions(batch, None, generator=generator, settings=settings)


def test_instruction_stage_columns_and_configs():
    config = small_config(max_instruction_tokens=8)
    out = instruction_batch(config, count=16)
    assert len(out["instruction"]) == 16 and len(set(out["uuid"])) == 16
    assert set(out["instruction_finish_reason"]) <= {"stop", "length"}
    assert all(t <= 8 for t in out["instruction_tokens"])
    assert "length" in out["instruction_finish_reason"]  # cap 8 with ~3% stop chance per token
    gen_config = out["gen_input_configs"][0]
    assert gen_config["input_generator"] == "tiny:chat-llama-3.1"
    assert gen_config["pre_query_template"].endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert (gen_config["temperature"], gen_config["top_p"], gen_config["seed"]) == (1.0, 1.0, config.seed)
    assert out["prompt"] == [[{"role": "user", "content": text}] for text in out["instruction"]]


def user(text):
    return [{"role": "user", "content": text}]


def test_prompt_filter_reasons():
    texts = ["", "Write a poem.", "Write a poem about " + "the sea " * 40, "Explain it."]
    batch = {
        "instruction": texts,
        "instruction_finish_reason": ["stop", "length", "stop", "stop"],
        "prompt": [user(t) for t in texts],
    }
    settings = filters.PromptFilterSettings(max_prompt_tokens=100, day="2024-07-26")
    out = filters.filter_prompts(batch, generator=GENERATOR, settings=settings)
    assert out["drop_reason"] == ["empty", "truncated", "prompt_too_long", ""]
    assert out["prompt_tokens"][2] > 100 > out["prompt_tokens"][3] > 0


def test_mark_duplicates_after_normalisation():
    texts = ["Write a poem.", "write  a POEM", "Write a poem!", "Other", "Other", "Write a poem."]
    assert filters.mark_duplicates([user(t) for t in texts]) == [
        "",
        "duplicate",
        "duplicate",
        "",
        "duplicate",
        "duplicate",
    ]
    # A prompt is all its messages: the same question under another system prompt is another prompt.
    system = [{"role": "system", "content": "Answer in French."}, *user("Write a poem.")]
    assert filters.mark_duplicates([user("Write a poem."), system, list(system)]) == ["", "", "duplicate"]


def test_response_stage_shares_prefill_and_records_configs():
    batch = {"uuid": ["a", "b"], "prompt": [user("Write a poem."), user("Hi")]}
    settings = responses.ResponseSettings(
        SamplingParams(0.8, 1.0, 12, (1022,)), 3, seed=1, generator_revision="local", day="2024-07-26"
    )
    out = responses.generate_responses(batch, None, generator=GENERATOR, settings=settings)
    assert [len(r) for r in out["responses"]] == [3, 3]
    assert all(len(r) == 3 for r in out["response_finish_reasons"] + out["response_tokens"])
    assert out["gen_response_configs"][0]["num_responses"] == 3
    assert out["gen_response_configs"][0]["temperature"] == 0.8


@pytest.mark.parametrize("reward", [ModelSpec("tiny:reward"), ARMO])
def test_reward_stage_with_both_model_kinds(reward):
    batch = {
        "prompt": [user("Write a poem."), user("Explain gravity.")],
        "responses": [["Roses are red.", "No.", "A poem"], ["Mass attracts mass.", "It pulls.", "?"]],
    }
    settings = rewards.RewardSettings(None, "2024-07-26", "local")
    out = rewards.score_responses(batch, None, reward=reward, settings=settings, batch_size=4)
    assert [len(r) for r in out["rewards"]] == [3, 3]
    flat = [r for row in out["rewards"] for r in row]
    assert all(math.isfinite(r) for r in flat) and len(set(flat)) == 6
    assert out["reward_inputs_truncated"] == [0, 0]
    # Batching does not change a score.
    one = rewards.score_responses(
        {"prompt": [user("Write a poem.")], "responses": [["No."]]},
        None,
        reward=reward,
        settings=settings,
        batch_size=1,
    )
    assert one["rewards"][0][0] == pytest.approx(out["rewards"][0][1], abs=1e-4)


def test_reward_inputs_longer_than_the_limit_are_truncated_and_counted():
    batch = {"prompt": [user("Write a poem.")], "responses": [["short", "long " * 200]]}
    out = rewards.score_responses(batch, None, reward=ARMO, settings=rewards.RewardSettings(80, "2024-07-26", "local"))
    assert out["reward_inputs_truncated"] == [1]  # the short one, with its system block, fits in 80


def test_custom_code_reward_model_needs_the_opt_in():
    with pytest.raises(ValueError, match="own code.*reward_trust_remote_code: true"):
        load_reward_model(ModelSpec("tiny:reward-ties"))


def scored(reward_name, responses):
    batch = {"prompt": [user("Write a poem.")] * len(responses), "responses": responses}
    spec = ModelSpec(f"tiny:{reward_name}", trust_remote_code=True)
    return batch | rewards.score_responses(
        batch, None, reward=spec, settings=rewards.RewardSettings(None, "2024-07-26", "local")
    )


def binarize_reasons(batch, margin=0.0):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    settings = pairs.BinarizeSettings(min_reward_margin=margin, implicit_prompt=False)
    return [pairs.binarize_example(r, settings=settings)["drop_reason"] for r in rows]


def test_binarize_drops_ties_from_a_constant_reward_model():
    batch = scored("reward-ties", [["a", "b", "c"], ["d", "e", "f"]])
    assert batch["rewards"] == [[0.5] * 3] * 2
    assert binarize_reasons(batch) == ["all_rewards_equal"] * 2


def test_binarize_drops_nan_rewards():
    # The NaN fixture returns NaN for odd-length inputs: among these responses some are, some are not.
    batch = scored("reward-nan", [["a", "ab", "abc"], ["abcd", "x y", "z"]])
    has_nan = [any(math.isnan(r) for r in row) for row in batch["rewards"]]
    assert any(has_nan)
    assert [r == "nan_reward" for r in binarize_reasons(batch)] == has_nan


def test_binarize_choice_and_other_drop_reasons():
    example = {"prompt": user("Q"), "responses": ["low", "high", "mid", "high2"], "rewards": [0.1, 0.9, 0.5, 0.9]}
    explicit = pairs.BinarizeSettings(min_reward_margin=0.0, implicit_prompt=False)
    out = pairs.binarize_example(example, settings=explicit)
    assert out["drop_reason"] == ""
    assert out["chosen"] == [{"role": "assistant", "content": "high"}]  # first of the tied best
    assert out["rejected"] == [{"role": "assistant", "content": "low"}]
    assert (out["chosen_score"], out["rejected_score"]) == (0.9, 0.1)
    assert out["reward_margin"] == pytest.approx(0.8)
    implicit = pairs.binarize_example(example, settings=pairs.BinarizeSettings(0.0, implicit_prompt=True))
    assert implicit["chosen"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "high"}]
    assert (
        pairs.binarize_example(example, settings=pairs.BinarizeSettings(0.9, False))["drop_reason"]
        == "margin_below_min"
    )
    same = {"prompt": user("Q"), "responses": ["x", "x", "x"], "rewards": [0.1, 0.2, 0.3]}
    assert pairs.binarize_example(same, settings=explicit)["drop_reason"] == "fewer_than_two_distinct_responses"


def test_a_multi_message_prompt_is_answered_and_scored_as_the_whole_conversation(monkeypatch):
    # The row contract: responses render `prompt` and rewards render `prompt` + the response, whatever it holds.
    from builder.models import load_tokenizer
    from builder.templates import render_chat

    conversation = [
        {"role": "system", "content": "Be brief."},
        *user("Name a colour."),
        {"role": "assistant", "content": "Blue."},
        *user("Another one?"),
    ]
    fed = []
    sample = responses.sample_completions
    monkeypatch.setattr(
        responses,
        "sample_completions",
        lambda spec, rank, prompts, *a, **k: fed.append(prompts) or sample(spec, rank, prompts, *a, **k),
    )
    settings = responses.ResponseSettings(
        SamplingParams(0.8, 1.0, 6, (1022,)), 2, seed=1, generator_revision="local", day="2024-07-26"
    )
    out = responses.generate_responses(
        {"uuid": ["a", "b"], "prompt": [conversation, user("Another one?")]},
        None,
        generator=GENERATOR,
        settings=settings,
    )
    assert [len(r) for r in out["responses"]] == [2, 2]
    tokenizer = load_tokenizer(GENERATOR)
    text = render_chat(tokenizer, conversation, add_generation_prompt=True, day="2024-07-26")
    assert "Be brief." in text and "Blue." in text
    assert fed[0][0] == tokenizer(text, add_special_tokens=False)["input_ids"]  # the whole conversation, one BOS
    assert len(fed[0][0]) > len(fed[0][1])
    scored = rewards.score_responses(
        {"prompt": [conversation, user("Another one?")], "responses": [["Red."], ["Red."]]},
        None,
        reward=ModelSpec("tiny:reward"),
        settings=rewards.RewardSettings(None, "2024-07-26", "local"),
    )
    assert scored["rewards"][0] != scored["rewards"][1]
    chosen = pairs.binarize_example(
        {"prompt": conversation, "responses": ["a", "b"], "rewards": [1.0, 0.0]},
        settings=pairs.BinarizeSettings(0.0, implicit_prompt=True),
    )["chosen"]
    assert chosen == [*conversation, {"role": "assistant", "content": "a"}]


def test_every_row_is_accounted_for_in_a_build_with_drops():
    config = small_config(
        generator_model="tiny:chat-llama-3",
        num_instructions=60,
        max_instruction_tokens=30,
        max_prompt_tokens=30,
        min_reward_margin=0.05,
    )
    result = build(config)
    ledger = result.ledger
    for record in ledger.stages:
        assert record.rows_in == record.rows_out + sum(record.drops.values()), record
    for earlier, later in zip(ledger.stages, ledger.stages[1:]):
        assert later.rows_in == earlier.rows_out
    drops = ledger.drops()
    assert drops.get("truncated", 0) > 0 and drops.get("prompt_too_long", 0) > 0
    assert drops.get("margin_below_min", 0) > 0
    total = sum(len(split) for split in result.dataset.values())
    assert total == ledger.get("binarize").rows_out == config.num_instructions - sum(drops.values())
    for row in result.dataset["train"]:
        assert row["reward_margin"] >= 0.05
        assert row["chosen_score"] == max(row["rewards"]) and row["rejected_score"] == min(row["rewards"])
        assert row["prompt_tokens"] <= 30


def test_a_build_where_every_instruction_is_dropped_says_why():
    config = small_config(generator_model="tiny:chat-llama-3", max_prompt_tokens=2)
    with pytest.raises(
        ValueError, match="No rows survived the filter stage.*prompt_too_long.*raise max_instruction_tokens"
    ):
        build(config)
