"""Speak text while it is still arriving: cut it into sentences, synthesize them in order, overlapped.

A voice agent's reply comes from its own LLM a few tokens at a time, and one
Orpheus request holds at most ``MAX_TEXT_CHARS`` characters and plays at most
``DEFAULT_MAX_TOKENS`` tokens (about 14 s) unless asked for more. Waiting for the
whole reply would delay the first audio by the agent LLM's whole answer, and a
long reply would be cut off. So the text is cut into sentences as they complete
(``SentenceSplitter``), each sentence is one request, and the next sentence
generates while the current one plays (``speak_in_order``), so the listener hears
one continuous stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

# About what one request's default token budget (DEFAULT_MAX_TOKENS, ~14 s of audio) speaks at a
# conversational 14-15 characters a second, with room to spare: longer sentences are cut at a clause.
MAX_SENTENCE_CHARS = 200

_END_MARKS = ".!?…"
_CLOSERS = "\"'”’)]"
# Words that end in a full stop without ending the sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "approx", "fig",
                            "inc", "ltd", "mt", "vol", "dept", "est", "cf",
                            "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"})
# Letters each with a full stop, the last one's before the cut: "U.S", "U.K" ("U.S. Army" goes on).
_INITIALISM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
# Abbreviations that end a sentence unless a number follows ("Call No. 5", "see p. 12").
_BEFORE_NUMBERS = frozenset({"no", "nos", "nr", "p", "pp", "art", "sec", "ch", "fig", "vol"})
# A sentence end: end marks, any closing quotes or brackets, whitespace, then the next sentence's first character.
_BOUNDARY = re.compile(rf"[{re.escape(_END_MARKS)}]+[{re.escape(_CLOSERS)}]*(\s+)(\S)")
# Chinese and Japanese full-width end marks: no space follows them, so the next sentence's first
# character must be neither another end mark nor a closing quote ("好。”" and "吗？！" end where they end).
_WIDE_BOUNDARY = re.compile(r"[。！？]+[」』）”’]*(\s*)([^\s。！？」』）”’])")
_PIECE_CHARS = 1024  # SentenceSplitter.push takes long text this many characters at a time
_CLAUSE_END = re.compile(r"[,;:]\s|\s[-–—]\s|[，、；：]")


class SentenceSplitter:
    """Cut text that arrives in pieces into sentences, each as soon as it is known to be complete.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (and closing quotes) followed by
    whitespace and a character that can start a sentence (not a lowercase letter:
    "e.g. this" and "Wait... what" go on), at ``。``, ``！`` or ``？`` (no space follows
    those), or at a line break. Abbreviations,
    initials and initialisms ("Dr. Smith", "J. R. R. Tolkien", "the U.S. Army", "No. 5") do not
    end one, nor do decimals (no space after the point). A sentence longer than ``max_chars`` is cut at its last
    clause break (comma, semicolon, colon, dash) or space before that length, never
    inside a ``<tag>``. Sentences come out with their whitespace collapsed.
    """

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS):
        if max_chars < 20:
            raise ValueError(f"max_chars must be >= 20, got {max_chars}")
        self.max_chars = max_chars
        self.pending = ""

    def push(self, text: str) -> list[str]:
        """Add ``text``; return the sentences it completed.

        Taken a piece at a time (the same sentences as whole): each cut rescans what is held, so a whole
        book pushed at once would take time growing with its length squared before its first sentence.
        """
        sentences = []
        for start in range(0, len(text), _PIECE_CHARS):
            self.pending += text[start:start + _PIECE_CHARS]
            while (cut := self._next_cut()) is not None:
                sentences += _tidy(self.pending[:cut])
                self.pending = self.pending[cut:]
        return sentences

    def paused(self) -> list[str]:
        """The text has paused: return what is held as a sentence if it ends as one would (an end mark,
        closing quotes or brackets, maybe whitespace), else nothing.

        ``push`` cuts a sentence only once the next one begins, as the end mark alone may not end it
        ("e.g. this"). A voice agent's reply often stops right there for a while ("Let me check that
        for you." before a tool call): waiting for its next words would hold that sentence's audio
        back for the whole pause. A number's point at a pause ("It is 3." then, later, "14 in all") is
        taken as the end it more often is ("Your total is 42.").
        """
        held = self.pending.rstrip()
        if not held or self._next_cut(held + " X") != len(held):  # as if a sentence began next
            return []
        self.pending = ""
        return _tidy(held)

    def finish(self) -> list[str]:
        """The text is complete: return what is left as the last sentence."""
        sentences = self.push("") + _tidy(self.pending)
        self.pending = ""
        return sentences

    def _next_cut(self, text: str | None = None) -> int | None:
        """Where the first complete sentence of ``text`` (default: ``pending``) ends, if one does."""
        text = self.pending if text is None else text
        cuts = [match.start(1) for match in _WIDE_BOUNDARY.finditer(text)][:1]
        for match in _BOUNDARY.finditer(text):
            before = text[: match.start()]
            marks = text[match.start() : match.start(1)].rstrip(_CLOSERS)
            if match.group(2).islower() or not any(ch.isalpha() for ch in before) \
                    or (marks == "." and _is_abbreviation(before, match.group(2))):
                continue  # "e.g. this", a list's "1.", "Dr. Smith", "No. 5": the sentence goes on
            cuts.append(match.start(1))
            break
        start = len(text) - len(text.lstrip())
        line_break = text.find("\n", start)
        if line_break >= 0:
            cuts.append(line_break + 1)
        if cuts and len(_collapse(text[: min(cuts)])) <= self.max_chars:
            return min(cuts)
        if len(_collapse(text)) > self.max_chars:
            return self._long_cut(text)
        return None

    def _long_cut(self, text: str) -> int:
        """Where to cut ``text``, too long for one sentence: the last clause break or space in its first
        ``max_chars`` characters (counted after collapsing whitespace) outside a tag, else right there."""
        limit = _raw_index(text, self.max_chars)
        head = text[:limit]
        tag_start = head.rfind("<")
        if tag_start > 0 and tag_start > head.rfind(">"):  # a tag would be split: cut before it
            head = head[:tag_start]
        clauses = [m.end() for m in _CLAUSE_END.finditer(head)]
        lead = len(head) - len(head.lstrip())  # whitespace left from the cut before: not the sentence's
        if clauses and clauses[-1] - lead > (len(head) - lead) // 3:
            return clauses[-1]
        space = head.rstrip().rfind(" ")
        return space + 1 if space > 0 else max(len(head), 1)


def _is_abbreviation(before: str, next_char: str = "") -> bool:
    """Whether the word ending ``before`` (the text up to a full stop) is an abbreviation, an initial or
    initialism ("U.S.", "J."), or a number's abbreviation followed by one ("No. 5", ``next_char`` a digit)."""
    word = before.rsplit(None, 1)[-1] if before.split() else ""
    word = word.lstrip("(\"'“‘")
    initial = len(word) == 1 and word.isalpha() and word.isupper() and word != "I"
    numbered = next_char.isdigit() and word.lower() in _BEFORE_NUMBERS
    initialism = word.isupper() and bool(_INITIALISM.fullmatch(word))  # not "a.m": it often ends one
    return initial or initialism or numbered or word.lower() in _ABBREVIATIONS


def _collapse(text: str) -> str:
    return " ".join(text.split())


def has_words(text: str) -> bool:
    """Whether ``text`` has anything to say: a letter or a digit (spaces and punctuation alone are not spoken)."""
    return any(ch.isalnum() for ch in text)


def _tidy(text: str) -> list[str]:
    """``text`` as a sentence, or nothing if it has nothing to say (``has_words``)."""
    sentence = _collapse(text)
    return [sentence] if has_words(sentence) else []


def _raw_index(text: str, collapsed_chars: int) -> int:
    """The index in ``text`` where its first ``collapsed_chars`` characters (whitespace collapsed) end."""
    count, previous_space = 0, True
    for index, ch in enumerate(text):
        space = ch.isspace()
        if not (space and previous_space):
            count += 1
        previous_space = space
        if count > collapsed_chars:
            return index
    return len(text)


# How long text may pause after what reads as a finished sentence before that sentence is spoken
# (``SentenceSplitter.paused``): an LLM's tokens come tens of milliseconds apart, a tool call's pause
# takes seconds.
PAUSE_SECONDS = 0.3


async def sentences_of(text: str | Iterable[str] | AsyncIterable[str], max_chars: int = MAX_SENTENCE_CHARS,
                       pause_seconds: float | None = PAUSE_SECONDS) -> AsyncGenerator[str, None]:
    """The sentences of ``text``: a whole string, or pieces as they arrive (an iterable or async iterable).
    Closed early, it closes its source too (a voice agent's LLM reply stops being read). A plain
    iterable is read on the event loop: text that arrives over time wants an async iterable. What an
    async source has sent so far, if it ends as a sentence does, comes out once the source has sent
    nothing more for ``pause_seconds`` (None: only once the next sentence begins or the text ends)."""
    if pause_seconds is not None and pause_seconds < 0:
        raise ValueError(f"pause_seconds must be >= 0 or None, got {pause_seconds}")
    splitter = SentenceSplitter(max_chars)
    if isinstance(text, str):
        pieces: AsyncIterable[str] = _pieces([text])
    elif isinstance(text, AsyncIterable):
        pieces = text
    else:
        pieces = _pieces(text)
        pause_seconds = None  # read at once: it never pauses
    if pause_seconds is None:
        async with _closing(pieces):
            async for piece in pieces:
                for sentence in splitter.push(piece):
                    yield sentence
    else:  # the source is read, and closed, by a task of its own
        async with contextlib.aclosing(_with_pauses(pieces, splitter, pause_seconds)) as sentences:
            async for sentence in sentences:
                yield sentence
    for sentence in splitter.finish():
        yield sentence


async def _with_pauses(pieces: AsyncIterable[str], splitter: SentenceSplitter,
                       pause_seconds: float) -> AsyncGenerator[str, None]:
    """``sentences_of``'s reading of an async source that may pause: one task reads the whole source and
    closes it (its own ``asyncio.timeout`` or cancel scopes, its context variables, stay in that one
    task), while this one waits for each piece at most ``pause_seconds`` before ``splitter.paused``."""
    arrived: asyncio.Queue = asyncio.Queue(maxsize=1)  # a piece or two read ahead, not the whole source
    closing = False  # the reader is being cancelled from here: its CancelledError is its own

    async def read() -> None:
        try:
            async with _closing(pieces):
                async for piece in pieces:
                    await arrived.put(piece)
        except BaseException as error:  # the source's own failure (a CancelledError too): raised to the reader
            if closing:
                raise
            await arrived.put(_Failed(error))
        else:
            await arrived.put(_DONE)

    reader = asyncio.create_task(read())
    getting: asyncio.Future | None = None
    try:
        while True:
            # asyncio.wait, not wait_for: wait_for (before Python 3.12) returns an item that came as this task
            # was cancelled, and the cancellation is lost (a barge-in's close then waited for good).
            getting = asyncio.ensure_future(arrived.get())
            if splitter.pending.strip() and not (await asyncio.wait({getting}, timeout=pause_seconds))[0]:
                for sentence in splitter.paused():  # a pause after what may be a whole sentence
                    yield sentence
            piece = await getting
            if piece is _DONE:
                return
            if isinstance(piece, _Failed):
                raise piece.error
            for sentence in splitter.push(piece):
                yield sentence
    finally:  # the reader stops where it is, and closes the source
        closing = True
        tasks = [task for task in (getting, reader) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _closing(pieces: AsyncIterable[str]):
    """A context that closes ``pieces`` on its way out where it can be closed (an async generator)."""
    return contextlib.aclosing(pieces) if hasattr(pieces, "aclose") else contextlib.nullcontext(pieces)


async def _pieces(items: Iterable[str]) -> AsyncGenerator[str, None]:
    try:
        for item in items:
            yield item
    finally:
        if hasattr(items, "close"):  # a generator: closed with this one, as an async source is
            items.close()


T = TypeVar("T")


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()


async def speak_in_order(sentences: AsyncIterable[str], speak: Callable[[str], AsyncGenerator[T, None]],
                         lookahead: int = 2, concurrency: int = 1) -> AsyncGenerator[T, None]:
    """Every item of ``speak(sentence)`` for each sentence, sentence by sentence in order.

    A sentence starts once the one before it has finished generating (with
    ``concurrency`` > 1, once fewer than that many are generating), not once it has
    been played: generation runs faster than real time, so the next sentence's
    first audio is there before the current one's has played, and a lone
    utterance's first audio does not share the server with its own next sentence.
    At most ``lookahead`` sentences after the one being yielded are started (their
    items wait in memory): that bounds the audio held and the work lost when the
    listener barges in. Leaving early (``aclose``), an error in one sentence or in
    the text source closes every running ``speak`` generator (which ends its stream
    the clean way) before this generator finishes.
    """
    if lookahead < 0 or concurrency < 1:
        raise ValueError(f"lookahead must be >= 0 and concurrency >= 1, got {lookahead} and {concurrency}")
    ahead = asyncio.Semaphore(lookahead + 1)  # the sentence being yielded and those started after it
    generating = asyncio.Semaphore(concurrency)
    order: asyncio.Queue = asyncio.Queue()  # one queue of items per sentence, in order; then _DONE
    running: list[asyncio.Task] = []

    async def run(sentence: str, items: asyncio.Queue) -> None:
        try:
            async with contextlib.aclosing(speak(sentence)) as stream:
                async for item in stream:
                    items.put_nowait(item)
            items.put_nowait(_DONE)
        except BaseException as error:  # handed to the consumer, raised there in order (else it would wait
            items.put_nowait(_Failed(error))  # for good); a CancelledError from inside speak too
            if not isinstance(error, Exception):
                raise
        finally:
            generating.release()

    async def feed() -> None:
        try:
            async for sentence in sentences:
                await ahead.acquire()
                await generating.acquire()
                items: asyncio.Queue = asyncio.Queue()
                running.append(asyncio.create_task(run(sentence, items)))
                order.put_nowait(items)
            order.put_nowait(_DONE)
        except BaseException as error:  # the text source failed (or was cancelled): raised to the consumer
            order.put_nowait(_Failed(error))
            if not isinstance(error, Exception):
                raise

    feeder = asyncio.create_task(feed())
    try:
        while (items := await order.get()) is not _DONE:
            if isinstance(items, _Failed):
                raise items.error
            while (item := await items.get()) is not _DONE:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
            ahead.release()
    finally:
        feeder.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(feeder, *running, return_exceptions=True)
        if hasattr(sentences, "aclose"):  # the text source too, wherever the feeder left it
            await sentences.aclose()
