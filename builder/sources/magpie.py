"""Magpie's source: the generator writes every instruction itself, fed only its pre-query template.

Rows are `num_instructions` uuids from the seed; each instruction is sampled with the row's own seed and stops
where the user's turn ends. The row contract starts here: `prompt` is the conversation to answer (the instruction
as one user message), and `instruction` is Magpie's column for its last user message.
"""

import hashlib
import uuid as uuid_lib
from dataclasses import dataclass
from functools import partial

from datasets import Dataset

from ..engines import SamplingParams, sample_completions
from ..engines.protocol import completion_text
from ..models import ModelSpec, public_model_name
from ..pipeline.stage import MODEL, PROVENANCE, ROW, ROW_STATS, Column, Stage
from ..stages import row_seed


@dataclass(frozen=True)
class InstructionSettings:
    pre_query_ids: tuple[int, ...]
    pre_query_text: str
    sampling: SamplingParams
    seed: int
    generator_revision: str


def make_uuids(seed: int, count: int) -> list[str]:
    return [
        str(uuid_lib.UUID(bytes=hashlib.blake2b(f"magpie/{seed}/{i}".encode(), digest_size=16).digest(), version=4))
        for i in range(count)
    ]


def uuid_rows(seed: int, count: int) -> Dataset:
    """The source's rows: one uuid per instruction to sample. A row's instruction depends on its uuid alone, so
    the count is no part of the key: a bigger build reuses the finished batches of the rows it shares."""
    return Dataset.from_dict({"uuid": make_uuids(seed, count)})


def generate_instructions(
    batch: dict,
    rank: int | None,
    *,
    generator: ModelSpec,
    settings: InstructionSettings,
    max_batch_size: int = 64,
    next_batch: dict | None = None,
):
    """Samples one instruction per row from the pre-query template.

    Input columns: `uuid`. Output columns: `instruction`, `prompt` (`[user: instruction]`),
    `instruction_finish_reason` ("stop" or "length"), `instruction_tokens`, `gen_input_configs`. `next_batch` (this
    worker's next shard, when there is one) starts in the rows this shard's tail frees; it changes no output.
    """

    def work(rows: dict):
        seeds = [row_seed(settings.seed, "instruction", u, 0) for u in rows["uuid"]]
        return [list(settings.pre_query_ids)] * len(seeds), seeds

    prompts, seeds = work(batch)
    completions, tokenizer = sample_completions(
        generator,
        rank,
        prompts,
        seeds,
        settings.sampling,
        same_prompt=True,
        max_batch_size=max_batch_size,
        then=work(next_batch) if next_batch else None,
    )
    config = {
        "input_generator": public_model_name(generator.name_or_path),
        "generator_revision": settings.generator_revision,
        "pre_query_template": settings.pre_query_text,
        "temperature": settings.sampling.temperature,
        "top_p": settings.sampling.top_p,
        "max_tokens": settings.sampling.max_new_tokens,
        "seed": settings.seed,
    }
    texts = [completion_text(tokenizer, c, settings.sampling.stop_strings) for c in completions]
    instructions = [text for text, _ in texts]
    return {
        "instruction": instructions,
        "prompt": [[{"role": "user", "content": text}] for text in instructions],
        "instruction_finish_reason": [reason for _, reason in texts],
        "instruction_tokens": [len(c.token_ids) for c in completions],
        "gen_input_configs": [config] * len(completions),
    }


def instruction_tokens(rows) -> tuple[int, dict]:
    return sum(rows["instruction_tokens"]), {}


def instructions(config, models) -> Stage:
    """`num_instructions` instructions from the pre-query template alone (Magpie: temperature 1.0, top_p 1.0)."""
    pre_query = models.pre_query
    return Stage(
        name="instructions",
        kind=MODEL,
        desc="Generating instructions",
        apply=generate_instructions,
        start=partial(uuid_rows, config.seed, config.num_instructions),
        reads=("uuid",),
        writes=(
            Column("uuid", "Stable id of the row (from the seed and the row's index).", ROW),
            Column("instruction", "The instruction the generator wrote from the pre-query template.", ROW),
            Column("prompt", "The conversation before the answer: `[{role: user, content: instruction}]`.", ROW),
            Column("instruction_finish_reason", "`stop` (the user's turn ended) or `length` (hit the token cap)."),
            Column("instruction_tokens", "Length of the instruction in generator tokens.", ROW_STATS),
            Column(
                "gen_input_configs",
                "Instruction sampling: generator, revision, pre-query template, temperature, top_p, seed.",
                PROVENANCE,
            ),
        ),
        settings=InstructionSettings(
            tuple(pre_query.token_ids),
            pre_query.text,
            SamplingParams(
                config.instruction_temperature,
                config.instruction_top_p,
                config.max_instruction_tokens,
                tuple(pre_query.instruction_stop_ids),
                tuple(pre_query.instruction_stop_strings),
            ),
            config.seed,
            models.generator_revision,
        ),
        models={"generator": models.generator},
        runtime={"max_batch_size": config.generation_batch_size},
        batch_size=config.shard_size,
        look_ahead=config.look_ahead,
        tally=instruction_tokens,
    )
