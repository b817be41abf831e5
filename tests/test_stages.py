import math

import pytest

from builder import scoring, stages
from builder.build import build, model_specs, pre_query_of
from builder.generation import SamplingParams
from builder.models import ModelSpec, load_reward_model
from conftest import small_config

GENERATOR = ModelSpec("tiny:chat-llama-3.1")
ARMO = ModelSpec("tiny:reward-armo", trust_remote_code=True)


def instruction_batch(config, count=6):
    generator, _ = model_specs(config)
    pre_query = pre_query_of(config, generator)
    settings = stages.InstructionSettings(
        tuple(pre_query.token_ids), pre_query.text,
        SamplingParams(1.0, 1.0, config.max_instruction_tokens, tuple(pre_query.instruction_stop_ids)), config.seed,
        "local")
    batch = {"uuid": stages.make_uuids(config.seed, count)}
    return batch | stages.generate_instructions(batch, None, generator=generator, settings=settings)


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


def test_tag_instruction_reasons():
    batch = {
        "instruction": ["", "Write a poem.", "Write a poem about " + "the sea " * 40, "Explain it."],
        "instruction_finish_reason": ["stop", "length", "stop", "stop"],
    }
    out = stages.tag_instruction(batch, generator=GENERATOR, day="2024-07-26", max_prompt_tokens=100)
    assert out["drop_reason"] == ["empty", "truncated", "prompt_too_long", ""]
    assert out["prompt_tokens"][3] == len(out["prompt_token_ids"][3]) < 100
    assert out["prompt_tokens"][2] > 100


def test_mark_duplicates_after_normalisation():
    texts = ["Write a poem.", "write  a POEM", "Write a poem!", "Other", "Other", "Write a poem."]
    reasons = ["", "", "", "truncated", "", ""]
    assert stages.mark_duplicates(texts, reasons) == ["", "duplicate", "duplicate", "truncated", "", "duplicate"]


def test_response_stage_shares_prefill_and_records_configs():
    batch = {"uuid": ["a", "b"], "prompt_token_ids": [[1016, 5, 6, 7], [1016, 9]]}
    settings = stages.ResponseSettings(SamplingParams(0.8, 1.0, 12, (1022,)), 3, seed=1, generator_revision="local")
    out = stages.generate_responses(batch, None, generator=GENERATOR, settings=settings)
    assert [len(r) for r in out["responses"]] == [3, 3]
    assert all(len(r) == 3 for r in out["response_finish_reasons"] + out["response_tokens"])
    assert out["gen_response_configs"][0]["num_responses"] == 3
    assert out["gen_response_configs"][0]["temperature"] == 0.8


@pytest.mark.parametrize("reward", [ModelSpec("tiny:reward"), ARMO])
def test_reward_stage_with_both_model_kinds(reward):
    batch = {"instruction": ["Write a poem.", "Explain gravity."],
             "responses": [["Roses are red.", "No.", "A poem"], ["Mass attracts mass.", "It pulls.", "?"]]}
    settings = stages.RewardSettings(None, 4, "2024-07-26")
    out = stages.score_responses(batch, None, reward=reward, settings=settings)
    assert [len(r) for r in out["rewards"]] == [3, 3]
    flat = [r for row in out["rewards"] for r in row]
    assert all(math.isfinite(r) for r in flat) and len(set(flat)) == 6
    assert out["reward_inputs_truncated"] == [0, 0]
    # Batching does not change a score.
    one = stages.score_responses({"instruction": ["Write a poem."], "responses": [["No."]]}, None, reward=reward,
                                 settings=stages.RewardSettings(None, 1, "2024-07-26"))
    assert one["rewards"][0][0] == pytest.approx(out["rewards"][0][1], abs=1e-4)


def test_reward_inputs_longer_than_the_limit_are_truncated_and_counted():
    batch = {"instruction": ["Write a poem."], "responses": [["short", "long " * 200]]}
    out = stages.score_responses(batch, None, reward=ARMO, settings=stages.RewardSettings(80, 4, "2024-07-26"))
    assert out["reward_inputs_truncated"] == [1]  # the short one, with its system block, fits in 80


def test_padding_never_moves_the_read_position():
    # Sequences that end with the pad id (EOS used as pad) only share a batch with sequences of their length.
    token_ids = [[1, 2, 9], [1, 9], [1, 2, 3, 4], [5, 9], [1, 2]]
    batches = scoring.reward_batches(token_ids, pad_token_id=9, batch_size=8)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for batch in batches:
        if any(token_ids[i][-1] == 9 for i in batch):
            assert len({len(token_ids[i]) for i in batch}) == 1


def test_custom_code_reward_model_needs_the_opt_in():
    with pytest.raises(ValueError, match="own code.*reward_trust_remote_code: true"):
        load_reward_model(ModelSpec("tiny:reward-armo"))


def scored(reward_name, responses):
    batch = {"instruction": ["Write a poem."] * len(responses), "responses": responses}
    spec = ModelSpec(f"tiny:{reward_name}", trust_remote_code=True)
    return batch | stages.score_responses(batch, None, reward=spec,
                                          settings=stages.RewardSettings(None, 8, "2024-07-26"))


def binarize_reasons(batch, margin=0.0):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return [stages.binarize_example(r, min_reward_margin=margin, implicit_prompt=False)["drop_reason"] for r in rows]


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
    example = {"instruction": "Q", "responses": ["low", "high", "mid", "high2"], "rewards": [0.1, 0.9, 0.5, 0.9]}
    out = stages.binarize_example(example, min_reward_margin=0.0, implicit_prompt=False)
    assert out["drop_reason"] == ""
    assert out["prompt"] == [{"role": "user", "content": "Q"}]
    assert out["chosen"] == [{"role": "assistant", "content": "high"}]  # first of the tied best
    assert out["rejected"] == [{"role": "assistant", "content": "low"}]
    assert (out["chosen_score"], out["rejected_score"]) == (0.9, 0.1)
    assert out["reward_margin"] == pytest.approx(0.8)
    implicit = stages.binarize_example(example, min_reward_margin=0.0, implicit_prompt=True)
    assert "prompt" not in implicit
    assert implicit["chosen"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "high"}]
    assert stages.binarize_example(example, min_reward_margin=0.9, implicit_prompt=False)["drop_reason"] \
        == "margin_below_min"
    same = {"instruction": "Q", "responses": ["x", "x", "x"], "rewards": [0.1, 0.2, 0.3]}
    assert stages.binarize_example(same, min_reward_margin=0.0, implicit_prompt=False)["drop_reason"] \
        == "fewer_than_two_distinct_responses"


def test_every_row_is_accounted_for_in_a_build_with_drops():
    config = small_config(generator_model="tiny:chat-llama-3", num_instructions=60, max_instruction_tokens=30,
                          max_prompt_tokens=30, min_reward_margin=0.05)
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
    with pytest.raises(ValueError, match="No rows survived the instruction filters.*prompt_too_long"):
        build(config)


def test_shared_prefix_scoring_equals_whole_sequence_scoring(monkeypatch):
    model, tokenizer = load_reward_model(ModelSpec("tiny:reward"))
    assert scoring.shares_prefix(model)
    roots = []
    shared_prefix = scoring.shared_prefix
    monkeypatch.setattr(scoring, "shared_prefix", lambda *a, **k: roots.append(shared_prefix(*a, **k)) or roots[-1])

    def prompt(text):
        # Every prompt starts with the same system block: that root prefix runs once for all groups.
        return tokenizer("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
                         f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False).input_ids

    def answers(ids, texts):
        return [ids + tokenizer(text + "<|eot_id|>", add_special_tokens=False).input_ids for text in texts]

    # Prefixes of different lengths and suffixes of different lengths, mixed across groups in batches of 3.
    groups = [answers(prompt("Write a poem about the sea and the sky"),
                      ("Waves.", "The sea is wide and the sky is blue.", "No", "Blue, blue, blue")),
              answers(prompt("Hi"), ("Hello there, how can I help you today?", "Hey", "Hi!"))]
    whole = [scoring.score_sequences(model, group, tokenizer.pad_token_id, batch_size=1) for group in groups]
    shared = scoring.score_with_shared_prefixes(model, groups, tokenizer.pad_token_id, batch_size=3)
    assert [len(s) for s in shared] == [4, 3]
    assert roots[0] is not None and roots[0].length >= scoring.MIN_SHARED_PREFIX
    for got, expected in zip(shared, whole):
        assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 4) for v in whole[0] + whole[1]}) == 7  # the scores differ, so a mix-up would show
    assert scoring.score_groups(model, [groups[0], groups[0][:2]], tokenizer.pad_token_id, 8) == \
        [pytest.approx(whole[0], abs=1e-4), pytest.approx(whole[0][:2], abs=1e-4)]
    armo, _ = load_reward_model(ARMO)
    assert not scoring.shares_prefix(armo)  # custom code reads its gating features off the whole input
