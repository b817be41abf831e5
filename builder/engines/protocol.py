"""What every engine takes and gives: sampling parameters and completions, as token ids."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Args:
    temperature (`float`): 0 means greedy.
    top_p (`float`): nucleus sampling; 1.0 keeps the whole distribution.
    max_new_tokens (`int`): the token cap; a sample that reaches it has finish reason "length".
    stop_token_ids (`tuple[int, ...]`): end-of-turn and EOS ids; a sample that writes one has finish reason "stop".
    stop_strings (`tuple[str, ...]`): text that ends a turn where no control token does; a sample stops once its
        text holds one (its ids then run to the end of the token that completed it: `completion_text` cuts there).
    """

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    stop_strings: tuple[str, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]  # without the stop token
    finish_reason: str  # "stop" or "length"


def cut_at_stop(text: str, stop_strings) -> tuple[str, bool]:
    """`text` before the first stop string in it, and whether there was one."""
    hits = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return (text[: min(hits)], True) if hits else (text, False)


def completion_text(tokenizer, completion: Completion, stop_strings=(), strip: bool = True) -> tuple[str, str]:
    """(text, finish reason) of a completion: decoded without special tokens, cut before a stop string (then the
    reason is "stop" whatever the engine said), and stripped unless `strip` is False (a continued text)."""
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, stop_strings)
    return text.strip() if strip else text, "stop" if stopped else completion.finish_reason


class StopText:
    """Whether a sample's text now holds a stop string: the transformers engine's check after every token (vLLM
    has its own). Only the last tokens are decoded: a stop string is found the step it is completed."""

    def __init__(self, tokenizer, stop_strings):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.window = max(map(len, self.stop_strings)) + 8  # every token that is not skipped is a character or more

    def __call__(self, token_ids: list[int]) -> bool:
        tail = self.tokenizer.decode(token_ids[-self.window :], skip_special_tokens=True)
        return any(stop in tail for stop in self.stop_strings)
