"""Audio sinks for a stream of int16 chunks: a WAV file that can be read while it grows (its header's
sizes follow each chunk), and raw PCM on a byte stream (a pipe into a player)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .constants import SAMPLE_RATE

# A WAV's sizes are 32-bit: past 4 GiB of audio (24.8 hours at 24 kHz) they stay at their largest, as
# streaming writers do (readers then read to the end of the file) instead of failing after the data is written.
MAX_WAV_SIZE = 0xFFFFFFFF


def wav_header(data_bytes: int, sample_rate: int = SAMPLE_RATE, channels: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (
        b"RIFF" + struct.pack("<I", min(36 + data_bytes, MAX_WAV_SIZE)) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data" + struct.pack("<I", min(data_bytes, MAX_WAV_SIZE))
    )


class StreamingWavWriter:
    """Append int16 mono chunks as they arrive, the header's sizes patched after each: the file is a
    whole WAV of what has come at every moment, also when the writer never gets to close it (a
    process killed mid-stream left a header of 0 frames).

    The file is created with the first chunk, so a request that fails before any audio
    leaves an existing file of that name as it was.
    """

    def __init__(self, path: str | Path, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.file: BinaryIO | None = None
        self.data_bytes = 0

    def write(self, pcm: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
            self.file.write(wav_header(0, self.sample_rate))
        data = np.asarray(pcm, dtype="<i2").tobytes()
        self.file.write(data)
        self.data_bytes += len(data)
        self.file.seek(0)
        self.file.write(wav_header(self.data_bytes, self.sample_rate))
        self.file.seek(0, 2)  # the end, for the next chunk
        self.file.flush()

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()

    def __enter__(self) -> StreamingWavWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RawPcmWriter:
    """Each chunk as raw PCM (16-bit little-endian, mono) on ``stream`` as soon as it arrives, flushed, so a
    player reading a pipe starts with the first chunk. The stream stays open (it is usually stdout)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def write(self, pcm: np.ndarray) -> None:
        self.stream.write(np.asarray(pcm, dtype="<i2").tobytes())
        self.stream.flush()

    def close(self) -> None:
        pass

    def __enter__(self) -> RawPcmWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_wav(path: str | Path) -> tuple[int, np.ndarray]:
    """(sample rate, int16 samples) of a mono 16-bit PCM WAV file."""
    import wave  # noqa: PLC0415

    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        return wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
