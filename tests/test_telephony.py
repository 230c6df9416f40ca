"""Phone-line audio: streaming resampling to 8/16 kHz and G.711 μ-law / A-law, as the reference coder does."""

import math

import numpy as np
import pytest

from orpheus_triton.constants import SAMPLE_RATE
from orpheus_triton.telephony import PhoneAudio, Resampler, alaw_decode, alaw_encode, mulaw_decode, mulaw_encode

# Codes of the ITU reference coder (Sun's g711.c, as Python's former audioop module had it) for these samples.
SAMPLES = [-32768, -8159 * 4, -1000, -33, -1, 0, 1, 4, 100, 1000, 12345, 32767]
MULAW = [0, 0, 78, 122, 126, 255, 255, 254, 242, 206, 151, 128]
ALAW = [42, 42, 122, 87, 85, 213, 213, 213, 211, 250, 189, 170]


def test_g711_codes_are_the_reference_coders():
    samples = np.array(SAMPLES, dtype=np.int16)
    assert list(mulaw_encode(samples)) == MULAW
    assert list(alaw_encode(samples)) == ALAW
    codes = bytes([0x00, 0x0F, 0x7E, 0x7F, 0x80, 0xFE, 0xFF])
    assert mulaw_decode(codes).tolist() == [-32124, -16764, -8, 0, 32124, 8, 0]
    assert alaw_decode(bytes([0x00, 0x55, 0x2A, 0xD5, 0xAA, 0x80])).tolist() == [-5504, -8, -32256, 8, 32256, 5504]


def test_g711_round_trips_every_code_and_every_sample_within_a_step():
    codes = bytes(range(256))
    assert mulaw_encode(mulaw_decode(codes)) == bytes(0xFF if c == 0x7F else c for c in codes)  # two zeros: +0
    assert alaw_encode(alaw_decode(codes)) == codes
    samples = np.arange(-32768, 32768, dtype=np.int16)
    for encode, decode in ((mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)):
        error = np.abs(decode(encode(samples)).astype(np.int32) - samples)
        magnitude = np.abs(samples.astype(np.int32))
        assert (error <= np.maximum(magnitude / 16, 16) + 1).all()  # a 4-bit mantissa: within half a step


def test_the_reference_module_agrees_on_every_sample_where_python_still_has_it():
    audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    samples = np.arange(-32768, 32768, dtype=np.int16)
    assert mulaw_encode(samples) == audioop.lin2ulaw(samples.tobytes(), 2)
    assert alaw_encode(samples) == audioop.lin2alaw(samples.tobytes(), 2)


def tone(frequency: float, seconds: float = 1.0, amplitude: float = 10000) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return np.rint(amplitude * np.sin(2 * math.pi * frequency * t)).astype(np.int16)


def resample(samples: np.ndarray, rate: int, chunk: int) -> np.ndarray:
    resampler = Resampler(rate)
    pieces = [resampler.push(samples[i : i + chunk]) for i in range(0, len(samples), chunk)]
    return np.concatenate([*pieces, resampler.flush()])


def gain_db(out: np.ndarray, amplitude: float = 10000) -> float:
    middle = out[len(out) // 10 : -len(out) // 10].astype(np.float64)  # away from the filter's start and end
    return 20 * math.log10(max(np.sqrt((middle**2).mean()), 1e-9) / (amplitude / math.sqrt(2)))


@pytest.mark.parametrize("rate", [8000, 16000])
def test_speech_band_passes_and_what_would_alias_is_removed(rate):
    for frequency in (300, 1000, 3000):
        assert abs(gain_db(resample(tone(frequency), rate, 2048))) < 0.1, frequency
    nyquist = rate / 2
    for frequency in (nyquist * 1.12, nyquist * 1.5, 11000):
        assert gain_db(resample(tone(frequency), rate, 2048)) < -60, frequency


def test_chunks_of_any_size_give_what_the_whole_utterance_gives():
    speech = tone(440) + tone(1700, amplitude=3000)
    whole = resample(speech, 8000, len(speech))
    assert len(whole) == math.ceil((len(speech) + Resampler(8000).taps_per_phase // 2) / 3)
    for chunk in (1, 7, 2048, 5000):
        assert np.array_equal(resample(speech, 8000, chunk), whole)
    assert np.array_equal(resample(speech, 16000, 333), resample(speech, 16000, len(speech)))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="expected int16 samples .*, got float32"):
        Resampler(8000).push(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="expected int16 samples .*, got float64"):
        PhoneAudio("mulaw", rate=SAMPLE_RATE).encode(np.array([0.5, -0.5]))
    with pytest.raises(ValueError, match="24000 -> 44100 Hz is a ratio of 147/80"):
        Resampler(44100)
    with pytest.raises(ValueError, match="unknown encoding 'mp3'"):
        PhoneAudio("mp3")
    # 8000.0 failed inside fractions with "both arguments should be Rational"; 24000.0 (no resampling) passed
    for rate in (8000.0, "8000", True, 24000.0):
        with pytest.raises(TypeError, match=f"sample rates must be whole numbers of Hz, got {rate!r}"):
            PhoneAudio("mulaw", rate)
    for rate in (np.int64(8000), np.uint64(8000)):  # numpy whole numbers do (uint64 failed inside Fraction)
        assert PhoneAudio("mulaw", rate).encode(np.zeros(3, np.int16)) == b"\xff"


def test_phone_audio_streams_bytes_for_the_line():
    chunks = [tone(500, seconds=2048 / SAMPLE_RATE)] * 4  # four server chunks
    phone = PhoneAudio("mulaw")
    data = b"".join(phone.encode(chunk) for chunk in chunks) + phone.flush()
    assert len(data) == len(resample(np.concatenate(chunks), 8000, 2048))  # one byte per 8 kHz sample
    assert data == mulaw_encode(resample(np.concatenate(chunks), 8000, 2048))
    wide = PhoneAudio("pcm16", rate=16000)
    assert len(wide.encode(chunks[0])) + len(wide.flush()) == 2 * len(resample(chunks[0], 16000, 2048))
    assert PhoneAudio("alaw", rate=SAMPLE_RATE).encode(chunks[0]) == alaw_encode(chunks[0])  # no resampling
    # After flush, the same PhoneAudio serves the next utterance as a new one would.
    again = b"".join(phone.encode(chunk) for chunk in chunks) + phone.flush()
    assert again == data
    # So it does after reset, an utterance cut short (a barge-in): what it held back is dropped, unsent.
    phone.encode(tone(900, seconds=0.05))
    phone.reset()
    assert b"".join(phone.encode(chunk) for chunk in chunks) + phone.flush() == data
    PhoneAudio("alaw", rate=SAMPLE_RATE).reset()  # nothing held back: nothing to drop


def test_a_growing_wav_is_whole_after_every_chunk(tmp_path):
    """Its header's sizes follow each chunk: a writer killed mid-stream leaves a WAV of what came."""
    import numpy as np

    from orpheus_triton.wav import StreamingWavWriter, read_wav

    writer = StreamingWavWriter(tmp_path / "growing.wav")
    writer.write(np.arange(2048, dtype=np.int16))
    assert read_wav(tmp_path / "growing.wav")[1].size == 2048
    writer.write(np.arange(1000, dtype=np.int16))
    rate, samples = read_wav(tmp_path / "growing.wav")  # never closed
    assert rate == 24000 and samples.size == 3048 and samples[-1] == 999
    writer.close()
    assert read_wav(tmp_path / "growing.wav")[1].size == 3048


def test_a_wav_past_4_gib_keeps_its_largest_sizes_instead_of_failing_after_the_write(tmp_path):
    """The header's sizes are 32-bit: past 4 GiB of audio (24.8 hours) struct.pack raised, after the chunk's
    data was written; they now stay at their largest, as streaming writers do."""
    import struct

    from orpheus_triton.wav import StreamingWavWriter, wav_header

    header = wav_header(2**32)
    assert struct.unpack("<I", header[4:8])[0] == struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    writer = StreamingWavWriter(tmp_path / "long.wav")
    writer.write(np.zeros(4, dtype=np.int16))
    writer.data_bytes = 2**32 - 4  # as if a day of audio had come
    writer.write(np.zeros(2048, dtype=np.int16))
    writer.close()
    assert (tmp_path / "long.wav").read_bytes()[40:44] == b"\xff\xff\xff\xff"
