import numpy as np
import pytest

from orpheus_triton.constants import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, END_OF_SPEECH, TOKENS_PER_FRAME, VOCAB_SIZE
from orpheus_triton.frames import StreamFramer, audio_token_id, split_codebooks, token_code, token_slot, window_seed


def audio_stream(codes):
    return [audio_token_id(c, i) for i, c in enumerate(codes)]


def test_token_layout_matches_orpheus():
    assert audio_token_id(0, 0) == 128266
    assert audio_token_id(4095, 6) == 128266 + 4095 + 6 * 4096
    assert audio_token_id(5, 7) == audio_token_id(5, 0)  # slot = position mod 7
    assert AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE <= VOCAB_SIZE
    assert token_slot(audio_token_id(17, 3)) == 3
    assert token_slot(END_OF_SPEECH) is None
    assert token_code(audio_token_id(17, 3), 10) == 17
    assert token_code(audio_token_id(17, 3), 11) is None
    with pytest.raises(ValueError, match="outside"):
        audio_token_id(4096, 0)


def test_split_codebooks_uses_orpheus_slot_order():
    frame = [10, 11, 12, 13, 14, 15, 16]
    c0, c1, c2 = split_codebooks(frame * 2)
    assert c0.tolist() == [10, 10]
    assert c1.tolist() == [11, 14, 11, 14]
    assert c2.tolist() == [12, 13, 15, 16, 12, 13, 15, 16]
    with pytest.raises(ValueError, match="whole number"):
        split_codebooks([1, 2, 3])


def test_a_calls_windows_split_in_one_pass_as_each_alone():
    """The decoder splits all of a call's windows at once ([windows, 28] -> [windows, 4], [windows, 8],
    [windows, 16]): what splitting each one alone gives, row by row."""
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 4096, size=(5, 28))
    together = split_codebooks(windows.tolist())
    assert [book.shape for book in together] == [(5, 4), (5, 8), (5, 16)]
    for row, codes in enumerate(windows):
        for book, alone in zip(together, split_codebooks(codes), strict=True):
            assert book[row].tolist() == alone.tolist()
    with pytest.raises(ValueError, match="whole number"):
        split_codebooks([[1, 2, 3]])
    with pytest.raises(ValueError, match="got shape"):
        split_codebooks(7)


def test_framer_emits_a_window_every_frame_after_four():
    """Without the lead-in frame: upstream's windows, the last 4 frames every 7 tokens once 28 are in."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, CODEBOOK_SIZE, 7 * 10).tolist()
    framer = StreamFramer(lead_in=False)
    windows = []
    for token in audio_stream(codes):  # one token at a time, as the LLM streams
        windows += framer.push([token])
    assert [w.frame_index for w in windows] == list(range(7))
    for w in windows:
        start = w.frame_index * 7
        assert list(w.codes) == codes[start : start + 28]
    # Same windows whatever the chunking.
    chunked = StreamFramer(lead_in=False)
    again = chunked.push(audio_stream(codes)[:30]) + chunked.push(audio_stream(codes)[30:])
    assert again == windows


def test_lead_in_window_comes_at_21_tokens_then_upstreams_windows():
    """The lead-in window: frame 0 twice, then frames 1 and 2, emitted with the 21st token; after it
    exactly the windows without the lead-in, so a stream gains frame 0's audio and nothing else changes."""
    from orpheus_triton.constants import LEAD_IN_TOKENS

    codes = np.random.default_rng(1).integers(0, CODEBOOK_SIZE, 7 * 6).tolist()
    framer, emitted_at = StreamFramer(), []
    windows = []
    for position, token in enumerate(audio_stream(codes), start=1):
        new = framer.push([token])
        emitted_at += [position] * len(new)
        windows += new
    assert LEAD_IN_TOKENS == 21 and emitted_at == [21, 28, 35, 42]
    lead_in = windows[0]
    assert lead_in.frame_index == -1 and list(lead_in.codes) == codes[:7] + codes[:21]
    assert windows[1:] == StreamFramer(lead_in=False).push(audio_stream(codes))
    assert lead_in.seed != windows[1].seed  # its own noise: a different window at a different place
    # A stream of 3 frames still has audio; shorter ones have none, with or without the lead-in.
    assert len(StreamFramer().push(audio_stream(codes[:21]))) == 1
    assert StreamFramer().push(audio_stream(codes[:20])) == []


def test_framer_skips_non_audio_and_drops_misaligned_tokens():
    codes = list(range(1, 36))
    tokens = audio_stream(codes)
    # A stray token for slot 3 arrives at position 1; then end-of-speech.
    noisy = tokens[:1] + [audio_token_id(9, 3)] + tokens[1:] + [END_OF_SPEECH]
    framer = StreamFramer()
    windows = framer.push(noisy)
    assert framer.misaligned == 1
    assert windows == StreamFramer().push(tokens)


def test_window_seed_depends_on_codes_and_position_only():
    codes = list(range(28))
    assert window_seed(codes, 0) == window_seed(list(codes), 0)
    assert window_seed(codes, 0) != window_seed(codes, 1)
    assert window_seed(codes, 0) != window_seed([1] + codes[1:], 0)
    assert window_seed(codes, -1) not in (window_seed(codes, 0), window_seed(codes, 1))  # the lead-in window
    assert 0 <= window_seed(codes, 5) < 2**63


def test_frame_chunker_sends_whole_frames_and_flushes_at_the_end():
    from orpheus_triton.serving import FrameChunker

    chunker = FrameChunker(7)
    sent = [chunker.add([t], finished=False) for t in range(13)]
    assert [s for s in sent if s] == [list(range(7))]
    assert chunker.add([13, END_OF_SPEECH], finished=True) == [7, 8, 9, 10, 11, 12, 13, END_OF_SPEECH]
    assert chunker.sent == 15
    assert FrameChunker(1).add([5], finished=False) == [5]
    with pytest.raises(ValueError, match=">= 1"):
        FrameChunker(0)


def _frames_of(codes, *indices):
    return [c for i in indices for c in codes[7 * i : 7 * i + 7]]


def test_lead_out_windows_give_the_last_two_frames_at_the_end():
    """finish(): frame f from frames f-1..f+2 as always, the frames past the end repeating the last one;
    with the lead-in frame a stream then plays each of its whole frames exactly once."""
    codes = np.random.default_rng(2).integers(0, CODEBOOK_SIZE, 7 * 6 + 3).tolist()  # 6 frames + 3 codes
    framer = StreamFramer()
    windows = framer.push(audio_stream(codes))
    lead_out = framer.finish()
    assert [w.frame_index for w in windows] == [-1, 0, 1, 2]  # frames 0 (lead-in), 1, 2, 3
    assert [w.frame_index for w in lead_out] == [3, 4]  # frames 4 and 5; the partial 7th frame is dropped
    assert list(lead_out[0].codes) == _frames_of(codes, 3, 4, 5, 5)
    assert list(lead_out[1].codes) == _frames_of(codes, 4, 5, 5, 5)
    assert len(windows + lead_out) == 6  # every whole frame once
    assert StreamFramer(lead_out=False).finish() == [] and StreamFramer().finish() == []


@pytest.mark.parametrize(("frames", "lead_in", "expected"), [
    (3, True, [(1, 0, 1, 2, 2), (2, 1, 2, 2, 2)]),  # frame 0 came from the lead-in window
    (3, False, [(1, 0, 1, 2, 2), (2, 1, 2, 2, 2)]),  # frame 0 is not played without the lead-in
    (2, True, [(0, 0, 0, 1, 1), (1, 0, 1, 1, 1)]),
    (2, False, [(1, 0, 1, 1, 1)]),
    (1, True, [(0, 0, 0, 0, 0)]),
    (1, False, []),
])


def test_lead_out_of_short_streams(frames, lead_in, expected):
    """(frame given, then the four frames of its window) for streams too short for any regular window."""
    codes = np.random.default_rng(3).integers(0, CODEBOOK_SIZE, 7 * frames).tolist()
    framer = StreamFramer(lead_in=lead_in)
    pushed = framer.push(audio_stream(codes))
    assert len(pushed) == (1 if lead_in and frames == 3 else 0)
    got = framer.finish()
    assert [w.frame_index + 1 for w in got] == [f for f, *_ in expected]
    assert [list(w.codes) for w in got] == [_frames_of(codes, *window) for _, *window in expected]
