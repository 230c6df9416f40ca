"""In-flight batching, sampling and the audio-token guard of the torch engine (CPU, fp32)."""

import contextlib
import logging
import os
import re
import threading
import time

import numpy as np
import pytest
import torch

from orpheus_triton.constants import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    END_OF_SPEECH,
    FINISH_END_OF_SPEECH,
    FINISH_MAX_TOKENS,
    FINISH_STOPPED,
    NO_END_ID,
    TOKENS_PER_FRAME,
)
from orpheus_triton.engine import (
    KV_CACHE_SHARE,
    PREFILL_GRAPH_ROWS,
    PREFILL_TOKENS_PER_STEP,
    CapacityError,
    GenerationRequest,
    InflightEngine,
)
from orpheus_triton.frames import StreamFramer, token_slot
from orpheus_triton.llama import load_llama
from orpheus_triton.sampling import SamplingBatch, gumbel_noise, sample


@pytest.fixture(scope="module")
def model(model_set):
    return load_llama(model_set.llm)


def make_engine(model, **kw):
    kw.setdefault("max_streams", 4)
    kw.setdefault("max_seq_len", 512)
    return InflightEngine(model, **kw)


class Collector:
    def __init__(self):
        self.tokens, self.finished, self.errors = [], None, []  # finished: why the stream ended, once it has

    def emit(self, tokens, finish):
        self.tokens += tokens
        self.finished = finish

    def fail(self, message):
        self.errors.append(message)


def request(prompt, out: Collector, **kw):
    kw.setdefault("max_new_tokens", 60)
    return GenerationRequest(prompt=prompt, emit=out.emit, fail=out.fail, **kw)


PROMPTS = [list(range(200, 200 + n)) for n in (9, 23, 5, 40, 14, 31)]


def test_stream_is_identical_alone_and_in_a_busy_batch(model):
    alone = Collector()
    engine = make_engine(model)
    engine.submit(request(PROMPTS[0], alone, seed=42))
    engine.run_until_idle()

    busy = make_engine(model, prefill_chunk=16)
    outs = [Collector() for _ in PROMPTS]
    for i in (1, 2, 3):
        busy.submit(request(PROMPTS[i], outs[i], seed=i, max_new_tokens=20 + 15 * i))
    for _ in range(7):  # others are mid-stream when ours joins
        busy.step()
    busy.submit(request(PROMPTS[0], outs[0], seed=42))
    busy.submit(request(PROMPTS[4], outs[4], seed=4))
    busy.run_until_idle()
    assert outs[0].tokens == alone.tokens
    assert len(alone.tokens) >= 2 and alone.finished


@pytest.mark.parametrize("varlen", [False, True], ids=["masked", "per-row-keys"])
def test_gpu_decode_path_streams_as_if_alone(model, varlen, flash_reference):
    """The bucketed decode of the GPU path (padded rows write only into free slots), run eagerly here:
    streams joining, leaving and prefilled in bursts get exactly the tokens they get alone. With
    ``varlen`` decode steps read each row's own keys only (FlashAttention's varlen call on GPU,
    a reference of it here)."""
    alone = {}
    for i in (0, 2, 4):
        alone[i] = Collector()
        engine = make_engine(model)
        engine.submit(request(PROMPTS[i], alone[i], seed=i, max_new_tokens=30 + 10 * i))
        engine.run_until_idle()

    engine = make_engine(model, max_streams=5, bucketed=True)
    model.use_varlen_decode(varlen)
    try:
        together = run_together(engine)
    finally:
        model.use_varlen_decode(False)
    for i in alone:
        assert together[i].tokens == alone[i].tokens, i


class PrefillSpy:
    """Stands in for an engine's bucketed prefill and records the rows of each prefill it takes."""

    def __init__(self, prefiller):
        self.prefiller, self.calls = prefiller, []

    def bucket(self, rows, width):
        return self.prefiller.bucket(rows, width)

    def __call__(self, tokens, last):
        self.calls.append(tokens.shape[0])
        return self.prefiller(tokens, last)


def test_gpu_prefill_path_takes_a_few_prompts_at_a_bucketed_shape_and_a_burst_eagerly(model, monkeypatch):
    """The GPU path's prefill, run eagerly here: up to PREFILL_GRAPH_ROWS short prompts at a padded shape
    through the scratch slots (a CUDA graph on GPU), a larger group (a burst of callers) in one forward
    straight into the decode slots; every stream gets the tokens it gets alone."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]] + [list(range(500 + 7 * i, 505 + 7 * i)) for i in range(9)]
    alone = []
    for i, prompt in enumerate(prompts):
        alone.append(Collector())
        engine = make_engine(model)
        engine.submit(request(prompt, alone[i], seed=i, max_new_tokens=12))
        engine.run_until_idle()

    engine = make_engine(model, max_streams=12, bucketed=True)
    assert engine.prefiller is not None and engine.model.num_slots == 12 + PREFILL_GRAPH_ROWS
    spy = engine.prefiller = PrefillSpy(engine.prefiller)
    forwards = []
    plain_forward = engine.model.forward

    def eager_forward(tokens, positions, first_slot=0, **kw):
        if tokens.shape[1] > 1 and first_slot < engine.scratch_slot:
            forwards.append(tokens.shape)
        return plain_forward(tokens, positions, first_slot=first_slot, **kw)

    monkeypatch.setattr(engine.model, "forward", eager_forward)
    together = [Collector() for _ in prompts]
    for i in range(3):
        engine.submit(request(prompts[i], together[i], seed=i, max_new_tokens=12))
    engine.step()
    assert spy.calls == [3] and forwards == []
    for i in range(3, len(prompts)):  # nine callers at once
        engine.submit(request(prompts[i], together[i], seed=i, max_new_tokens=12))
    engine.run_until_idle()
    assert spy.calls == [3] and forwards == [(9, 5)]
    assert [out.tokens for out in together] == [out.tokens for out in alone]


def run_together(engine) -> dict:
    """Streams 0, 2 and 4 (with 30 + 10 i tokens) joining an engine of 5 slots beside another that leaves
    early, 2 and 4 in a burst."""
    assert engine.decoder is not None and engine.decoder.batch_buckets == [1, 2, 4, 5]
    together = {i: Collector() for i in (0, 2, 4)}
    engine.submit(request(PROMPTS[1], Collector(), seed=9, max_new_tokens=12))  # leaves early
    engine.submit(request(PROMPTS[0], together[0], seed=0, max_new_tokens=30))
    for _ in range(5):
        engine.step()
    engine.submit(request(PROMPTS[2], together[2], seed=2, max_new_tokens=50))  # a burst of two
    engine.submit(request(PROMPTS[4], together[4], seed=4, max_new_tokens=70))
    engine.run_until_idle()
    return together


def test_a_burst_of_prompts_is_prefilled_together_and_streams_as_if_alone(model):
    burst = [0, 1, 2, 4]  # prompts of 9, 23, 5 and 14 tokens
    alone = {}
    for i in burst:
        alone[i] = Collector()
        engine = make_engine(model)
        engine.submit(request(PROMPTS[i], alone[i], seed=i, max_new_tokens=40))
        engine.run_until_idle()

    engine = make_engine(model, max_streams=3, prefill_chunk=40)
    together = {i: Collector() for i in burst}
    for i in burst:
        engine.submit(request(PROMPTS[i], together[i], seed=i, max_new_tokens=40))
    engine.step()
    # One forward took the first three (3 free slots; 37 of the 40-token budget); the fourth waits.
    assert [len(together[i].tokens) for i in burst] == [2, 2, 2, 0]  # first token + this step's decode
    assert len(engine.decoding) == 3 and len(engine.queue) == 1
    engine.run_until_idle()
    for i in burst:
        assert together[i].tokens == alone[i].tokens, i


def test_short_prompts_of_a_burst_go_whole_into_batched_forwards(model, monkeypatch):
    """A short prompt that does not fit what is left of a step's budget waits for the next step's batched
    forward instead of going through the scratch slot on its own: a burst costs one forward per budget's worth
    of prompts, not one per prompt after the first budget."""
    engine = make_engine(model, max_streams=6, prefill_chunk=20)
    forwards = []
    plain_forward = engine.model.forward

    def spy(tokens, positions, first_slot=0, **kw):
        forwards.append((tuple(tokens.shape), first_slot))
        return plain_forward(tokens, positions, first_slot=first_slot, **kw)

    monkeypatch.setattr(engine.model, "forward", spy)
    outs = [Collector() for _ in range(6)]
    for i, out in enumerate(outs):
        engine.submit(request(list(range(300 + 10 * i, 309 + 10 * i)), out, seed=i, max_new_tokens=5))
    firsts = []
    for _ in range(3):
        forwards.clear()
        engine.step()
        firsts.append(sum(1 for out in outs if out.tokens))
        prefills = [shape for shape, first_slot in forwards if shape[1] > 1]
        assert all(first_slot != engine.scratch_slot for _, first_slot in forwards)
        assert prefills == [(2, 9)]  # two 9-token prompts (18 of 20 tokens) per step, in one forward
    assert firsts == [2, 4, 6]
    engine.run_until_idle()
    assert all(out.finished and len(out.tokens) == 6 for out in outs)


# What reads a tensor's value into Python: on a GPU each waits for every kernel queued before it.
TENSOR_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def device_waits_refused():
    """Refuse what waits for a GPU's queued work: a tensor read into Python, a Python number assigned at
    tensor indices (torch 2.11 copies it to the device with a blocking copy first), and a tensor made from
    Python values straight on a device (a blocking copy: ``sampling.host_to_device`` copies without one)."""
    saved = {name: getattr(torch.Tensor, name) for name in (*TENSOR_READS, "__setitem__")}
    plain_tensor = torch.tensor

    def tensor(*args, device=None, **kwargs):
        if device is not None:
            raise AssertionError(f"a tensor made from Python values on {device}")
        return plain_tensor(*args, **kwargs)

    def refused(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a tensor was read back ({name})")
        return read

    def setitem(self, index, value):
        indices = index if isinstance(index, tuple) else (index,)
        if isinstance(value, (bool, int, float)) and any(isinstance(i, torch.Tensor) for i in indices):
            raise AssertionError(f"a Python {type(value).__name__} assigned at tensor indices")
        return saved["__setitem__"](self, index, value)

    for name in TENSOR_READS:
        setattr(torch.Tensor, name, refused(name))
    torch.Tensor.__setitem__ = setitem
    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = plain_tensor
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("options", [{}, {"bucketed": True}, {"bucketed": True, "graph_sampling": False}],
                         ids=["plain", "gpu-path", "gpu-path-eager-sampling"])
def test_an_overlapped_step_waits_for_the_device_only_for_the_last_steps_tokens(model, options, monkeypatch):
    """With overlap a step is queued while the GPU still computes the one before; anything in it that waits
    for the device (a value read back: the prompts' longest length, the forward's context length; a Python
    True assigned at tensor indices: the repetition penalty's marks) waits for that step instead, and the
    host's work can no longer run under the GPU's (served on an H100, overlap left the step as long as
    without). Short prompts prefilled together, a long one chunk by chunk, the decode and the sampling wait
    for nothing, and the streams get their tokens."""
    engine = make_engine(model, overlap=True, prefill_chunk=32, **options)
    if engine.prefiller is not None:
        engine.prefiller = PrefillSpy(engine.prefiller)
    outs = [Collector() for _ in range(3)]
    for i, prompt in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[3]]):  # 9 + 5 tokens together; 40 in chunks
        engine.submit(request(prompt, outs[i], seed=i, max_new_tokens=8))
    prefills = []

    def waiting_for_nothing(name):
        plain = getattr(engine, name)

        def run():
            with device_waits_refused():
                plain()
            if name == "_prefill":
                prefills.append(len(engine.decoding))
        return run

    for name in ("_drop_cancelled", "_retire_complete", "_prefill", "_decode"):  # all but reading tokens back
        monkeypatch.setattr(engine, name, waiting_for_nothing(name))
    engine.run_until_idle()
    assert prefills[:2] == [2, 3]  # the two short prompts at once, the long one over two steps (18 + 22)
    assert engine.prefiller is None or engine.prefiller.calls == [2]  # the GPU path: the two at a padded shape
    assert all(out.finished and not out.errors and len(out.tokens) == 9 for out in outs)


def test_newcomer_joins_at_next_step_and_slots_are_reused(model):
    engine = make_engine(model, max_streams=2)
    long_a, long_b, newcomer = Collector(), Collector(), Collector()
    engine.submit(request(PROMPTS[1], long_a, max_new_tokens=200, audio_guard=False, end_id=-1))
    engine.submit(request(PROMPTS[2], long_b, max_new_tokens=12, audio_guard=False, end_id=-1))
    engine.step()
    assert len(engine.decoding) == 2
    engine.submit(request(PROMPTS[3], newcomer, max_new_tokens=5, audio_guard=False, end_id=-1))
    while not long_b.finished:  # the newcomer waits only for a free slot ...
        engine.step()
    assert len(newcomer.tokens) == 0
    engine.step()  # ... and gets its first tokens in the very next step, while long_a keeps running
    assert len(newcomer.tokens) >= 1 and not long_a.finished
    engine.run_until_idle()
    assert len(long_a.tokens) == 201 and len(newcomer.tokens) == 6  # max_new_tokens + appended end_id


def test_stream_and_queue_integrals_count_wall_time_between_steps(model, monkeypatch):
    """The engine's stream- and queued-seconds (whose rates are the mean streams in it and waiting for it)
    cover the time between steps too, and stop while it is idle: a clock that moves 1 s per reading."""
    import itertools
    import types

    from orpheus_triton import engine as engine_module

    ticks = itertools.count()
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                                      monotonic=time.monotonic))
    engine = make_engine(model, max_streams=1)
    outs = [Collector(), Collector()]
    engine.submit(request(PROMPTS[0], outs[0], max_new_tokens=6, audio_guard=False, end_id=-1))
    engine.submit(request(PROMPTS[2], outs[1], max_new_tokens=3, audio_guard=False, end_id=-1))
    engine.step()  # clock 0 -> 1: both waited (as submitted); the first is admitted
    assert (engine.stats.stream_seconds, engine.stats.queued_seconds) == (0.0, 2.0)
    expected_held, expected_waiting = 0.0, 2.0
    while not engine.idle():
        held, waiting = len(engine.decoding), len(engine.queue)
        engine.step()  # 2 s: the gap since the last step ended, and this step
        expected_held, expected_waiting = expected_held + 2 * held, expected_waiting + 2 * waiting
        assert (engine.stats.stream_seconds, engine.stats.queued_seconds) == (expected_held, expected_waiting)
    assert all(out.finished and not out.errors for out in outs) and expected_held >= 2 * 3 and expected_waiting > 2
    engine.submit(request(PROMPTS[2], Collector(), max_new_tokens=1, audio_guard=False, end_id=-1))
    next(ticks), next(ticks)  # idle time passes: no stream held it
    engine.step()
    assert engine.stats.stream_seconds == expected_held and engine.stats.queued_seconds == expected_waiting + 1.0


def test_long_prompt_prefill_is_chunked(model):
    engine = make_engine(model, prefill_chunk=8)
    running, long_prompt = Collector(), Collector()
    engine.submit(request(PROMPTS[2], running, max_new_tokens=50, audio_guard=False, end_id=-1))
    engine.step()
    engine.submit(request(list(range(300, 340)), long_prompt, max_new_tokens=3))
    produced = []
    for _ in range(5):  # 40 prompt tokens in chunks of 8: the running stream advances every step
        before = len(running.tokens)
        engine.step()
        produced.append(len(running.tokens) - before)
    assert produced == [1, 1, 1, 1, 1]
    assert len(long_prompt.tokens) == 2  # first token right after the last chunk, then it joins the decode


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
def test_cancellation_frees_the_slot_within_one_step(model, overlap):
    """With ``overlap`` the cancelled stream's token still on its way back is dropped too."""
    engine = make_engine(model, max_streams=1, overlap=overlap)
    cancelled = {"flag": False}
    victim, waiting = Collector(), Collector()
    engine.submit(request(PROMPTS[0], victim, max_new_tokens=400, is_cancelled=lambda: cancelled["flag"]))
    engine.submit(request(PROMPTS[1], waiting, max_new_tokens=3))
    for _ in range(3):
        engine.step()
    produced = len(victim.tokens)
    cancelled["flag"] = True
    engine.step()
    assert len(victim.tokens) == produced and victim.errors == ["request cancelled by the client"]
    # The freed slot served the waiting request in the same step (with overlap, its tokens come a step later).
    assert engine.decoding[0].request.prompt == PROMPTS[1] and engine.decoding[0].issued == 2
    assert len(waiting.tokens) == (0 if overlap else 2)
    assert engine.stats.cancelled == 1
    engine.run_until_idle()
    assert len(victim.tokens) == produced and len(waiting.tokens) == 4 and waiting.finished


def test_a_queued_stream_cancelled_while_the_engine_asks_still_hears_its_end(model):
    """Each queued stream is asked about cancellation once a step: one whose client cancels between two
    questions is either dropped and told, or kept until the next step; it never just leaves the queue."""
    engine = make_engine(model, max_streams=1)
    engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=50))
    asked = []

    def cancels_after_two_questions():  # the client cancels right after the engine's second question
        asked.append(1)
        return len(asked) > 2

    queued, other = Collector(), Collector()
    engine.submit(request(PROMPTS[1], queued, max_new_tokens=5, is_cancelled=cancels_after_two_questions))
    engine.submit(request(PROMPTS[2], other, max_new_tokens=5, is_cancelled=lambda: True))  # cancelled already
    engine.step()
    assert other.errors == ["request cancelled by the client"]
    assert len(asked) == 1 and [s.request.prompt for s in engine.queue] == [PROMPTS[1]]  # kept: not yet cancelled
    engine.step()
    assert len(asked) == 2 and len(engine.queue) == 1 and not queued.errors
    engine.step()
    assert queued.errors == ["request cancelled by the client"] and not engine.queue
    assert engine.stats.cancelled == 2


def test_a_failed_prefill_fails_the_streams_it_took_from_the_queue(model, monkeypatch):
    """The engine loop fails every stream it holds when a step raises: the prompts of a batched prefill
    are among them from the moment they leave the queue."""
    engine = make_engine(model, max_streams=4)
    running, newcomers = Collector(), [Collector(), Collector()]
    engine.submit(request(PROMPTS[0], running, max_new_tokens=50))
    engine.step()
    for prompt, out in zip(PROMPTS[1:], newcomers, strict=False):
        engine.submit(request(prompt, out, max_new_tokens=5))
    forward = engine.model.forward

    def failing_prefill(tokens, *args, **kwargs):
        if tokens.shape[1] > 1:
            raise RuntimeError("out of memory")
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", failing_prefill)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    engine._fail_all("internal error in the LLM engine step; see server log")  # what the loop does then
    assert all(out.errors == ["internal error in the LLM engine step; see server log"] for out in newcomers)
    assert running.errors and engine.idle()
    # The stats say so (the failed step did not): no stale active streams on the metrics, none counted as
    # held through the idle time that follows.
    assert engine.stats.active_streams == 0 and engine.stats.queued_requests == 0 and engine._last_step_end is None


def test_capacity_errors_are_clear(model):
    engine = make_engine(model, max_seq_len=64, max_streams=1, max_queue=1)
    with pytest.raises(CapacityError, match="exceeds the engine's max_seq_len 64"):
        engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=60))
    for _ in range(2):  # one for the free slot, one waiting
        engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    with pytest.raises(CapacityError, match=r"server busy: 1 requests already waiting for a stream slot \(max_queue 1; "
                                            r"0 of 1 slots in use\)"):
        engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))


def test_guard_keeps_every_token_in_its_frame_slot(model):
    engine = make_engine(model)
    guarded, free = Collector(), Collector()
    engine.submit(request(PROMPTS[2], guarded, max_new_tokens=294, seed=7))
    engine.submit(request(PROMPTS[2], free, max_new_tokens=294, seed=7, audio_guard=False))
    engine.run_until_idle()
    audio = [t for t in guarded.tokens if t != END_OF_SPEECH]
    assert all(token_slot(t) == i % TOKENS_PER_FRAME for i, t in enumerate(audio))
    assert guarded.tokens[-1] == END_OF_SPEECH and len(audio) % TOKENS_PER_FRAME == 0
    # Unguarded, the random model emits text and wrong-slot tokens: the framer has to drop them,
    # and upstream's decoder would shift frames.
    framer = StreamFramer()
    framer.push(free.tokens)
    stray = sum(1 for t in free.tokens if token_slot(t) is None) + framer.misaligned
    assert stray > 0


def sampling_params(batch, **kw):
    zeros = torch.zeros(batch, dtype=torch.long)
    base = dict(temperature=torch.full((batch,), 1.0), top_p=torch.ones(batch), top_k=zeros,
                repetition_penalty=torch.ones(batch), seed=torch.arange(batch), step=zeros,
                audio_guard=torch.zeros(batch, dtype=torch.bool), audio_position=zeros)
    base.update(kw)
    return SamplingBatch(**base)


def test_greedy_top_k_and_repetition_penalty_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    seen = torch.zeros(3, 1000, dtype=torch.bool)
    history = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    seen.scatter_(1, history, True)
    penalised = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    params = sampling_params(3, temperature=torch.zeros(3), repetition_penalty=torch.full((3,), 1.3))
    greedy = sample(logits, params, seen)
    assert greedy.tolist() == penalised.argmax(1).tolist()
    top1 = sample(logits, sampling_params(3, top_k=torch.ones(3, dtype=torch.long)), torch.zeros_like(seen))
    assert top1.tolist() == logits.argmax(1).tolist()


def test_seeded_draws_follow_the_softmax_and_ignore_batch_neighbours():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = [sample(logits, sampling_params(1, seed=torch.tensor([s])), torch.zeros(1, 4, dtype=torch.bool)).item()
             for s in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Row 0 of a batch draws the same as the same row alone.
    batch_logits = torch.cat([logits, torch.randn(5, 4)])
    seeds = torch.tensor([123, 1, 2, 3, 4, 5])
    together = sample(batch_logits, sampling_params(6, seed=seeds), torch.zeros(6, 4, dtype=torch.bool))
    alone = sample(logits, sampling_params(1, seed=seeds[:1]), torch.zeros(1, 4, dtype=torch.bool))
    assert together[0] == alone[0]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(logits, sampling_params(1, seed=torch.tensor([s]), top_p=torch.tensor([0.75])),
                    torch.zeros(1, 4, dtype=torch.bool)).item() for s in range(300)}
    assert draws == {0, 1}


def test_seen_rows_read_from_a_larger_table_pick_the_same_tokens():
    """The engine hands sample() its whole seen-token table and the batch's rows in it."""
    vocab = AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE + 10
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, vocab, generator=gen) * 3
    table = torch.rand(9, vocab, generator=gen) < 0.3
    rows = torch.tensor([7, 2, 5, 0])
    params = sampling_params(4, temperature=torch.full((4,), 0.7), repetition_penalty=torch.full((4,), 1.5),
                             audio_guard=torch.tensor([True, False, True, False]),
                             audio_position=torch.tensor([3, 0, 6, 0]))
    picked = sample(logits, params, table, seen_rows=rows)
    assert torch.equal(picked, sample(logits, params, table[rows]))
    assert not torch.equal(picked, sample(logits, params, table[:4]))  # the rows matter


def test_guarded_rows_read_their_seen_codes_as_one_block():
    """sampling.guarded_seen: a row's slot block and end-of-speech, read from its row of the table, are the
    entries of its guard candidates."""
    from orpheus_triton.sampling import guard_candidates, guarded_seen

    vocab = AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE + 10
    gen = torch.Generator().manual_seed(5)
    table = torch.rand(9, vocab, generator=gen) < 0.3
    rows, slots = torch.tensor([7, 2, 5, 0, 2]), torch.tensor([0, 6, 3, 3, 1])
    assert torch.equal(guarded_seen(table, rows, slots), table[rows[:, None], guard_candidates(slots)])


def test_the_guarded_head_gives_the_full_logits_of_each_rows_candidates():
    """sampling.LmHead.guarded (rows grouped by frame slot, each slot's block of the output matrix once) gives
    every row, in the batch's order, the logits the whole head gives its guard candidates."""
    from orpheus_triton.sampling import FullLogits, LmHead, guard_candidates

    vocab = AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE + 10
    gen = torch.Generator().manual_seed(6)
    weight, hidden = torch.randn(vocab, 16, generator=gen), torch.randn(7, 16, generator=gen)
    rows, slots = torch.tensor([6, 1, 4, 0, 3]), torch.tensor([2, 0, 2, 5, 0])
    got = LmHead(hidden, weight).guarded(rows, slots, slots.tolist())
    want = FullLogits(hidden @ weight.T).guarded(rows, slots, slots.tolist())
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(want, (hidden @ weight.T)[rows[:, None],
                                                                                           guard_candidates(slots)])


def test_unsorted_fast_path_picks_what_sorting_would():
    """Rows whose unfiltered Gumbel-max lies in the top-k/top-p set skip the sort; the pick is the same,
    and the same as when every row is sorted (on GPU, where reading back which rows need it costs more)."""
    from orpheus_triton.sampling import _choose, _choose_sorted, gumbel_noise

    gen = torch.Generator().manual_seed(0)
    rows = 4000
    scores = torch.randn(rows, 64, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    scores[::5, 3] = float("-inf")  # end-of-speech masked off mid-frame
    candidates = torch.randperm(64, generator=gen).repeat(rows, 1) + 1000
    settings = {
        "temperature": torch.rand(rows, generator=gen) + 0.2,
        "top_p": torch.rand(rows, generator=gen) * 0.9 + 0.1,
        "top_k": torch.randint(0, 80, (rows,), generator=gen) * (torch.rand(rows, generator=gen) < 0.5),
        "seed": torch.arange(rows), "step": torch.full((rows,), 3),
    }
    settings["temperature"][::7] = 0.0  # greedy rows
    settings["top_p"][::3] = 1.0  # top-k alone
    fast = _choose(scores, candidates, settings, sort_all=False)
    assert torch.equal(_choose(scores, candidates, settings, sort_all=True), fast)  # the GPU's way
    temperature = torch.where(settings["temperature"] <= 0, 1.0, settings["temperature"])[:, None]
    noise = gumbel_noise(settings["seed"], settings["step"], candidates)
    noise[::7] = 0.0
    sorted_ = _choose_sorted(scores / temperature, candidates, noise, settings)
    assert torch.equal(fast, sorted_)


def test_ties_at_the_nucleus_edge_are_kept_together():
    """Equal scores are kept or dropped as a group, so the pick cannot depend on how a sort orders them."""
    from orpheus_triton.sampling import _choose_sorted, gumbel_noise

    scores = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]])).repeat(300, 1)
    candidates = torch.arange(4).repeat(300, 1)
    settings = {"top_p": torch.full((300,), 0.5), "top_k": torch.zeros(300, dtype=torch.long)}
    noise = gumbel_noise(torch.arange(300), torch.zeros(300, dtype=torch.long), candidates)
    assert set(_choose_sorted(scores, candidates, noise, settings).tolist()) == {0, 1, 2, 3}
    settings = {"top_p": torch.ones(300), "top_k": torch.full((300,), 2)}  # top-k 2 cuts inside the tie
    assert set(_choose_sorted(scores, candidates, noise, settings).tolist()) == {0, 1, 2, 3}
    settings["top_p"] = torch.full((300,), 0.3)
    assert set(_choose_sorted(scores, candidates, noise, settings).tolist()) == {0}


def test_both_samplers_keep_the_kth_scores_ties_and_all_of_top_p_1():
    """top-k by value in both pickers, as transformers: the sorting one (the GPU's graph sampler) dropped
    the k-th score's ties by rank before the nucleus's mass, and picked only the first token where the
    other picked any of four; top_p 1 keeps every candidate (float32 sums reach 1.0 before the last)."""
    from orpheus_triton import sampling
    from orpheus_triton.sampling import _choose, _choose_sorted, gumbel_noise

    rows = 300
    scores = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]])).repeat(rows, 1)
    candidates = torch.arange(4).repeat(rows, 1)
    settings = {"temperature": torch.ones(rows), "top_p": torch.full((rows,), 0.5), "top_k": torch.full((rows,), 2),
                "seed": torch.arange(rows), "step": torch.zeros(rows, dtype=torch.long)}
    noise = gumbel_noise(settings["seed"], settings["step"], candidates)
    assert set(_choose_sorted(scores, candidates, noise, settings).tolist()) == {0, 1, 2, 3}
    assert set(_choose(scores, candidates, settings, sort_all=False).tolist()) == {0, 1, 2, 3}

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 4097, generator=gen) * 4
    candidates = torch.arange(4097).repeat(2, 1)
    least = scores.argmin(dim=1)
    probe = torch.zeros(2, 4097)
    probe[torch.arange(2), least] = 1e6  # noise that picks the least likely candidate if it was kept
    settings = {"temperature": torch.ones(2), "top_p": torch.ones(2), "top_k": torch.zeros(2, dtype=torch.long),
                "seed": torch.arange(2), "step": torch.zeros(2, dtype=torch.long)}
    assert torch.equal(_choose_sorted(scores, candidates, probe, settings), least)
    original = sampling.gumbel_noise
    try:
        sampling.gumbel_noise = lambda seeds, steps, ids: probe
        assert torch.equal(_choose(scores, candidates, settings, sort_all=False), least)
    finally:
        sampling.gumbel_noise = original


def test_a_tiny_temperature_picks_the_best_candidate():
    """Scores divided by 1e-39 overflowed to infinity: every positive score tied and the first was picked."""
    from orpheus_triton.sampling import _choose

    scores = torch.full((1, 64), -3.0)
    scores[0, 10], scores[0, 20] = 1.0, 9.0
    settings = {"temperature": torch.tensor([1e-39]), "top_p": torch.tensor([0.8]),
                "top_k": torch.zeros(1, dtype=torch.long), "seed": torch.tensor([5]), "step": torch.tensor([0])}
    assert _choose(scores, torch.arange(64)[None], settings).tolist() == [20]


def test_gumbel_noise_is_a_pure_function_of_seed_step_token():
    ids = torch.arange(AUDIO_TOKEN_BASE, AUDIO_TOKEN_BASE + CODEBOOK_SIZE)[None]
    a = gumbel_noise(torch.tensor([7]), torch.tensor([3]), ids)
    b = gumbel_noise(torch.tensor([7]), torch.tensor([3]), ids)
    c = gumbel_noise(torch.tensor([7]), torch.tensor([4]), ids)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item() - 0.5772) < 0.05  # Euler-Mascheroni: the mean of Gumbel(0, 1)


def test_llm_stage_tensors_to_settings():
    from orpheus_triton import constants as c
    from orpheus_triton.serving import generation_settings

    tensors = {c.LLM_INPUT_IDS: np.array([[5, 6, 7, 0]], dtype=np.int32),
               c.LLM_INPUT_LENGTHS: np.array([[3]], dtype=np.int32),
               c.LLM_REQUEST_OUTPUT_LEN: np.array([[50]], dtype=np.int32),
               c.LLM_SEED: np.array([[2**63 + 5]], dtype=np.uint64),
               c.LLM_AUDIO_GUARD: np.array([[False]])}
    settings = generation_settings(tensors.get)
    assert settings == {"prompt": [5, 6, 7], "max_new_tokens": 50, "seed": 2**63 + 5, "audio_guard": False}
    request = GenerationRequest(**settings, emit=lambda *_: None)
    assert request.temperature == 0.6 and request.top_p == 0.8 and request.repetition_penalty == 1.1
    with pytest.raises(ValueError, match="request_output_len"):
        generation_settings({c.LLM_INPUT_IDS: tensors[c.LLM_INPUT_IDS]}.get)
    with pytest.raises(ValueError, match="does not fit"):
        generation_settings({**tensors, c.LLM_INPUT_LENGTHS: np.array([[9]], dtype=np.int32)}.get)
    # Two streams in one request (the llm has a max_batch_size): only the first used to be served, the other
    # dropped unsaid, or with lengths [6, 2] the first prompt ran into the second row.
    two = {c.LLM_INPUT_IDS: np.array([[5, 6, 7, 0], [8, 9, 0, 0]], dtype=np.int32),
           c.LLM_INPUT_LENGTHS: np.array([[3], [2]], dtype=np.int32),
           c.LLM_REQUEST_OUTPUT_LEN: np.array([[50], [50]], dtype=np.int32)}
    with pytest.raises(ValueError, match=r"has shape \[2, 4\]: send one stream per request"):
        generation_settings(two.get)
    with pytest.raises(ValueError, match=f"'{c.LLM_SEED}' holds 2 values: send one stream per request"):
        generation_settings({**tensors, c.LLM_SEED: np.array([[1], [2]], dtype=np.uint64)}.get)
    with pytest.raises(ValueError, match="streaming=false is not served"):
        generation_settings({**tensors, c.LLM_STREAMING: np.array([[False]])}.get)
    assert generation_settings({**tensors, c.LLM_STREAMING: np.array([[True]])}.get) == settings


def test_a_request_start_that_is_absent_empty_or_not_a_time_is_the_arrival():
    from orpheus_triton.serving import request_start_of

    assert request_start_of(np.array([[12.5]]), 99.0, now=100.0) == 12.5
    for value in (None, np.zeros((0, 1)), np.array([[np.nan]])):
        assert request_start_of(value, 99.0, now=100.0) == 99.0
    # Nor is one far from now: -1e300 (a direct client's) kept the TTFA histogram's sum at 1e300 for good.
    for start in (-1e300, 100.0 - 3601, 100.0 + 61, 1e300):
        assert request_start_of(np.array([[start]]), 99.0, now=100.0) == 99.0
    assert request_start_of(np.array([[95.0]]), 99.0) == 99.0  # epoch seconds: 95 s after 1970 is not now


def test_out_of_range_sampling_is_refused(model):
    """The refusal names only the settings that are wrong, each with the range it must be in."""
    with pytest.raises(ValueError, match=r"out of range: top_p 0.0 \(in \(0, 1\]\)$"):
        make_engine(model).submit(request(PROMPTS[0], Collector(), top_p=0.0))
    with pytest.raises(ValueError, match=r"out of range: top_k -1 \(>= 0\)$"):
        make_engine(model).submit(request(PROMPTS[0], Collector(), top_k=-1))
    # Infinite (or beyond float32) settings turned the guard's -inf scores into NaN: end of speech mid-frame.
    for settings in ({"temperature": float("inf")}, {"temperature": 1e39}, {"repetition_penalty": float("inf")},
                     {"temperature": float("nan")}):
        (name, value), = settings.items()
        with pytest.raises(ValueError, match=rf"out of range: {name} {re.escape(str(value))} \([>=]+ 0, finite\)$"):
            make_engine(model).submit(request(PROMPTS[0], Collector(), **settings))


def test_a_bad_request_is_refused_alone_and_running_streams_go_on(model):
    """A prompt id outside the vocabulary failed the step's forward, and with it every running stream; an
    end id other than end-of-speech with the guard on shifted every frame after the first end-of-speech."""
    engine = make_engine(model)
    running = Collector()
    engine.submit(request(PROMPTS[0], running, max_new_tokens=14))
    engine.step()
    vocab = model.config.vocab_size
    for prompt, bad in (([1, 2, vocab], f"{vocab} at position 2"), ([-1, 5], "-1 at position 0")):
        with pytest.raises(ValueError, match=f"prompt token {bad} is not in the vocabulary"):
            engine.submit(request(prompt, Collector()))
    with pytest.raises(ValueError, match="end_id 128009 with the audio-token guard on"):
        engine.submit(request(PROMPTS[0], Collector(), end_id=128009))
    engine.submit(request(PROMPTS[0], Collector(), end_id=128009, audio_guard=False))  # unguarded: any end id
    engine.submit(request(PROMPTS[0], Collector(), end_id=NO_END_ID, max_new_tokens=3))  # benchmarks: no end
    engine.run_until_idle()
    assert running.finished and not running.errors


def test_full_uint64_seed_range(model):
    outs = [Collector(), Collector()]
    engine = make_engine(model)
    engine.submit(request(PROMPTS[0], outs[0], seed=2**64 - 1, max_new_tokens=14))
    engine.submit(request(PROMPTS[0], outs[1], seed=2**63 - 1, max_new_tokens=14))
    engine.run_until_idle()
    assert len(outs[0].tokens) >= 7 and outs[0].tokens != outs[1].tokens


def test_stop_request_drops_a_stream_by_id(model):
    engine = make_engine(model)
    victim, other = Collector(), Collector()
    engine.submit(request(PROMPTS[0], victim, max_new_tokens=300, request_id="victim"))
    engine.submit(request(PROMPTS[1], other, max_new_tokens=20, request_id="other"))
    engine.step()
    assert engine.stop_stream("victim") and not engine.stop_stream("nobody")
    produced = len(victim.tokens)
    engine.step()
    # It ends as TensorRT-LLM ends a stopped request: normally, with end_id last (so an
    # ensemble around it completes), not with an error.
    assert victim.tokens[produced:] == [END_OF_SPEECH] and victim.finished == FINISH_STOPPED and not victim.errors
    assert engine.stats.cancelled == 1 and len(engine.decoding) == 1
    engine.run_until_idle()
    assert other.finished and not other.errors


def test_each_stream_ends_saying_why(model):
    """With its last tokens a stream says why it ended: its end_id (end of speech), its max_new_tokens (its
    text's last words may be missing: the client is told), or a stop; only a cut is counted as capped."""
    ending = stream_ending_on_its_own_token(model)
    expected_length = ending.pop("expected_length")
    engine = make_engine(model)
    spoke, capped, stopped = Collector(), Collector(), Collector()
    engine.submit(request(PROMPTS[5], spoke, **ending))
    engine.submit(request(PROMPTS[0], capped, max_new_tokens=5))
    engine.submit(request(PROMPTS[1], stopped, max_new_tokens=300, request_id="stopped"))
    engine.step()
    engine.stop_stream("stopped")
    engine.run_until_idle()
    assert len(spoke.tokens) == expected_length and spoke.finished == FINISH_END_OF_SPEECH
    assert capped.tokens[5:] == [END_OF_SPEECH] and capped.finished == FINISH_MAX_TOKENS
    assert stopped.tokens[-1] == END_OF_SPEECH and stopped.finished == FINISH_STOPPED
    assert engine.stats.capped == 1 and engine.stats.cancelled == 1


def test_a_stop_that_comes_as_its_stream_ends_does_not_stop_the_next_stream_with_its_id(model):
    """The stop lands (another thread) during the step in which the stream finishes on its own; the
    engine then idles, and a new stream with the same id came: it used to be stopped at once."""
    engine = make_engine(model)
    first, second = Collector(), Collector()

    def emit(tokens, finish):
        first.emit(tokens, finish)
        if finish is not None:
            assert engine.stop_stream("X")  # still known: the step has not let it go yet

    engine.submit(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=5, emit=emit, fail=first.fail,
                                    request_id="X", seed=1))
    engine.run_until_idle()
    engine.submit(request(PROMPTS[1], second, max_new_tokens=21, request_id="X", seed=2))
    engine.run_until_idle()
    assert second.finished and not second.errors and len(second.tokens) > 1  # not just [end_id]
    assert engine.stats.cancelled == 0


def test_a_stop_while_its_stream_moves_from_the_queue_into_a_slot_is_not_lost(model):
    """The stop (another thread: the llm model's execute) lands while the engine thread moves the stream
    out of the queue into a decode slot. It used to find the stream in neither: stop_stream said no such
    stream, and the stream generated to max_new_tokens while the client waited for its end."""
    engine = make_engine(model)
    out, found = Collector(), {}
    engine.submit(request(PROMPTS[0], out, max_new_tokens=300, request_id="X"))
    moving = threading.Event()

    class MovingSlowly(list):
        def extend(self, streams):
            moving.set()
            time.sleep(0.2)  # the stop arrives meanwhile
            super().extend(streams)

    engine.decoding = MovingSlowly()
    stopper = threading.Thread(target=lambda: moving.wait(5) and found.update(stopped=engine.stop_stream("X")))
    stopper.start()
    engine.step()
    stopper.join(5)
    engine.run_until_idle()
    assert found == {"stopped": True}
    assert out.finished and out.tokens[-1] == END_OF_SPEECH and len(out.tokens) <= 3 and not out.errors


def test_a_request_that_cannot_be_asked_about_cancellation_is_dropped_and_the_others_go_on(model, caplog):
    """Triton's is_cancelled() can raise for a request that is gone. The engine asked it unguarded: every
    step then failed, the running streams with it, and the queue behind it was never served."""
    engine = make_engine(model, max_streams=1)
    running, gone, later = Collector(), Collector(), Collector()

    def cannot_ask():
        raise RuntimeError("the request is no longer known")

    engine.submit(request(PROMPTS[0], running, max_new_tokens=5, request_id="running"))
    engine.submit(request(PROMPTS[1], gone, max_new_tokens=5, request_id="gone", is_cancelled=cannot_ask))
    engine.submit(request(PROMPTS[2], later, max_new_tokens=5, request_id="later"))
    with caplog.at_level(logging.WARNING, logger="orpheus_triton.engine"):
        engine.run_until_idle()
    assert running.finished and later.finished and not running.errors and not later.errors
    assert gone.errors == ["request cancelled by the client"] and not gone.tokens
    assert "could not ask whether request 'gone' was cancelled" in caplog.text


def test_a_request_refused_for_a_full_queue_is_counted(model):
    """stats.queue_full (orpheus_llm_queue_full_requests_total): 'server busy' at once was counted nowhere,
    where one after max_queue_seconds was (timed_out)."""
    engine = make_engine(model, max_streams=1, max_queue=1)
    engine.submit(request(PROMPTS[0], Collector()))  # the free slot's
    engine.submit(request(PROMPTS[0], Collector()))  # waiting
    for _ in range(2):
        with pytest.raises(CapacityError, match="server busy"):
            engine.submit(request(PROMPTS[1], Collector()))
    assert engine.stats.queue_full == 2 and engine.stats.timed_out == 0 and len(engine.queue) == 2


def test_max_queue_counts_only_the_requests_beyond_the_free_slots(model):
    """A request waits in the queue until the engine thread takes it, free slot or not: a burst of 12 into
    an engine with 16 free slots and max_queue 4 was refused from the fifth on, with every slot free."""
    engine = make_engine(model, max_streams=16, max_queue=4)
    for _ in range(16 + 4):  # not started: every request stays queued, 16 of them for free slots
        engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    with pytest.raises(CapacityError, match="4 requests already waiting"):
        engine.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    # max_queue 0: a request is refused exactly when no slot is free for it
    strict = make_engine(model, max_streams=2, max_queue=0)
    strict.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    strict.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    with pytest.raises(CapacityError, match="server busy"):
        strict.submit(request(PROMPTS[0], Collector(), max_new_tokens=5))
    with pytest.raises(ValueError, match="max_queue must be >= 0"):
        make_engine(model, max_queue=-1)


def test_cpu_threads_parameter():
    from orpheus_triton.triton_llm import set_cpu_threads

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads({"cpu_threads": "auto"}, "cuda") == before  # GPU: left alone
        cores = len(os.sched_getaffinity(0))
        assert set_cpu_threads({}, "cpu") == max(1, cores // 2) == torch.get_num_threads()
        assert set_cpu_threads({"cpu_threads": "3"}, "cpu") == 3 == torch.get_num_threads()
        for bad in ("0", "-1", "many"):
            with pytest.raises(ValueError, match=f"cpu_threads must be 'auto' or a whole number >= 1, got '{bad}'"):
                set_cpu_threads({"cpu_threads": bad}, "cpu")
    finally:
        torch.set_num_threads(before)


def _openmp_runtime():
    """The OpenMP runtime torch loaded (its per-thread thread count is what torch's CPU kernels use)."""
    import ctypes  # noqa: PLC0415

    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libgomp" in line or "libiomp" in line:
                return ctypes.CDLL(line.split()[-1])
    pytest.skip("torch's OpenMP runtime not found in /proc/self/maps")


def test_torch_threads_start_with_the_process_thread_count():
    """torch.set_num_threads binds the calling thread: a plain thread started later begins with the
    OpenMP runtime's default (one per core), so its first matrix product may run on every core."""
    import threading  # noqa: PLC0415

    from orpheus_triton.threads import start_torch_thread  # noqa: PLC0415

    runtime = _openmp_runtime()
    seen = {}
    plain = threading.Thread(target=lambda: seen.update(plain=runtime.omp_get_max_threads()))
    plain.start()
    plain.join()
    wanted = seen["plain"] + 1  # anything but what a new thread gets by default
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        start_torch_thread(lambda: seen.update(torch=runtime.omp_get_max_threads()), "test").join(10)
    finally:
        torch.set_num_threads(before)
    assert seen["torch"] == wanted


def test_graph_sampling_picks_what_sample_picks():
    """guarded_tokens (fixed shapes, one CUDA graph on GPU) against sample() on the same logits (float64)."""
    from orpheus_triton.sampling import FullLogits, guarded_tokens

    gen = torch.Generator().manual_seed(1)
    batch, hidden_size, vocab = 96, 24, AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    hidden = torch.randn(batch, hidden_size, generator=gen, dtype=torch.float64)
    seen = torch.rand(batch + 5, vocab, generator=gen) < 0.01
    seen_rows = torch.randperm(batch + 5, generator=gen)[:batch]
    params = SamplingBatch(
        temperature=torch.rand(batch, generator=gen) * 1.3 - 0.1,  # some greedy rows
        top_p=torch.rand(batch, generator=gen) * 0.9 + 0.1, top_k=torch.randint(0, 60, (batch,), generator=gen),
        repetition_penalty=1 + torch.rand(batch, generator=gen) * 0.5, seed=torch.arange(batch) * 7919,
        step=torch.randint(0, 500, (batch,), generator=gen), audio_guard=torch.ones(batch, dtype=torch.bool),
        audio_position=torch.randint(0, 700, (batch,), generator=gen),
    )
    expected = sample(FullLogits(hidden @ weight.T), params, seen, seen_rows=seen_rows)
    assert torch.equal(guarded_tokens(hidden, weight, seen, seen_rows, params), expected)


def test_engine_with_graph_sampling_streams_the_same_tokens(model):
    """The engine's graph-sampling path (eager on CPU) gives every stream the tokens of the usual path; in a
    batch with an unguarded row the guarded rows still come from the graph sampler, that row from sample()."""
    settings = [{"seed": 1}, {"seed": 2, "top_k": 5}, {"seed": 3, "temperature": 0.0},
                {"seed": 4, "audio_guard": False, "max_new_tokens": 10}]
    runs, sampled = [], []
    for graph_sampling in (False, True):
        engine = make_engine(model, bucketed=True, graph_sampling=graph_sampling)
        assert (engine.sampler is not None) == graph_sampling
        if graph_sampling:
            sampler = engine.sampler

            def spy(hidden, reals, whole, engine=engine, sampler=sampler):
                sampled.append((hidden.shape[0], len(engine.decoding)))
                return sampler(hidden, reals, whole)

            engine.sampler = spy
        outs = [Collector() for _ in settings]
        for prompt, out, extra in zip(PROMPTS, outs, settings, strict=False):
            engine.submit(request(prompt, out, **extra))
        engine.run_until_idle()
        runs.append([out.tokens for out in outs])
    assert runs[0] == runs[1] and all(len(tokens) >= 2 for tokens in runs[0])
    assert (3, 4) in sampled  # the three guarded rows of a four-stream batch, from the graph sampler


def stream_ending_on_its_own_token(model, at: int = 9) -> dict:
    """Settings for a stream that ends by producing its end_id ``at`` tokens in (seeded, unguarded,
    end_id = the token it makes there)."""
    probe, settings = Collector(), {"seed": 7, "audio_guard": False, "max_new_tokens": 40}
    engine = make_engine(model)
    engine.submit(request(PROMPTS[5], probe, end_id=-1, **settings))
    engine.run_until_idle()
    at = next(i for i in range(at, 40) if probe.tokens[i] not in probe.tokens[:i])
    return {**settings, "end_id": probe.tokens[at], "expected_length": at + 1}


@pytest.mark.parametrize("options", [{}, {"bucketed": True, "graph_sampling": False}, {"bucketed": True}],
                         ids=["plain", "bucketed", "graph-sampling"])
def test_overlapped_engine_streams_the_same_tokens(model, options):
    """With ``overlap`` the next forward takes each stream's token from the device and tokens are read
    back a step later: streams joining mid-run, in a burst, cut at max_new_tokens or ending on their
    end_id get exactly the tokens they get without it."""
    ending = stream_ending_on_its_own_token(model)
    expected_length = ending.pop("expected_length")
    runs = []
    for overlap in (False, True):
        engine = make_engine(model, max_streams=3, prefill_chunk=32, overlap=overlap, **options)
        outs = {i: Collector() for i in range(6)}
        engine.submit(request(PROMPTS[1], outs[1], seed=1, max_new_tokens=12))  # leaves early
        engine.submit(request(PROMPTS[5], outs[5], **ending))  # ends on its own end_id
        for _ in range(4):
            engine.step()
        for i in (0, 2, 4):  # a burst, one of them waiting for a free slot
            engine.submit(request(PROMPTS[i], outs[i], seed=i, max_new_tokens=20 + 7 * i))
        for _ in range(3):
            engine.step()
        engine.submit(request(PROMPTS[3], outs[3], seed=3, top_k=5, max_new_tokens=25))
        engine.run_until_idle()
        assert engine.idle() and not engine.decoding
        runs.append({i: out.tokens for i, out in outs.items()})
        assert all(out.finished for out in outs.values())
    assert runs[0] == runs[1]
    assert len(runs[1][5]) == expected_length and runs[1][5][-1] == ending["end_id"]
    assert len(runs[1][1]) == 13 and runs[1][1][-1] == END_OF_SPEECH  # 12 tokens + the appended end_id


def test_overlapped_engine_hands_tokens_out_one_step_later(model):
    engine = make_engine(model, overlap=True)
    out = Collector()
    engine.submit(request(PROMPTS[0], out, max_new_tokens=3, audio_guard=False, end_id=-1))
    engine.step()  # prefill + first decode, both still on the device
    assert out.tokens == [] and len(engine.decoding) == 1
    engine.step()  # third token sampled: the stream's last, so it leaves before the next forward ...
    assert len(out.tokens) == 2 and not out.finished
    assert engine.decoding and engine.decoding[0].issued == 3
    engine.step()  # ... which it is not part of; its last token is handed out with end_id
    assert not engine.decoding and out.finished and len(out.tokens) == 4 and engine.idle()


def test_the_llm_stage_builds_its_engine_with_the_options_of_its_config(model_set):
    from orpheus_triton.triton_llm import build_engine

    params = {"llm_dir": str(model_set.llm), "device": "cpu", "max_streams": "3", "max_seq_len": "256"}
    plain = build_engine(params)
    assert (plain.max_streams, plain.max_seq_len, plain.overlap) == (3, 256, False)
    assert build_engine({**params, "overlap": "true"}).overlap
    # The prefill budget: the device's default unless the config sets one ("0" as rendered: the default).
    assert plain.prefill_chunk == build_engine({**params, "prefill_chunk": "0"}).prefill_chunk
    assert plain.prefill_chunk == PREFILL_TOKENS_PER_STEP["cpu"] < PREFILL_TOKENS_PER_STEP["cuda"]
    assert build_engine({**params, "prefill_chunk": "64"}).prefill_chunk == 64


def test_the_llm_stage_picks_streams_and_overlap_by_device_unless_its_config_names_them(model_set, monkeypatch):
    """As rendered by default (max_streams "0", overlap "auto"): 16 streams on a CPU (64 on a GPU, fewer where its
    free memory holds fewer) and no overlap on a CPU (on a GPU, where an H200 measured it paying); a wrong
    overlap value is named before the weights load."""
    from orpheus_triton import engine as engine_module
    from orpheus_triton.llama import kv_cache_bytes
    from orpheus_triton.triton_llm import build_engine, overlap_setting

    params = {"llm_dir": str(model_set.llm), "device": "cpu", "max_streams": "0", "max_seq_len": "256",
              "overlap": "auto"}
    engine = build_engine(params)
    assert (engine.max_streams, engine.overlap) == (engine_module.MAX_STREAMS_BY_DEVICE["cpu"], False) == (16, False)
    assert engine_module.MAX_STREAMS_BY_DEVICE["cuda"] == 64
    assert build_engine({**params, "overlap": "TRUE "}).overlap
    assert not build_engine({**params, "overlap": "false"}).overlap
    assert (overlap_setting("auto"), overlap_setting(""), overlap_setting("true")) == (None, None, True)
    with pytest.raises(ValueError, match="overlap must be auto, true or false, got 'on'"):
        build_engine({**params, "llm_dir": "/nonexistent", "overlap": "on"})
    # A device whose free memory's default share holds 6 caches of max_seq_len: 5 streams beside the prefill
    # slot (the share leaves room for CUDA graphs, activations and the SNAC decoder)
    model = engine.model
    per_stream = kv_cache_bytes(model.config, 1, 256, model.embed_tokens.weight.dtype)
    share = engine_module.DEFAULT_STREAMS_MEMORY_SHARE
    assert share <= KV_CACHE_SHARE / 1.5
    monkeypatch.setattr(engine_module, "available_memory", lambda device: int(6 * per_stream / share) + 1)
    assert engine_module.default_max_streams(model, 256) == 6 - 1
    monkeypatch.setattr(engine_module, "available_memory", lambda device: 0)
    assert engine_module.default_max_streams(model, 256) == 1  # check_cache_fits then says what does not fit
    monkeypatch.setattr(engine_module, "available_memory", lambda device: None)
    assert engine_module.default_max_streams(model, 256) == 16


def test_a_prefill_budget_or_length_below_one_token_is_refused(model):
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        InflightEngine(model, max_streams=2, max_seq_len=64, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_seq_len must be >= 1 .*, got 0"):
        InflightEngine(model, max_streams=2, max_seq_len=0)


def test_a_kv_cache_the_device_cannot_hold_is_refused_with_what_to_change(model, monkeypatch, caplog):
    from orpheus_triton import engine as engine_module
    from orpheus_triton.llama import kv_cache_bytes

    per_stream = kv_cache_bytes(model.config, 1, 512, model.embed_tokens.weight.dtype)
    monkeypatch.setattr(engine_module, "available_memory", lambda device: 3 * per_stream)
    with pytest.raises(ValueError, match=r"KV cache for 4 streams of 512 positions .* about 1 fit") as refused:
        make_engine(model, max_streams=4, max_seq_len=512)
    assert "--max-streams" in str(refused.value) and "--max-seq-len" in str(refused.value)
    monkeypatch.setattr(engine_module, "available_memory", lambda device: per_stream // 2)
    with pytest.raises(ValueError, match="not one stream fits"):
        make_engine(model, max_streams=4, max_seq_len=512)
    monkeypatch.setattr(engine_module, "available_memory", lambda device: 6 * per_stream)
    with caplog.at_level(logging.INFO, logger="orpheus_triton.engine"):
        assert make_engine(model, max_streams=4, max_seq_len=512).max_streams == 4  # 5 slots in 90% of 6
    assert "room for about 4 streams of this length, serve --max-streams" in caplog.text  # the log says
    monkeypatch.setattr(engine_module, "available_memory", lambda device: None)  # cannot tell: no check
    assert make_engine(model, max_streams=4, max_seq_len=512).max_streams == 4


def test_kv_cache_size_and_free_memory_are_read_as_allocated():
    from orpheus_triton.llama import Llama, LlamaConfig, available_memory, kv_cache_bytes

    config = LlamaConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300})
    with torch.device("meta"):
        llama = Llama(config)
    llama.allocate_cache(3, 16)
    caches = [t for layer in llama.layers for t in (layer.self_attn.k_cache, layer.self_attn.v_cache)]
    assert kv_cache_bytes(config, 3, 16, torch.float32) == sum(t.numel() * t.element_size() for t in caches)
    assert available_memory(torch.device("cpu")) > 0  # Linux: MemAvailable
    assert available_memory(torch.device("meta")) is None


def test_a_request_waiting_too_long_for_a_slot_is_refused_and_the_others_go_on(model):
    engine = make_engine(model, max_streams=1, max_queue_seconds=0.05)
    running, waiting, late = Collector(), Collector(), Collector()
    engine.submit(request(PROMPTS[0], running, max_new_tokens=40, request_id="running"))
    engine.step()  # the running stream takes the only slot
    engine.submit(request(PROMPTS[1], waiting, max_new_tokens=5, request_id="waiting"))
    time.sleep(0.1)
    engine.step()
    assert waiting.errors and "no stream slot came free within 0.05 s" in waiting.errors[0]
    assert "1 of 1 stream slots in use" in waiting.errors[0]
    assert not waiting.tokens and engine.stats.timed_out == 1 and not engine.queue
    engine.run_until_idle()
    assert not running.errors and len(running.tokens) == 41  # 40 and the closing end_id
    # Within its time, a queued request waits for the slot and is served as usual.
    patient = make_engine(model, max_streams=1, max_queue_seconds=60)
    first = Collector()
    patient.submit(request(PROMPTS[0], first, max_new_tokens=5))
    patient.step()
    patient.submit(request(PROMPTS[1], late, max_new_tokens=5))
    patient.run_until_idle()
    assert late.errors == [] and len(late.tokens) == 6 and patient.stats.timed_out == 0
    with pytest.raises(ValueError, match="max_queue_seconds must be >= 0"):
        make_engine(model, max_queue_seconds=-1)
