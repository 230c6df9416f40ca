#!/usr/bin/env python3
"""Render the model repository for NVIDIA GPUs: the LLM stage served by Triton's TensorRT-LLM backend.

The repository is the one ``orpheus-triton serve`` renders (preprocessing ->
llm -> snac_decoder behind the ``orpheus`` ensemble) with the LLM stage in
two models: ``tensorrt_llm``, served by the TensorRT-LLM backend from the
engine build_trtllm.py built (build_engines/llm_tensorrtllm.pbtxt; its ``1/``
is left empty, the C++ backend needs no model file), and in front of it
``llm``, the relay (model_repository/llm_relay, orpheus_triton.llm_relay),
which the ensemble calls with the same tensors as the torch engine. The relay
turns TensorRT-LLM's token-by-token stream into one response per SNAC frame
ended by end_id, and maps the sampling seed onto the input recent
TensorRT-LLM backends call ``seed`` (see ``--seed-tensor``).

    python build_engines/render_gpu_repository.py --models /models --engine-dir /engines/orpheus-3b \\
        --out /tmp/orpheus-gpu-repository            # render only
    python build_engines/render_gpu_repository.py --models /models --engine-dir /engines/orpheus-3b --serve

``--serve`` then runs the image's ``tritonserver`` on the repository (ports as
``orpheus-triton serve``) as ``serve`` runs it: SIGTERM and SIGINT drain it (new streams refused, those in
flight get up to ``--exit-timeout`` to finish) and then stop it, and a backend stub that dies after loading
stops the server
with exit status 1 (tritonserver 2.51 neither restarts it nor stops reporting ready), so that the
container's restart policy starts a whole one again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from orpheus_triton.arguments import non_negative, positive
from orpheus_triton.constants import ENGINE_MODEL, LLM_SEED
from orpheus_triton.demo_models import ModelSet, cache_dir
from orpheus_triton.repository import RelaySettings, RepositorySettings, render_with_relay

TEMPLATE = Path(__file__).resolve().with_name("llm_tensorrtllm.pbtxt")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
SEED_TENSORS = ("seed", LLM_SEED)  # current TensorRT-LLM backends, older ones
DEFAULT_MAX_BATCH_SIZE = 256  # build_trtllm.py's default engine capacity
TRITON_BACKENDS = Path("/opt/tritonserver/backends")


def _log(message: str) -> None:
    print(f"[render-gpu-repository] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrtllmSettings:
    """What the TensorRT-LLM ``llm`` model needs beyond RepositorySettings."""

    engine_dir: str
    triton_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: Triton's queue is unbounded; the executor schedules from its own
    batch_scheduler_policy: str = "guaranteed_no_evict"  # a started stream is never paused
    kv_cache_free_gpu_mem_fraction: float = 0.7  # leaves room for the SNAC decoder on the same GPU
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool = False
    cancellation_check_period_ms: int = 100
    seed_tensor: str = "seed"
    relay_instances: int = 4  # processes of the `llm` relay: about 60 real-time streams each

    def check(self) -> None:
        if self.triton_max_batch_size < 1:
            raise ValueError("the llm's max batch size must be at least 1")
        if not 0 < self.kv_cache_free_gpu_mem_fraction <= 1:
            raise ValueError("kv_cache_free_gpu_mem_fraction must be in (0, 1]")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise ValueError(f"batch_scheduler_policy must be one of {', '.join(SCHEDULER_POLICIES)}")
        if self.relay_instances < 1:
            raise ValueError("relay_instances must be at least 1")
        if self.seed_tensor not in SEED_TENSORS:
            raise ValueError(f"seed_tensor must be one of {', '.join(SEED_TENSORS)}")
        if self.batch_scheduler_policy == "max_utilization" and not self.enable_chunked_context:
            # TensorRT-LLM's executor then refuses every streaming request whose prompt + max_tokens exceeds
            # the engine's max_input_len ("Request sequence length is potentially greater than max input length")
            raise ValueError("batch_scheduler_policy max_utilization needs chunked context: without it TensorRT-LLM "
                             "refuses every streaming request whose prompt + max_tokens exceeds the engine's "
                             "max_input_len; keep chunked context or use guaranteed_no_evict")


def _pbtxt_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def render_llm_config(trt: TrtllmSettings, template: Path = TEMPLATE) -> str:
    """The TensorRT-LLM backend's config.pbtxt for the ``tensorrt_llm`` model."""
    trt.check()
    values = {key: _pbtxt_value(value) for key, value in asdict(trt).items()}
    try:
        return string.Template(template.read_text()).substitute(values)
    except KeyError as missing:
        raise ValueError(f"{template} uses unknown setting {missing}") from None


def render_gpu_repository(settings: RepositorySettings, trt: TrtllmSettings, out: Path) -> Path:
    """Write the GPU repository to ``out`` (replaced if present) and return it."""
    trt.check()
    engine_config = render_llm_config(trt)
    relay = RelaySettings(engine_model=ENGINE_MODEL, engine_seed_input=trt.seed_tensor, engine_audio_guard=False,
                          relay_instances=trt.relay_instances)
    root = render_with_relay(settings, Path(out), relay)
    engine = root / ENGINE_MODEL
    shutil.rmtree(engine)
    (engine / "1").mkdir(parents=True)
    (engine / "config.pbtxt").write_text(engine_config)
    return root


def engine_build_setting(engine_dir: Path, name: str) -> int | None:
    """A positive whole-number setting (``max_batch_size``, ``max_seq_len``) the engine in ``engine_dir``
    was built with, if its config.json says."""
    try:
        config = json.loads((Path(engine_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("build_config", {}).get(name)
    return int(value) if isinstance(value, int) and value > 0 else None


def engine_world_size(engine_dir: Path) -> int:
    """How many GPUs (ranks) the engine in ``engine_dir`` runs on: its build's tensor-parallel size (1 where
    its config.json does not say)."""
    try:
        mapping = json.loads((Path(engine_dir) / "config.json").read_text())["pretrained_config"]["mapping"]
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    size = mapping.get("world_size") if isinstance(mapping, dict) else None
    return size if isinstance(size, int) and size > 1 else 1


ORCHESTRATOR_ENV = "TRTLLM_ORCHESTRATOR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="render_gpu_repository.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", required=True, help="model set directory with llm/ (tokenizer) and snac/")
    parser.add_argument("--engine-dir", required=True, help="TensorRT-LLM engine directory (build_trtllm.py)")
    parser.add_argument("--out", help="repository to write (default: the cache's repositories/tensorrtllm)")
    parser.add_argument("--device", default="cuda", help="device of the SNAC decoder (default: cuda)")
    parser.add_argument("--max-batch-size", type=positive, default=None,
                        help=f"the {ENGINE_MODEL} model's Triton max batch size (default: the engine's max_batch_size)")
    parser.add_argument("--kv-cache-free-gpu-mem-fraction", type=float,
                        default=TrtllmSettings.kv_cache_free_gpu_mem_fraction,
                        help="share of the GPU memory free after loading the engine that the KV cache may take")
    parser.add_argument("--batch-scheduler-policy", choices=SCHEDULER_POLICIES,
                        default=TrtllmSettings.batch_scheduler_policy)
    parser.add_argument("--no-chunked-context", action="store_true",
                        help="turn chunked prefill off (on by default: it needs an engine built with paged context "
                             "FMHA, as build_trtllm.py builds them)")
    parser.add_argument("--kv-cache-reuse", action="store_true", help="reuse KV blocks of shared prompt prefixes")
    parser.add_argument("--seed-tensor", choices=SEED_TENSORS, default=TrtllmSettings.seed_tensor,
                        help="the backend's seed input: 'seed' (current releases) or 'random_seed' (older ones)")
    parser.add_argument("--relay-instances", type=positive, default=TrtllmSettings.relay_instances,
                        help="processes of the llm relay in front of the engine (about 60 real-time streams each)")
    parser.add_argument("--max-callers", type=non_negative, default=RepositorySettings.max_callers, metavar="N",
                        help="callers in flight at most, each from its request to its last audio; more are "
                             "refused with 'server busy' (counted with --serve; 0: no bound beyond the engine's)")
    parser.add_argument("--decoder-max-batch-size", type=positive, default=RepositorySettings.decoder_max_batch_size)
    parser.add_argument("--preprocessing-instances", type=positive, default=RepositorySettings.preprocessing_instances)
    parser.add_argument("--voices", default=RepositorySettings.voices, metavar="NAMES",
                        help="the checkpoint's voices, comma-separated ('none': single-speaker; default: Orpheus 3B "
                             "English's)")
    parser.add_argument("--default-voice", default=RepositorySettings.default_voice, metavar="NAME",
                        help="the voice of requests that name none (default: the first of --voices)")
    parser.add_argument("--serve", action="store_true", help="then run tritonserver on the repository")
    parser.add_argument("--mps", action="store_true",
                        help="with --serve: the server under an NVIDIA MPS control daemon of its own, as "
                             "`orpheus-triton serve --mps`: the engine's and the SNAC decoder's kernels share the GPU "
                             "at once instead of taking turns (measured with the torch engine, not with TensorRT-LLM)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--exit-timeout", type=non_negative, default=30, metavar="SECONDS",
                        help="with --serve: on SIGTERM or Ctrl-C, how long the streams in flight may take to finish, "
                             "new ones refused meanwhile, before the server stops (default 30, tritonserver's own)")
    return parser


def _serve(repository: Path, args, world_size: int = 1) -> int:
    from orpheus_triton.interrupts import terminate_as_interrupt  # noqa: PLC0415
    from orpheus_triton.mps import MpsUnavailable, mps_if  # noqa: PLC0415
    from orpheus_triton.server import Ports, serve_until_stopped  # noqa: PLC0415

    if not shutil.which("tritonserver"):
        _log("error: tritonserver is not on PATH; the TensorRT-LLM backend ships in the Triton TensorRT-LLM "
             "image (nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3), see build_engines/README.md")
        return 2
    if TRITON_BACKENDS.is_dir() and not (TRITON_BACKENDS / "tensorrtllm").is_dir():
        _log(f"error: {TRITON_BACKENDS} has no tensorrtllm backend; use the -trtllm-python-py3 Triton image")
        return 2
    ports = Ports(args.grpc_port, args.http_port, args.metrics_port)
    orchestrator: dict[str, str | None] = {}
    if world_size > 1 and ORCHESTRATOR_ENV not in os.environ:
        # One tritonserver: without MPI's ranks the backend sees a world of 1 and refuses a tensor-parallel
        # engine; in orchestrator mode it spawns a worker per GPU itself (trtllmExecutorWorker).
        _log(f"the engine runs on {world_size} GPUs: the tensorrtllm backend spawns a worker per GPU "
             f"({ORCHESTRATOR_ENV}=1)")
        orchestrator[ORCHESTRATOR_ENV] = "1"
    _log(f"gRPC on :{ports.grpc}, HTTP on :{ports.http}, metrics on :{ports.metrics}")
    try:  # SIGTERM or SIGHUP outside run_in_foreground's watch (an MPS daemon's start or quit) as Ctrl-C
        with terminate_as_interrupt(), mps_if(args.mps, _log) as environment:
            return serve_until_stopped(repository, ports, args.exit_timeout, _log,
                                       environment={**environment, **orchestrator})
    except MpsUnavailable as error:
        _log(f"error: --mps: {error}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mps and not args.serve:
        _log("error: --mps is for the server: give --serve too")
        return 2
    models = ModelSet(Path(args.models).expanduser().resolve())
    engine_dir = Path(args.engine_dir).expanduser().resolve()
    try:
        models.check()
    except (FileNotFoundError, ValueError) as error:
        _log(f"error: {error}")
        return 2
    if not (engine_dir / "config.json").is_file():
        _log(f"warning: {engine_dir} holds no engine yet (config.json missing); build it with build_trtllm.py")
    max_batch_size = args.max_batch_size or engine_build_setting(engine_dir, "max_batch_size") or DEFAULT_MAX_BATCH_SIZE
    settings = RepositorySettings(
        llm_dir=str(models.llm), snac_dir=str(models.snac), device=args.device,
        # preprocessing fits a request's default max_tokens to the engine's length and refuses a prompt
        # longer than the engine takes (0: unknown, unchecked)
        max_seq_len=engine_build_setting(engine_dir, "max_seq_len") or 0,
        max_prompt_tokens=engine_build_setting(engine_dir, "max_input_len") or 0,
        decoder_max_batch_size=args.decoder_max_batch_size, preprocessing_instances=args.preprocessing_instances,
        voices=args.voices, default_voice=args.default_voice, max_callers=args.max_callers,
    )
    trt = TrtllmSettings(
        engine_dir=str(engine_dir), triton_max_batch_size=max_batch_size,
        kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
        batch_scheduler_policy=args.batch_scheduler_policy, enable_chunked_context=not args.no_chunked_context,
        enable_kv_cache_reuse=args.kv_cache_reuse, seed_tensor=args.seed_tensor,
        relay_instances=args.relay_instances,
    )
    out = Path(args.out).expanduser().resolve() if args.out else cache_dir() / "repositories" / "tensorrtllm"
    try:
        repository = render_gpu_repository(settings, trt, out)
    except ValueError as error:
        _log(f"error: {error}")
        return 2
    _log(f"model repository: {repository} ({ENGINE_MODEL}: TensorRT-LLM engine {engine_dir}, max batch "
         f"{max_batch_size}, behind the llm relay)")
    if args.serve:
        return _serve(repository, args, engine_world_size(engine_dir))
    print(repository)
    return 0


if __name__ == "__main__":
    sys.exit(main())
