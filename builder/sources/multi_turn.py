"""Multi-turn Magpie (Magpie-Llama-3.1-Pro-MT-300K): later user turns written by the generator itself.

For each turn after the first, the generator answers the last user turn once (response sampling), then is fed the
conversation so far, behind a system prompt saying the user asks follow-up questions, and the header of the next
user turn (derived from the template, token-exact), and writes that turn (instruction sampling), stopping where the
user's turn ends. The system prompt steers the writing only; the published conversation has none. The N answers of
the response stage then answer the last turn, and `prompt` is the whole conversation up to it.
"""

from dataclasses import dataclass

from ..engines import SamplingParams, sample_completions
from ..engines.protocol import completion_text
from ..models import ModelSpec, load_tokenizer
from ..pipeline.stage import DROP_REASON, KEEP, MODEL, ROW, ROW_STATS, Column, Stage
from ..stages import row_seed
from ..stages.filters import chat_prompt_ids
from ..templates import LaterTurn, bos_prefix, next_turn_ids


# In the spirit of Magpie's multi-turn runs: the model, as the user, asks a related follow-up question.
FOLLOW_UP_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. The user will engage in a multi-round conversation with you, asking initial "
    "questions and following up with additional related questions."
)


@dataclass(frozen=True)
class TurnSettings:
    num_turns: int
    later: LaterTurn
    instruction_sampling: SamplingParams
    answer_sampling: SamplingParams
    system_prompt: str | None  # None where the template refuses system messages
    max_prompt_tokens: int
    seed: int
    day: str


def extend_conversations(
    batch: dict, rank: int | None, *, generator: ModelSpec, settings: TurnSettings, max_batch_size: int = 64
):
    """Turns 2..n of every conversation.

    Input columns: `uuid`, `prompt` (the first user turn). Output columns: `prompt` (user, assistant, ..., user),
    `instruction` (the last user turn), `prompt_tokens`, `drop_reason` ("later_turn_empty", "later_turn_truncated",
    "turn_answer_empty", "turn_answer_truncated", "prompt_too_long").
    """
    tokenizer = load_tokenizer(generator)
    bos = bos_prefix(tokenizer)
    conversations = [list(prompt) for prompt in batch["prompt"]]
    reasons = [KEEP] * len(conversations)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    for turn in range(2, settings.num_turns + 1):
        live = [i for i, reason in enumerate(reasons) if reason == KEEP]
        if not live:
            break
        answers, tokenizer = sample_completions(
            generator,
            rank,
            [chat_prompt_ids(tokenizer, conversations[i], settings.day, bos) for i in live],
            [row_seed(settings.seed, f"turn{turn}-answer", batch["uuid"][i], 0) for i in live],
            settings.answer_sampling,
            max_batch_size=max_batch_size,
        )
        for i, answer in zip(live, answers):
            text, finish = completion_text(tokenizer, answer, settings.answer_sampling.stop_strings)
            conversations[i].append({"role": "assistant", "content": text})
            if not text:
                reasons[i] = "turn_answer_empty"
            elif finish != "stop":
                reasons[i] = "turn_answer_truncated"
        live = [i for i in live if reasons[i] == KEEP]
        questions, tokenizer = sample_completions(
            generator,
            rank,
            [next_turn_ids(tokenizer, system + conversations[i], settings.later, settings.day, bos) for i in live],
            [row_seed(settings.seed, f"turn{turn}-instruction", batch["uuid"][i], 0) for i in live],
            settings.instruction_sampling,
            max_batch_size=max_batch_size,
        )
        for i, question in zip(live, questions):
            text, finish = completion_text(tokenizer, question, settings.instruction_sampling.stop_strings)
            conversations[i].append({"role": "user", "content": text})
            if not text:
                reasons[i] = "later_turn_empty"
            elif finish != "stop":
                reasons[i] = "later_turn_truncated"
    lengths = [len(chat_prompt_ids(tokenizer, c, settings.day, bos)) for c in conversations]
    for i, length in enumerate(lengths):
        if reasons[i] == KEEP and length > settings.max_prompt_tokens:
            reasons[i] = "prompt_too_long"
    return {
        "prompt": conversations,
        "instruction": [c[-1]["content"] for c in conversations],
        "prompt_tokens": lengths,
        DROP_REASON: reasons,
    }


def later_turns(config, models) -> Stage:
    """Turns 2..`num_turns`, each a sampled answer and a follow-up question the generator writes as the user."""
    pre_query = models.pre_query
    return Stage(
        name="turns",
        kind=MODEL,
        desc="Extending conversations",
        apply=extend_conversations,
        reads=("uuid", "prompt"),
        writes=(
            Column(
                "prompt", "The conversation before the answer: user and assistant turns, ending with the user.", ROW
            ),
            Column("instruction", "The last user turn of the conversation.", ROW),
            Column(
                "prompt_tokens", "Length of the chat prompt (template + conversation) in generator tokens.", ROW_STATS
            ),
        ),
        settings=TurnSettings(
            config.num_turns,
            models.later_turn,
            SamplingParams(
                config.instruction_temperature,
                config.instruction_top_p,
                config.max_instruction_tokens,
                tuple(pre_query.instruction_stop_ids),
                tuple(pre_query.instruction_stop_strings),
            ),
            SamplingParams(
                config.response_temperature,
                config.response_top_p,
                config.max_response_tokens,
                tuple(pre_query.response_stop_ids),
                tuple(pre_query.response_stop_strings),
            ),
            models.follow_up_system_prompt,
            config.max_prompt_tokens,
            config.seed,
            config.chat_template_date,
        ),
        models={"generator": models.generator},
        drop_reasons=(
            "later_turn_empty",
            "later_turn_truncated",
            "turn_answer_empty",
            "turn_answer_truncated",
            "prompt_too_long",
        ),
        runtime={"max_batch_size": config.generation_batch_size},
        batch_size=config.shard_size,
        if_none_left="raise max_instruction_tokens / max_response_tokens, or lower num_turns",
    )
