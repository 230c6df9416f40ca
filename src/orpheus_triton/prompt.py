"""The Orpheus prompt: text and voice in, token ids out, with input checks that name the problem."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .constants import (
    BEGIN_OF_TEXT,
    END_OF_HUMAN,
    END_OF_TEXT,
    MAX_TEXT_CHARS,
    START_OF_AI,
    START_OF_HUMAN,
    START_OF_SPEECH,
    VOICES,
)


class PromptError(ValueError):
    """The request's text or voice cannot be turned into a prompt; the message says why."""


def check_voice(voice: str) -> str:
    voice = voice.strip().lower()
    if voice not in VOICES:
        raise PromptError(f"unknown voice {voice!r}; choose one of: {', '.join(VOICES)}")
    return voice


def check_text(text: str) -> str:
    text = text.strip()
    if not text:
        raise PromptError("text is empty; send the words to speak")
    if len(text) > MAX_TEXT_CHARS:
        raise PromptError(
            f"text is {len(text)} characters; the limit is {MAX_TEXT_CHARS} per request (split longer text into "
            "sentences, as AsyncOrpheusClient.stream_text and `orpheus-triton say --sentences` do)"
        )
    return text


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the LLM directory must hold the model's tokenizer.json")
    return Tokenizer.from_file(str(path))


def build_prompt(tokenizer: Tokenizer, text: str, voice: str) -> list[int]:
    """Orpheus's fine-tuning format: <human> BOS "voice: text" <eot> </human> <ai> <speech>.

    Emotive tags such as <laugh> are ordinary text to the tokenizer and pass through.
    """
    text, voice = check_text(text), check_voice(voice)
    ids = tokenizer.encode(f"{voice}: {text}", add_special_tokens=True).ids
    if not ids or ids[0] != BEGIN_OF_TEXT:  # tokenizers without a BOS post-processor
        ids = [BEGIN_OF_TEXT, *ids]
    return [START_OF_HUMAN, *ids, END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]
