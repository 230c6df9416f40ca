"""The Orpheus prompt: text and voice in, token ids out, with input checks that name the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .constants import (
    BEGIN_OF_TEXT,
    CUSTOM_TOKEN_BASE,
    DEFAULT_VOICE,
    END_OF_HUMAN,
    END_OF_TEXT,
    MAX_TEXT_CHARS,
    START_OF_AI,
    START_OF_HUMAN,
    START_OF_SPEECH,
    VOCAB_SIZE,
    VOICES,
    shown,
)


class PromptError(ValueError):
    """The request's text or voice cannot be turned into a prompt; the message says why."""


@dataclass(frozen=True)
class Voices:
    """The speaker names a checkpoint was fine-tuned with ("tara: Hello"), and the one a request that
    names none gets.

    Orpheus 3B's English fine-tune knows ``VOICES``; the multilingual fine-tunes and
    custom ones know others, and a single-speaker fine-tune knows none: its prompt is
    the text alone (``names`` empty, ``default`` None).
    """

    names: tuple[str, ...] = VOICES
    default: str | None = DEFAULT_VOICE

    @classmethod
    def parse(cls, names: str, default: str | None = None) -> Voices:
        """From comma-separated ``names`` ("none": a single-speaker model) and the ``default`` voice (the
        first name when not given). Names keep their case, as the checkpoint was trained with them;
        requests may name them in any case. Raises ValueError naming what is wrong.

        An empty list is refused, not read as "none": it is what an unset shell variable gives
        (``--voices "$VOICES"``), and a single-speaker prompt for a multi-speaker checkpoint would
        change every request's prompt without a word."""
        if not names.strip():
            raise ValueError(f"the voices are empty ({names!r}: an unset shell variable?): list the checkpoint's "
                             "voices, comma-separated, or give 'none' for a single-speaker fine-tune")
        if names.strip().lower() == "none":
            if default and default.strip():
                raise ValueError(f"default voice {default!r} given, but the voices are {names!r}: a single-speaker "
                                 "model has none")
            return cls((), None)
        listed = tuple(_voice_name(name) for name in names.split(","))
        folded = [name.casefold() for name in listed]
        repeated = sorted({name for name, key in zip(listed, folded, strict=True) if folded.count(key) > 1})
        if repeated:
            raise ValueError(f"voices {names!r} name {', '.join(repeated)} more than once")
        voices = cls(listed, listed[0])
        if default and default.strip():
            try:
                return cls(listed, voices.resolve(default))
            except PromptError:
                raise ValueError(f"default voice {default.strip()!r} is not one of the voices: "
                                 f"{', '.join(listed)}") from None
        return voices

    def resolve(self, voice: str | None) -> str | None:
        """The voice a request's ``voice`` (None or empty: it named none) is prompted with."""
        voice = (voice or "").strip()
        if not voice:
            return self.default
        if not self.names:
            raise PromptError(f"voice {shown(voice)} given, but this model is a single-speaker fine-tune: "
                              "send no voice")
        for name in self.names:
            if name.casefold() == voice.casefold():
                return name
        raise PromptError(f"unknown voice {shown(voice)}; choose one of: {', '.join(self.names)}")


ENGLISH_VOICES = Voices()  # Orpheus 3B's English fine-tune: the default


def _voice_name(name: str) -> str:
    name = name.strip()
    if not name or any(ch.isspace() or ch in ':"\\' for ch in name):
        raise ValueError(f"voice name {shown(name)} must be one word without ':', '\"' or '\\' "
                         "(the prompt is 'voice: text')")
    return name


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
    """The model's tokenizer.json, with Orpheus's own added tokens (ids CUSTOM_TOKEN_BASE to VOCAB_SIZE - 1)
    marked special.

    Orpheus adds its audio and control tokens ("<custom_token_N>") with ``add_tokens``, as ordinary
    added tokens; only special ones are read as plain characters where ``build_prompt`` finds their
    names in a request's text (``encode_special_tokens``). Marking them special changes no id; tokens a
    fine-tune added beyond them (a tag of its own) stay as they are. Marked in the JSON before it is
    read: re-adding 28,683 tokens through the tokenizer took 2.4 s on tokenizers 0.19-0.22.

    Raises FileNotFoundError or ValueError naming the file and what is wrong with it (``tokenizers``' own
    errors name neither: "data did not match any variant of untagged enum ModelUntagged")."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the LLM directory must hold the model's tokenizer.json")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a tokenizer.json: it is not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    added = document.get("added_tokens") if isinstance(document, dict) else None
    for token in added if isinstance(added, list) else []:  # anything else is tokenizers' to refuse, below
        identity = token.get("id") if isinstance(token, dict) else None
        if isinstance(identity, int) and CUSTOM_TOKEN_BASE <= identity < VOCAB_SIZE:
            token["special"] = True
    try:
        return Tokenizer.from_str(json.dumps(document))
    except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception for a document it cannot read)
        raise ValueError(f"{path} is not a tokenizer the `tokenizers` library can read: {error}") from None


def build_prompt(tokenizer: Tokenizer, text: str, voice: str | None, voices: Voices = ENGLISH_VOICES) -> list[int]:
    """Orpheus's fine-tuning format: <human> BOS "voice: text" <eot> </human> <ai> <speech>.

    ``voice`` None takes ``voices``' default; a single-speaker model's prompt is the text alone.
    Emotive tags such as <laugh> are ordinary text to the tokenizer and pass through.
    """
    text, voice = check_text(text), voices.resolve(voice)
    # A control token's name in the text ("<custom_token_2>" is end-of-speech) is read as the characters it
    # is, not as that token: a request's text must not end the human turn or speak audio codes of its own.
    literal = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        ids = tokenizer.encode(f"{voice}: {text}" if voice else text, add_special_tokens=True).ids
    finally:
        tokenizer.encode_special_tokens = literal
    if not ids or ids[0] != BEGIN_OF_TEXT:  # tokenizers without a BOS post-processor
        ids = [BEGIN_OF_TEXT, *ids]
    return [START_OF_HUMAN, *ids, END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]
