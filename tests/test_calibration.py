"""The FP8 calibration set: Orpheus prompts followed by the audio the model writes for them."""

from __future__ import annotations

import json

import pytest

from orpheus_triton.calibration import (
    CALIBRATION_FILE,
    CALIBRATION_TEXTS,
    calibration_requests,
    generate_sequences,
    read_back_length,
    write_calibration_set,
)
from orpheus_triton.constants import (
    AUDIO_TOKEN_BASE,
    BEGIN_OF_TEXT,
    CODEBOOK_SIZE,
    START_OF_SPEECH,
    TOKENS_PER_FRAME,
)
from orpheus_triton.frames import token_slot
from orpheus_triton.llama import load_llama
from orpheus_triton.prompt import ENGLISH_VOICES, Voices, build_prompt, load_tokenizer

LENGTH = 288  # the demo tokenizer spells text byte by byte: its longest prompt is about 220 tokens


def test_requests_cycle_through_every_text_in_every_voice(model_set):
    tokenizer = load_tokenizer(model_set.llm)
    pairs = len(CALIBRATION_TEXTS) * len(ENGLISH_VOICES.names)
    requests = calibration_requests(tokenizer, pairs + 2)
    assert [seed for _, seed in requests] == list(range(pairs + 2))
    prompts = [prompt for prompt, _ in requests]
    assert len({tuple(p) for p in prompts}) == pairs  # then the first two again, with other seeds
    assert prompts[pairs:] == prompts[:2]
    assert prompts[0] == build_prompt(tokenizer, CALIBRATION_TEXTS[0], ENGLISH_VOICES.names[0])
    single_speaker = calibration_requests(tokenizer, 3, Voices.parse("none"))
    assert single_speaker[0][0] == build_prompt(tokenizer, CALIBRATION_TEXTS[0], None, Voices.parse("none"))


def test_calibration_set_is_prompts_then_the_models_own_audio(model_set, tmp_path):
    path = write_calibration_set(model_set.llm, tmp_path / "calibration", count=6, length=LENGTH, device="cpu",
                                 max_streams=4, log=lambda message: None)
    assert path == tmp_path / "calibration" / CALIBRATION_FILE
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tokenizer = load_tokenizer(model_set.llm)
    assert len(texts) == 6
    [read_back] = {len(tokenizer.encode(text, add_special_tokens=True).ids) for text in texts}  # one length
    # TensorRT-LLM cuts what it reads back at read_back_length: a sequence lost its last token
    assert read_back == read_back_length(LENGTH)  # the demo model speaks to the end of every sequence
    for (prompt, _), text in zip(calibration_requests(tokenizer, 6), texts, strict=True):
        # What TensorRT-LLM's calibration reads back: the tokenizer's BOS, then the sequence itself.
        ids = tokenizer.encode(text, add_special_tokens=True).ids
        assert ids[0] == BEGIN_OF_TEXT
        sequence = ids[1:]
        assert sequence[: len(prompt)] == prompt and prompt[-1] == START_OF_SPEECH
        audio = sequence[len(prompt):]
        assert len(sequence) <= LENGTH and len(audio) > 0
        # The audio-token guard was on: every token a code of its frame slot.
        for position, token in enumerate(audio):
            slot = position % TOKENS_PER_FRAME
            assert AUDIO_TOKEN_BASE + slot * CODEBOOK_SIZE <= token < AUDIO_TOKEN_BASE + (slot + 1) * CODEBOOK_SIZE
            assert token_slot(token) == slot


def test_generation_is_batch_independent(model_set):
    """The set does not depend on how many sequences run at once (per-stream seeds)."""
    model = load_llama(model_set.llm)
    requests = calibration_requests(load_tokenizer(model_set.llm), 3)
    together = generate_sequences(model, requests, LENGTH, max_streams=3)
    one_at_a_time = generate_sequences(model, requests, LENGTH, max_streams=1)
    assert together == one_at_a_time


def test_bad_sizes_are_refused_with_the_reason(model_set):
    tokenizer = load_tokenizer(model_set.llm)
    with pytest.raises(ValueError, match="at least 1 sequence"):
        calibration_requests(tokenizer, 0)
    with pytest.raises(ValueError, match="no room for audio after a prompt"):
        generate_sequences(load_llama(model_set.llm), calibration_requests(tokenizer, 2), 64)


def test_sequences_come_at_one_length_for_the_unmasked_padded_calibration():
    """TensorRT-LLM pads the set on the left without an attention mask: a short sequence would attend to
    its padding. Those with under half the most audio are left out, the rest cut to the shortest, never
    into a prompt."""
    from orpheus_triton.calibration import equal_lengths

    sequences = [list(range(n)) for n in (100, 90, 70, 40, 100, 80)]
    prompts = [20, 20, 20, 20, 20, 75]  # the last would lose its start of speech at 70
    assert equal_lengths(sequences, prompts) == [list(range(70))] * 4
    assert equal_lengths([[1, 2], [1, 2, 3]], [2, 3]) == [[1, 2], [1, 2, 3]]  # no audio at all: as they are


def test_a_prompt_too_long_is_refused_before_the_model_loads(model_set, tmp_path, monkeypatch):
    import orpheus_triton.calibration as calibration

    def load_llama(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(calibration, "load_llama", load_llama)
    with pytest.raises(ValueError, match="no room for audio after a prompt"):
        write_calibration_set(model_set.llm, tmp_path / "c", count=2, length=16, device="cpu", log=lambda m: None)
