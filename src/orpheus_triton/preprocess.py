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
    PAD_TOKEN,
)
from .prompt import ENGLISH_VOICES, PromptError, Voices, build_prompt

# Preprocessing output names that differ from the LLM input they feed: Triton
# would otherwise see one name as both an input and an output of this model.
OUT_TEMPERATURE = "sampling_temperature"
OUT_REPETITION_PENALTY = "sampling_repetition_penalty"
MAX_TOKENS_LIMIT = 8192


@dataclass(frozen=True)
class SynthesisOptions:
    """A request's options after defaults and range checks."""

    text: str
    voice: str | None = None  # None: the served model's default voice
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise PromptError(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 5):
            raise PromptError(f"temperature must be in [0, 5] (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and 1 <= self.repetition_penalty <= 3):
            raise PromptError(
                f"repetition_penalty must be in [1, 3] (Orpheus needs >= 1.1 for stable speech), "
                f"got {self.repetition_penalty}"
            )


def llm_inputs(tokenizer: Tokenizer, options: SynthesisOptions,
               voices: Voices = ENGLISH_VOICES) -> dict[str, np.ndarray]:
    """The tensors the LLM stage takes (TensorRT-LLM names), each with a leading batch dimension of 1;
    ``voices``: the served model's voices."""
    ids = build_prompt(tokenizer, options.text, options.voice, voices)

    def scalar(value, dtype):
        return np.array([[value]], dtype=dtype)

    return {
        LLM_INPUT_IDS: np.array([ids], dtype=np.int32),
        LLM_INPUT_LENGTHS: scalar(len(ids), np.int32),
        LLM_REQUEST_OUTPUT_LEN: scalar(options.max_tokens, np.int32),
        LLM_END_ID: scalar(END_OF_SPEECH, np.int32),
        LLM_PAD_ID: scalar(PAD_TOKEN, np.int32),
        LLM_STREAMING: scalar(True, np.bool_),
        OUT_TEMPERATURE: scalar(options.temperature, np.float32),
        LLM_TOP_P: scalar(options.top_p, np.float32),
        OUT_REPETITION_PENALTY: scalar(options.repetition_penalty, np.float32),
        LLM_SEED: scalar(options.seed, np.uint64),
    }
