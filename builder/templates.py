"""The pre-query template: the left part of a chat template, up to where the user's message would start.

Magpie feeds an aligned model only this text and lets it write the user's message itself. It is derived from the
tokenizer's own chat template (render one sentinel user message, keep what precedes the sentinel), so it is what
the model saw in training, for any model. The token ids are what the generator is fed: they must be exactly the
ids the model sees before the user's text in a real chat, with exactly one BOS whether the template prints it or
the tokenizer adds it.
"""

from dataclasses import dataclass, field
from datetime import date, datetime, time


SENTINEL = "MAGPIESENTINEL7f3a"
SECOND_USER = "MAGPIESECONDUSER5c1d"
ASSISTANT = "MAGPIEASSISTANT9b2e"
# Messages that any tokenizer splits after the pre-query text: used to check that the ids are a prefix.
# Real messages start with a word or a digit; one that starts with whitespace would merge with the header.
PROBE_MESSAGES = ("Hello, how are you?", "Write a short poem.", "what is the best way", "1. List three ideas")

# Hand-written pre-query strings, for compatibility with Magpie's configs and distilabel's `MagpieBase`.
PRE_QUERY_ALIASES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "llama3.1": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>user\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n",
    "gemma2": "<bos><start_of_turn>user\n",
    "phi3": "<|user|>\n",
    "mistral": "<s>[INST] ",
    "chatml": "<|im_start|>user\n",
}


class TemplateError(ValueError):
    """A chat template that cannot give a pre-query template; the message names the model and the fix."""


@dataclass(frozen=True)
class PreQuery:
    """What the instruction stage feeds the generator, and when it stops.

    Args:
        text (`str`): the pre-query template as text (shown in the dataset card).
        token_ids (`list[int]`): the ids the generator is fed, exactly one BOS in front when the model has one.
        instruction_stop_ids (`list[int]`): the end of the user's turn plus the model's EOS ids.
        response_stop_ids (`list[int]`): the end of the assistant's turn plus the model's EOS ids.
        source (`str`): "chat_template", "alias:<name>" or "override".
        stripped_system (`str`, *optional*): the default system block that was removed, if any.
    """

    text: str
    token_ids: list[int]
    instruction_stop_ids: list[int]
    response_stop_ids: list[int]
    source: str
    stripped_system: str | None = None
    notes: list[str] = field(default_factory=list)


def pinned_datetime(day: date | str) -> datetime:
    if isinstance(day, str):
        day = date.fromisoformat(day)
    return datetime.combine(day, time(12, 0))


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, day: date | str) -> str:
    """Renders `messages` exactly as `tokenizer.apply_chat_template(tokenize=False)` does, with the clock pinned.

    Templates that print today's date (Llama-3.2, gpt-oss) call `strftime_now`; transformers binds it to the wall
    clock, which would make a build depend on the day it ran. The same compiled template is rendered here with
    `strftime_now` bound to `day` instead.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = tokenizer.get_chat_template()
    now = pinned_datetime(day)
    return _compile_jinja_template(template).render(
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
        strftime_now=now.strftime,
    )


def bos_prefix(tokenizer) -> list[int]:
    """`[bos_token_id]` when the tokenizer puts BOS in front as it encodes, else `[]`."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def encode_chat_text(tokenizer, text: str, bos: list[int] | None = None) -> list[int]:
    """Token ids of rendered chat text with exactly one BOS where the model uses one.

    The text is encoded without special tokens (the template may print BOS itself, as Llama-3 and Gemma do), and
    BOS is put in front only when the tokenizer would add it and the text does not start with it (Phi-3.5).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_prefix(tokenizer) if bos is None else bos
    if bos and (not ids or ids[0] != bos[0]):
        ids = bos + ids
    return ids


def _first_control_token(tokenizer, text: str) -> int | None:
    control_ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token_id in control_ids:
            return token_id
    return None


def _render_or_explain(tokenizer, messages, model_name: str, day, what: str, **kwargs) -> str:
    import jinja2

    try:
        return render_chat(tokenizer, messages, day=day, add_generation_prompt=False, **kwargs)
    except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
        raise TemplateError(
            f"The chat template of {model_name} cannot render {what} ({error}). Set `pre_query_template` to a raw "
            f"string or one of the aliases {sorted(PRE_QUERY_ALIASES)} to bypass it."
        ) from error


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_exact_ids(tokenizer, pre_text: str, render_with_message, bos: list[int]) -> list[int]:
    """The ids of `pre_text`, cut back to the longest prefix of the ids of real chats that start with it.

    Where the template ends in a space that the tokenizer merges into the next word (Mistral's "[INST] "), the
    text's own ids are not what the model sees in a real chat ("[INST]", " Hello"): the space then belongs to the
    user's message and the model writes it.
    """
    ids = encode_chat_text(tokenizer, pre_text, bos)
    for message in PROBE_MESSAGES:
        full = encode_chat_text(tokenizer, render_with_message(message), bos)
        ids = ids[: _common_prefix(ids, full)]
    return ids


def derive_stop_ids(tokenizer, generation_eos_ids: list[int], model_name: str, day) -> tuple[list[int], list[int]]:
    """(instruction_stop_ids, response_stop_ids): the template's end-of-turn token(s) plus the model's EOS ids."""
    user_turn = _render_or_explain(tokenizer, [{"role": "user", "content": SENTINEL}], model_name, day, "a user turn")
    chat = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": ASSISTANT}]
    assistant_turn = _render_or_explain(tokenizer, chat, model_name, day, "an assistant turn")
    user_end = _first_control_token(tokenizer, user_turn.split(SENTINEL, 1)[1])
    assistant_end = _first_control_token(tokenizer, assistant_turn.split(ASSISTANT, 1)[1])
    eos = list(generation_eos_ids)

    def unique(ids):
        return list(dict.fromkeys(i for i in ids if i is not None))

    return unique([user_end, *eos]), unique([assistant_end, *eos])


def _user_header(tokenizer, model_name: str, day, response_end_id: int | None) -> str:
    """The text that opens a user turn with no system block before it, read off a two-turn chat."""
    chat = [
        {"role": "user", "content": SENTINEL},
        {"role": "assistant", "content": ASSISTANT},
        {"role": "user", "content": SECOND_USER},
    ]
    text = _render_or_explain(tokenizer, chat, model_name, day, "a two-turn chat")
    between = text[text.index(ASSISTANT) + len(ASSISTANT) : text.index(SECOND_USER)]
    if response_end_id is not None:
        end_text = tokenizer.convert_ids_to_tokens(response_end_id)
        if between.startswith(end_text):
            between = between[len(end_text) :]
    return between.lstrip("\n")


def derive_pre_query(
    tokenizer,
    generation_eos_ids: list[int],
    *,
    model_name: str,
    day: date | str,
    pre_query_template: str | None = None,
    keep_default_system: bool = True,
    system_prompt: str | None = None,
) -> PreQuery:
    """Derives the pre-query template and stop ids of a model from its tokenizer.

    Args:
        tokenizer: the generator's tokenizer, with its chat template.
        generation_eos_ids (`list[int]`): the model's EOS id(s), from its generation config.
        model_name (`str`): named in errors.
        day (`date` or `str`): the date for templates that print today's date.
        pre_query_template (`str`, *optional*): an alias from `PRE_QUERY_ALIASES` or a raw string; overrides the
            derivation (the stop ids still come from the chat template when it has one).
        keep_default_system (`bool`, defaults to `True`): keep a system block the template inserts by itself (what
            the model sees in deployment); `False` strips it, as Magpie's own Llama-3.1 runs did.
        system_prompt (`str`, *optional*): a custom system prompt (Magpie's task-specific mode).
    """
    has_template = tokenizer.chat_template is not None
    if not has_template and pre_query_template is None:
        raise TemplateError(
            f"{model_name} has no chat template, so no pre-query template can be derived. Set "
            f"`pre_query_template` to a raw string or one of the aliases {sorted(PRE_QUERY_ALIASES)}."
        )
    bos = bos_prefix(tokenizer)
    if has_template:
        instruction_stop_ids, response_stop_ids = derive_stop_ids(tokenizer, generation_eos_ids, model_name, day)
    else:
        instruction_stop_ids = response_stop_ids = list(dict.fromkeys(generation_eos_ids))
    if not instruction_stop_ids:
        raise TemplateError(f"{model_name} has no end-of-turn or EOS token to stop generation at.")

    if pre_query_template is not None:
        text = PRE_QUERY_ALIASES.get(pre_query_template, pre_query_template)
        source = f"alias:{pre_query_template}" if pre_query_template in PRE_QUERY_ALIASES else "override"
        return PreQuery(text, encode_chat_text(tokenizer, text, bos), instruction_stop_ids, response_stop_ids, source)

    prefix_messages = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def render_with(message: str) -> str:
        return render_chat(
            tokenizer, prefix_messages + [{"role": "user", "content": message}], day=day, add_generation_prompt=False
        )

    what = "a system prompt followed by a user message" if system_prompt else "a lone user message"
    rendered = _render_or_explain(
        tokenizer, prefix_messages + [{"role": "user", "content": SENTINEL}], model_name, day, what
    )
    if SENTINEL not in rendered:
        raise TemplateError(
            f"The chat template of {model_name} does not print the user's message; set "
            "`pre_query_template` to a raw string."
        )
    text = rendered[: rendered.index(SENTINEL)]
    if system_prompt and system_prompt not in text:
        raise TemplateError(
            f"The chat template of {model_name} drops system messages, so `system_prompt` would never reach the "
            "model. Remove `system_prompt`, or write the pre-query text yourself in `pre_query_template`."
        )

    stripped = None
    if not keep_default_system and not system_prompt:
        header = _user_header(tokenizer, model_name, day, response_stop_ids[0])
        bos_text = tokenizer.bos_token if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else ""
        if not header or not text.endswith(header):
            raise TemplateError(
                f"Cannot find where the user turn starts in the chat template of {model_name}; "
                "set `keep_default_system: true` or a raw `pre_query_template`."
            )
        bare = bos_text + header
        if bare != text:
            stripped = text[len(bos_text) : len(text) - len(header)]
            text = bare
            render_with = lambda message: text + message  # noqa: E731 - the real chat has no system block now

    ids = token_exact_ids(tokenizer, text, render_with, bos)
    notes = []
    if ids != encode_chat_text(tokenizer, text, bos):
        notes.append("the last token of the text merges with the user's first word; the model writes it")
    return PreQuery(text, ids, instruction_stop_ids, response_stop_ids, "chat_template", stripped, notes)


@dataclass(frozen=True)
class LaterTurn:
    """How a later user turn is opened after a finished conversation.

    Args:
        header_ids (`list[int]`): the ids that open the next user turn.
        closing_tokens (`int`): how many ids a template puts after the last turn of a finished chat only (Phi-3.5's
            EOS), which a chat that goes on does not have; they are cut before the header.
    """

    header_ids: list[int]
    closing_tokens: int = 0
    rerender: bool = False  # the template changes a finished turn once another follows (Qwen3, gpt-oss)


def derive_next_user_header(tokenizer, model_name: str, day) -> LaterTurn:
    """What a real two-turn chat has between the first assistant turn and the second user's text, token-exact: the
    ids of a rendered [user, assistant] chat (less its closing tokens) followed by the header equal the ids of the
    real two-turn chat cut before the second user's text.
    """
    bos = bos_prefix(tokenizer)
    chat = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": ASSISTANT}]
    first = encode_chat_text(tokenizer, _render_or_explain(tokenizer, chat, model_name, day, "an assistant turn"), bos)

    def render_with(message: str) -> str:
        return render_chat(
            tokenizer, [*chat, {"role": "user", "content": message}], add_generation_prompt=False, day=day
        )

    rendered = _render_or_explain(
        tokenizer, [*chat, {"role": "user", "content": SECOND_USER}], model_name, day, "a two-turn chat"
    )
    cut = token_exact_ids(tokenizer, rendered[: rendered.index(SECOND_USER)], render_with, bos)
    kept = _common_prefix(first, cut)
    closing = first[kept:]
    control = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if kept < len(cut) and all(t in control or not tokenizer.decode([t]).strip() for t in closing):
        return LaterTurn(cut[kept:], len(closing))
    # The finished turn itself changes (a reasoning template drops the thinking, gpt-oss ends with another token):
    # every conversation is then rendered with a next user turn and cut before its text, which is token-exact
    # unless the cut falls inside a token.
    if cut != encode_chat_text(tokenizer, rendered[: rendered.index(SECOND_USER)], bos):
        raise TemplateError(
            f"The chat template of {model_name} renders a finished assistant turn differently when another user turn "
            "follows it, and its next user header merges with the user's text, so later turns cannot be sampled "
            "token-exactly. Use num_turns: 1 with this model."
        )
    return LaterTurn([], 0, rerender=True)


def next_turn_ids(tokenizer, conversation: list[dict], later: LaterTurn, day, bos: list[int]) -> list[int]:
    """What the generator is fed to write the next user turn after `conversation` (which ends with an assistant
    turn): the conversation as the template renders it, less its closing tokens, then the later-turn header."""
    if later.rerender:
        text = render_chat(
            tokenizer, [*conversation, {"role": "user", "content": SECOND_USER}], add_generation_prompt=False, day=day
        )
        return encode_chat_text(tokenizer, text[: text.index(SECOND_USER)], bos)
    ids = encode_chat_text(tokenizer, render_chat(tokenizer, conversation, add_generation_prompt=False, day=day), bos)
    return ids[: len(ids) - later.closing_tokens] + list(later.header_ids)
