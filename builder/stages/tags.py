"""Tags by an LLM judge: Magpie's task category, difficulty and input quality of every instruction, by label scoring.

The judge reads one prompt per instruction (its rubric first, so every prompt shares that prefix, then the
instruction), and each tag's label is not generated and parsed: every label of a tag is scored as the judge's
continuation ("Difficulty: hard\n") and the most likely one is the tag, its share of the probability over the tag's
labels the confidence. The labels are Magpie's (magpie-align/magpie `exp/str_utils.py`); the rubric is our own text
in the same spirit.
"""

import math
from dataclasses import dataclass

from ..engines import SamplingParams, sample_completions, score_continuations
from ..engines.protocol import completion_text
from ..models import ModelSpec, load_tokenizer
from ..pipeline.stage import MODEL, ROW_STATS, Column, Stage
from ..templates import bos_prefix, encode_chat_text, render_chat


@dataclass(frozen=True)
class Tag:
    """Args:
    name (`str`): the column (Magpie's name).
    header (`str`): the answer line's header the judge continues after ("Difficulty").
    labels (`tuple[str, ...]`): the closed label set, ordinal ones from worst to best.
    rubric (`str`): what the judge is told the tag means.
    """

    name: str
    header: str
    labels: tuple[str, ...]
    rubric: str


TASK_CATEGORY = Tag(
    "task_category",
    "Task category",
    (
        "Information seeking",
        "Reasoning",
        "Planning",
        "Editing",
        "Coding & Debugging",
        "Math",
        "Role playing",
        "Data analysis",
        "Creative writing",
        "Advice seeking",
        "Brainstorming",
        "Others",
    ),
    "the one main kind of task the user asks for. Information seeking: facts or explanations. Reasoning: logic, "
    "puzzles, problem solving. Planning: plans, schedules, strategies. Editing: rewrite, correct or format a "
    "given text. Coding & Debugging: write, review or fix code. Math: calculations and mathematical problems. "
    "Role playing: the assistant takes on a character. Data analysis: interpret or process data or tables. "
    "Creative writing: stories, poems, scripts. Advice seeking: personal or professional advice. Brainstorming: "
    "generate ideas. Others: anything else.",
)
DIFFICULTY = Tag(
    "difficulty",
    "Difficulty",
    ("very easy", "easy", "medium", "hard", "very hard"),
    "how hard it is to answer the query well, for an expert who knows what the user needs (very easy, easy, "
    "medium, hard, very hard).",
)
INPUT_QUALITY = Tag(
    "input_quality",
    "Input quality",
    ("very poor", "poor", "average", "good", "excellent"),
    "how clear, specific and coherent the query is. very poor: unclear, vague or incoherent, missing essential "
    "context. poor: unclear or missing important details. average: moderately clear, may need some more "
    "information. good: clear, specific and mostly well-formed. excellent: very clear, specific and "
    "well-articulated, with all the context needed.",
)
TAGS = (TASK_CATEGORY, DIFFICULTY, INPUT_QUALITY)
ORDINAL = {DIFFICULTY.name: DIFFICULTY.labels, INPUT_QUALITY.name: INPUT_QUALITY.labels}


def judge_prompt(instruction: str, tags: tuple[Tag, ...]) -> str:
    """The judge's user message: the rubric first (the prefix all prompts share), the instruction last."""
    lines = "\n".join(f"{tag.header}: {tag.rubric}" for tag in tags)
    return (
        "You annotate queries that users send to an AI assistant, to curate a training set. Read the query and "
        f"answer with {len(tags)} lines, each a header and exactly one of its labels:\n{lines}\n\n"
        f"## User query\n\n{instruction}"
    )


def label_texts(header: str, labels) -> list[str]:
    """The judge's answer line for each label. Where one label begins another ("1" and "10"), a line break closes
    each, so the shorter one does not also collect the longer one's probability."""
    labels = [str(label) for label in labels]
    nested = any(a != b and b.startswith(a) for a in labels for b in labels)
    return [f"{header}: {label}" + ("\n" if nested else "") for label in labels]


def normalise(logprobs: list[float]) -> list[float]:
    """Log-likelihoods of a closed label set -> their probabilities, summing to 1."""
    top = max(logprobs)
    weights = [math.exp(v - top) for v in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def chat_ids(tokenizer, content: str, day: str, bos: list[int]) -> list[int]:
    """A user message through the model's own chat template, with the assistant's generation header."""
    return encode_chat_text(
        tokenizer,
        render_chat(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True, day=day),
        bos,
    )


@dataclass(frozen=True)
class TagSettings:
    tags: tuple[Tag, ...]
    day: str
    judge_revision: str


def tag_instructions(batch: dict, rank: int | None, *, judge: ModelSpec, settings: TagSettings, max_rows: int = 256):
    """Labels every instruction with each tag by label scoring.

    Input columns: `instruction`. Output columns: per tag `<tag>` (one of its labels) and `<tag>_confidence` (the
    label's probability among the tag's labels).
    """
    tokenizer = load_tokenizer(judge)
    bos = bos_prefix(tokenizer)
    prompts = [
        chat_ids(tokenizer, judge_prompt(text, settings.tags), settings.day, bos) for text in batch["instruction"]
    ]
    continuations, spans = [], []
    for tag in settings.tags:
        start = len(continuations)
        continuations += [
            tokenizer(text, add_special_tokens=False)["input_ids"] for text in label_texts(tag.header, tag.labels)
        ]
        spans.append((tag, start, len(continuations)))
    scores = score_continuations(judge, rank, prompts, continuations, max_rows=max_rows)
    out = {}
    for tag, start, end in spans:
        labels, confidences = [], []
        for row in scores:
            probabilities = normalise(row[start:end])
            best = max(range(len(probabilities)), key=lambda i: (probabilities[i], -i))
            labels.append(tag.labels[best])
            confidences.append(probabilities[best])
        out[tag.name], out[f"{tag.name}_confidence"] = labels, confidences
    return out


def tags(config, models) -> Stage:
    """Task category, difficulty and input quality of every instruction, by the judge (default: the generator)."""
    columns = []
    for tag in TAGS:
        columns += [
            Column(tag.name, f"{tag.header} by the judge: one of {', '.join(tag.labels)}.", ROW_STATS),
            Column(
                f"{tag.name}_confidence",
                f"The judge's probability of that {tag.header.lower()} among its labels.",
                ROW_STATS,
            ),
        ]
    return Stage(
        name="tags",
        kind=MODEL,
        desc="Tagging instructions",
        apply=tag_instructions,
        reads=("instruction",),
        writes=tuple(columns),
        settings=TagSettings(TAGS, config.chat_template_date, models.judge_revision),
        models={"judge": models.judge},
        runtime={"max_rows": config.judge_batch_size},
        batch_size=config.shard_size,
    )


# Magpie's free-text tags, each asked on its own and begun for the judge, so its answer reads as Magpie's did.
EXPLANATIONS = (
    ("intent", "In one sentence, what does the user want?", "The user wants to"),
    (
        "knowledge",
        "In one sentence, what must an assistant know to answer it well?",
        "To solve this problem, the models need to know",
    ),
    (
        "quality_explanation",
        "In one or two sentences, assess how clear, specific and coherent the query is, naming its strengths and "
        "weaknesses.",
        "The query is",
    ),
)


def explanation_prompt(instruction: str, question: str) -> str:
    return f"You annotate queries that users send to an AI assistant. {question}\n\n## User query\n\n{instruction}"


@dataclass(frozen=True)
class ExplanationSettings:
    sampling: SamplingParams  # greedy: the same text on every run
    day: str
    judge_revision: str


def explain_instructions(
    batch: dict, rank: int | None, *, judge: ModelSpec, settings: ExplanationSettings, max_batch_size: int = 64
):
    """Magpie's short generated tags, greedy from the judge, each answer begun with Magpie's opening words.

    Input columns: `instruction`. Output columns: `intent`, `knowledge`, `quality_explanation`,
    `explanations_truncated` (how many of the row's three hit `max_explanation_tokens`).
    """
    tokenizer = load_tokenizer(judge)
    bos = bos_prefix(tokenizer)
    prompts, openings = [], []
    for text in batch["instruction"]:
        for _, question, opening in EXPLANATIONS:
            opening_ids = tokenizer(opening, add_special_tokens=False)["input_ids"]
            prompts.append(chat_ids(tokenizer, explanation_prompt(text, question), settings.day, bos) + opening_ids)
            openings.append(opening)
    completions, tokenizer = sample_completions(
        judge, rank, prompts, [0] * len(prompts), settings.sampling, max_batch_size=max_batch_size
    )
    cut = [completion_text(tokenizer, c, settings.sampling.stop_strings, strip=False) for c in completions]
    texts = [f"{opening}{text}".strip() for opening, (text, _) in zip(openings, cut)]
    count = len(EXPLANATIONS)
    out = {name: texts[i::count] for i, (name, _, _) in enumerate(EXPLANATIONS)}
    out["explanations_truncated"] = [
        sum(reason == "length" for _, reason in cut[i : i + count]) for i in range(0, len(cut), count)
    ]
    return out


def truncated_explanations(rows) -> tuple[int, dict]:
    return 0, {"explanations_truncated": sum(rows["explanations_truncated"])}


def explanations(config, models) -> Stage:
    """Magpie's `intent`, `knowledge` and `quality_explanation`: short texts the judge writes (greedy)."""
    return Stage(
        name="explanations",
        kind=MODEL,
        desc="Explaining instructions",
        apply=explain_instructions,
        reads=("instruction",),
        writes=(
            Column("intent", 'What the user wants, in the judge\'s words ("The user wants to ...").', ROW_STATS),
            Column("knowledge", "What answering it takes, in the judge's words.", ROW_STATS),
            Column("quality_explanation", "The judge's assessment of the query's clarity and specificity.", ROW_STATS),
            Column("explanations_truncated", "How many of the row's three texts hit `max_explanation_tokens`."),
        ),
        settings=ExplanationSettings(
            SamplingParams(
                0.0, 1.0, config.max_explanation_tokens, tuple(models.judge_stop_ids), tuple(models.judge_stop_strings)
            ),
            config.chat_template_date,
            models.judge_revision,
        ),
        models={"judge": models.judge},
        runtime={"max_batch_size": config.generation_batch_size},
        batch_size=config.shard_size,
        tally=truncated_explanations,
    )
