"""Rendering the model repository: config.pbtxt templates + settings -> a directory Triton loads.

``model_repository/`` holds one folder per model, ``config.pbtxt`` beside
``1/model.py`` as Triton expects, with ``${name}`` placeholders for what
changes between deployments (weight directories, engine capacity, device).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

from .constants import (
    CANCEL_CHECK_SECONDS,
    DECODER_MODEL,
    ENGINE_MODEL,
    ENSEMBLE_MODEL,
    LLM_MODEL,
    LLM_SEED,
    MAX_ROUND_WINDOWS,
    NEWCOMER_ROUND_HORIZON,
    PREPROCESSING_MODEL,
    STREAM_STATE_SECONDS,
    TOKENS_PER_FRAME,
    VOICES,
)
from .decode_rounds import MAX_REQUEST_FRAMES
from .prompt import Voices

MODELS = (ENSEMBLE_MODEL, PREPROCESSING_MODEL, LLM_MODEL, DECODER_MODEL)
RELAY_TEMPLATE = "llm_relay"  # rendered as `llm` in front of an engine model (render_with_relay)


def template_dir() -> Path:
    """The model_repository/ folder of this checkout or installation."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "model_repository", here.parent / "model_repository"):
        if (candidate / ENSEMBLE_MODEL / "config.pbtxt").is_file():
            return candidate
    raise FileNotFoundError("model_repository/ templates not found next to the orpheus_triton package")


@dataclass(frozen=True)
class RepositorySettings:
    llm_dir: str
    snac_dir: str
    device: str = "auto"  # auto = cuda if available, else cpu
    max_streams: int = 0  # 0: by device (engine.MAX_STREAMS_BY_DEVICE: 16 on a CPU, 64 on a GPU)
    max_seq_len: int = 2048
    # The longest prompt the LLM takes (TensorRT-LLM: the engine's max_input_len), checked in preprocessing so
    # that a longer one hears why instead of the engine's internal error; 0: max_seq_len alone bounds it.
    max_prompt_tokens: int = 0
    max_queue: int = 256
    max_queue_seconds: float = 0.0  # a request waiting this long for a stream slot is refused; 0: no limit
    # Callers in flight at most, from preprocessing taking the request to its last audio (callers.py); more are
    # refused. 0: no bound beyond max_streams and max_queue, which count streams generating.
    max_callers: int = 0
    prefill_chunk: int = 0  # prompt tokens prefilled per step at most; 0: by device (engine.PREFILL_TOKENS_PER_STEP)
    tokens_per_response: int = TOKENS_PER_FRAME  # one SNAC frame per LLM response (1 = token by token)
    llm_max_batch_size: int = 64
    preprocessing_instances: int = 2
    # The voices the checkpoint was fine-tuned with, comma-separated ("none": a single-speaker model,
    # prompted with the text alone), and the one for requests that name none ("": the first).
    voices: str = ",".join(VOICES)
    default_voice: str = ""
    # Requests per decoder call from Triton, and windows per SNAC call (decode_rounds.DecodeScheduler). A round
    # takes one window per stream: 216 streams fit one round of 256 instead of four rounds of 64 per
    # 85 ms frame, and a GPU's time per call grows far slower than its windows (an H200 decoded a round of
    # 256 windows in 35 ms: perf/results/2026-11-26_h200).
    decoder_max_batch_size: int = MAX_ROUND_WINDOWS
    decoder_queue_delay_us: int = 2000
    # Intra-op threads of the LLM and decoder processes: "auto" = on CPU half the cores each, so the two
    # don't oversubscribe them (triton_llm.set_cpu_threads); on GPU torch's default. Or a number.
    llm_cpu_threads: str = "auto"
    decoder_cpu_threads: str = "auto"
    # The llm and snac_decoder adapters' response threads (triton_calls.response_threads): auto = on a GPU one
    # for the llm, DECODER_GPU_RESPONSE_THREADS for the decoder, none on a CPU; true, false, or a number of
    # threads (each stream's responses on one of them).
    llm_response_thread: str = "auto"
    decoder_response_thread: str = "auto"
    # With it, how often Triton is asked about every stream's cancellation (triton_calls.CancellationWatch).
    llm_cancel_check_seconds: float = CANCEL_CHECK_SECONDS
    # Guarded rows sample from one CUDA graph per batch bucket (InflightEngine graph_sampling;
    # on the GPU path only).
    llm_graph_sampling: bool = True
    # Read each step's tokens back after the next step is queued (InflightEngine overlap): auto (on a GPU),
    # true or false.
    llm_overlap: bool | str = "auto"
    decoder_exact: bool = False  # whole windows, row by row: sample-identical to upstream (snac_codec)
    # Streams start with the lead-in frame: first audio after 21 tokens, not 28 (frames.StreamFramer).
    decoder_lead_in: bool = True
    # Streams end with their last two frames, which upstream never plays (frames.StreamFramer.finish).
    decoder_lead_out: bool = True
    # How long the decoder keeps a stream's state without tokens. The torch llm ends every stream with
    # end_id, where the state goes at once; this is for clients that vanish mid-stream.
    decoder_stream_idle_seconds: float = STREAM_STATE_SECONDS
    # While a newcomer waits for first audio, streams with more audio than this in hand sit the decoder's
    # round out (decode_rounds.DecodeScheduler; 0: off).
    decoder_newcomer_horizon: float = NEWCOMER_ROUND_HORIZON


@dataclass(frozen=True)
class RelaySettings:
    """The relay in front of a token-by-token engine model (model_repository/llm_relay)."""

    engine_model: str = ENGINE_MODEL
    engine_seed_input: str = LLM_SEED  # TensorRT-LLM: "seed" in current backends
    engine_audio_guard: bool = True  # whether the engine takes audio_token_guard (TensorRT-LLM: no)
    # Processes of the relay. Each forwarded token costs one 165-200 us of CPU (2-core VM), nearly all of
    # it in the Python backend's BLS response handling (perf/relay_bench.py): one process carries about
    # 60 real-time streams. Stream ids are guarded per process.
    relay_instances: int = 1


def parse_cpu_threads(value: str) -> int | None:
    """A ``*_cpu_threads`` setting: None for 'auto' (or empty), else a whole number >= 1."""
    value = str(value or "auto").strip()
    if value == "auto":
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"cpu_threads must be 'auto' or a whole number >= 1, got {value!r}")
    return threads


# Left in every rendered repository: a folder holding it may be replaced by the next render.
RENDERED_MARK = ".orpheus-triton-repository"


def render(settings: RepositorySettings, out: Path, templates: Path | None = None) -> Path:
    """Write a loadable repository to ``out`` and return it. An existing ``out`` is replaced only if it
    is empty or a model repository (rendered before, or every entry a model folder with its config):
    a mistyped path must not delete a model set or a home folder."""
    templates = templates or template_dir()
    Voices.parse(settings.voices, settings.default_voice)  # a bad list is refused here, not in a stub's log
    if not 1 <= settings.tokens_per_response <= MAX_REQUEST_FRAMES * TOKENS_PER_FRAME:
        raise ValueError(f"tokens_per_response {settings.tokens_per_response} must be from 1 to "
                         f"{MAX_REQUEST_FRAMES * TOKENS_PER_FRAME}: the decoder refuses larger requests")
    values = _values(settings)
    out = Path(out)
    if out.exists() or out.is_symlink():
        _check_replaceable(out)
        shutil.rmtree(out)
    for model in MODELS:
        _render_model(templates / model, out / model, values)
    (out / RENDERED_MARK).write_text("rendered by orpheus_triton.repository; replaced by the next render\n")
    return out


# The locks of the folders ``run_folder`` made: held (open) for as long as this process lives.
_HELD_LOCKS: dict[Path, IO[bytes]] = {}


def run_folder(root: Path, prefix: str = "repository-") -> Path:
    """A new folder in ``root`` for this process's rendered repository, locked while the process lives.

    The launcher removes its folder as it stops, but one killed outright (SIGKILL, the out-of-memory
    killer) never does, and a cache kept across containers filled with them. So each folder has a lock
    file beside it (``<folder>.lock``, an flock the kernel releases when its holder dies), and the
    folders whose lock nobody holds are removed first. A lock file takes its name only once locked (made
    under a ``.pending-`` name, renamed): another launcher's sweep never finds it unlocked. Where the
    file system has no flock, the folder is made without one (and left, if its launcher is killed).
    """
    _sweep(root, f"{prefix}*.lock", older_than=0.0)
    _sweep(root, f".pending-{prefix}*.lock", older_than=60.0)  # a launcher killed between its two steps
    if (locked := _locked_pending_file(root, prefix)) is None:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    pending, lock = locked
    lock_path = root / pending.name.removeprefix(".pending-")
    os.rename(pending, lock_path)
    _HELD_LOCKS[lock_path] = lock
    folder = lock_path.with_suffix("")
    folder.mkdir(mode=0o755)
    return folder


def _locked_pending_file(root: Path, prefix: str, tries: int = 3):
    """A new ``.pending-`` lock file in ``root`` and its open file, flock held; None where the file system
    has no flock, or another launcher's sweep took each one made as stale (a clock far off)."""
    for _ in range(tries):
        handle, name = tempfile.mkstemp(prefix=f".pending-{prefix}", suffix=".lock", dir=root)
        lock = os.fdopen(handle, "rb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Path(name), lock
        except BlockingIOError:  # taken by a sweep, which removes it: a new one
            lock.close()
        except OSError:  # no flock here (some network file systems)
            lock.close()
            Path(name).unlink(missing_ok=True)
            return None
    return None


def _sweep(root: Path, pattern: str, older_than: float) -> None:
    """Remove the lock files matching ``pattern`` that no live process holds, with their folders."""
    for lock_path in root.glob(pattern):
        try:
            if older_than and time.time() - lock_path.stat().st_mtime < older_than:
                continue
            with open(lock_path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its process is gone
                shutil.rmtree(lock_path.with_suffix(""), ignore_errors=True)
                lock_path.unlink(missing_ok=True)
        except OSError:  # held by a live process (BlockingIOError), gone meanwhile, or no flock here
            continue


def release_run_folder(folder: Path) -> None:
    """Remove ``folder`` (``run_folder``'s) and its lock file, at this process's orderly end."""
    shutil.rmtree(folder, ignore_errors=True)
    lock_path = folder.with_suffix(".lock")
    lock_path.unlink(missing_ok=True)
    if (lock := _HELD_LOCKS.pop(lock_path, None)) is not None:
        lock.close()


def _check_replaceable(out: Path) -> None:
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: not replaced by a model repository")
    entries = list(out.iterdir())
    if (out / RENDERED_MARK).is_file() or all((entry / "config.pbtxt").is_file() for entry in entries):
        return
    others = sorted(entry.name for entry in entries if not (entry / "config.pbtxt").is_file())
    raise ValueError(f"{out} holds files that are not a model repository's ({', '.join(others[:3])}"
                     f"{', ...' if len(others) > 3 else ''}): not replaced; delete it or choose another folder")


def render_with_relay(settings: RepositorySettings, out: Path, relay: RelaySettings,
                      templates: Path | None = None) -> Path:
    """Write the repository with the `llm` stage in two models: the relay (orpheus_triton.llm_relay)
    as `llm`, in front of the engine model ``relay.engine_model``.

    With TensorRT-LLM the engine model's config replaces the one rendered here
    (build_engines/render_gpu_repository.py). Left as it is, the engine model is the
    torch engine streaming token by token, as TensorRT-LLM does: how the relay is
    tested on any machine.
    """
    templates = templates or template_dir()
    root = render(replace(settings, tokens_per_response=1), out, templates)
    engine = root / relay.engine_model
    (root / LLM_MODEL).rename(engine)
    config = engine / "config.pbtxt"
    name = f'name: "{LLM_MODEL}"'
    if config.read_text().count(name) != 1:
        raise ValueError(f"{config}: expected {name!r} once")
    config.write_text(config.read_text().replace(name, f'name: "{relay.engine_model}"'))
    render_relay(settings, relay, root, templates)
    return root


def render_relay(settings: RepositorySettings, relay: RelaySettings, root: Path, templates: Path | None = None) -> Path:
    """Write the relay (model_repository/llm_relay) into repository ``root`` as `llm`; returns its folder."""
    target = Path(root) / LLM_MODEL
    _render_model((templates or template_dir()) / RELAY_TEMPLATE, target, _values(settings) | _values(relay))
    return target


def _values(settings) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(settings).items()}


def _render_model(source: Path, target: Path, values: dict[str, str]) -> None:
    # .gitkeep: what keeps the ensemble's empty version folder in git (a wheel drops it; rendered below)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".gitkeep"))
    try:
        rendered = string.Template((source / "config.pbtxt").read_text()).substitute(values)
    except KeyError as missing:
        raise ValueError(f"{source / 'config.pbtxt'} uses unknown setting {missing}") from None
    (target / "config.pbtxt").write_text(rendered)
    (target / "1").mkdir(exist_ok=True)  # Triton wants a version folder, even an ensemble's
