"""The pre-query derivation and the stops on the real published chat templates of many families.

Each record in `builder/testing/chat_templates/` (the 20 shared ones) and `.../families/` holds a real template, where
it was read, and which of its markers the real tokenizer reads as one control token; `template_tokenizer` builds a
tokenizer with exactly those. Every family is checked for the pre-query text and ids (one BOS), where an instruction
and a response end (as a model would write them: question, then the assistant's marker, then an answer),
`keep_default_system: false`, a custom system prompt, and a pinned date.
"""

import json
from importlib import resources

import pytest

from builder.engines.protocol import Completion, StopText, completion_text
from builder.templates import TemplateError, derive_pre_query, encode_chat_text, render_chat
from builder.testing.tiny import template_tokenizer


ROOT = resources.files("builder.testing").joinpath("chat_templates")
SHARED = sorted(p.name for p in ROOT.iterdir() if p.name.endswith(".json"))
FAMILIES = sorted(p.name for p in ROOT.joinpath("families").iterdir() if p.name.endswith(".json"))
RECORDS = SHARED + [f"families/{name}" for name in FAMILIES]
DAY = "2024-07-26"
QUESTION, ANSWER, FOLLOW_UP = "Hello, how are you?", "I am fine, thank you.", "What is the capital of France?"


# Per family, read off its template by hand: what ends the user's turn (a control token, or the text of a turn that
# no control token closes), and the pre-query with `keep_default_system: false` (None: the template inserts no
# system block, so nothing changes).
EXPECTED = {
    "command-r.json": (("token", "<|END_OF_TURN_TOKEN|>"), None),
    "deepseek-r1.json": (("token", "<｜Assistant｜>"), None),
    "deepseek-v2-chat.json": (("text", "Assistant:"), None),
    "deepseek-v3.1.json": (("token", "<｜Assistant｜>"), None),
    "gemma-2-it.json": (("token", "<end_of_turn>"), None),
    "gemma-3-it.json": (("token", "<end_of_turn>"), None),
    "gpt-oss-120b.json": (("token", "<|end|>"), "<|start|>user<|message|>"),
    "llama-3-8b-instruct.json": (("token", "<|eot_id|>"), None),
    "llama-3.1-8b-instruct.json": (
        ("token", "<|eot_id|>"),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    ),
    "llama-3.2-3b-instruct.json": (
        ("token", "<|eot_id|>"),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    ),
    "llama-3.3-70b-instruct.json": (
        ("token", "<|eot_id|>"),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    ),
    "mistral-7b-instruct-v0.2.json": (("text", "[/INST]"), None),
    "mistral-nemo-instruct-2407.json": (("token", "[/INST]"), None),
    "phi-3-mini-instruct-legacy.json": (("token", "<|end|>"), None),
    "phi-3.5-mini-instruct.json": (("token", "<|end|>"), None),
    "phi-4.json": (("token", "<|im_end|>"), None),
    "qwen2-7b-instruct.json": (("token", "<|im_end|>"), "<|im_start|>user\n"),
    "qwen2.5-7b-instruct.json": (("token", "<|im_end|>"), "<|im_start|>user\n"),
    "qwen3-0.6b.json": (("token", "<|im_end|>"), None),
    "yi-1.5-chat.json": (("token", "<|im_end|>"), None),
    "families/aya-expanse-8b.json": (("token", "<|END_OF_TURN_TOKEN|>"), None),
    "families/codellama-70b-instruct.json": (("token", "<step>"), None),
    "families/command-r7b-12-2024.json": (
        ("token", "<|END_OF_TURN_TOKEN|>"),
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
    ),
    "families/deepseek-coder-6.7b-instruct.json": (
        ("text", "### Response:"),
        "<｜begin▁of▁sentence｜>### Instruction:\n",
    ),
    "families/exaone-3.5-instruct.json": (("token", "[|assistant|]"), "[|user|]"),
    "families/falcon3-7b-instruct.json": (("text", "<|assistant|>"), None),
    "families/glm-4-9b-chat.json": (("token", "<|assistant|>"), None),
    "families/glm-4.5.json": (("token", "<|assistant|>"), None),
    "families/granite-3.1-instruct.json": (("token", "<|end_of_text|>"), "<|start_of_role|>user<|end_of_role|>"),
    "families/internlm2.5-7b-chat.json": (("token", "<|im_end|>"), None),
    "families/llama-2-7b-chat.json": (("text", "[/INST]"), None),
    "families/llama-3.1-tulu-3-8b.json": (("text", "<|assistant|>"), None),
    "families/llama-4-scout-17b-16e-instruct.json": (("token", "<|eot|>"), None),
    "families/llama3-chatqa-1.5-8b.json": (("text", "Assistant:"), "<|begin_of_text|>User: "),
    "families/minicpm3-4b.json": (("token", "<|im_end|>"), None),
    "families/mistral-7b-instruct-v0.3.json": (("token", "[/INST]"), None),
    "families/mistral-small-3.1-24b-instruct-2503.json": (("token", "[/INST]"), "<s>[INST]"),
    "families/nemotron-mini-4b-instruct.json": (("token", "<extra_id_1>"), "<extra_id_1>User\n"),
    "families/nous-hermes-2-mixtral-8x7b-dpo.json": (("token", "<|im_end|>"), None),
    "families/olmo-2-1124-7b-instruct.json": (("text", "<|assistant|>"), None),
    "families/openchat-3.5-0106.json": (("token", "<|end_of_turn|>"), None),
    "families/openhermes-2.5-mistral-7b.json": (("token", "<|im_end|>"), None),
    "families/phi-4-mini-instruct.json": (("token", "<|end|>"), None),
    "families/smollm2-135m-instruct.json": (("token", "<|im_end|>"), "<|im_start|>user\n"),
    "families/solar-10.7b-instruct-v1.0.json": (("text", "### Assistant:"), None),
    "families/starcoder2-15b-instruct-v0.1.json": (("text", "### Response"), "<|endoftext|>### Instruction\n"),
    "families/zephyr-7b-beta.json": (("token", "</s>"), None),
}


def record(name: str) -> dict:
    folder = ROOT
    for part in name.split("/"):
        folder = folder.joinpath(part)
    return json.loads(folder.read_text())


def family(name: str):
    data = record(name)
    tokenizer = template_tokenizer(data)
    eos_tokens = data.get("generation_eos") or [data["eos_token"]]
    return data, tokenizer, [tokenizer.convert_tokens_to_ids(t) for t in eos_tokens]


def derive(tokenizer, eos, **kwargs):
    return derive_pre_query(tokenizer, eos, model_name="org/model", day=kwargs.pop("day", DAY), **kwargs)


def written(tokenizer, generated: list[int], stop_ids, stop_strings) -> tuple[str, str]:
    """What the builder keeps of a sample whose tokens would be `generated`: cut at the first stop id (as both
    engines do), or once the text holds a stop string, then decoded and cut as the stages do."""
    check = StopText(tokenizer, stop_strings) if stop_strings else None
    kept = []
    for token in generated:
        if token in stop_ids:
            return completion_text(tokenizer, Completion(kept, "stop"), stop_strings)
        kept.append(token)
        if check and check(kept):
            return completion_text(tokenizer, Completion(kept, "stop"), stop_strings)
    return completion_text(tokenizer, Completion(kept, "length"), stop_strings)


def chat(tokenizer, messages, generation_prompt=False):
    return encode_chat_text(
        tokenizer, render_chat(tokenizer, messages, add_generation_prompt=generation_prompt, day=DAY)
    )


def test_at_least_fifteen_families_beyond_the_shared_twenty():
    assert len(SHARED) == 20
    assert len(FAMILIES) >= 15
    for name in FAMILIES:
        data = record(f"families/{name}")
        assert ":" in data["source"], name  # repo:path@commit, or the package and file it was read from
        assert data["chat_template"] and "special_tokens" in data, name


@pytest.mark.parametrize("name", RECORDS)
def test_pre_query_text_and_ids_with_one_bos(name):
    data, tokenizer, eos = family(name)
    pre_query = derive(tokenizer, eos)
    assert pre_query.text == data["expected_pre_query"]
    real = chat(tokenizer, [{"role": "user", "content": QUESTION}], generation_prompt=True)
    assert real[: len(pre_query.token_ids)] == pre_query.token_ids
    bos = tokenizer.bos_token_id
    if bos is not None and real[0] == bos:
        assert pre_query.token_ids[0] == bos and pre_query.token_ids[1] != bos
        opens_turns = data["bos_token"] in pre_query.text[len(data["bos_token"]) :]
        assert opens_turns or pre_query.token_ids.count(bos) == 1


@pytest.mark.parametrize("name", RECORDS)
def test_an_instruction_ends_where_the_users_turn_ends(name):
    """The generator is fed the pre-query and writes on as in a real chat: the question, then whatever the template
    prints after it (the end of the turn, the assistant's marker) and an answer. Only the question is kept."""
    data, tokenizer, eos = family(name)
    pre_query = derive(tokenizer, eos)
    full = chat(tokenizer, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}])
    assert full[: len(pre_query.token_ids)] == pre_query.token_ids
    text, reason = written(
        tokenizer,
        full[len(pre_query.token_ids) :],
        pre_query.instruction_stop_ids,
        pre_query.instruction_stop_strings,
    )
    assert (text, reason) == (QUESTION, "stop")


@pytest.mark.parametrize("name", RECORDS)
def test_a_response_ends_where_the_assistants_turn_ends(name):
    """The generator, fed a real chat up to the generation prompt, writes the answer and then what the template
    prints after it: in a finished chat, or (where a finished chat prints nothing there, GLM-4) in one that goes on."""
    data, tokenizer, eos = family(name)
    pre_query = derive(tokenizer, eos)
    prompt = render_chat(tokenizer, [{"role": "user", "content": QUESTION}], add_generation_prompt=True, day=DAY)
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    results = []
    for rest in ([], [{"role": "user", "content": FOLLOW_UP}]):
        after = render_chat(tokenizer, turns + rest, add_generation_prompt=False, day=DAY).split(ANSWER, 1)[1]
        prompt_ids = encode_chat_text(tokenizer, prompt)
        full = encode_chat_text(tokenizer, prompt + ANSWER + after)
        assert full[: len(prompt_ids)] == prompt_ids
        results.append(
            written(tokenizer, full[len(prompt_ids) :], pre_query.response_stop_ids, pre_query.response_stop_strings)
        )
        if results[-1][1] == "stop":
            break
    text, reason = results[-1]
    assert reason == "stop" and text.endswith(ANSWER)
    # gpt-oss writes its Harmony channel ("<|channel|>final<|message|>") before the answer: the builder stops it
    # at the right token but does not parse channels.
    assert text == ANSWER or (name == "gpt-oss-120b.json" and text == "final" + ANSWER)


def test_every_family_has_its_expectations():
    assert sorted(EXPECTED) == sorted(RECORDS)


@pytest.mark.parametrize("name", RECORDS)
def test_the_instruction_stop_and_the_stripped_system_block_are_the_templates(name):
    (kind, end), stripped = EXPECTED[name]
    data, tokenizer, eos = family(name)
    pre_query = derive(tokenizer, eos)
    if kind == "token":
        assert pre_query.instruction_stop_ids[0] == tokenizer.convert_tokens_to_ids(end)
        assert pre_query.instruction_stop_strings == [] and repr(end) in pre_query.instruction_stop
    else:
        assert pre_query.instruction_stop_strings == [end] and repr(end) in pre_query.instruction_stop
        assert pre_query.instruction_stop_ids == list(dict.fromkeys(eos))
    assert set(eos) <= set(pre_query.instruction_stop_ids) and set(eos) <= set(pre_query.response_stop_ids)

    bare = derive(tokenizer, eos, keep_default_system=False)
    if stripped is None:
        assert bare == pre_query  # nothing to strip: nothing changes, and no error
    else:
        assert bare.text == stripped and bare.stripped_system
        assert pre_query.text.replace(bare.stripped_system, "", 1) == bare.text
        # The stripped pre-query is token-exact too: the ids of a chat with that text.
        real = encode_chat_text(tokenizer, bare.text + QUESTION)
        assert real[: len(bare.token_ids)] == bare.token_ids
        assert bare.token_ids.count(tokenizer.bos_token_id) <= pre_query.token_ids.count(tokenizer.bos_token_id)


@pytest.mark.parametrize("name", RECORDS)
def test_a_custom_system_prompt_reaches_the_model_or_is_refused_clearly(name):
    data, tokenizer, eos = family(name)
    system = "You are a math tutor."
    try:
        pre_query = derive(tokenizer, eos, system_prompt=system)
    except TemplateError as error:
        assert "org/model" in str(error) and "pre_query_template" in str(error)
        assert data.get("renders_system", False) is not True
        return
    assert system in pre_query.text and data.get("renders_system", True) is True
    real = chat(
        tokenizer,
        [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
        generation_prompt=True,
    )
    assert real[: len(pre_query.token_ids)] == pre_query.token_ids


@pytest.mark.parametrize("name", RECORDS)
def test_the_date_comes_from_the_config(name):
    data, tokenizer, eos = family(name)
    first, again = derive(tokenizer, eos), derive(tokenizer, eos)
    other = derive(tokenizer, eos, day="2025-01-02")
    assert first == again
    if data.get("date_dependent"):
        assert other.text != first.text and "2025" in other.text and "2024" in first.text
    else:
        assert other == first
