"""Audio tokens <-> SNAC codes, and the streaming window framer.

An Orpheus audio token carries both a SNAC code and the slot of the frame it
belongs to: ``id = AUDIO_TOKEN_BASE + code + CODEBOOK_SIZE * slot``. Seven
consecutive tokens form one frame; the framer below turns a token stream into
the 28-token windows that the SNAC decoder turns into audio, as the reference
Orpheus streaming decoder does (one window every 7 tokens once 28 are buffered,
each giving its second frame's audio), with one fix and two additions:

- the reference drops every code 0 (its ``if token > 0`` test), which silently
  shifts the frame alignment; here code 0 is a code like any other;
- the lead-in frame (on by default): the reference never emits frame 0's audio
  (its first window gives frame 1, after 28 tokens). Here frame 0 comes first,
  from a window whose first frame repeats frame 0 as its left context, as soon
  as frames 1 and 2 (its right context, as for every other frame) are in: first
  audio after 21 tokens instead of 28, then one frame every 7 tokens as before.
  Every later window is the reference's;
- the lead-out frames (on by default): the reference never emits a stream's last
  two frames either (no window has them second). Here, when the stream ends
  (``finish``), each comes from a window whose missing right context repeats
  the last frame. With both, a stream plays every whole frame it generated,
  once, as decoding all of its codes at once would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .constants import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    END_OF_SPEECH,
    FRAMES_PER_WINDOW,
    SLOT_CODEBOOK,
    TOKENS_PER_FRAME,
    WINDOW_TOKENS,
)


def audio_token_id(code: int, position: int) -> int:
    """Token id of SNAC ``code`` at stream ``position`` (counted from the first audio token)."""
    if not 0 <= code < CODEBOOK_SIZE:
        raise ValueError(f"SNAC code {code} outside [0, {CODEBOOK_SIZE})")
    return AUDIO_TOKEN_BASE + code + CODEBOOK_SIZE * (position % TOKENS_PER_FRAME)


def token_slot(token_id: int) -> int | None:
    """Frame slot (0..6) an audio token belongs to, or None for a non-audio token."""
    offset = token_id - AUDIO_TOKEN_BASE
    if not 0 <= offset < CODEBOOK_SIZE * TOKENS_PER_FRAME:
        return None
    return offset // CODEBOOK_SIZE


def token_code(token_id: int, position: int) -> int | None:
    """SNAC code of ``token_id`` if it is a valid audio token for ``position``, else None."""
    code = token_id - AUDIO_TOKEN_BASE - CODEBOOK_SIZE * (position % TOKENS_PER_FRAME)
    return code if 0 <= code < CODEBOOK_SIZE else None


# Each SNAC codebook's slots in a frame, in order (1, 2 and 4 of the 7).
BOOK_SLOTS = tuple(tuple(slot for slot, b in enumerate(SLOT_CODEBOOK) if b == book) for book in range(3))


def split_codebooks(codes: Sequence[int] | Sequence[Sequence[int]] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split whole frames of codes into SNAC's three codebooks (1, 2 and 4 codes a frame).

    One window's codes [n] give three arrays of n/7, 2n/7 and 4n/7 codes; several windows' codes
    [windows, n] give three [windows, ...] arrays, in one pass over all of them (a GPU decoder's call
    of a few hundred windows split them one by one: a third of its thread's time on an H100 host,
    perf/results/2026-11-27_h100).
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim not in (1, 2):
        raise ValueError(f"want one window's codes [n] or several windows' [windows, n], got shape {codes.shape}")
    if codes.shape[-1] % TOKENS_PER_FRAME:
        raise ValueError(f"{codes.shape[-1]} codes is not a whole number of {TOKENS_PER_FRAME}-code frames")
    leading = codes.shape[:-1]
    frames = codes.reshape(*leading, -1, TOKENS_PER_FRAME)
    first, second, third = (frames[..., slots].reshape(*leading, -1) for slots in BOOK_SLOTS)
    return first, second, third


def window_seed(window_codes: Sequence[int], frame_index: int) -> int:
    """Seed for the noise SNAC draws while decoding one window.

    It depends only on what is decoded (the codes and where the window sits in
    its stream), so a stream's audio is the same whether it is decoded alone or
    batched with others, and the same seed + text gives the same audio without
    the decoder needing to know the request's seed.
    """
    digest = hashlib.blake2b(np.asarray(window_codes, dtype=np.int32).tobytes(), digest_size=8,
                             key=frame_index.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Window:
    """28 codes (4 frames) ready for SNAC; ``frame_index`` is its first frame's index in the stream
    (-1 for the lead-in window, whose first frame stands in for the one before frame 0)."""

    codes: tuple[int, ...]
    frame_index: int

    @cached_property  # the padding window's is asked at every padded call
    def seed(self) -> int:
        return window_seed(self.codes, self.frame_index)


@dataclass
class StreamFramer:
    """Per-stream state of the streaming decoder: the last codes and the stream position.

    ``push`` takes generated token ids in order and returns the windows that
    became complete. Tokens that are not audio (end-of-speech, stray text) are
    skipped as the reference does; those other than end-of-speech are counted in
    ``not_audio`` (from the LLM with its audio-token guard on there are none). An
    audio token whose slot does not match its position (possible only with the
    guard switched off, or from a client of the decoder alone) is dropped and
    counted in ``misaligned``: keeping it would shift every later
    frame, which is the reference decoder's skipped-frames glitch. ``lead_in``: emit
    the lead-in window (see the module's docstring) once three frames are in;
    ``lead_out``: ``finish`` gives the lead-out windows.
    """

    lead_in: bool = True
    lead_out: bool = True
    recent_codes: list[int] = field(default_factory=list)  # at most one window
    position: int = 0  # audio tokens accepted so far
    misaligned: int = 0  # audio tokens dropped for arriving in the wrong slot
    not_audio: int = 0  # token ids skipped for being no audio token, end-of-speech aside

    @property
    def dropped(self) -> int:
        """Token ids that gave no audio so far: ``misaligned`` and ``not_audio``."""
        return self.misaligned + self.not_audio

    def push(self, token_ids: Iterable[int]) -> list[Window]:
        windows = []
        for token in token_ids:
            token = int(token)
            slot = token_slot(token)
            if slot is None:
                self.not_audio += token != END_OF_SPEECH
                continue
            expected = self.position % TOKENS_PER_FRAME
            if slot != expected:
                self.misaligned += 1
                continue
            self.recent_codes.append(token - AUDIO_TOKEN_BASE - CODEBOOK_SIZE * slot)
            del self.recent_codes[:-WINDOW_TOKENS]
            self.position += 1
            if self.position % TOKENS_PER_FRAME:
                continue
            frames = self.position // TOKENS_PER_FRAME
            if frames >= FRAMES_PER_WINDOW:
                windows.append(Window(tuple(self.recent_codes), frames - FRAMES_PER_WINDOW))
            elif self.lead_in and frames == FRAMES_PER_WINDOW - 1:
                windows.append(Window(tuple(self.recent_codes[:TOKENS_PER_FRAME] + self.recent_codes), -1))
        return windows

    def finish(self) -> list[Window]:
        """At the stream's end: the lead-out windows, one for each whole frame no window has given
        (the last two; all of a stream shorter than three frames), in order. Frame f's window is frames
        f-1 to f+2 as always, those past the last frame (or before frame 0) repeating it. A partial last
        frame is dropped, as it always was. Empty without ``lead_out``."""
        frames = self.position // TOKENS_PER_FRAME
        if not self.lead_out or not frames:
            return []
        whole = self.recent_codes[: len(self.recent_codes) - self.position % TOKENS_PER_FRAME]
        held = len(whole) // TOKENS_PER_FRAME  # the last whole frames, up to frame `frames - 1`
        whole = whole[len(whole) - held * TOKENS_PER_FRAME :]

        def frame_codes(index: int) -> list[int]:
            start = (min(max(index, 0), frames - 1) - (frames - held)) * TOKENS_PER_FRAME
            return whole[start : start + TOKENS_PER_FRAME]

        # Given so far: frames 1 to frames-3 by the regular windows, frame 0 by the lead-in window.
        first = max(frames - (FRAMES_PER_WINDOW - 2), 0 if self.lead_in else 1)
        return [Window(tuple(code for index in range(f - 1, f - 1 + FRAMES_PER_WINDOW) for code in frame_codes(index)),
                       f - 1) for f in range(first, frames)]
