"""The language of every instruction (ISO 639-1), by lingua: its models ship inside the package, so it runs offline."""

import functools

from ..pipeline.stage import ROW_STATS, ROWS, Column, Stage


UNKNOWN = "unknown"  # text lingua cannot place in any language (digits, symbols)


@functools.cache
def detector():
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError as error:
        raise ImportError(
            "Language detection needs lingua: pip install 'magpie-builder[curation]' (or lingua-language-detector)."
        ) from error
    return LanguageDetectorBuilder.from_all_languages().build()


def detect_languages(batch: dict, *, settings=None) -> dict:
    """Input column: `instruction`. Output column: `language`, lowercase ISO 639-1 ("en"), or "unknown"."""
    found = detector().detect_languages_in_parallel_of(batch["instruction"])
    return {"language": [language.iso_code_639_1.name.lower() if language else UNKNOWN for language in found]}


def language(config) -> Stage:
    return Stage(
        name="language",
        kind=ROWS,
        desc="Detecting languages",
        apply=detect_languages,
        reads=("instruction",),
        writes=(Column("language", "Language of the instruction (ISO 639-1, by lingua), or `unknown`.", ROW_STATS),),
    )
