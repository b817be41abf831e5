"""The declared stages: the list, the contract the runner checks, the keys and the code version behind them."""

import importlib.util
import re
from dataclasses import dataclass, replace

import pytest
from datasets import Dataset

from builder.build import build, check_models, stages_for
from builder.pipeline import keys
from builder.pipeline.runner import StageError, check_declarations, published_columns
from builder.pipeline.stage import DROP_REASON, KEEP, MODEL, ROW_STATS, ROWS, SECTIONS, Column, Stage
from builder.publish.card import render_card

from conftest import ROOT, small_config


# The published columns, in order, as every earlier release wrote them.
PUBLISHED = [
    "uuid",
    "instruction",
    "prompt",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "reward_margin",
    "responses",
    "rewards",
    "response_finish_reasons",
    "response_tokens",
    "instruction_tokens",
    "prompt_tokens",
    "reward_inputs_truncated",
    "gen_input_configs",
    "gen_response_configs",
    "reward_model",
]


@pytest.fixture(scope="module")
def standard():
    config = small_config()
    return config, stages_for(config, check_models(config))


def test_the_build_is_one_list_and_its_declarations_give_the_published_columns(standard):
    config, stages = standard
    assert [s.name for s in stages] == ["instructions", "filter", "dedup", "responses", "rewards", "binarize", "split"]
    check_declarations(stages)
    assert [c.name for c in published_columns(stages)] == PUBLISHED
    result = build(config)
    assert [c.name for c in result.columns] == PUBLISHED
    for split in result.dataset.values():
        assert split.column_names == PUBLISHED
    card = str(render_card(result))
    table = card[card.index("## Columns") : card.index("## Examples")]
    assert re.findall(r"^\| `(\w+)` \|", table, flags=re.M) == PUBLISHED
    for column in result.columns:
        assert f"| `{column.name}` | {column.description} |" in table
    assert "instruction_finish_reason" not in card  # an internal column: spent by the filter, never published


def _tiny_source(name="rows"):
    return Stage(
        name=name,
        kind=ROWS,
        apply=lambda batch, settings: {},
        start=lambda: Dataset.from_dict({"uuid": ["a"]}),
        writes=(Column("uuid", "id", SECTIONS[0]),),
    )


def test_reading_a_column_no_earlier_stage_writes_is_refused_before_anything_runs():
    reader = Stage(name="reader", kind=ROWS, apply=lambda batch, settings: {}, reads=("instruction",))
    with pytest.raises(StageError, match=r"reader reads \['instruction'\], which no stage before it writes"):
        check_declarations([_tiny_source(), reader])
    with pytest.raises(StageError, match="first stage must be a source"):
        check_declarations([reader])
    with pytest.raises(StageError, match="Stage names repeat"):
        check_declarations([_tiny_source(), _tiny_source()])


def _build_with(extra: Stage, after: str = "dedup", **overrides):
    def with_extra(config, models):
        stages = stages_for(config, models)
        at = [s.name for s in stages].index(after) + 1
        return stages[:at] + [extra] + stages[at:]

    return build(small_config(**overrides), stages=with_extra)


def _words(batch, *, settings):
    return {"words": [len(t.split()) for t in batch["instruction"]], "stray": [0] * len(batch["instruction"])}


def test_a_column_written_but_not_declared_fails_the_build():
    stage = Stage(
        name="words", kind=ROWS, apply=_words, reads=("instruction",), writes=(Column("words", "Words.", ROW_STATS),)
    )
    with pytest.raises(StageError, match=r"words wrote \['stray'\] without declaring them"):
        _build_with(stage)
    declared_too_much = replace(stage, writes=(*stage.writes, Column("stray", "x"), Column("absent", "y")))
    with pytest.raises(StageError, match=r"declares \['absent'\] but did not write them: return them"):
        _build_with(declared_too_much)


def _drop_all_short(batch, *, settings):
    return {DROP_REASON: [KEEP if len(t) > 5 else "short" for t in batch["instruction"]]}


def test_a_drop_reason_the_stage_does_not_declare_fails_the_build_and_declared_ones_are_counted():
    stage = Stage(name="short", kind=ROWS, apply=_drop_all_short, reads=("instruction",))
    with pytest.raises(StageError, match=r"returns `drop_reason` but declares no `drop_reasons`"):
        _build_with(stage)
    with pytest.raises(StageError, match=r"dropped rows as \['short'\], which it does not declare"):
        _build_with(replace(stage, drop_reasons=("long",)))
    result = _build_with(replace(stage, drop_reasons=("short",)))
    record = result.ledger.get("short")
    assert record.rows_in == record.rows_out + record.drops.get("short", 0)
    assert all(len(row["instruction"]) > 5 for split in result.dataset.values() for row in split)


@dataclass(frozen=True)
class _Tag:
    value: str


def _tag_batch(batch, rank, *, settings):
    return {"tag": [settings.value] * len(batch["uuid"])}


def test_a_model_stage_sees_only_what_it_reads():
    def peek(batch, rank, *, settings):
        assert set(batch) == {"uuid"}, sorted(batch)
        return _tag_batch(batch, rank, settings=settings)

    stage = Stage(
        name="tag",
        kind=MODEL,
        apply=peek,
        reads=("uuid",),
        settings=_Tag("x"),
        writes=(Column("tag", "A tag.", ROW_STATS),),
    )
    result = _build_with(stage)
    assert set(result.dataset["train"]["tag"]) == {"x"}


def _rewrite_uuid(batch, rank, *, settings):
    return {"uuid": ["zz"] * len(batch["uuid"]), "tag": ["x"] * len(batch["uuid"])}


def test_a_stage_that_overwrites_a_column_must_declare_it():
    stage = Stage(
        name="tag", kind=MODEL, apply=_rewrite_uuid, reads=("uuid",), writes=(Column("tag", "A tag.", ROW_STATS),)
    )
    with pytest.raises(StageError, match=r"tag wrote \['uuid'\] without declaring them"):
        _build_with(stage)


def _shout(batch, *, settings):
    return {"instruction": [t.upper() for t in batch["instruction"]]}


def test_a_declared_overwrite_is_allowed_and_removing_a_spent_column_is_not_an_error():
    # `instruction` is declared again (rewritten), and `prompt_tokens` is removed though no later stage reads it.
    stage = Stage(
        name="shout",
        kind=ROWS,
        apply=_shout,
        reads=("instruction",),
        writes=(Column("instruction", "The instruction, upper case.", SECTIONS[0]),),
        removes=("prompt_tokens",),
    )
    result = _build_with(stage)
    rows = [row for split in result.dataset.values() for row in split]
    assert rows and all(row["instruction"] == row["instruction"].upper() for row in rows)
    assert "prompt_tokens" not in result.dataset["train"].column_names


def test_a_stage_defined_outside_a_module_file_is_refused_with_the_fix():
    namespace = {}
    exec("def apply(batch, *, settings):\n    return {}\n", namespace)  # as in a notebook or a REPL
    stage = Stage(name="adhoc", kind=ROWS, apply=namespace["apply"], reads=("instruction",))
    with pytest.raises(StageError, match=r"adhoc: .* is not defined in a module file.*define a stage's functions"):
        keys.stage_key("", stage)


def test_keys_chain_from_upstream(standard):
    config, stages = standard
    base = {}
    upstream = ""
    for stage in stages:
        upstream = base[stage.name] = keys.stage_key(upstream, stage)
    # A change in the first stage's settings changes every key after it, though their own settings are the same.
    hotter = replace(stages[0], settings=replace(stages[0].settings, seed=stages[0].settings.seed + 1))
    changed, upstream = {}, ""
    for stage in [hotter, *stages[1:]]:
        upstream = changed[stage.name] = keys.stage_key(upstream, stage)
    assert all(changed[name] != base[name] for name in base)
    # Runtime options (batch sizes) change how a stage runs, not what it computes: same key.
    faster = replace(stages[3], runtime={"max_batch_size": 7})
    assert keys.stage_key(base["dedup"], faster) == base["responses"]


def test_the_code_version_ignores_docstrings_and_comments_not_code(tmp_path):
    source = tmp_path / "stage_code.py"
    source.write_text('"""A stage."""\n\ndef apply(x):\n    """Doubles."""\n    return 2 * x  # why\n')
    first = keys.file_version(str(source))
    source.write_text('"""A stage, described better."""\n\n\ndef apply(x):\n    # a new comment\n    return 2 * x\n')
    keys.file_version.cache_clear()
    assert keys.file_version(str(source)) == first
    source.write_text('"""A stage."""\n\ndef apply(x):\n    return 3 * x\n')
    keys.file_version.cache_clear()
    assert keys.file_version(str(source)) != first


def test_the_code_version_covers_stages_engines_templates_and_models_not_the_card_or_the_cli(standard):
    _, stages = standard
    covered = set()
    for stage in stages:
        covered |= {f.relative_to(keys.PACKAGE).as_posix() for f in keys.code_files(stage.apply, stage.start)}
    assert {
        "engines/transformers/generation.py",
        "templates.py",
        "models.py",
        "sources/magpie.py",
        "stages/responses.py",
        "stages/pairs.py",
    } <= covered
    assert "stages/__init__.py" in covered  # row_seed: every sample's seed
    assert not {p for p in covered if p.startswith("publish/") or p in ("cli.py", "config.py", "build.py")}
    assert not {
        p for p in covered if p.startswith("pipeline/") and p not in ("pipeline/__init__.py", "pipeline/stage.py")
    }


def test_the_code_version_follows_imports_and_data_files(standard, monkeypatch):
    # A stage's key covers the helpers its module imports (the row seeds, in stages/__init__.py) and the data files
    # the engines and test models read (a chat template), so a change there never reuses old batches.
    _, stages = standard
    apply = stages[3].apply  # responses
    before = keys.code_version(apply)
    original = keys.file_version
    changed = set()
    monkeypatch.setattr(keys, "file_version", lambda path: "changed" if path in changed else original(path))
    for path in (keys.PACKAGE / "stages" / "__init__.py", keys.PACKAGE / "testing" / "chat_templates" / "phi-4.json"):
        changed.add(str(path))
        keys.shared_version.cache_clear()
        assert keys.code_version(apply) != before, path
        changed.clear()
    keys.shared_version.cache_clear()
    assert keys.code_version(apply) == before


def test_a_setting_is_one_key_however_it_is_spelled():
    # YAML reads `1` as an int; the command line and `1.0` give a float: the same build, the same keys.
    assert small_config(response_temperature=1).response_temperature == 1.0
    assert isinstance(small_config(min_reward_margin=0).min_reward_margin, float)
    assert keys.digest(small_config(response_temperature=1).response_temperature) == keys.digest(1.0)
    with pytest.raises(TypeError, match="Cannot key a object"):
        keys.digest(object())


def load_readme_stage(tmp_path):
    """The "Adding a stage" example of the README, as the module a user would write."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a stage") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    path = tmp_path / "min_words.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("min_words", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = re.findall(r"```python\n(.*?)```", section, flags=re.S)[1]
    assert "min_words.min_words(config)," in entry and "filters.exact_duplicates(config)," in entry
    return module


def test_the_readme_example_stage_runs_as_one_module_and_one_list_entry(tmp_path):
    min_words = load_readme_stage(tmp_path)
    result = _build_with(min_words.min_words(small_config()), num_instructions=40)
    record = result.ledger.get("min_words")
    assert record.drops.get("too_few_words", 0) > 0  # random-token instructions: some are one or two "words"
    assert record.rows_in == record.rows_out + record.drops["too_few_words"]
    rows = [row for split in result.dataset.values() for row in split]
    assert rows and all(row["instruction_words"] >= 3 for row in rows)
    assert all(row["instruction_words"] == len(row["instruction"].split()) for row in rows)
    names = [c.name for c in result.columns]
    assert names.index("instruction_tokens") < names.index("instruction_words") < names.index("gen_input_configs")
    card = str(render_card(result))
    assert "| `instruction_words` | Words in the instruction. |" in card and "too_few_words: " in card
