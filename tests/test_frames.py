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


def test_framer_emits_a_window_every_frame_after_four():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, CODEBOOK_SIZE, 7 * 10).tolist()
    framer = StreamFramer()
    windows = []
    for token in audio_stream(codes):  # one token at a time, as the LLM streams
        windows += framer.push([token])
    assert [w.frame_index for w in windows] == list(range(7))
    for w in windows:
        start = w.frame_index * 7
        assert list(w.codes) == codes[start : start + 28]
    # Same windows whatever the chunking.
    chunked = StreamFramer()
    again = chunked.push(audio_stream(codes)[:30]) + chunked.push(audio_stream(codes)[30:])
    assert again == windows


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


def test_decoder_state_is_per_stream_and_ends_with_end_of_speech():
    from orpheus_triton.serving import StreamDecoderState

    state = StreamDecoderState()
    a = [audio_token_id(c, i) for i, c in enumerate(range(1, 29))]
    b = [audio_token_id(c, i) for i, c in enumerate(range(100, 128))]
    # Interleaved chunks of two streams never mix.
    out = state.windows_for([("a", np.array(a[:14])), ("b", np.array(b[:20])), ("a", np.array(a[14:])),
                             ("b", np.array(b[20:] + [END_OF_SPEECH]))])
    assert [len(w) for w in out] == [0, 0, 1, 1]
    assert out[2][0].codes == tuple(range(1, 29)) and out[3][0].codes == tuple(range(100, 128))
    assert set(state.streams) == {"a"}  # b ended
    # A new stream reusing "b" starts clean.
    again = state.windows_for([("b", np.array(b))])
    assert again[0][0].codes == tuple(range(100, 128)) and again[0][0].frame_index == 0


def test_decode_rounds_take_each_streams_next_request_in_order():
    from orpheus_triton.serving import decode_rounds

    # Stream a ran ahead (three requests queued), b has two, c one.
    assert decode_rounds(["a", "b", "a", "c", "a", "b"]) == [[0, 1, 3], [2, 5], [4]]
    assert decode_rounds(["solo"] * 3) == [[0], [1], [2]]
    assert decode_rounds(["x", "y", "z"]) == [[0, 1, 2]]
    assert decode_rounds([]) == []
