"""What every engine takes and gives: sampling parameters and completions, as token ids."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Args:
    temperature (`float`): 0 means greedy.
    top_p (`float`): nucleus sampling; 1.0 keeps the whole distribution.
    max_new_tokens (`int`): the token cap; a sample that reaches it has finish reason "length".
    stop_token_ids (`tuple[int, ...]`): end-of-turn and EOS ids; a sample that writes one has finish reason "stop".
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]


@dataclass
class Completion:
    token_ids: list[int]  # without the stop token
    finish_reason: str  # "stop" or "length"
