"""Multi-turn Magpie: the later-turn header is token-exact for every family, conversations have the turns asked
for, and TRL trains on the preference and the SFT output."""

import math

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from builder.build import build
from builder.cli import main as cli_main
from builder.templates import bos_prefix, derive_next_user_header, encode_chat_text, next_turn_ids, render_chat

from conftest import FAMILIES, ROOT, small_config


DEMO_MULTI_TURN = str(ROOT / "dataset_scripts" / "demo_multi_turn.yaml")
DAY = "2024-07-26"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_later_turn_header_is_token_exact(tiny_model, family):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(f"chat-{family}"))
    later = derive_next_user_header(tokenizer, family, DAY)
    header = later.header_ids
    bos = bos_prefix(tokenizer)
    chat = [
        {"role": "user", "content": "What is a prime number?"},
        {"role": "assistant", "content": "One with two divisors."},
    ]
    first = encode_chat_text(tokenizer, render_chat(tokenizer, chat, add_generation_prompt=False, day=DAY), bos)
    # What only a finished chat ends with (Phi-3.5's EOS) is special tokens, cut before the header.
    closing = first[len(first) - later.closing_tokens :]
    assert all(t in tokenizer.all_special_ids for t in closing)
    first = first[: len(first) - later.closing_tokens]
    for follow_up in ("Give me an example.", "why is 1 not prime", "2. And 9?"):
        real = encode_chat_text(
            tokenizer,
            render_chat(
                tokenizer, [*chat, {"role": "user", "content": follow_up}], add_generation_prompt=False, day=DAY
            ),
            bos,
        )
        assert real[: len(first) + len(header)] == first + header  # a real two-turn chat, cut before the text
        rest = tokenizer.decode(real[len(first) + len(header) :])
        assert rest.lstrip().startswith(follow_up)


def mt_config(family: str, **overrides):
    values = dict(
        generator_model=f"tiny:chat-{family}",
        num_turns=3,
        num_instructions=16,
        max_instruction_tokens=64,
        max_response_tokens=96,
        num_responses=2,
        max_prompt_tokens=2048,
    )
    values.update(overrides)
    return small_config(**values)


@pytest.mark.parametrize("family", FAMILIES)
def test_three_turns_give_user_assistant_user_assistant_user_prompts(family):
    result = build(mt_config(family))
    rows = [row for split in result.dataset.values() for row in split]
    assert rows
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
        assert all(m["content"] for m in row["prompt"])
        assert row["instruction"] == row["prompt"][-1]["content"]
        assert row["chosen"][0]["role"] == "assistant" and len(row["chosen"]) == 1
    turns = next(s for s in result.ledger.stages if s.name == "turns")
    assert turns.rows_in == turns.rows_out + sum(turns.drops.values())
    reasons = {
        "later_turn_empty",
        "later_turn_truncated",
        "turn_answer_empty",
        "turn_answer_truncated",
        "prompt_too_long",
    }
    assert set(turns.drops) <= reasons


def test_the_follow_up_prompt_steers_the_writing_but_is_not_published(monkeypatch):
    from builder.sources import multi_turn

    fed = []
    original = multi_turn.next_turn_ids

    def spy(tokenizer, conversation, *args):
        fed.append(conversation)
        return original(tokenizer, conversation, *args)

    monkeypatch.setattr(multi_turn, "next_turn_ids", spy)
    result = build(mt_config("llama-3.1", num_turns=2))
    assert fed and all(c[0] == {"role": "system", "content": multi_turn.FOLLOW_UP_SYSTEM_PROMPT} for c in fed)
    assert all(m["role"] != "system" for split in result.dataset.values() for row in split for m in row["prompt"])
    # Gemma's template refuses system messages: the follow-ups are written without one.
    fed.clear()
    build(mt_config("gemma-2", num_turns=2))
    assert fed and all(c[0]["role"] == "user" for c in fed)


@pytest.fixture(scope="module")
def multi_turn_folders(tmp_path_factory):
    folders = {}
    for output_format in ("dpo", "sft"):
        folder = tmp_path_factory.mktemp(f"mt-{output_format}")
        args = ["--config", DEMO_MULTI_TURN, "--output_dir", str(folder), "--num_instructions", "24"]
        assert cli_main([*args, "--output_format", output_format, "--resume", "false"]) == 0
        folders[output_format] = folder
    return folders


def trainer_args(tmp_path, config_class):
    return config_class(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=512,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
    )


def test_dpo_trainer_runs_two_steps_on_the_multi_turn_output(multi_turn_folders, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    train = load_dataset(str(multi_turn_folders["dpo"]), split="train")
    assert all(len(p) == 5 for p in train["prompt"])
    path = tiny_model("chat-llama-3.1")
    args = trainer_args(tmp_path, DPOConfig)
    args.beta = 0.01
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)


def test_sft_trainer_runs_two_steps_on_the_sft_output(multi_turn_folders, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    train = load_dataset(str(multi_turn_folders["sft"]), split="train")
    assert "prompt" not in train.column_names and "chosen" not in train.column_names
    for messages in train["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    path = tiny_model("chat-llama-3.1")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=trainer_args(tmp_path, SFTConfig),
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)


TEMPLATE_DIR = ROOT / "builder" / "testing" / "chat_templates"


@pytest.mark.parametrize("template_file", sorted(p.name for p in TEMPLATE_DIR.glob("*.json")))
def test_the_later_turn_header_of_every_shared_real_template(tiny_model, template_file):
    """On the 20 real templates (with the tiny Llama-3 tokenizer): the ids fed for a later turn are a real two-turn
    chat cut before the second user's text, whether the header follows the finished turn or the template changes
    that turn once another follows (Qwen3, gpt-oss); otherwise a clear error that names the model and the way out."""
    import json

    from builder.templates import TemplateError

    data = json.loads((TEMPLATE_DIR / template_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("chat-llama-3"))
    tokenizer.chat_template = data["chat_template"]
    tokenizer.bos_token, tokenizer.eos_token = data["bos_token"], data["eos_token"]
    try:
        later = derive_next_user_header(tokenizer, template_file, DAY)
    except TemplateError as error:
        assert template_file in str(error) and "num_turns: 1" in str(error)
        return
    bos = bos_prefix(tokenizer)
    chat = [
        {"role": "user", "content": "What is a prime number?"},
        {"role": "assistant", "content": "One with two divisors."},
    ]
    real = encode_chat_text(
        tokenizer,
        render_chat(
            tokenizer,
            [*chat, {"role": "user", "content": "Give me an example."}],
            add_generation_prompt=False,
            day=DAY,
        ),
        bos,
    )
    # The header after the finished turn, or (rerender) the conversation cut as a longer chat renders it.
    fed = next_turn_ids(tokenizer, chat, later, DAY, bos)
    assert real[: len(fed)] == fed
    assert tokenizer.decode(real[len(fed) :]).lstrip().startswith("Give me an example.")
