"""Calibration sequences for quantizing Orpheus: its own prompts, then the speech it writes for them.

An FP8 engine's scales (for weights, activations, keys and values) come from
running the model over sample sequences and keeping the largest magnitude each
quantized tensor sees. Orpheus spends nearly all of its tokens after
start-of-speech, writing SNAC codes; a text corpus (TensorRT-LLM's default
calibration set is news articles) never shows the model that part of its work,
nor the long audio contexts whose keys and values an FP8 cache must hold. These
sequences are Orpheus prompts (every voice, varied sentences) followed by the
audio tokens the model itself generates for them with the serving defaults, cut
at a fixed length.

The set is written as TensorRT-LLM's calibration reads a local dataset: a
folder whose ``train.jsonl`` has one ``{"text": ...}`` per sequence. The text is
the sequence's tokens decoded with special tokens kept, so re-encoding it gives
the same ids (after the BOS the tokenizer puts in front).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .constants import END_OF_SPEECH
from .engine import GenerationRequest, InflightEngine
from .frames import token_slot
from .llama import load_llama
from .prompt import ENGLISH_VOICES, Voices, build_prompt, load_tokenizer
from .triton_llm import pick_device

CALIBRATION_FILE = "train.jsonl"


def read_back_length(length: int) -> int:
    """How many tokens TensorRT-LLM's calibration reads back for a sequence of ``length``: it encodes each
    text again, which puts the tokenizer's BOS in front. Its maximum sequence length is this, so that the
    sequence's last token is not cut off."""
    return length + 1

# Long enough that the speech for each nearly fills a calibration sequence (about 2.5 words a second of
# speech at 82 tokens a second: 1024 tokens are some 12 s, 30 words), and varied the way callers' text is:
# questions, numbers, spelled-out codes, emotive tags, short replies run together.
CALIBRATION_TEXTS = (
    "Thanks for calling. I can help you reschedule your appointment, check an order, or answer a question "
    "about your bill. Which of those would you like to start with today?",
    "Your order number is four seven two, nine nine one. It shipped on Tuesday and should arrive by Friday "
    "afternoon. Would you like me to text you the tracking link?",
    "Oh no, I'm so sorry to hear that. <sigh> Let's see what we can do. Can you tell me when you first "
    "noticed the problem, and whether it happens every time?",
    "Okay, got it. So that's a table for four, this Saturday at seven thirty, under the name Rivera. "
    "I'll send a confirmation to the email we have on file.",
    "Honestly? <laugh> I did not expect that. But you know what, it worked out better than the plan we had, "
    "so I'm not going to complain about it.",
    "The total comes to one hundred and twenty-eight dollars and forty cents, including tax. You can pay by "
    "card now, or I can send an invoice that's due in thirty days.",
    "Before we continue, I need to verify your identity. Could you please confirm the last four digits of "
    "your account number and your date of birth?",
    "It was late, the rain hadn't stopped for hours, and the old lighthouse keeper climbed the stairs one "
    "more time, counting each step the way his father had taught him.",
    "Hmm, let me think. <chuckle> If we leave at eight, we miss the traffic, grab coffee on the way, and "
    "still make it to the venue with half an hour to spare.",
    "Your prescription is ready for pickup at the pharmacy on Main Street. The pharmacy is open until nine "
    "tonight, and tomorrow from eight in the morning.",
    "Step one, unplug the router. Step two, wait about thirty seconds. Step three, plug it back in and "
    "wait until the light on the front turns solid green.",
    "Wait, what? <gasp> You're telling me the whole thing was a surprise party, and everybody knew except "
    "me? I can't believe you kept that a secret for a month.",
    "Welcome back! Last time we talked about budgeting for the holidays. Today, let's look at three simple "
    "ways to cut your monthly expenses without giving up the things you enjoy.",
    "I understand this is frustrating, and I want to make it right. I've issued a full refund, which should "
    "appear on your statement within five to seven business days.",
    "The meeting has been moved from two fifteen to three o'clock, in conference room B on the fourth floor. "
    "Please bring the quarterly figures and the draft proposal.",
    "Good morning! It's sixty-two degrees and sunny right now, with a high of seventy-eight this afternoon. "
    "Expect a light breeze from the west and clear skies through the evening.",
)


def calibration_requests(tokenizer, count: int, voices: Voices = ENGLISH_VOICES) -> list[tuple[list[int], int]]:
    """``count`` (prompt, seed) pairs: every text in every voice, then again with other seeds."""
    if count < 1:
        raise ValueError(f"the calibration set needs at least 1 sequence, got {count}")
    speakers = voices.names or (None,)
    pairs = [(text, voice) for voice in speakers for text in CALIBRATION_TEXTS]
    return [(build_prompt(tokenizer, *pairs[i % len(pairs)], voices=voices), i) for i in range(count)]


def check_room(requests: list[tuple[list[int], int]], length: int) -> None:
    """Raise ValueError if a prompt leaves no room for audio in a sequence of ``length`` tokens."""
    longest = max(len(prompt) for prompt, _ in requests)
    if longest >= length:
        raise ValueError(f"calibration sequences of {length} tokens leave no room for audio after a prompt of "
                         f"{longest} tokens: make them longer")


def equal_lengths(sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[int]]:
    """The sequences at one length. TensorRT-LLM's calibration encodes the whole set padded on the left
    and runs it without an attention mask: a shorter sequence would be calibrated with padding it attends
    to in front, its positions shifted. Sequences with less than half the most audio (the model ended
    its speech early) are left out, and so is any whose prompt the cut would reach; the others are cut
    to the shortest of them."""
    audio = [len(sequence) - prompt for sequence, prompt in zip(sequences, prompt_lengths, strict=True)]
    most = max(audio)
    if most <= 0:
        return sequences
    kept = [(sequence, prompt) for sequence, prompt, heard in zip(sequences, prompt_lengths, audio, strict=True)
            if 2 * heard >= most]
    length = min(len(sequence) for sequence, _ in kept)
    kept = [(sequence, prompt) for sequence, prompt in kept if prompt < length]  # the shortest stays
    length = min(len(sequence) for sequence, _ in kept)
    return [sequence[:length] for sequence, _ in kept]


def generate_sequences(model, requests: list[tuple[list[int], int]], length: int, max_streams: int = 64,
                       progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Each prompt followed by the audio the model writes for it (audio-token guard on, serving defaults),
    up to ``length`` tokens in all, or fewer where the model ends its speech first.

    The prompts run through the in-flight batching engine ``max_streams`` at a time.
    """
    check_room(requests, length)
    engine = InflightEngine(model, max_streams=min(max_streams, len(requests)), max_seq_len=length,
                            max_queue=len(requests))
    outputs: list[list[int]] = [[] for _ in requests]
    done = [0]

    def collect(index: int):
        def emit(tokens: list[int], finish: str | None) -> None:
            outputs[index].extend(tokens)
            if finish is not None:
                done[0] += 1
                if progress is not None:
                    progress(done[0], len(requests))
        return emit

    for index, (prompt, seed) in enumerate(requests):
        engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=length - len(prompt), emit=collect(index),
                                        seed=seed, request_id=f"calibration-{index}"))
    engine.run_until_idle()
    return [prompt + [t for t in output if t != END_OF_SPEECH]
            for (prompt, _), output in zip(requests, outputs, strict=True)]


def write_calibration_set(llm_dir: str | Path, out_dir: str | Path, count: int = 256, length: int = 1024,
                          voices: Voices = ENGLISH_VOICES, device: str = "auto", max_streams: int = 64,
                          log: Callable[[str], None] = print) -> Path:
    """Generate ``count`` calibration sequences of up to ``length`` tokens with the checkpoint in ``llm_dir``
    and write them to ``out_dir/train.jsonl`` (see the module docstring). Returns the file's path."""
    device = pick_device(device)
    tokenizer = load_tokenizer(llm_dir)
    requests = calibration_requests(tokenizer, count, voices)
    check_room(requests, length)  # before loading the model
    log(f"  generating {count} calibration sequences of up to {length} tokens on {device} "
        f"({len(CALIBRATION_TEXTS)} texts x {len(voices.names) or 1} voices, {min(max_streams, count)} at a time)")
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 8) == 0:
            log(f"  {done}/{total} sequences ({time.monotonic() - started:.0f} s)")

    model = load_llama(llm_dir, device=device)
    try:
        sequences = generate_sequences(model, requests, length, max_streams, progress)
    finally:
        del model
        gc.collect()  # the engine's KV cache and CUDA graphs go with it
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the quantizer loads the model again next
    generated = sequences
    sequences = equal_lengths(generated, [len(prompt) for prompt, _ in requests])
    if len(sequences) < len(generated) or len(sequences[0]) < max(map(len, generated)):
        log(f"  {len(generated) - len(sequences)} sequences with less than half the most audio left out; "
            f"{len(sequences)} cut to {len(sequences[0])} tokens, one length for the calibration's batches")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CALIBRATION_FILE
    with path.open("w") as file:
        for sequence in sequences:
            file.write(json.dumps({"text": tokenizer.decode(sequence, skip_special_tokens=False)}) + "\n")
    audio = sum(token_slot(t) is not None for sequence in sequences for t in sequence)
    log(f"  wrote {path}: {len(sequences)} sequences, {sum(map(len, sequences))} tokens, {audio} of them audio")
    return path
