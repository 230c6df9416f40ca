"""The preprocessing stage's logic: a request's text, voice and options -> the LLM stage's input tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .constants import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    END_OF_SPEECH,
    LLM_END_ID,
    LLM_INPUT_IDS,
    LLM_INPUT_LENGTHS,
    LLM_PAD_ID,
    LLM_REQUEST_OUTPUT_LEN,
    LLM_SEED,
    LLM_STREAMING,
    LLM_TOP_P,
    MIN_MAX_TOKENS,
    PAD_TOKEN,
    max_tokens_refusal,
)
from .prompt import ENGLISH_VOICES, PromptError, Voices, build_prompt

# Preprocessing output names that differ from the LLM input they feed: Triton
# would otherwise see one name as both an input and an output of this model.
OUT_TEMPERATURE = "sampling_temperature"
OUT_REPETITION_PENALTY = "sampling_repetition_penalty"


@dataclass(frozen=True)
class SynthesisOptions:
    """A request's options after defaults and range checks."""

    text: str
    voice: str | None = None  # None: the served model's default voice
    # None: DEFAULT_MAX_TOKENS, or as many as the served max_seq_len leaves after the prompt if fewer
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: int = 0

    def __post_init__(self):
        if self.max_tokens is not None and (refusal := max_tokens_refusal(self.max_tokens)) is not None:
            raise PromptError(refusal)
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 5):
            raise PromptError(f"temperature must be in [0, 5] (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and 1 <= self.repetition_penalty <= 3):
            raise PromptError(
                f"repetition_penalty must be in [1, 3] (Orpheus needs >= 1.1 for stable speech), "
                f"got {self.repetition_penalty}"
            )


def output_budget(prompt_tokens: int, max_tokens: int | None, max_seq_len: int | None) -> int:
    """The audio tokens a request may generate: its ``max_tokens``, or by default DEFAULT_MAX_TOKENS cut
    to what the LLM's ``max_seq_len`` (prompt + generated tokens) leaves after the prompt.

    The default follows the server's length so that a server started with a shorter ``--max-seq-len``
    still serves every request that names no ``max_tokens``; one that names more than fits is refused
    here, with both numbers, instead of by the engine behind.
    """
    if max_seq_len is None:
        return DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    room = max_seq_len - prompt_tokens
    if room < MIN_MAX_TOKENS:
        raise PromptError(f"the prompt takes {prompt_tokens} tokens of the server's max_seq_len of {max_seq_len} "
                          f"(prompt + audio tokens), leaving {max(room, 0)} for audio, less than one SNAC frame "
                          f"({MIN_MAX_TOKENS} tokens); shorten the text (or serve with a longer max_seq_len: "
                          f"`orpheus-triton serve --max-seq-len`)")
    if max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise PromptError(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the server's "
                          f"max_seq_len {max_seq_len}; shorten the text or lower max_tokens to {room} at most")
    return max_tokens


def check_max_seq_len(tokenizer: Tokenizer, voices: Voices, max_seq_len: int) -> None:
    """Raise ValueError if ``max_seq_len`` leaves no room for any request: the shortest prompt (a word
    in the default voice) and one SNAC frame of audio. Said when the server starts, instead of by
    every request it then refuses."""
    shortest = len(build_prompt(tokenizer, "Hi", None, voices)) + MIN_MAX_TOKENS
    if max_seq_len < shortest:
        raise ValueError(f"max_seq_len {max_seq_len} (prompt + audio tokens per stream) is too short for any "
                         f"request: a one-word prompt takes {shortest - MIN_MAX_TOKENS} tokens and one SNAC frame "
                         f"{MIN_MAX_TOKENS} more: {shortest} at the least")


def llm_inputs(tokenizer: Tokenizer, options: SynthesisOptions, voices: Voices = ENGLISH_VOICES,
               max_seq_len: int | None = None, max_prompt_tokens: int | None = None) -> dict[str, np.ndarray]:
    """The tensors the LLM stage takes (TensorRT-LLM names), each with a leading batch dimension of 1;
    ``voices``: the served model's voices; ``max_seq_len``: the LLM's prompt + generated tokens per
    stream (None: unchecked here, the LLM checks); ``max_prompt_tokens``: the longest prompt it takes
    (TensorRT-LLM's max_input_len; None: max_seq_len alone bounds it)."""
    ids = build_prompt(tokenizer, options.text, options.voice, voices)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise PromptError(f"the prompt takes {len(ids)} tokens, more than the {max_prompt_tokens} the LLM engine "
                          "takes (its max_input_len); shorten the text")
    max_tokens = output_budget(len(ids), options.max_tokens, max_seq_len)

    def scalar(value, dtype):
        return np.array([[value]], dtype=dtype)

    return {
        LLM_INPUT_IDS: np.array([ids], dtype=np.int32),
        LLM_INPUT_LENGTHS: scalar(len(ids), np.int32),
        LLM_REQUEST_OUTPUT_LEN: scalar(max_tokens, np.int32),
        LLM_END_ID: scalar(END_OF_SPEECH, np.int32),
        LLM_PAD_ID: scalar(PAD_TOKEN, np.int32),
        LLM_STREAMING: scalar(True, np.bool_),
        OUT_TEMPERATURE: scalar(options.temperature, np.float32),
        LLM_TOP_P: scalar(options.top_p, np.float32),
        OUT_REPETITION_PENALTY: scalar(options.repetition_penalty, np.float32),
        LLM_SEED: scalar(options.seed, np.uint64),
    }
