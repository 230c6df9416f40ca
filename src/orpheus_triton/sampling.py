"""Per-row sampling for a batch of streams: penalties, audio-token guard, top-k/top-p, seeded draws.

Randomness is counter-based: the Gumbel noise added to token ``v`` of a stream
at generation step ``s`` is a hash of (seed, s, v). A stream's draws therefore
depend only on its own seed and logits, never on which other streams share the
batch or on the order rows happen to be in, and the same holds on CPU and GPU.
Taking the argmax of logits + Gumbel noise is an exact draw from the softmax
(the Gumbel-max trick), so filtered sampling keeps its usual meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .constants import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, END_OF_SPEECH, TOKENS_PER_FRAME
from .counter_noise import hash32, row_keys, uniform
from .cuda_graphs import capture


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for rows (seed, step) and candidate ``token_ids`` [B, C] -> float32 [B, C]."""
    bits = hash32(row_keys(seeds, steps)[:, None] ^ (token_ids.to(torch.int64) * 0x9E3779B1))
    return uniform(bits).log_().neg_().log_().neg_().float()  # -log(-log(u)), in place on u


@dataclass
class SamplingBatch:
    """Per-row sampling settings, as tensors of shape [B] on the logits' device."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # 0 = off
    repetition_penalty: torch.Tensor
    seed: torch.Tensor  # int64
    step: torch.Tensor  # tokens generated so far
    audio_guard: torch.Tensor  # bool
    audio_position: torch.Tensor  # audio tokens generated so far (frame slot = position % 7)

    @classmethod
    def from_packed(cls, reals: torch.Tensor, whole: torch.Tensor) -> SamplingBatch:
        """The settings from the engine's two packed tensors (one host-to-device copy per dtype):
        ``reals`` [3, B] temperature, top_p, repetition_penalty; ``whole`` [>= 5, B] top_k, seed
        (int64), step, guard flag, audio position (the engine adds each row's slot in its ``seen`` table)."""
        return cls(temperature=reals[0], top_p=reals[1], repetition_penalty=reals[2], top_k=whole[0],
                   seed=whole[1], step=whole[2], audio_guard=whole[3].bool(), audio_position=whole[4])


@dataclass(frozen=True)
class HostRows:
    """The settings that decide how rows are grouped, as host values.

    The engine knows them without asking the device. Read from a GPU, each would be
    a wait for every kernel queued before it (the decode step included), and the
    sampling kernels after it could no longer be queued while the GPU is still busy
    with the forward. With these, the only read of a step is its tokens.
    """

    guarded: list[bool]
    slots: list[int]  # frame slot of each row: audio_position % 7
    top_k: list[int]

    @classmethod
    def read(cls, params: SamplingBatch) -> HostRows:
        """Read from the device (for callers that do not have them at hand)."""
        return cls(params.audio_guard.tolist(), (params.audio_position % TOKENS_PER_FRAME).tolist(),
                   params.top_k.tolist())


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting: torch's blocking copy to a GPU first waits for
    every queued kernel, a pinned non-blocking one does not (the pinned block is kept until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def guard_candidates(audio_position: torch.Tensor) -> torch.Tensor:
    """Token ids a guarded row may produce: the 4096 codes of its frame slot, then end-of-speech."""
    slot = audio_position % TOKENS_PER_FRAME
    codes = AUDIO_TOKEN_BASE + slot[:, None] * CODEBOOK_SIZE + torch.arange(CODEBOOK_SIZE, device=slot.device)
    eos = torch.full_like(slot[:, None], END_OF_SPEECH)
    return torch.cat((codes, eos), dim=1)


# Without the guard, a row samples among its most likely tokens only: as many as
# the guard allows (4096 codes + end-of-speech), so both paths cost the same.
UNGUARDED_CANDIDATES = CODEBOOK_SIZE + 1


class LmHead:
    """Logits on demand from the final hidden states, so guarded rows only pay for their candidates.

    A guarded row needs 4097 logits, not 156,940: the 4096 codes of its frame
    slot are one contiguous block of the output matrix, so rows are grouped by
    slot and multiplied with that block alone (about 38x less work and memory
    traffic in the head than full logits).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.hidden = hidden  # [B, H]
        self.weight = weight  # [V, H]

    def full(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.hidden[rows] @ self.weight.T).float()

    def guarded(self, rows: torch.Tensor, slots: torch.Tensor, host_slots: list[int]) -> torch.Tensor:
        # Rows in slot order (stable: each slot's rows as they come), so that each slot's rows are one
        # stretch of the matrices: one product and one copy a slot, then one reordering back if needed.
        device = self.hidden.device
        order = sorted(range(len(host_slots)), key=host_slots.__getitem__)
        reordered = order != list(range(len(order)))
        if reordered:
            rows = rows[host_to_device(torch.tensor(order), device)]
        hidden = self.hidden[rows]
        scores = torch.empty(len(host_slots), CODEBOOK_SIZE + 1, device=device)
        first = 0
        for slot in sorted(set(host_slots)):
            last = first + host_slots.count(slot)
            start = AUDIO_TOKEN_BASE + slot * CODEBOOK_SIZE
            block = self.weight[start : start + CODEBOOK_SIZE]
            scores[first:last, :CODEBOOK_SIZE] = (hidden[first:last] @ block.T).float()
            first = last
        scores[:, CODEBOOK_SIZE] = (hidden @ self.weight[END_OF_SPEECH]).float()
        if reordered:  # back to the batch's order
            scores = scores[host_to_device(torch.tensor(sorted(range(len(order)), key=order.__getitem__)), device)]
        return scores


class FullLogits(LmHead):
    """The same interface over precomputed logits [B, V]."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def full(self, rows: torch.Tensor) -> torch.Tensor:
        return self.logits[rows]

    def guarded(self, rows: torch.Tensor, slots: torch.Tensor, host_slots: list[int]) -> torch.Tensor:
        return self.logits[rows].gather(1, guard_candidates(slots))


def _penalise(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty as in Hugging Face and TensorRT-LLM: shrink the logit of every token
    already in the sequence (divide if positive, multiply if negative)."""
    penalty = penalty[:, None]
    return torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)


def sample(logits: torch.Tensor | LmHead, params: SamplingBatch, seen: torch.Tensor,
           seen_rows: torch.Tensor | None = None, host: HostRows | None = None) -> torch.Tensor:
    """Pick one token per row. ``seen`` [B, V] bool marks prompt and generated tokens (for the penalty).

    ``logits`` is either full logits [B, V] or an ``LmHead`` that computes only what is needed.
    With ``seen_rows`` [B], ``seen`` is a larger table and row b of the batch is its row
    ``seen_rows[b]``: guarded rows then read only their 4097 candidates from it, not a whole
    vocabulary-wide row each. ``host``: the rows' grouping settings as host values (read from
    the device when not given).
    """
    head = logits if isinstance(logits, LmHead) else FullLogits(logits)
    host = host or HostRows.read(params)
    device = params.temperature.device
    batch = params.temperature.shape[0]
    next_tokens = torch.empty(batch, dtype=torch.int64, device=device)
    for guarded in (True, False):
        members = [row for row, flag in enumerate(host.guarded) if flag == guarded]
        if not members:
            continue
        everyone = len(members) == batch  # the usual case: no need to gather the rows' settings
        rows = torch.arange(batch, device=device) if everyone else host_to_device(torch.tensor(members), device)
        sub = {name: getattr(params, name) if everyone else getattr(params, name)[rows]
               for name in params.__dataclass_fields__}
        table_rows = rows if seen_rows is None else seen_rows[rows]
        max_top_k = max(host.top_k[row] for row in members)
        if guarded:
            slots = sub["audio_position"] % TOKENS_PER_FRAME
            candidates = guard_candidates(slots)
            scores = _guarded_scores(head.guarded(rows, slots, [host.slots[row] for row in members]), slots,
                                     seen, table_rows, sub["repetition_penalty"])
        else:
            scores = _penalise(head.full(rows), seen[table_rows], sub["repetition_penalty"])
            scores, candidates = scores.topk(min(scores.shape[1], UNGUARDED_CANDIDATES), dim=1)
        next_tokens[rows] = _choose(scores, candidates, sub, max_top_k)
    return next_tokens


def _guarded_scores(scores: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor, table_rows: torch.Tensor,
                    penalty: torch.Tensor) -> torch.Tensor:
    """Guarded rows' candidate logits [B, 4097], penalised, with end-of-speech only where a frame is complete."""
    scores = _penalise(scores, guarded_seen(seen, table_rows, slots), penalty)
    scores[:, -1] = torch.where(slots == 0, scores[:, -1], float("-inf"))
    return scores


def guarded_seen(seen: torch.Tensor, table_rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Whether each guarded row's candidates (``guard_candidates``: its slot's 4096 codes, then end-of-speech)
    are in its sequence: rows ``table_rows`` of ``seen`` [rows, V].

    A slot's codes are one contiguous block of the vocabulary, so each row copies a block instead of
    gathering 4097 scattered entries (8 rows: 17 against 61 us on a CPU; 32 rows: 33 against 191).
    """
    codes = seen[:, AUDIO_TOKEN_BASE : AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE]
    blocks = codes.unflatten(1, (TOKENS_PER_FRAME, CODEBOOK_SIZE))  # a view: [rows, slot, code]
    return torch.cat((blocks[table_rows, slots], seen[table_rows, END_OF_SPEECH][:, None]), dim=1)


def _tempered(scores: torch.Tensor, candidates: torch.Tensor, p: dict[str, torch.Tensor]):
    """(scores divided by temperature, the rows' Gumbel noise, greedy rows): greedy rows (temperature
    <= 0) keep their scores and draw no noise, so their pick is the argmax.

    Each row's best score is taken off first (no filter or softmax sees the shift): divided by a tiny
    temperature (1e-39), the scores themselves overflowed to infinity, every positive one tied and the
    first of them was picked instead of the best."""
    greedy = p["temperature"] <= 0
    scores = (scores - scores.amax(dim=1, keepdim=True)) / torch.where(greedy, 1.0, p["temperature"])[:, None]
    noise = gumbel_noise(p["seed"], p["step"], candidates)
    return scores, torch.where(greedy[:, None], torch.zeros_like(noise), noise), greedy


def _choose(scores: torch.Tensor, candidates: torch.Tensor, p: dict[str, torch.Tensor],
            max_top_k: int | None = None, sort_all: bool | None = None) -> torch.Tensor:
    """Gumbel-max over the rows' top-k/top-p filtered candidates.

    Sorting 4097 candidates per row is the costliest part of sampling on a CPU, and
    it is rarely needed: the argmax of scores + noise over *all* candidates is also
    the argmax over the filtered set whenever it lies inside that set, which a row
    can check in one pass (how many candidates score higher, and their mass).
    That happens with probability about top_p; only the other rows are sorted.
    On a GPU (``sort_all`` None: by the device) every row is sorted instead:
    a few hundred rows' sort costs less there than reading back which rows need one.
    ``max_top_k``: the largest top_k of the rows (read from ``p`` when not given).
    """
    if max_top_k is None:
        max_top_k = int(p["top_k"].max())
    if sort_all is None:
        sort_all = scores.device.type == "cuda"
    scores, noise, greedy = _tempered(scores, candidates, p)
    pick = (scores + noise).argmax(dim=1, keepdim=True)
    picked = scores.gather(1, pick)
    higher = scores > picked
    top_k = p["top_k"]
    inside = (top_k <= 0) | (higher.sum(dim=1) < top_k)
    weights = torch.exp(scores)  # _tempered left each row's best score at 0
    kept = weights
    if max_top_k > 0:
        width = scores.shape[1]
        kth_index = (top_k.clamp(1, width) - 1)[:, None]
        kth = scores.topk(min(max_top_k, width), dim=1).values.gather(1, kth_index)
        kept = torch.where((top_k[:, None] > 0) & (scores < kth), 0.0, weights)
    mass_before = (weights * higher).sum(dim=1) / kept.sum(dim=1)
    # top_p 1 keeps every candidate (float32 sums reach 1.0 before the last of 4097 candidates)
    inside &= greedy | (p["top_p"] >= 1) | (mass_before < p["top_p"])
    tokens = candidates.gather(1, pick).squeeze(1)
    if sort_all:
        return torch.where(inside, tokens, _choose_sorted(scores, candidates, noise, p))
    outside = (~inside).nonzero().flatten()
    if outside.numel():
        tokens[outside] = _choose_sorted(scores[outside], candidates[outside], noise[outside],
                                         {name: value[outside] for name, value in p.items()})
    return tokens


def _sort_descending(scores: torch.Tensor) -> torch.Tensor:
    """Each row's scores from highest to lowest; on CPU through NumPy, whose (SIMD) sort of 4k values is
    about 6x faster here than torch's.

    Only the values are needed (``_choose_sorted`` keeps or drops equal scores together), not the order:
    sorting values alone took 120 us for 8 rows of 4,097 where sorting their order and gathering by it
    took 324.
    """
    if scores.device.type != "cpu":
        return scores.sort(dim=1, descending=True).values
    return torch.from_numpy(-np.sort(-scores.numpy(), axis=1))


def _choose_sorted(scores: torch.Tensor, candidates: torch.Tensor, noise: torch.Tensor,
                   p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The filtered Gumbel-max by sorting: ``scores`` already divided by temperature.

    A candidate is kept when fewer than top_k candidates score strictly higher and
    their probability mass is below top_p: the smallest nucleus, with the whole
    tie group at its edge kept (the same test ``_choose`` applies without sorting).
    """
    sorted_scores = _sort_descending(scores)
    top_k = p["top_k"][:, None]
    # By value, as _choose and transformers: the k-th score's ties stay (by rank, some of them were
    # dropped from the nucleus's mass, and this path picked other tokens than _choose).
    kth = sorted_scores.gather(1, top_k.clamp(1, scores.shape[1]) - 1)
    drop = (top_k > 0) & (sorted_scores < kth)
    probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token; all at top_p 1).
    mass_before = probs.cumsum(dim=1) - probs
    drop |= (p["top_p"][:, None] < 1) & (mass_before >= p["top_p"][:, None])
    drop[:, 0] = False
    lowest_kept = sorted_scores.masked_fill(drop, float("inf")).amin(dim=1, keepdim=True)
    kept = scores.masked_fill(scores < lowest_kept, float("-inf"))
    pick = (kept + noise).argmax(dim=1, keepdim=True)
    return candidates.gather(1, pick).squeeze(1)


def guarded_tokens(hidden: torch.Tensor, weight: torch.Tensor, seen: torch.Tensor, seen_rows: torch.Tensor,
                   params: SamplingBatch) -> torch.Tensor:
    """``sample`` for a batch whose rows are all guarded, at shapes fixed by the batch alone.

    No host value decides a shape or a branch and nothing is read back, so the whole of it can be
    captured in a CUDA graph (``GuardedSampler``) and replayed as one launch instead of a couple of
    hundred. The head multiplies every row with all seven code blocks (28,672 rows of ``weight``)
    and gathers its own slot's block, where ``LmHead.guarded`` groups rows by slot; every row takes
    the sorted path, which picks what ``_choose`` picks (its unsorted test is a shortcut to the same
    token). ``hidden`` [B, H], ``weight`` the output matrix [V, H], ``seen`` [slots, V] bool.
    """
    slots = params.audio_position % TOKENS_PER_FRAME
    candidates = guard_candidates(slots)
    codes = hidden @ weight[AUDIO_TOKEN_BASE : AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE].T
    columns = slots[:, None] * CODEBOOK_SIZE + torch.arange(CODEBOOK_SIZE, device=hidden.device)
    scores = torch.cat((codes.gather(1, columns), (hidden @ weight[END_OF_SPEECH])[:, None]), dim=1).float()
    scores = _guarded_scores(scores, slots, seen, seen_rows, params.repetition_penalty)
    p = {name: getattr(params, name) for name in ("temperature", "top_p", "top_k", "seed", "step")}
    scores, noise, _ = _tempered(scores, candidates, p)
    return _choose_sorted(scores, candidates, noise, p)


class GuardedSampler:
    """``guarded_tokens`` for the engine's steps: inputs in fixed buffers, one CUDA graph per batch bucket.

    The settings arrive in the engine's two packed tensors: ``reals`` [3, B] (temperature, top_p,
    repetition_penalty) and ``whole`` [6, B] (top_k, seed, step, guard flag, audio position, the
    row's slot in ``seen``). Rows past the batch keep whatever valid settings they last had; their
    tokens are not read. Where graphs are off (a CPU) the same buffers run eagerly, and the tokens land
    in one output buffer as a replay's do (overwritten by the next call: a caller that keeps them past it
    must copy them, which a test without a GPU then sees too).
    """

    def __init__(self, weight: torch.Tensor, seen: torch.Tensor, buckets: list[int], use_graphs: bool):
        device = weight.device
        rows = max(buckets)
        self.weight, self.seen, self.buckets = weight, seen, sorted(buckets)
        # A memory pool of its own: the decoder's graphs, replayed in any order, never write into it.
        self.use_graphs, self.pool = use_graphs, torch.cuda.graph_pool_handle() if use_graphs else None
        self.hidden = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=device)
        self.reals = torch.ones(3, rows, device=device)
        self.whole = torch.zeros(6, rows, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)  # the eager path's output
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, hidden: torch.Tensor, reals: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]
        rows = next(b for b in self.buckets if b >= batch)
        self.hidden[:batch].copy_(hidden)
        self.reals[:, :batch].copy_(reals)
        self.whole[:, :batch].copy_(whole)
        if not self.use_graphs:
            return self.tokens[:rows].copy_(self._tokens(rows))[:batch]
        graph, tokens = self.graphs.get(rows) or self._capture(rows)
        graph.replay()
        return tokens[:batch]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket's graph now (a server's startup); returns how many were captured."""
        if not self.use_graphs:
            return 0
        missing = [rows for rows in self.buckets if rows not in self.graphs]
        for rows in missing:
            self._capture(rows)
        return len(missing)

    def _tokens(self, rows: int) -> torch.Tensor:
        whole = self.whole[:, :rows]
        params = SamplingBatch.from_packed(self.reals[:, :rows], whole)
        return guarded_tokens(self.hidden[:rows], self.weight, self.seen, whole[5], params)

    def _capture(self, rows: int):
        self.graphs[rows] = capture(lambda: self._tokens(rows), self.hidden.device, self.pool)
        return self.graphs[rows]
