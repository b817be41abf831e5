"""Responses: N answers to every prompt, sampled through the generator's normal chat template."""

from dataclasses import dataclass

from ..engines import SamplingParams, sample_completions
from ..engines.protocol import completion_text
from ..models import ModelSpec, load_tokenizer, public_model_name
from ..pipeline.stage import CANDIDATE_STATS, CANDIDATES, MODEL, PROVENANCE, Column, Stage
from ..templates import bos_prefix
from . import row_seed
from .filters import chat_prompt_ids


@dataclass(frozen=True)
class ResponseSettings:
    sampling: SamplingParams
    num_responses: int
    seed: int
    generator_revision: str
    day: str


def generate_responses(
    batch: dict,
    rank: int | None,
    *,
    generator: ModelSpec,
    settings: ResponseSettings,
    max_batch_size: int = 64,
    next_batch: dict | None = None,
    prompt_cap: int | None = None,
):
    """Samples N responses per prompt, all N from one shared prefill of the chat prompt.

    Input columns: `uuid`, `prompt`. Output columns: `responses` (N strings), `response_finish_reasons` (N of
    "stop"/"length"), `response_tokens` (N ints), `gen_response_configs`. `next_batch` (this worker's next shard,
    when there is one) starts in the rows this shard's tail frees; it changes no output.
    """
    n = settings.num_responses
    tokenizer = load_tokenizer(generator)
    bos = bos_prefix(tokenizer)

    def work(rows: dict):
        return (
            [chat_prompt_ids(tokenizer, prompt, settings.day, bos) for prompt in rows["prompt"]],
            [row_seed(settings.seed, "response", u, j) for u in rows["uuid"] for j in range(n)],
        )

    prompts, seeds = work(batch)
    completions, tokenizer = sample_completions(
        generator,
        rank,
        prompts,
        seeds,
        settings.sampling,
        num_samples=n,
        max_batch_size=max_batch_size,
        then=work(next_batch) if next_batch else None,
        prompt_cap=prompt_cap,
    )
    config = {
        "output_generator": public_model_name(generator.name_or_path),
        "generator_revision": settings.generator_revision,
        "temperature": settings.sampling.temperature,
        "top_p": settings.sampling.top_p,
        "max_tokens": settings.sampling.max_new_tokens,
        "num_responses": n,
        "seed": settings.seed,
    }
    texts = [completion_text(tokenizer, c, settings.sampling.stop_strings) for c in completions]
    groups = [completions[i : i + n] for i in range(0, len(completions), n)]
    text_groups = [texts[i : i + n] for i in range(0, len(texts), n)]
    return {
        "responses": [[text for text, _ in g] for g in text_groups],
        "response_finish_reasons": [[reason for _, reason in g] for g in text_groups],
        "response_tokens": [[len(c.token_ids) for c in g] for g in groups],
        "gen_response_configs": [config] * len(groups),
    }


def response_tokens(rows) -> tuple[int, dict]:
    reasons = [r for row in rows["response_finish_reasons"] for r in row]
    return sum(map(sum, rows["response_tokens"])), {"responses_truncated": reasons.count("length")}


def responses(config, models) -> Stage:
    """`num_responses` per prompt (Magpie DPO: 5 at temperature 0.8), stopped at the end of the assistant's turn."""
    return Stage(
        name="responses",
        kind=MODEL,
        desc="Generating responses",
        apply=generate_responses,
        reads=("uuid", "prompt"),
        writes=(
            Column("responses", "All sampled responses, in sampling order.", CANDIDATES),
            Column(
                "response_finish_reasons",
                "`stop` (the model ended its turn) or `length` (hit the token cap), per response.",
                CANDIDATE_STATS,
            ),
            Column("response_tokens", "Length of each response in generator tokens.", CANDIDATE_STATS),
            Column(
                "gen_response_configs",
                "Response sampling: generator, revision, temperature, top_p, max tokens, N, seed.",
                PROVENANCE,
            ),
        ),
        settings=ResponseSettings(
            SamplingParams(
                config.response_temperature,
                config.response_top_p,
                config.max_response_tokens,
                tuple(models.pre_query.response_stop_ids),
                tuple(models.pre_query.response_stop_strings),
            ),
            config.num_responses,
            config.seed,
            models.generator_revision,
            config.chat_template_date,
        ),
        models={"generator": models.generator},
        runtime={"max_batch_size": config.generation_batch_size, "prompt_cap": config.max_prompt_tokens},
        batch_size=config.shard_size,
        look_ahead=config.look_ahead,
        tally=response_tokens,
    )
