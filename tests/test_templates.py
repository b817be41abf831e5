import json
from importlib import resources

import pytest
from transformers import AutoTokenizer

from builder.templates import (
    PRE_QUERY_ALIASES,
    SENTINEL,
    TemplateError,
    derive_pre_query,
    encode_chat_text,
    render_chat,
)

from conftest import FAMILIES


TEMPLATE_DIR = resources.files("builder.testing").joinpath("chat_templates")
TEMPLATE_FILES = sorted(p.name for p in TEMPLATE_DIR.iterdir() if p.name.endswith(".json"))


def load_template(name: str) -> dict:
    return json.loads(TEMPLATE_DIR.joinpath(name).read_text())


def load_family(tiny_model, family):
    path = tiny_model(f"chat-{family}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = json.loads(open(f"{path}/generation_config.json").read())["eos_token_id"]
    return tokenizer, eos if isinstance(eos, list) else [eos]


def derive(tokenizer, eos, **kwargs):
    return derive_pre_query(tokenizer, eos, model_name="tiny", day="2024-07-26", **kwargs)


def test_all_twenty_real_templates_are_shipped():
    assert len(TEMPLATE_FILES) == 20


@pytest.mark.parametrize("template_file", TEMPLATE_FILES)
def test_pre_query_text_of_every_real_template(tiny_model, template_file):
    """The derived text is exactly what each real template renders before the user's message."""
    data = load_template(template_file)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("chat-llama-3"))
    tokenizer.chat_template = data["chat_template"]
    tokenizer.bos_token, tokenizer.eos_token = data["bos_token"], data["eos_token"]
    rendered = render_chat(
        tokenizer, [{"role": "user", "content": SENTINEL}], add_generation_prompt=False, day="2024-07-26"
    )
    assert rendered[: rendered.index(SENTINEL)] == data["expected_pre_query"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_query_ids_are_token_exact_with_one_bos(tiny_model, family):
    tokenizer, eos = load_family(tiny_model, family)
    pre_query = derive(tokenizer, eos)
    chat = render_chat(
        tokenizer, [{"role": "user", "content": "Hello, how are you?"}], add_generation_prompt=True, day="2024-07-26"
    )
    real_ids = encode_chat_text(tokenizer, chat)
    # The ids the generator is fed are exactly the first ids of a real chat.
    assert real_ids[: len(pre_query.token_ids)] == pre_query.token_ids
    bos = tokenizer.bos_token_id
    if bos is None:  # Qwen has no BOS at all
        assert pre_query.token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    else:
        assert pre_query.token_ids[0] == bos
        assert pre_query.token_ids.count(bos) == 1
    # The ids are the text's own ids, cut back at most where the user's first word absorbs the last piece.
    assert encode_chat_text(tokenizer, pre_query.text)[: len(pre_query.token_ids)] == pre_query.token_ids


def test_phi35_bos_comes_from_the_tokenizer_not_the_template(tiny_model):
    tokenizer, eos = load_family(tiny_model, "phi-3.5")
    pre_query = derive(tokenizer, eos)
    assert pre_query.text == "<|user|>\n"  # the template never prints <s>
    assert tokenizer.convert_ids_to_tokens(pre_query.token_ids)[:2] == ["<s>", "<|user|>"]


def test_gemma_and_llama_bos_is_never_doubled(tiny_model):
    for family in ("gemma-2", "llama-3"):
        tokenizer, eos = load_family(tiny_model, family)
        ids = derive(tokenizer, eos).token_ids
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_mistral_trailing_space_is_left_to_the_model(tiny_model):
    tokenizer, eos = load_family(tiny_model, "mistral")
    pre_query = derive(tokenizer, eos)
    assert pre_query.text == "<s>[INST] "
    assert tokenizer.convert_ids_to_tokens(pre_query.token_ids) == ["<s>", "[INST]"]
    assert pre_query.notes


@pytest.mark.parametrize(
    "family, instruction_end, response_end",
    [
        ("llama-3", "<|eot_id|>", "<|eot_id|>"),
        ("llama-3.1", "<|eot_id|>", "<|eot_id|>"),
        ("qwen2.5", "<|im_end|>", "<|im_end|>"),
        ("gemma-2", "<end_of_turn>", "<end_of_turn>"),
        ("phi-3.5", "<|end|>", "<|end|>"),
        ("mistral", "[/INST]", "</s>"),
    ],
)
def test_stop_ids_are_end_of_turn_plus_eos(tiny_model, family, instruction_end, response_end):
    tokenizer, eos = load_family(tiny_model, family)
    pre_query = derive(tokenizer, eos)
    assert pre_query.instruction_stop_ids[0] == tokenizer.convert_tokens_to_ids(instruction_end)
    assert pre_query.response_stop_ids[0] == tokenizer.convert_tokens_to_ids(response_end)
    for stop_ids in (pre_query.instruction_stop_ids, pre_query.response_stop_ids):
        assert set(eos) <= set(stop_ids) and len(stop_ids) == len(set(stop_ids))


def test_default_system_block_kept_by_default_and_stripped_on_request(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3.1")
    kept = derive(tokenizer, eos)
    assert "Cutting Knowledge Date: December 2023" in kept.text and kept.stripped_system is None
    stripped = derive(tokenizer, eos, keep_default_system=False)
    assert stripped.text == PRE_QUERY_ALIASES["llama3.1"]  # Magpie's own Llama-3.1 string
    assert "Cutting Knowledge Date" in stripped.stripped_system
    assert tokenizer.convert_ids_to_tokens(stripped.token_ids)[:2] == ["<|begin_of_text|>", "<|start_header_id|>"]

    tokenizer, eos = load_family(tiny_model, "qwen2.5")
    assert "You are Qwen" in derive(tokenizer, eos).text
    assert derive(tokenizer, eos, keep_default_system=False).text == "<|im_start|>user\n"


def test_stripping_is_a_no_op_without_a_default_system_block(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    assert derive(tokenizer, eos, keep_default_system=False) == derive(tokenizer, eos)


@pytest.mark.parametrize("family", ["llama-3", "llama-3.1", "qwen2.5", "phi-3.5"])
def test_custom_system_prompt(tiny_model, family):
    tokenizer, eos = load_family(tiny_model, family)
    pre_query = derive(tokenizer, eos, system_prompt="You are a math tutor.")
    assert "You are a math tutor." in pre_query.text
    assert "You are Qwen" not in pre_query.text
    chat = render_chat(
        tokenizer,
        [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": "Hello, how are you?"}],
        add_generation_prompt=True,
        day="2024-07-26",
    )
    assert encode_chat_text(tokenizer, chat)[: len(pre_query.token_ids)] == pre_query.token_ids


@pytest.mark.parametrize("family", ["gemma-2", "mistral"])
def test_templates_without_system_role_give_a_clear_error(tiny_model, family):
    tokenizer, eos = load_family(tiny_model, family)
    with pytest.raises(TemplateError, match="cannot render a system prompt.*pre_query_template"):
        derive(tokenizer, eos, system_prompt="You are a math tutor.")


def test_template_that_drops_system_messages_is_refused(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = load_template("phi-3-mini-instruct-legacy.json")["chat_template"]
    with pytest.raises(TemplateError, match="drops system messages"):
        derive(tokenizer, eos, system_prompt="You are a math tutor.")


def test_date_comes_from_the_config_not_the_clock(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = load_template("llama-3.2-3b-instruct.json")["chat_template"]
    first = derive_pre_query(tokenizer, eos, model_name="tiny", day="2024-07-26")
    again = derive_pre_query(tokenizer, eos, model_name="tiny", day="2024-07-26")
    other = derive_pre_query(tokenizer, eos, model_name="tiny", day="2025-01-02")
    assert first == again
    assert "Today Date: 26 Jul 2024" in first.text
    assert "Today Date: 02 Jan 2025" in other.text


def test_missing_chat_template_is_a_clear_error(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="my-org/base-model has no chat template.*pre_query_template"):
        derive_pre_query(tokenizer, eos, model_name="my-org/base-model", day="2024-07-26")


def test_template_that_cannot_render_a_lone_user_message(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = "{{ raise_exception('Conversations must start with a system message') }}"
    with pytest.raises(TemplateError, match="my-model cannot render.*must start with a system.*pre_query_template"):
        derive_pre_query(tokenizer, eos, model_name="my-model", day="2024-07-26")


def test_alias_and_raw_override(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    alias = derive(tokenizer, eos, pre_query_template="llama3")
    assert alias.source == "alias:llama3" and alias.text == PRE_QUERY_ALIASES["llama3"]
    assert alias.token_ids == derive(tokenizer, eos).token_ids
    raw = derive(tokenizer, eos, pre_query_template="<|start_header_id|>user<|end_header_id|>\n\n")
    assert raw.source == "override"
    assert raw.token_ids[0] == tokenizer.bos_token_id and raw.token_ids.count(tokenizer.bos_token_id) == 1
    # Without a chat template an alias brings its own end of the user's turn; a raw string needs `instruction_stop`.
    tokenizer.chat_template = None
    bare = derive(tokenizer, eos, pre_query_template="llama3")
    assert set(bare.instruction_stop_ids) == {tokenizer.convert_tokens_to_ids("<|eot_id|>"), *eos}
    with pytest.raises(TemplateError, match="Cannot tell where the user's turn ends for tiny.*instruction_stop"):
        derive(tokenizer, eos, pre_query_template="<|start_header_id|>user<|end_header_id|>\n\n")
    raw = derive(tokenizer, eos, pre_query_template="Question: ", instruction_stop="\nAnswer:")
    assert raw.instruction_stop_strings == ["\nAnswer:"] and raw.instruction_stop_ids == eos


def test_a_dict_of_chat_templates_without_a_default_is_a_template_error(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = {"tool_use": tokenizer.chat_template, "rag": tokenizer.chat_template}
    with pytest.raises(
        TemplateError, match="org/m has several chat templates \\(rag, tool_use\\).*pre_query_template"
    ):
        derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26")


def test_a_template_with_no_end_to_the_users_turn_is_refused_unless_told_where_it_ends(tiny_model):
    tokenizer, eos = load_family(tiny_model, "llama-3")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="Cannot tell where the user's turn ends for org/m.*instruction_stop"):
        derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26")
    told = derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26", instruction_stop="\n\n")
    assert told.instruction_stop_strings == ["\n\n"] and told.instruction_stop_ids == list(dict.fromkeys(eos))
    # A build that only answers a prompt dataset's prompts samples no instruction: nothing to refuse.
    derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26", needs_instruction_stop=False)
    # A control token given as the stop stops on its id.
    token = derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26", instruction_stop="<|eot_id|>")
    assert token.instruction_stop_ids[0] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_a_stop_string_cuts_every_instruction_in_a_build_and_the_card_says_so():
    """`instruction_stop` as text, through the transformers engine: the same samples as without it, each cut before
    the first place its text holds the stop string."""
    from collections import Counter

    from builder.build import build
    from builder.publish.card import render_card

    from conftest import small_config

    def instructions(result):
        return {
            uuid: text for split in result.dataset.values() for uuid, text in zip(split["uuid"], split["instruction"])
        }

    free = instructions(build(small_config(num_instructions=24)))
    words = Counter(w for text in free.values() for w in set(text.split()) if len(w) >= 3)
    stop = words.most_common(1)[0][0]
    result = build(small_config(num_instructions=24, instruction_stop=stop))
    cut = instructions(result)
    assert all(stop not in text for text in cut.values())
    shared = [u for u in cut if u in free and stop in free[u]]
    assert shared, "the stop string cut no instruction that both builds kept"
    for uuid in shared:
        assert cut[uuid] == free[uuid][: free[uuid].index(stop)].strip()
    card = str(render_card(result))
    assert f"| End of an instruction | the text '{stop}' (a stop string" in card


def test_turns_joined_by_a_separator_token_give_the_header_without_it():
    """A template that prints a control token between turns (here `\\n<SPECIAL_7>\\n`) and a default system turn:
    stripping that turn leaves BOS and the user header, not the separator."""
    from builder.testing.tiny import template_tokenizer

    template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n<SPECIAL_7>\n"
        "{% endif %}{% for m in messages %}{% if not loop.first %}\n<SPECIAL_7>\n{% endif %}<|im_start|>{{ m['role'] }}"
        "\n{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}\n<SPECIAL_7>\n<|im_start|>assistant\n"
        "{% endif %}"
    )
    data = {
        "chat_template": template,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "special_tokens": ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<SPECIAL_7>"],
        "adds_bos": False,
    }
    tokenizer = template_tokenizer(data)
    eos = [tokenizer.convert_tokens_to_ids("</s>")]
    kept = derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26")
    assert kept.text == "<s><|im_start|>system\nBe brief.<|im_end|>\n<SPECIAL_7>\n<|im_start|>user\n"
    assert kept.instruction_stop_ids[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    bare = derive_pre_query(tokenizer, eos, model_name="org/m", day="2024-07-26", keep_default_system=False)
    assert bare.text == "<s><|im_start|>user\n"
    assert bare.stripped_system == "<|im_start|>system\nBe brief.<|im_end|>\n<SPECIAL_7>\n"
