"""Orpheus's audio for phone lines: its 24 kHz int16 chunks resampled and G.711-encoded, as they stream.

Voice agents on the telephone network (SIP trunks, Twilio Media Streams and the
like) send 8 kHz G.711: μ-law in North America and Japan, A-law elsewhere, one
byte per sample. ``PhoneAudio`` turns each chunk the server streams into that,
keeping the resampling filter's state from chunk to chunk, so the chunks can be
forwarded as they come and together are the same as converting the whole
utterance at once. ``Resampler`` alone gives 16 kHz (or any rate whose ratio to
24 kHz is small) as int16 for wideband lines and speech pipelines.
"""

from __future__ import annotations

import operator
from fractions import Fraction

import numpy as np

from .constants import SAMPLE_RATE

ENCODINGS = ("mulaw", "alaw", "pcm16")


def whole_hz(rate) -> int:
    """A sample rate as a Python int; TypeError naming it if it is not a whole number (8000.0 failed deep
    inside ``fractions``, a numpy unsigned int inside its arithmetic)."""
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer):
        raise TypeError(f"sample rates must be whole numbers of Hz, got {rate!r}")
    return operator.index(rate)


class Resampler:
    """Streaming rational resampling of int16 audio (polyphase windowed-sinc low-pass filter).

    ``push`` takes the next chunk and returns the output samples it completes;
    ``flush`` returns the last ones, as if the audio were followed by silence, and
    leaves the resampler as new, for the next utterance. The filter (Kaiser-windowed
    sinc, 96 taps per phase) is flat to 3 kHz at 8 kHz out (-1.8 dB at 3.4 kHz, -6 dB
    at 90% of the output's Nyquist frequency) and 60 dB down from 1.05 times it.
    """

    def __init__(self, to_rate: int, from_rate: int = SAMPLE_RATE, taps_per_phase: int = 96):
        to_rate, from_rate = whole_hz(to_rate), whole_hz(from_rate)
        if to_rate <= 0 or from_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        ratio = Fraction(to_rate, from_rate)
        if ratio.numerator > 16 or ratio.denominator > 16:
            raise ValueError(f"{from_rate} -> {to_rate} Hz is a ratio of {ratio}: only small ratios are supported")
        self.up, self.down = ratio.numerator, ratio.denominator
        self.taps_per_phase = taps_per_phase
        self.phases = _polyphase_filter(self.up, self.down, taps_per_phase)  # [up, taps], reversed taps
        self.history = np.zeros(taps_per_phase - 1, dtype=np.float64)  # the last inputs, oldest first
        self.consumed = 0  # input samples seen so far
        self.produced = 0  # output samples given so far

    def push(self, chunk: np.ndarray) -> np.ndarray:
        samples = _int16(chunk)
        signal = np.concatenate([self.history, samples.astype(np.float64)])
        self.consumed += samples.size
        out = self._complete(signal, self.consumed)
        self.history = signal[len(signal) - (self.taps_per_phase - 1):]
        return out

    def flush(self) -> np.ndarray:
        """The outputs still owed for the inputs given, computed against trailing silence."""
        pad = self.taps_per_phase
        signal = np.concatenate([self.history, np.zeros(pad)])
        # The filter is causal, centred half its length back: the outputs up to the last input's time
        # plus that delay, so the audio's last moments are not cut off.
        total = -(-(self.consumed + self.taps_per_phase // 2) * self.up // self.down)
        out = self._complete(signal, self.consumed + pad, limit=total)
        self.reset()
        return out

    def reset(self) -> None:
        """Forget the inputs given: the next ``push`` starts a new signal."""
        self.history = np.zeros(self.taps_per_phase - 1)
        self.consumed = self.produced = 0

    def _complete(self, signal: np.ndarray, available: int, limit: int | None = None) -> np.ndarray:
        """Outputs ``produced``.. whose filter window ends within the first ``available`` inputs; ``signal``
        holds inputs ``available - len(signal)``.. ``available - 1``."""
        # Output n sits at input time n * down / up: its newest input is floor(n * down / up).
        last = (available * self.up - 1) // self.down  # the last output whose newest input is available
        count = last + 1 - self.produced
        if limit is not None:
            count = min(count, limit - self.produced)
        if count <= 0:
            return np.zeros(0, dtype=np.int16)
        n = self.produced + np.arange(count)
        newest = n * self.down // self.up  # absolute input index
        phase = (n * self.down) % self.up
        start = newest - (self.taps_per_phase - 1) - (available - len(signal))  # window start within signal
        windows = signal[start[:, None] + np.arange(self.taps_per_phase)]  # [count, taps], oldest first
        values = np.einsum("nt,nt->n", windows, self.phases[phase])
        self.produced += count
        return np.clip(np.rint(values), -32768, 32767).astype(np.int16)


def _int16(chunk: np.ndarray) -> np.ndarray:
    samples = np.asarray(chunk).reshape(-1)
    if samples.dtype != np.int16:
        raise ValueError(f"expected int16 samples (the server's audio), got {samples.dtype}")
    return samples


def _polyphase_filter(up: int, down: int, taps_per_phase: int) -> np.ndarray:
    """The low-pass filter at ``up`` times the input rate, split into ``up`` phases of ``taps_per_phase``
    taps each, each phase's taps in time order of the inputs they weigh (oldest first), gain ``up``."""
    length = up * taps_per_phase
    cutoff = 0.9 / (2 * max(up, down))  # cycles per sample at the upsampled rate: 90% of the lower Nyquist
    t = np.arange(length) - (length - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(length, 8.0)
    h *= up / h.sum()
    # Phase p weighs input newest - k with tap p + k * up: reversed, so oldest first.
    return np.stack([h[p::up][::-1] for p in range(up)])


def mulaw_encode(samples: np.ndarray) -> bytes:
    """G.711 μ-law: int16 samples -> one byte each (the reference coder on 14-bit magnitudes: bias 33,
    clipped at 8159, bits inverted; what Python's former audioop.lin2ulaw gave)."""
    x = np.asarray(samples, dtype=np.int32).reshape(-1) >> 2
    negative = x < 0
    magnitude = np.minimum(np.where(negative, -x, x), 8159) + 33
    segment = np.floor(np.log2(magnitude)).astype(np.int32) - 5
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))  # 8: the clip
    return (code ^ np.where(negative, 0x7F, 0xFF)).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 μ-law bytes -> int16 samples (for checks and loopback tests)."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    magnitude = ((((u & 0x0F) << 3) + 132) << ((u >> 4) & 0x07)) - 132
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def alaw_encode(samples: np.ndarray) -> bytes:
    """G.711 A-law: int16 samples -> one byte each (13-bit magnitude, even bits inverted)."""
    x = np.asarray(samples, dtype=np.int32).reshape(-1) >> 3  # 13 bits
    sign = np.where(x >= 0, 0x80, 0)
    magnitude = np.minimum(np.where(x >= 0, x, -x - 1), 0x0FFF)
    exponent = np.where(magnitude < 32, 0, np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4)
    mantissa = np.where(exponent == 0, magnitude >> 1, magnitude >> exponent) & 0x0F
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8).tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> int16 samples."""
    a = np.frombuffer(data, dtype=np.uint8).astype(np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


class PhoneAudio:
    """Chunks of the server's 24 kHz int16 audio -> bytes for a phone line, one chunk at a time.

        phone = PhoneAudio("mulaw")             # 8 kHz μ-law, e.g. Twilio Media Streams
        async for chunk in client.stream(text):
            send(base64.b64encode(phone.encode(chunk)))
        send(base64.b64encode(phone.flush()))  # the filter's last few samples

    ``encoding``: "mulaw", "alaw" (one byte per sample) or "pcm16" (little-endian int16);
    ``rate``: the line's sample rate (8000 for G.711, 16000 for wideband). One converter serves one
    utterance at a time: ``flush`` at its end, ``reset`` when it is cut short (a barge-in).
    """

    def __init__(self, encoding: str = "mulaw", rate: int = 8000):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
        rate = whole_hz(rate)
        self.encoding, self.rate = encoding, rate
        self.resampler = Resampler(rate) if rate != SAMPLE_RATE else None

    def encode(self, chunk: np.ndarray) -> bytes:
        """``chunk`` (int16, 24 kHz mono) as the line's bytes. The resampling filter holds the chunk's last
        few samples back until the next one (or ``flush``): chunk by chunk gives the same bytes as whole."""
        return self._bytes(self.resampler.push(chunk) if self.resampler else _int16(chunk))

    def flush(self) -> bytes:
        """The bytes held back, at the utterance's end; the next ``encode`` starts a new utterance."""
        return self._bytes(self.resampler.flush()) if self.resampler else b""

    def reset(self) -> None:
        """Drop what is held back, unsent (the caller barged in: the rest of the utterance is not played);
        the next ``encode`` starts a new utterance."""
        if self.resampler:
            self.resampler.reset()

    def _bytes(self, samples: np.ndarray) -> bytes:
        if self.encoding == "mulaw":
            return mulaw_encode(samples)
        if self.encoding == "alaw":
            return alaw_encode(samples)
        return samples.astype("<i2").tobytes()
