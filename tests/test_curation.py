"""Curation as Magpie did it: tags by label scoring, safety, language, near-duplicates, the selection, the judge reward,
and what the card shows of them."""

import json
import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset

from builder.build import build
from builder.cli import main as cli_main
from builder.config import BuildConfig
from builder.engines.transformers.continuations import continuation_logprobs
from builder.models import ModelSpec, load_generator, load_tokenizer
from builder.pipeline.stage import DROP_REASON, KEEP
from builder.stages import language, near_dedup, safety, select, tags
from builder.stages.filters import drop_exact_duplicates
from builder.stages.rewards import JudgeRewardSettings, judge_responses

from conftest import ROOT, small_config


DEMO_CURATED = str(ROOT / "dataset_scripts" / "demo_curated.yaml")
JUDGE = ModelSpec("tiny:chat-llama-3.1", device="cpu", dtype="float32")
CURATION = dict(
    tag_instructions=True,
    guard_model="tiny:guard",
    detect_language=True,
    near_dedup=True,
    embedding_model="tiny:embedder",
)


def reference_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt), from one plain forward pass over prompt + continuation."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(continuation))


def test_label_scoring_equals_scoring_each_label_on_its_own():
    model, tokenizer = load_generator(JUDGE)
    shared = "Annotate the query below with its task category and difficulty.\n\n## User query\n\n"
    texts = ["Write a poem.", "Explain how to compute the area of a triangle, step by step please.", "Hi"]
    prompts = [tags.chat_ids(tokenizer, shared + t, "2024-07-26", [tokenizer.bos_token_id]) for t in texts]
    labels = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in tags.label_texts("Difficulty", tags.DIFFICULTY.labels)
    ]
    labels.append(tokenizer("x", add_special_tokens=False)["input_ids"][:1])  # a one-token label
    # max_rows=7: chunks of one prompt, so the prefix shared by all and the chunking are both exercised.
    for max_rows in (7, 64):
        scores = continuation_logprobs(model, prompts, labels, tokenizer.pad_token_id, max_rows=max_rows)
        for prompt, row in zip(prompts, scores):
            expected = [reference_logprob(model, prompt, label) for label in labels]
            assert np.allclose(row, expected, atol=1e-4), (row, expected)


def tag_batch(instructions):
    settings = tags.TagSettings(tags.TAGS, "2024-07-26", "local")
    return tags.tag_instructions({"instruction": instructions}, None, judge=JUDGE, settings=settings, max_rows=16)


def test_every_row_gets_a_label_of_each_closed_set_with_a_probability_and_batches_change_nothing():
    instructions = ["Write a poem about the sea.", "Fix my python code.", "What is 2+2?", "Plan a trip to Rome."]
    together = tag_batch(instructions)
    for tag in tags.TAGS:
        assert len(together[tag.name]) == len(instructions)
        assert all(label in tag.labels for label in together[tag.name])
        assert all(0 < p <= 1 and p >= 1 / len(tag.labels) for p in together[f"{tag.name}_confidence"])
    alone = [tag_batch([text]) for text in instructions]
    for i, single in enumerate(alone):
        for tag in tags.TAGS:
            assert single[tag.name] == [together[tag.name][i]]
            assert math.isclose(
                single[f"{tag.name}_confidence"][0], together[f"{tag.name}_confidence"][i], abs_tol=1e-4
            )


def test_the_tag_is_the_most_likely_label_and_its_confidence_its_normalised_probability(monkeypatch):
    # Scores as the engine would return them: one row, the labels of every tag in order.
    sizes = [len(tag.labels) for tag in tags.TAGS]
    row = [-5.0] * sum(sizes)
    row[4] = -1.0  # Coding & Debugging
    row[sizes[0] + 3], row[sizes[0] + 2] = -2.0, -2.0 - math.log(3)  # hard, three times as likely as medium
    row[sizes[0] + sizes[1] + 4] = -0.5  # excellent
    monkeypatch.setattr(tags, "score_continuations", lambda *args, **kwargs: [row])
    out = tag_batch(["anything"])
    assert out["task_category"] == ["Coding & Debugging"]
    assert out["difficulty"] == ["hard"] and out["input_quality"] == ["excellent"]
    weights = [math.exp(v) for v in row[sizes[0] : sizes[0] + sizes[1]]]
    assert math.isclose(out["difficulty_confidence"][0], math.exp(-2.0) / sum(weights))


def test_the_judge_writes_magpies_short_texts_greedily_each_begun_as_magpies_were():
    from builder.engines import SamplingParams
    from builder.templates import response_stops

    tokenizer = load_tokenizer(JUDGE)
    stop, _ = response_stops(tokenizer, [tokenizer.eos_token_id], "judge", "2024-07-26")
    settings = tags.ExplanationSettings(SamplingParams(0.0, 1.0, 24, tuple(stop)), "2024-07-26", "local")
    batch = {"instruction": ["Write a poem about the sea.", "What is 2+2?"]}
    out = tags.explain_instructions(batch, None, judge=JUDGE, settings=settings)
    assert out["intent"][0].startswith("The user wants to") and out["knowledge"][1].startswith("To solve this problem")
    assert all(text.startswith("The query is") for text in out["quality_explanation"])
    assert all(0 <= n <= 3 for n in out["explanations_truncated"])
    assert tags.explain_instructions(batch, None, judge=JUDGE, settings=settings) == out  # greedy: the same text


def test_the_guard_prompt_is_the_real_llama_guard_3_template_with_one_bos():
    spec = ModelSpec("tiny:guard", device="cpu")
    tokenizer = load_tokenizer(spec)
    ids, text, categories = safety.guard_prompt(
        tokenizer, "How do I bake bread?", "2024-07-26", [tokenizer.bos_token_id]
    )
    assert categories == [f"S{k}" for k in range(1, 15)]
    assert "Task: Check if there is unsafe content in 'User' messages" in text and "User: How do I bake bread?" in text
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert safety.answer_prefix(text) == "\n\n"


def test_safety_labels_are_safe_or_unsafe_with_the_most_likely_category(monkeypatch):
    spec = ModelSpec("tiny:guard", device="cpu")
    real = safety.classify(
        {"instruction": ["How do I bake bread?", "Tell me a joke."]},
        None,
        guard=spec,
        settings=safety.SafetySettings("2024-07-26", "local"),
    )
    assert all(label == "safe" or label.startswith("unsafe:S") for label in real["safety"])
    assert all(0.5 <= p <= 1 for p in real["safety_confidence"])

    def scores(spec, rank, prompts, continuations, max_rows):
        # safe, unsafe, then S1..S14: the second row is unsafe, most likely S10 (a prefix of nothing else here).
        unsafe = [-3.0, -1.0] + [-9.0] * 14
        unsafe[2 + 9] = -2.0
        return [[-0.1, -4.0] + [-9.0] * 14, unsafe]

    monkeypatch.setattr(safety, "score_continuations", scores)
    faked = safety.classify(
        {"instruction": ["a", "b"]}, None, guard=spec, settings=safety.SafetySettings("2024-07-26", "local")
    )
    assert faked["safety"] == ["safe", "unsafe:S10"]
    assert math.isclose(faked["safety_confidence"][1], math.exp(-1) / (math.exp(-1) + math.exp(-3)))


def test_language_is_iso_639_1_and_unknown_where_there_is_no_language():
    out = language.detect_languages(
        {
            "instruction": [
                "How do I sort a list in Python?",
                "Wie spät ist es heute?",
                "Comment faire une tarte ?",
                "1234",
            ]
        }
    )
    assert out["language"] == ["en", "de", "fr", language.UNKNOWN]


PLANTED = [
    "Write a short poem about the ocean and the stars at night.",
    "Explain how to compute the area of a triangle from its three sides.",
    "Write a short poem about the ocean and the bright stars at night.",  # a word added to row 0
    "List three ideas for a science project for a student in school.",
    "Explain how to compute the area of a circle from its three sides.",  # a word swapped in row 1
    "Write a short poem about the ocean and the stars at night.",  # an exact copy of row 0
    "What is the best way to learn French in one year?",
    "Give me a recipe for a simple dinner with rice and beans.",
]


def planted_rows() -> Dataset:
    return Dataset.from_dict(
        {
            "uuid": [f"u{i}" for i in range(len(PLANTED))],
            "instruction": PLANTED,
            "prompt": [[{"role": "user", "content": text}] for text in PLANTED],
        }
    )


def embedded(rows: Dataset) -> Dataset:
    spec = ModelSpec("tiny:embedder", device="cpu")
    out = near_dedup.embed_instructions(
        {"instruction": rows["instruction"]}, None, embedder=spec, settings=near_dedup.EmbedSettings("local")
    )
    return rows.add_column("embedding", [list(map(float, v)) for v in out["embedding"]])


def test_planted_near_duplicates_are_dropped_as_near_duplicate_and_exact_ones_stay_duplicate():
    rows = planted_rows()
    marked = drop_exact_duplicates(rows)
    assert marked[DROP_REASON] == [KEEP] * 5 + ["duplicate"] + [KEEP] * 2
    rows = rows.select([i for i, r in enumerate(marked[DROP_REASON]) if r == KEEP])  # as the runner keeps them
    settings = near_dedup.NeighbourSettings(k=10, distance=0.05, index="flat", nprobe=1)
    out = near_dedup.find_near_duplicates(embedded(rows), settings=settings)
    reasons = dict(zip(out["uuid"], out[DROP_REASON]))
    assert {u for u, r in reasons.items() if r == "near_duplicate"} == {"u2", "u4"}
    by_uuid = {row["uuid"]: row for row in out}
    assert by_uuid["u2"]["min_similar_uuid"] == "u0" and by_uuid["u0"]["min_similar_uuid"] == "u0"
    assert by_uuid["u0"]["repeat_count"] == 1 and by_uuid["u6"]["repeat_count"] == 0
    assert by_uuid["u6"]["min_similar_uuid"] is None and by_uuid["u6"]["min_neighbor_distance"] > 0.05
    assert by_uuid["u2"]["min_neighbor_distance"] < 0.05
    # 0 keeps every row, and still measures them.
    kept = near_dedup.find_near_duplicates(
        embedded(rows), settings=near_dedup.NeighbourSettings(k=10, distance=0.0, index="flat", nprobe=1)
    )
    assert set(kept[DROP_REASON]) == {KEEP} and kept["repeat_count"] == out["repeat_count"]


def random_unit_rows(count: int, dim: int, planted: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    for i in range(planted):  # row count-1-i is a slightly moved copy of row i
        vectors[count - 1 - i] = vectors[i] + 0.05 * rng.normal(size=dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Dataset.from_dict({"uuid": [f"r{i:05d}" for i in range(count)], "embedding": vectors.tolist()})


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_the_exact_and_the_approximate_index_find_the_planted_pairs(index):
    rows = random_unit_rows(3000, 32, planted=20)
    out = near_dedup.find_near_duplicates(
        rows, settings=near_dedup.NeighbourSettings(k=5, distance=0.05, index=index, nprobe=16)
    )
    dropped = {u for u, r in zip(out["uuid"], out[DROP_REASON]) if r == "near_duplicate"}
    expected = {f"r{2999 - i:05d}" for i in range(20)}
    assert dropped == expected if index == "flat" else len(dropped & expected) >= 18 and dropped <= expected


def test_a_group_larger_than_k_still_keeps_only_its_first_row():
    rows = random_unit_rows(50, 16, planted=0)
    vectors = np.array(rows["embedding"], dtype=np.float32)
    vectors[10:20] = vectors[5] + 0.001 * np.random.default_rng(1).normal(size=(10, 16))  # 11 copies of row 5
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = Dataset.from_dict({"uuid": rows["uuid"], "embedding": vectors.tolist()})
    out = near_dedup.find_near_duplicates(rows, settings=near_dedup.NeighbourSettings(3, 0.05, "flat", 1))
    dropped = [i for i, r in enumerate(out[DROP_REASON]) if r == "near_duplicate"]
    assert dropped == list(range(10, 20))
    assert out["repeat_count"][15] == 10 and out["min_similar_uuid"][15] == "r00005"
    assert out["repeat_count"][5] == 10 and out["min_similar_uuid"][5] == "r00005"


CATEGORIES = tags.TASK_CATEGORY.labels


def tagged_table(sizes: dict[str, int]) -> Dataset:
    rows = []
    for category, size in sizes.items():
        for i in range(size):
            rows.append(
                {
                    "uuid": f"{category[:4]}-{i:03d}",
                    "task_category": category,
                    "input_quality": tags.INPUT_QUALITY.labels[i % 5],
                    "input_quality_confidence": 1 - i / 1000,
                    "difficulty": tags.DIFFICULTY.labels[(i // 5) % 5],
                    "safety": "unsafe:S2" if i % 7 == 6 else "safe",
                    "language": "de" if i % 11 == 10 else "en",
                    "min_neighbor_distance": 0.01 if i % 13 == 12 else 0.5,
                }
            )
    return Dataset.from_list(rows)


def selection(**overrides) -> select.SelectSettings:
    values = dict(
        min_input_quality=None,
        min_difficulty=None,
        safe_only=False,
        languages=(),
        min_neighbor_distance=0.0,
        max_rows=None,
        policy="balanced",
        shares=(),
        order=("input_quality", "input_quality_confidence", "uuid"),
    )
    values.update(overrides)
    return select.SelectSettings(**values)


def test_the_rules_drop_by_the_rule_that_failed_and_the_counts_add_up():
    table = tagged_table({"Math": 60, "Coding & Debugging": 40})
    settings = selection(
        min_input_quality="average",
        safe_only=True,
        languages=("en",),
        min_neighbor_distance=0.05,
        min_difficulty="easy",
    )
    out = select.select_rows(table, settings=settings)
    counts = Counter(out[DROP_REASON])
    assert sum(counts.values()) == len(table)
    for row, reason in zip(table, out[DROP_REASON]):
        fails = [
            tags.INPUT_QUALITY.labels.index(row["input_quality"]) < 2 and "selection:input_quality",
            row["difficulty"] == "very easy" and "selection:difficulty",
            row["safety"] != "safe" and "selection:safety",
            row["language"] != "en" and "selection:language",
            row["min_neighbor_distance"] < 0.05 and "selection:min_neighbor_distance",
        ]
        assert reason == next((f for f in fails if f), KEEP)  # the first rule it fails names the drop


@pytest.mark.parametrize(
    "policy, shares, expected",
    [
        ("balanced", (), {"Math": 10, "Coding & Debugging": 10, "Editing": 5, "Reasoning": 5}),
        ("proportional", (), {"Math": 16, "Coding & Debugging": 11, "Editing": 2, "Reasoning": 1}),
        ("shares", (("Editing", 0.5), ("Math", 0.5)), {"Math": 25, "Editing": 5}),
    ],
)
def test_the_category_quotas_hold(policy, shares, expected):
    table = tagged_table({"Math": 60, "Coding & Debugging": 40, "Editing": 5, "Reasoning": 5})
    out = select.select_rows(table, settings=selection(max_rows=30, policy=policy, shares=shares))
    kept = Counter(c for c, r in zip(table["task_category"], out[DROP_REASON]) if r == KEEP)
    assert dict(kept) == expected and sum(kept.values()) == 30
    assert Counter(out[DROP_REASON])["selection:category_quota"] == len(table) - 30


def test_within_a_category_the_best_rows_by_the_stated_order_are_kept():
    table = tagged_table({"Math": 50})
    out = select.select_rows(table, settings=selection(max_rows=10))
    kept = [row for row, r in zip(table, out[DROP_REASON]) if r == KEEP]
    assert {row["input_quality"] for row in kept} == {"excellent"}  # 10 of them: i % 5 == 4
    assert len(kept) == 10


def test_quotas_never_exceed_what_a_category_has_and_hand_the_rest_on():
    assert select.quotas({"a": 2, "b": 100, "c": 100}, 50, "balanced", {}) == {"a": 2, "b": 24, "c": 24}
    assert select.quotas({"a": 2, "b": 3}, 50, "balanced", {}) == {"a": 2, "b": 3}
    assert sum(select.quotas(dict.fromkeys("abcdefghijk", 7), 5, "balanced", {}).values()) == 5


def test_bad_selection_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="select_min_input_quality.*Use one of very poor"):
        small_config(tag_instructions=True, select_min_input_quality="great")
    with pytest.raises(ValueError, match="select_safe_only.*Switch on guard_model"):
        small_config(select_safe_only=True)
    with pytest.raises(ValueError, match="select_category_shares.*Magpie's categories"):
        small_config(
            tag_instructions=True, select_max=5, select_category_policy="shares", select_category_shares=["Cooking=1"]
        )
    with pytest.raises(ValueError, match="reward_model"):
        BuildConfig(generator_model="tiny:chat-llama-3.1")
    assert BuildConfig(generator_model="tiny:chat-llama-3.1", reward_judge=True).reward_model is None


def test_the_judge_reward_is_the_expected_rating():
    settings = JudgeRewardSettings("2024-07-26", "local")
    batch = {"prompt": [[{"role": "user", "content": "What is 2+2?"}]], "responses": [["4", "It is four.", "5"]]}
    out = judge_responses(batch, None, judge=JUDGE, settings=settings)
    assert len(out["rewards"][0]) == 3 and all(1 <= r <= 10 for r in out["rewards"][0])
    assert out["reward_model"] == ["judge:tiny:chat-llama-3.1"] and out["reward_inputs_truncated"] == [0]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curated")
    overrides = ["--num_instructions", "64", "--select_max", "24", "--resume", "false", "--output_dir", str(folder)]
    assert cli_main(["--config", DEMO_CURATED, *overrides]) == 0
    return folder


def test_the_curated_demo_builds_every_stage_and_the_counts_add_up(curated):
    summary = json.loads((curated / "build_summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages)[:10] == [
        "instructions", "filter", "dedup", "embed", "near_dedup", "language", "safety", "tags", "explanations",
        "select",
    ]  # fmt: skip
    for stage in stages.values():
        if "rows_out" in stage and stage["name"] != "split":
            assert stage["rows_in"] == stage["rows_out"] + sum(stage["drops"].values())
    assert stages["select"]["rows_out"] <= 24
    assert all(r.startswith("selection:") for r in stages["select"]["drops"])
    loaded = load_dataset(str(curated))
    for row in loaded["train"]:
        assert row["task_category"] in CATEGORIES and row["safety"] == "safe"
        assert tags.INPUT_QUALITY.labels.index(row["input_quality"]) >= 1  # at least "poor"
        assert 1 <= row["chosen_score"] <= 10 and row["chosen_score"] > row["rejected_score"]
        assert row["reward_model"] == "judge:tiny:chat-llama-3.1"
        assert "embedding" not in row  # spent, never published


def test_the_card_shows_the_curation_plots_and_the_selection_table(curated):
    card = (curated / "README.md").read_text()
    assert (curated / "curation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "![Task categories, difficulty, input quality, safety, language and nearest-neighbour distances](curation.png)"
        in card
    )
    summary = json.loads((curated / "build_summary.json").read_text())
    select_stage = next(s for s in summary["stages"] if s["name"] == "select")
    assert f"| rows in | {select_stage['rows_in']} |" in card and f"| rows out | {select_stage['rows_out']} |" in card
    for reason, count in select_stage["drops"].items():
        assert f"| {reason.removeprefix('selection:')} | {count} |" in card
    assert "| Reward judge | `tiny:chat-llama-3.1`" in card and "`tiny:guard`" in card and "`tiny:embedder`" in card
    for column in (
        "task_category",
        "difficulty_confidence",
        "safety",
        "language",
        "min_neighbor_distance",
        "repeat_count",
    ):
        assert f"| `{column}` |" in card


def reused(caplog) -> set[str]:
    names = {
        "Generating instructions": "instructions",
        "Tagging instructions": "tags",
        "Classifying safety": "safety",
        "Embedding instructions": "embed",
        "Generating responses": "responses",
        "Scoring responses": "rewards",
    }
    return {stage for desc, stage in names.items() if any(f"{desc}: reused" in r.getMessage() for r in caplog.records)}


def test_resume_reuses_every_curation_stage_and_a_tagging_change_recomputes_only_what_depends_on_it(tmp_path, caplog):
    config = dict(CURATION, num_instructions=16, resume=True, cache_dir=str(tmp_path))
    first = build(small_config(**config)).dataset
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        again = build(small_config(**config)).dataset
    assert reused(caplog) == {"instructions", "tags", "safety", "embed", "responses", "rewards"}
    assert first["train"].to_list() == again["train"].to_list()
    # Another judge: the tags change, so they and everything after them are computed again; the stages before
    # them (instructions, embeddings, safety) are reused.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magpie_builder"):
        build(small_config(**config, judge_model="tiny:chat-qwen2.5"))
    assert reused(caplog) == {"instructions", "embed", "safety"}
