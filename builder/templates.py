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
# What ends the user's turn after each alias, for a model without a chat template.
ALIAS_STOPS = {
    "llama3": "<|eot_id|>",
    "llama3.1": "<|eot_id|>",
    "qwen2": "<|im_end|>",
    "qwen2.5": "<|im_end|>",
    "gemma2": "<end_of_turn>",
    "phi3": "<|end|>",
    "mistral": "[/INST]",
    "chatml": "<|im_end|>",
}


class TemplateError(ValueError):
    """A chat template that cannot give a pre-query template; the message names the model and the fix."""


@dataclass(frozen=True)
class PreQuery:
    """What the instruction stage feeds the generator, and when it stops.

    Args:
        text (`str`): the pre-query template as text (shown in the dataset card).
        token_ids (`list[int]`): the ids the generator is fed, exactly one BOS in front when the model has one.
        instruction_stop_ids (`list[int]`): the end of the user's turn (where a control token ends it) plus the
            model's EOS ids.
        response_stop_ids (`list[int]`): the end of the assistant's turn plus the model's EOS ids.
        source (`str`): "chat_template", "alias:<name>" or "override".
        stripped_system (`str`, *optional*): the default system block that was removed, if any.
        instruction_stop_strings (`list[str]`): the text that ends the user's turn where no control token does
            (Llama-2's "[/INST]", OLMo-2's plain-text "<|assistant|>"); the instruction is cut before it.
        response_stop_strings (`list[str]`): the same for the assistant's turn.
        instruction_stop (`str`): which stop ends an instruction, in words (the log and the card say it).
    """

    text: str
    token_ids: list[int]
    instruction_stop_ids: list[int]
    response_stop_ids: list[int]
    source: str
    stripped_system: str | None = None
    notes: list[str] = field(default_factory=list)
    instruction_stop_strings: list[str] = field(default_factory=list)
    response_stop_strings: list[str] = field(default_factory=list)
    instruction_stop: str = ""


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


def control_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special and added tokens (BOS, end-of-turn, role markers), text -> id: where a template
    prints one of these, the model reads one token, not the letters."""
    ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    tokens = {tokenizer.convert_ids_to_tokens(i): i for i in sorted(ids) if i is not None}
    # Some tokenizers add runs of spaces or newlines as tokens; they mark nothing.
    return {token: i for token, i in tokens.items() if token and token.strip()}


def _first_control(text: str, controls: dict[str, int]) -> tuple[int, str] | None:
    """(position, token) of the first control token printed in `text`, the longest where several start there."""
    found = [(text.find(token), -len(token), token) for token in controls if token in text]
    if not found:
        return None
    position, _, token = min(found)
    return position, token


def _render_or_explain(
    tokenizer, messages, model_name: str, day, what: str, add_generation_prompt: bool = False
) -> str:
    import jinja2

    try:
        return render_chat(tokenizer, messages, day=day, add_generation_prompt=add_generation_prompt)
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


@dataclass(frozen=True)
class TurnEnd:
    """What ends a turn: a control token (its id) or, where the template closes the turn with plain text, that text
    (a stop string)."""

    token_id: int | None
    text: str | None


def turn_end(after: str, controls: dict[str, int]) -> TurnEnd | None:
    """The end of a turn, read off what a real chat prints right after the turn's text: the first control token,
    unless text comes before it (then the first line of that text), or None where nothing but spaces follows."""
    first = _first_control(after, controls)
    before = after[: first[0]] if first else after
    line = next((line.strip() for line in before.splitlines() if line.strip()), "")
    if line:
        return TurnEnd(None, line)
    if first:
        return TurnEnd(controls[first[1]], None)
    return None


def _after(text: str, marker: str, until: str | None = None) -> str:
    rest = text.split(marker, 1)[1]
    return rest.split(until, 1)[0] if until and until in rest else rest


def user_turn_end(tokenizer, model_name: str, day) -> TurnEnd | None:
    """Where the user's turn ends, read off a real chat that goes on to the assistant's turn (the generation prompt):
    the end-of-turn token, or the next role's opener where nothing else closes the user's turn (GLM-4's
    `<|assistant|>`), or the text that does (Llama-2's " [/INST]")."""
    chat = [{"role": "user", "content": SENTINEL}]
    text = _render_or_explain(tokenizer, chat, model_name, day, "a user turn", add_generation_prompt=True)
    return turn_end(_after(text, SENTINEL), control_tokens(tokenizer))


def finished_turn_end(tokenizer, model_name: str, day) -> TurnEnd | None:
    """What a finished chat prints after the assistant's text (gpt-oss ends a final answer with `<|return|>`, not
    the `<|end|>` of a turn that another follows)."""
    chat = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": ASSISTANT}]
    finished = _render_or_explain(tokenizer, chat, model_name, day, "an assistant turn")
    return turn_end(_after(finished, ASSISTANT), control_tokens(tokenizer))


def assistant_turn_end(tokenizer, model_name: str, day) -> TurnEnd | None:
    """Where the assistant's turn ends: as a finished chat ends it, or, where a finished chat prints nothing there
    (GLM-4), what a chat that goes on to another user turn prints."""
    return finished_turn_end(tokenizer, model_name, day) or continued_turn_end(tokenizer, day)


def continued_turn_end(tokenizer, day) -> TurnEnd | None:
    """What a chat prints after the assistant's text when another user turn follows."""
    chat = [
        {"role": "user", "content": SENTINEL},
        {"role": "assistant", "content": ASSISTANT},
        {"role": "user", "content": SECOND_USER},
    ]
    try:
        text = render_chat(tokenizer, chat, add_generation_prompt=False, day=day)
    except Exception:  # a template that takes one exchange only: the finished chat is all there is
        return None
    return turn_end(_after(text, ASSISTANT, SECOND_USER), control_tokens(tokenizer))


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


def stops_of(end: TurnEnd | None, eos: list[int]) -> tuple[list[int], list[str]]:
    """(stop ids, stop strings) of a turn: its end token plus the model's EOS ids, or its end text."""
    return _unique([end and end.token_id, *eos]), [end.text] if end and end.text else []


def response_stops(tokenizer, generation_eos_ids: list[int], model_name: str, day) -> tuple[list[int], list[str]]:
    """(stop ids, stop strings) of the assistant's turn: where a model's answer ends (the judge's, too)."""
    return stops_of(assistant_turn_end(tokenizer, model_name, day), list(generation_eos_ids))


def instruction_stop_of(tokenizer, stop: str) -> TurnEnd:
    """The user's `instruction_stop`: a control token's text stops on its id, any other text as a stop string."""
    controls = control_tokens(tokenizer)
    return TurnEnd(controls[stop], None) if stop in controls else TurnEnd(None, stop)


def _user_header(tokenizer, model_name: str, day, ends: list[str]) -> str:
    """The text that opens a later user turn, read off a two-turn chat: what follows the assistant's text, less the
    tokens in `ends` that close the turn before it (gpt-oss and Command-R7B close a turn with two), and only as much
    of it as the first user turn also ends with (a separator printed between turns only is not part of the header).
    An end token followed by text is kept: it opens the turn too (Nemotron's `<extra_id_1>User`)."""
    chat = [
        {"role": "user", "content": SENTINEL},
        {"role": "assistant", "content": ASSISTANT},
        {"role": "user", "content": SECOND_USER},
    ]
    text = _render_or_explain(tokenizer, chat, model_name, day, "a two-turn chat")
    header = _after(text, ASSISTANT, SECOND_USER).lstrip()
    controls = control_tokens(tokenizer)
    while True:
        end = next((e for e in ends if header.startswith(e)), None)
        following = _first_control(header[len(end) :].lstrip(), controls) if end else None
        if not (following and following[0] == 0):
            break
        header = header[len(end) :].lstrip()
    first = _render_or_explain(tokenizer, chat[:1], model_name, day, "a lone user message")
    first = first[: first.index(SENTINEL)]
    # Cut points inside a control token of the first turn's text ("<s>" cut to "s>") are no header's start.
    inside = {at + i for token in controls for at in _occurrences(first, token) for i in range(1, len(token))}
    while header and (not first.endswith(header) or len(first) - len(header) in inside):
        header = header[1:]
    return header.lstrip()


def _occurrences(text: str, token: str) -> list[int]:
    found, at = [], text.find(token)
    while at >= 0:
        found.append(at)
        at = text.find(token, at + 1)
    return found


def template_start(tokenizer, text: str, header: str, ends: list[str]) -> str:
    """What a template prints before its first turn whatever the turn is (BOS, GLM's "[gMASK]<sop>"): the leading
    control tokens of `text` up to the first one that opens a turn: the header's own first token, or a token that
    is followed by plain text (a role name: "<|im_start|>system") or by the end of a turn (an empty system turn:
    EXAONE's "[|system|][|endofturn|]")."""
    controls = control_tokens(tokenizer)
    header_first = _first_control(header, controls)
    opener = header_first[1] if header_first and header_first[0] == 0 else None
    position = 0
    while True:
        first = _first_control(text[position:], controls)
        if not first or first[0] != 0 or first[1] == opener:
            return text[:position]
        end = position + len(first[1])
        if first[1] != tokenizer.bos_token:
            following = _first_control(text[end:], controls)
            if text[end:] and not (following and following[0] == 0 and following[1] not in ends):
                return text[:position]
        position = end


def derive_pre_query(
    tokenizer,
    generation_eos_ids: list[int],
    *,
    model_name: str,
    day: date | str,
    pre_query_template: str | None = None,
    keep_default_system: bool = True,
    system_prompt: str | None = None,
    instruction_stop: str | None = None,
    needs_instruction_stop: bool = True,
) -> PreQuery:
    """Derives the pre-query template and the stops of a model from its tokenizer.

    Args:
        tokenizer: the generator's tokenizer, with its chat template.
        generation_eos_ids (`list[int]`): the model's EOS id(s), from its generation config.
        model_name (`str`): named in errors.
        day (`date` or `str`): the date for templates that print today's date.
        pre_query_template (`str`, *optional*): an alias from `PRE_QUERY_ALIASES` or a raw string; overrides the
            derivation (the stops still come from the chat template when it has one).
        keep_default_system (`bool`, defaults to `True`): keep a system block the template inserts by itself (what
            the model sees in deployment); `False` strips it, as Magpie's own Llama-3.1 runs did.
        system_prompt (`str`, *optional*): a custom system prompt (Magpie's task-specific mode).
        instruction_stop (`str`, *optional*): what ends the user's turn, overriding the template: a control token
            (stops on its id) or any text (a stop string).
        needs_instruction_stop (`bool`, defaults to `True`): whether instructions are sampled at all; a build that
            answers a prompt dataset's prompts in one turn needs no end of the user's turn.
    """
    if isinstance(tokenizer.chat_template, dict) and "default" not in tokenizer.chat_template:
        raise TemplateError(
            f"{model_name} has several chat templates ({', '.join(sorted(tokenizer.chat_template))}) and none is "
            "named 'default', so it is not clear which one the model chats with. Set `pre_query_template` to a raw "
            f"string or one of the aliases {sorted(PRE_QUERY_ALIASES)}, and `instruction_stop` to what ends the "
            "user's turn."
        )
    has_template = tokenizer.chat_template is not None
    if not has_template and pre_query_template is None:
        raise TemplateError(
            f"{model_name} has no chat template, so no pre-query template can be derived. Set "
            f"`pre_query_template` to a raw string or one of the aliases {sorted(PRE_QUERY_ALIASES)}, and "
            "`instruction_stop` to what ends the user's turn."
        )
    bos = bos_prefix(tokenizer)
    eos = list(generation_eos_ids)
    user_end = user_turn_end(tokenizer, model_name, day) if has_template else None
    finished_end = finished_turn_end(tokenizer, model_name, day) if has_template else None
    assistant_end = (finished_end or continued_turn_end(tokenizer, day)) if has_template else None
    # The tokens that end a turn in the template itself, before any override: what a later user header follows.
    template_ends = [
        tokenizer.convert_ids_to_tokens(e.token_id) for e in (user_end, finished_end) if e and e.token_id is not None
    ]
    if not has_template and pre_query_template in ALIAS_STOPS:
        user_end = instruction_stop_of(tokenizer, ALIAS_STOPS[pre_query_template])
    if instruction_stop:
        user_end = instruction_stop_of(tokenizer, instruction_stop)
    if user_end is None and needs_instruction_stop:
        found = "nothing follows the user's text in its chat template" if has_template else "it has no chat template"
        raise TemplateError(
            f"Cannot tell where the user's turn ends for {model_name}: {found}, so an instruction would run on to "
            "EOS and take the model's answer with it. Set `instruction_stop` to the text or token that ends a user "
            "turn for this model, or a raw `pre_query_template` together with it."
        )
    instruction_ids, instruction_strings = stops_of(user_end, eos)
    response_ids, response_strings = stops_of(assistant_end, eos)
    stops = {
        "instruction_stop_ids": instruction_ids,
        "response_stop_ids": response_ids,
        "instruction_stop_strings": instruction_strings,
        "response_stop_strings": response_strings,
        "instruction_stop": _describe_stop(tokenizer, user_end, eos),
    }
    if not stops["instruction_stop_ids"] and not stops["instruction_stop_strings"]:
        raise TemplateError(f"{model_name} has no end-of-turn or EOS token to stop generation at.")

    if pre_query_template is not None:
        text = PRE_QUERY_ALIASES.get(pre_query_template, pre_query_template)
        source = f"alias:{pre_query_template}" if pre_query_template in PRE_QUERY_ALIASES else "override"
        return PreQuery(text, encode_chat_text(tokenizer, text, bos), source=source, **stops)

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
        block, start, header = default_system_block(tokenizer, text, model_name, day, template_ends)
        if block:
            stripped, text = block, start + header
            render_with = lambda message: text + message  # noqa: E731 - the real chat has no system block now

    ids = token_exact_ids(tokenizer, text, render_with, bos)
    notes = []
    if ids != encode_chat_text(tokenizer, text, bos):
        notes.append("the last token of the text merges with the user's first word; the model writes it")
    return PreQuery(text, ids, source="chat_template", stripped_system=stripped, notes=notes, **stops)


def _describe_stop(tokenizer, end: TurnEnd | None, eos: list[int]) -> str:
    if end is None:
        return "none (instructions are not sampled)"
    if end.text is not None:
        return f"the text {end.text!r} (a stop string; the instruction is cut before it)"
    token = tokenizer.convert_ids_to_tokens(end.token_id)
    return f"the token {token!r}" + (" (EOS)" if end.token_id in eos else "")


def default_system_block(tokenizer, text: str, model_name: str, day, ends: list[str]) -> tuple[str, str, str]:
    """(block, start, header): the system block a template inserts by itself into the pre-query `text` ("" when it
    inserts none), what precedes it (BOS, GLM's "[gMASK]<sop>"), and the user header that follows it. `ends` are
    the template's turn-end tokens (the user's and the finished assistant's).

    A block is only what a system message of one's own replaces or joins: with one, the same template must print
    that message between the same start and header, or the block is something else and is refused.
    """
    header = _user_header(tokenizer, model_name, day, ends)
    if not header or not text.endswith(header):
        raise TemplateError(
            f"Cannot find where the user turn starts in the chat template of {model_name}; "
            "set `keep_default_system: true` or a raw `pre_query_template`."
        )
    start = template_start(tokenizer, text[: len(text) - len(header)], header, ends)
    # A header opens the way the first turn does: a separator printed between turns (`\n<SPECIAL_k>\n`) before the
    # token that opens every turn is not part of it.
    opener = _first_control(text[len(start) :], control_tokens(tokenizer))
    if opener and opener[0] == 0 and opener[1] in header and not header.startswith(opener[1]):
        header = header[header.index(opener[1]) :]
    block = text[len(start) : len(text) - len(header)]
    if not block:
        return "", start, header
    probe = "MAGPIESYSTEM3e8c"
    try:
        with_system = render_chat(
            tokenizer,
            [{"role": "system", "content": probe}, {"role": "user", "content": SENTINEL}],
            add_generation_prompt=False,
            day=day,
        )
    except Exception:
        with_system = ""
    own = with_system.split(SENTINEL, 1)[0]
    # Where a system message goes elsewhere, the block is something else; where the template refuses or drops
    # system messages, the block is its fixed preamble (StarCoder2-Instruct, ChatQA) and is stripped.
    if probe in with_system and not (
        own.startswith(start) and own.endswith(header) and probe in own[len(start) : len(own) - len(header)]
    ):
        raise TemplateError(
            f"The chat template of {model_name} prints {block!r} before the user's turn, but not where a system "
            "message goes, so it is not a default system block that can be stripped. Set "
            "`keep_default_system: true`, or write the pre-query text yourself in `pre_query_template`."
        )
    return block, start, header


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
