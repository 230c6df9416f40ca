"""SNAC decoding of Orpheus windows, batched across streams, with per-window seeded noise.

The weights and architecture are upstream SNAC's (``config.json`` +
``pytorch_model.bin``, as published for ``hubertsiuzdak/snac_24khz``). For
serving:

* SNAC's noise blocks call ``torch.randn`` on the global generator, so a
  window's audio would depend on what else was decoded before it and on the
  batch it sits in. Each noise block is swapped for one that draws row ``b``'s
  noise from generator ``b``; seeded with ``Window.seed`` this gives exactly the
  noise upstream draws after ``torch.manual_seed(seed)`` for a batch of one.
  Those generators draw on the CPU, a row at a time (26 ms for a round of 256
  windows): on GPU the noise is counter-based instead (``counter_noise``), a
  pure function of (window seed, noise block, position) computed for the whole
  batch at once, just as batch-independent but not upstream's numbers
  (``WindowDecoder(noise=...)``).
* Weight-norm parametrisations are folded into plain weights once at load,
  instead of being recomputed on every call, and the TorchScript Snake
  activation is replaced by the same arithmetic in eager, in-place ops; outside
  the exact decoder its per-channel scales are folded into the convolutions
  beside it as well (``snake.fold_snake_scales``).
* Only the kept samples are computed (``snac_span``, time-major, with the
  transposed convolutions as polyphase matrix products): a window costs
  under half a whole-window decode alone, and about a quarter in a batch of 8.

Exactness is a choice (``load_window_decoder(exact=...)``). By default the
dense convolutions run batched on shortened inputs; their GEMMs round
differently for other shapes, so about 0.4% of int16 samples differ from
upstream's by one step (-90 dBFS), and by as much between a stream decoded
alone and in a batch. ``exact=True`` decodes whole windows and runs dense
(groups=1) convolutions one row at a time: every window is then sample for
sample what upstream computes for it, alone or batched, at 2.5x the CPU time
alone and 5x in a batch.
Depthwise convolutions and the elementwise layers are batch-invariant as they are.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from snac import SNAC
from snac.layers import NoiseBlock, Snake1d
from torch import nn
from torch.nn.utils import parametrize

from . import counter_noise
from .constants import (
    CODEBOOK_SIZE,
    CODES_PER_FRAME,
    FRAMES_PER_WINDOW,
    MAX_ROUND_WINDOWS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    TOKENS_PER_FRAME,
    WINDOW_KEEP_END,
    WINDOW_KEEP_START,
    WINDOW_TOKENS,
)
from .cuda_graphs import GraphRefused, capture_checked, padded_sizes
from .frames import Window, split_codebooks
from .llama import read_json_object
from .snac_span import Span, SpanDecoder
from .snake import Snake, fold_snake_scales

DECODE_SPAN = "span"  # compute only the kept samples' receptive field (default)
DECODE_FULL = "full"  # decode whole windows, exactly as upstream
DECODE_MODES = (DECODE_SPAN, DECODE_FULL)
NOISE_GENERATORS = "generators"  # a CPU generator per window: upstream's numbers (default on CPU)
NOISE_COUNTER = "counter"  # counter-based, on the model's device, the whole batch at once (default on GPU)
NOISE_SOURCES = (NOISE_GENERATORS, NOISE_COUNTER)

log = logging.getLogger(__name__)

PADDING_WINDOW = Window(tuple([0] * WINDOW_TOKENS), 0)  # padding rows and warm-up calls

SNAC_CONFIG = "config.json"
SNAC_WEIGHTS = "pytorch_model.bin"


class SeededNoise(nn.Module):
    """Drop-in for SNAC's ``NoiseBlock`` that takes its noise from per-row generators."""

    def __init__(self, block: NoiseBlock):
        super().__init__()
        self.linear = block.linear  # same attribute name: upstream state dicts still load
        self.generators: Sequence[torch.Generator] | None = None
        self.seeds: torch.Tensor | None = None  # counter-based noise: one seed per row, on the model's device
        self.counter = 0  # which noise block this is, so blocks draw different noise from one seed

    def draw_noise(self, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """Noise [batch, 1, length] for a signal of ``length`` positions: from one generator per row,
        or counter-based from one seed per row."""
        if self.seeds is not None:
            if self.seeds.numel() != batch:
                raise ValueError(f"{self.seeds.numel()} seeds for a batch of {batch}")
            return counter_noise.gaussian(self.seeds, self.counter, length).to(like.dtype)
        if self.generators is None:
            return torch.randn((batch, 1, length), device=like.device, dtype=like.dtype)
        if len(self.generators) != batch:
            raise ValueError(f"{len(self.generators)} generators for a batch of {batch}")
        # Drawn where the generators live (CPU) and moved in one copy, not one per row.
        return torch.cat([
            torch.randn((1, 1, length), generator=g, device=g.device, dtype=like.dtype) for g in self.generators
        ]).to(like.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        return x + self.draw_noise(batch, length, x) * self.linear(x)


class RowwiseConv1d(nn.Module):
    """A dense (transposed) Conv1d applied to each batch row separately (batch-invariant rounding)."""

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.conv(x)
        return torch.cat([self.conv(x[i : i + 1]) for i in range(x.shape[0])])


def check_snac_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"SNAC model directory {path} does not exist or is not a folder")
    missing = [name for name in (SNAC_CONFIG, SNAC_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SNAC model directory {path} lacks {', '.join(missing)}; expected upstream SNAC's "
            f"{SNAC_CONFIG} and {SNAC_WEIGHTS} (e.g. a local copy of hubertsiuzdak/snac_24khz)"
        )


def check_snac_config(config: dict, where: Path) -> None:
    """Refuse a SNAC that cannot decode Orpheus's codes (another sample rate, codebook layout or frame
    length: the 32 and 44 kHz models): it would load, then fail in its first decode or play wrong."""
    latent_per_frame = max(CODES_PER_FRAME)
    wanted = {
        "sampling_rate": SAMPLE_RATE,
        "codebook_size": CODEBOOK_SIZE,
        "vq_strides": [latent_per_frame // codes for codes in CODES_PER_FRAME],
        "hop length (product of decoder_rates)": SAMPLES_PER_FRAME // latent_per_frame,
    }
    defaults = {name: parameter.default for name, parameter in inspect.signature(SNAC).parameters.items()}
    config = {**defaults, **config}  # what SNAC builds from a config that leaves a key out
    found = {**config, "hop length (product of decoder_rates)": math.prod(config.get("decoder_rates") or [0])}
    wrong = [f"{name} {found.get(name)!r} (Orpheus needs {value!r})" for name, value in wanted.items()
             if found.get(name) != value]
    window = config.get("attn_window_size")
    if window is not None and (FRAMES_PER_WINDOW * latent_per_frame) % window:
        wrong.append(f"attn_window_size {window!r} (it must divide a window's {FRAMES_PER_WINDOW * latent_per_frame} "
                     "latent positions)")
    if wrong:
        raise ValueError(f"{where} is not a SNAC for Orpheus's codes: {'; '.join(wrong)} "
                         "(Orpheus decodes with hubertsiuzdak/snac_24khz)")


def read_snac_config(path: Path) -> dict:
    """SNAC folder ``path``'s config.json, checked to decode Orpheus's codes (``check_snac_config``).
    Raises ValueError naming the file."""
    config_path = path / SNAC_CONFIG
    config = read_json_object(config_path)
    check_snac_config(config, config_path)
    return config


def check_snac_weights(weights_path: Path) -> None:
    """Refuse, from its first bytes and (for torch.save's zip) its directory at the end, a file that is not
    the PyTorch checkpoint SNAC publishes, or is cut short. torch.load's own messages name no file, and
    for a file in another format advise weights_only=False: unsafe, and no help."""
    with weights_path.open("rb") as weights:
        start = weights.read(64)
    if start.startswith(b"version https://git-lfs"):
        raise ValueError(f"{weights_path} is a Git LFS pointer, not the weights: fetch them (git lfs pull)")
    if start.startswith(b"PK\x03\x04"):  # torch.save's zip archive: its directory, at the end, is read alone
        try:
            with zipfile.ZipFile(weights_path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{weights_path} could not be read as SNAC weights: the zip archive torch.save writes "
                             f"is cut short or damaged ({error}); fetch it again") from None
        if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            raise ValueError(f"{weights_path} is a zip archive, but not a PyTorch checkpoint (no data.pkl in it); "
                             f"fetch {SNAC_WEIGHTS} from hubertsiuzdak/snac_24khz again")
        return
    if start.startswith(b"\x80"):  # a legacy (pre-zip) torch.save pickle: torch.load reads it
        return
    length = int.from_bytes(start[:8], "little") if len(start) > 8 else 0
    if start[8:9] == b"{" and 0 < length <= weights_path.stat().st_size:  # safetensors: header length, then JSON
        raise ValueError(f"{weights_path} is not a PyTorch checkpoint: it looks like a safetensors file saved under "
                         f"that name; the SNAC decoder reads torch.save's format: put hubertsiuzdak/snac_24khz's "
                         f"{SNAC_WEIGHTS} there")
    what = f"it starts with {start[:16]!r}" if start else "it is empty"
    raise ValueError(f"{weights_path} is not a PyTorch checkpoint (torch.save's zip archive or pickle): {what}; fetch "
                     f"{SNAC_WEIGHTS} from hubertsiuzdak/snac_24khz again")


def check_snac(path: Path) -> dict:
    """Refuse a SNAC folder the decoder would refuse at load, from its config and the weights' first bytes
    (cheap: the weights are not read), so that ``serve`` says so before tritonserver starts. Returns the
    config. Raises FileNotFoundError or ValueError naming the file and the problem."""
    check_snac_dir(path)
    config = read_snac_config(path)
    check_snac_weights(path / SNAC_WEIGHTS)
    return config


def load_snac(path: str | Path, device: str | torch.device = "cpu", batch_invariant: bool = False) -> SNAC:
    """Load upstream-format SNAC from a local directory, ready for seeded, batched decoding.

    ``batch_invariant`` runs dense convolutions row by row, see the module docstring.
    Raises FileNotFoundError or ValueError naming the file for a directory that does not hold one.
    """
    path = Path(path)
    config = check_snac(path)
    config_path, weights_path = path / SNAC_CONFIG, path / SNAC_WEIGHTS
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (a truncated or foreign file: torch raises several kinds)
        raise ValueError(f"{weights_path} could not be read as SNAC weights: {str(error).splitlines()[0]}") from None
    try:
        model = SNAC(**config)
    except TypeError as error:  # a key SNAC does not take
        raise ValueError(f"{config_path} is not a SNAC config: {error}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # torch's first lines name the tensors
        detail = " ".join(line.strip() for line in str(error).splitlines()[:2])
        raise ValueError(f"{weights_path} does not match {config_path}: {detail}") from None
    # The encoder is never used for synthesis.
    model.encoder = nn.Identity()
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    _swap_modules(model, batch_invariant)
    if not batch_invariant:
        fold_snake_scales(model.decoder)
    return model.to(device).eval()


def _swap_modules(module: nn.Module, batch_invariant: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, Snake1d):
            setattr(module, name, Snake(child))
        elif isinstance(child, NoiseBlock):
            setattr(module, name, SeededNoise(child))
            _swap_modules(getattr(module, name), batch_invariant)
        elif batch_invariant and type(child) in (nn.Conv1d, nn.ConvTranspose1d) and child.groups == 1:
            setattr(module, name, RowwiseConv1d(cast("nn.Conv1d | nn.ConvTranspose1d", child)))
        else:
            _swap_modules(child, batch_invariant)


def load_window_decoder(path: str | Path, device: str | torch.device = "cpu", exact: bool = False,
                        max_windows: int = MAX_ROUND_WINDOWS) -> WindowDecoder:
    """The serving decoder: fast by default, or sample-identical to upstream (see the module docstring).

    On a GPU its calls are padded to a few sizes (``round_sizes`` up to ``max_windows``), which
    ``warm_up`` decodes once each; on a CPU every call decodes exactly its windows.
    """
    model = load_snac(path, device, batch_invariant=exact)
    on_gpu = next(model.parameters()).device.type == "cuda"
    return WindowDecoder(model, DECODE_FULL if exact else DECODE_SPAN,
                         sizes=round_sizes(max_windows) if on_gpu else (), graphs=on_gpu)


def round_sizes(max_windows: int) -> tuple[int, ...]:
    """The batch sizes a GPU decoder pads its calls to (``cuda_graphs.padded_sizes``, as the LLM's decode
    step: powers of two below 32, then multiples of 32 up to ``max_windows``).

    On the GPU the first SNAC call of each new batch size stalled the whole decoder
    for seconds (about 3 s on an H100: the served sweep of perf/results/2026-11-26_h100,
    where every round of a size not seen before held up every stream). A few sizes, each
    captured at load, leave no new size for a listener to wait on. Multiples of 32 rather than
    powers of two above it: a call's time grows about linearly with its rows there (on an H100,
    eagerly: 128 rows 24 ms, 256 rows 42 ms), and its GPU time is taken from the LLM on the same GPU;
    a round of 91 windows (216 streams served, perf/results/2026-11-27_h100) decodes 96 rows, not 128.
    """
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    return padded_sizes(max_windows)


class WindowDecoder:
    """Decodes any number of windows, from any streams, in one SNAC call.

    With ``sizes``, a call of n windows decodes the smallest size >= n rows, the rest
    padding windows whose audio is dropped (the noise is per row, so padding
    changes no real row's samples); calls beyond the largest size decode as they are.
    With ``graphs`` as well (a GPU, counter-based noise), each size's call is a CUDA
    graph (``CallGraphs``), checked against the eager call when captured.

    One thread at a time: a call sets its windows' noise seeds on the model's noise blocks (the
    server's decoder calls it from its one worker thread).
    """

    def __init__(self, model: SNAC, mode: str = DECODE_SPAN, noise: str | None = None, sizes: Sequence[int] = (),
                 graphs: bool = False):
        if mode not in DECODE_MODES:
            raise ValueError(f"unknown SNAC decode mode {mode!r} (choose from {', '.join(DECODE_MODES)})")
        self.model = model
        self.mode = mode
        self.device = next(model.parameters()).device
        self.noise = noise or (NOISE_COUNTER if self.device.type == "cuda" else NOISE_GENERATORS)
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"unknown SNAC noise source {self.noise!r} (choose from {', '.join(NOISE_SOURCES)})")
        self.noise_blocks = [m for m in model.modules() if isinstance(m, SeededNoise)]
        for counter, block in enumerate(self.noise_blocks):
            block.counter = counter
        self._span_decoders: dict[int, SpanDecoder] = {}
        if any(size < 1 for size in sizes):
            raise ValueError(f"decoder call sizes must be >= 1, got {tuple(sizes)}")
        self.sizes = tuple(sorted(set(sizes)))
        usable = self.device.type == "cuda" and self.sizes and self.noise == NOISE_COUNTER
        self.graphs = CallGraphs(self) if graphs and usable else None

    def rows_for(self, windows: int) -> int:
        """Rows a call of ``windows`` windows decodes (padded up to the next of ``sizes``)."""
        return next((size for size in self.sizes if size >= windows), windows)

    def _decode_kept(self, latent: torch.Tensor) -> torch.Tensor:
        """Kept samples [B, 1, 2048] of each window's latent [B, C, T]."""
        if self.mode == DECODE_SPAN:
            length = latent.shape[-1]
            if length not in self._span_decoders:
                self._span_decoders[length] = SpanDecoder(self.model.decoder, length,
                                                          Span(WINDOW_KEEP_START, WINDOW_KEEP_END))
            span = self._span_decoders[length]
            if span.supports:
                return span(latent)
        return self.model.decoder(latent)[..., WINDOW_KEEP_START:WINDOW_KEEP_END]

    @torch.inference_mode()
    def decode(self, windows: Sequence[Window]) -> list[np.ndarray]:
        """Return each window's kept samples (2048, int16), in order."""
        if not windows:
            return []
        real = len(windows)
        windows = [*windows, *[PADDING_WINDOW] * (self.rows_for(real) - real)]
        codes = [torch.from_numpy(book) for book in split_codebooks([w.codes for w in windows])]
        seeds = torch.tensor([w.seed for w in windows], dtype=torch.int64)
        if self.graphs is not None and len(windows) in self.sizes:
            audio = self.graphs(codes, seeds)
        else:
            audio = self.kept_samples(codes, seeds)
        return list(to_int16(audio[:real].float().cpu().numpy()))

    def kept_samples(self, codes: list[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        """Kept samples [B, 2048] of windows given as their three codebooks' codes [B, n] and seeds [B]."""
        codes = [book.to(self.device) for book in codes]
        row_seeds: torch.Tensor | None  # the blocks' seeds: None where each row has a generator
        if self.noise == NOISE_COUNTER:
            row_seeds, generators = seeds.to(self.device), None
        else:
            row_seeds, generators = None, [torch.Generator().manual_seed(seed) for seed in seeds.tolist()]
        for block in self.noise_blocks:
            block.seeds, block.generators = row_seeds, generators
        try:
            return self._decode_kept(self.model.quantizer.from_codes(codes))[:, 0]
        finally:
            for block in self.noise_blocks:
                block.seeds = block.generators = None


class CallGraphs:
    """A GPU decoder's calls as CUDA graphs, one per call size: about 650 kernel launches a call (16 ms
    of host time on an H100 whatever the batch: perf/results/2026-11-26_h100) become one.

    Codes and seeds are copied into fixed buffers, the size's graph replays, and its output
    buffer holds the kept samples until the next replay. Each graph is checked against the same
    call run eagerly when it is captured; should one disagree by more than an int16 step, or fail
    to capture, the decoder goes on without graphs (logged).
    """

    def __init__(self, decoder: WindowDecoder):
        self.decoder = decoder
        rows, device = max(decoder.sizes), decoder.device
        frames = WINDOW_TOKENS // TOKENS_PER_FRAME
        self.codes = [torch.zeros(rows, frames * n, dtype=torch.int64, device=device) for n in CODES_PER_FRAME]
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, codes: list[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        rows = len(seeds)
        for buffer, book in zip(self.codes, codes, strict=True):
            buffer[:rows].copy_(book)
        self.seeds[:rows].copy_(seeds)
        if rows not in self.graphs:
            return self._capture_checked(rows)
        graph, audio = self.graphs[rows]
        graph.replay()
        return audio

    def _run(self, rows: int) -> torch.Tensor:
        return self.decoder.kept_samples([buffer[:rows] for buffer in self.codes], self.seeds[:rows])

    def _capture_checked(self, rows: int) -> torch.Tensor:
        try:  # the samples within an int16 step of the eager call's
            graph, audio = capture_checked(lambda: self._run(rows), self.decoder.device, self.pool,
                                           tolerance=lambda eager: 1 / 32767)
        except GraphRefused as refused:
            log.warning("SNAC decoder, %d windows: %s; decoding without graphs", rows, refused)
            self.decoder.graphs = None
            return refused.eager
        self.graphs[rows] = (graph, audio)
        return audio


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 the way the reference decoder does (scale, truncate)."""
    return (audio * 32767).astype(np.int16)


def warm_up(decoder: WindowDecoder) -> None:
    """Throwaway decodes, one of each call size, so no listener pays for lazy initialisation (on a GPU
    this also captures each size's CUDA graph). Logs what the decoder runs as and how long this took."""
    started = time.perf_counter()
    for rows in decoder.sizes or (1,):
        decoder.decode([PADDING_WINDOW] * rows)
    graphs = f"{len(decoder.graphs.graphs)} CUDA graphs" if decoder.graphs is not None else "no CUDA graphs"
    log.info("SNAC decoder on %s: %s decode, %s noise, call sizes %s, %s; warmed up in %.1f s", decoder.device,
             decoder.mode, decoder.noise, list(decoder.sizes) or "as called", graphs, time.perf_counter() - started)
