#!/usr/bin/env python3
"""Build the TensorRT-LLM engine that serves Orpheus's `llm` stage on NVIDIA GPUs.

Run it inside the Triton TensorRT-LLM image (nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3),
which holds tensorrt_llm and trtllm-build:

    python3 build_engines/build_trtllm.py --llm-dir /models/llm --output-dir /engines/orpheus-3b

1. checks the Hugging Face checkpoint (the llm/ folder of a model set, see `orpheus-triton download`);
2. converts it to a TensorRT-LLM checkpoint (tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face),
   or with --quantization fp8 quantizes it to one: FP8 weights, activations and KV cache, calibrated on
   Orpheus prompts and the speech the model writes for them (orpheus_triton.calibration);
3. compiles it with trtllm-build for in-flight batching: paged KV cache, packed (padding-free) inputs,
   the GPT attention plugin with fused context attention, chunked prefill;
4. writes orpheus_engine.json beside the engine: how it was built, with which TensorRT-LLM, on which GPU.
   With --skip-if-built a later run that would build the same engine does nothing.

An engine only runs on the GPU model and TensorRT-LLM version it was built with.
`--dry-run` checks the checkpoint and prints the steps without needing TensorRT-LLM.
"""

from __future__ import annotations

import argparse
import collections.abc
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orpheus_triton.constants import MIN_VOCAB_SIZE, VOCAB_SIZE
from orpheus_triton.prompt import ENGLISH_VOICES, Voices

METADATA = "orpheus_engine.json"
VOLUME_ROOT_ENTRY = "lost+found"  # a mounted volume's, in its root: the build leaves it where it is
DTYPES = ("bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8")
# FP8 matrix products need Ada (8.9) or later.
FP8_CAPABILITY = (8, 9)
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3"


class BuildError(RuntimeError):
    """The engine cannot be built; the message says why and what to do.

    ``exit_code`` 2: the input or the environment is wrong (nothing was built); 1: a build step failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _log(message: str) -> None:
    print(f"[build-engines] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides what engine comes out (and so what --skip-if-built compares)."""

    dtype: str = "bfloat16"
    tp_size: int = 1
    max_batch_size: int = 256  # concurrent streams the engine can schedule
    max_input_len: int = 2048  # prompt tokens: a 2,000-character text plus voice and control tokens
    max_seq_len: int = 4096  # prompt + generated audio tokens (~82 tokens per second of audio)
    max_num_tokens: int = 8192  # tokens per engine step across the batch (prefill chunks + one per stream)
    max_beam_width: int = 1
    quantization: str = "none"  # or "fp8": weights, activations and KV cache
    calibration_sequences: int = 256  # fp8: Orpheus prompts with the model's own speech ...
    calibration_length: int = 1024  # ... of this many tokens each (about 12 s of speech)
    voices: str = ",".join(ENGLISH_VOICES.names)  # fp8: the speakers the calibration prompts name
    extra_build_args: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise BuildError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise BuildError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
        for name in ("tp_size", "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
                     "calibration_sequences"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calibration_length < 64:
            raise BuildError(f"--calibration-length must be at least 64 tokens, got {self.calibration_length}")
        try:
            self.speakers()
        except ValueError as error:
            raise BuildError(f"--voices: {error}") from None
        if self.max_input_len >= self.max_seq_len:
            raise BuildError(
                f"--max-input-len ({self.max_input_len}) must be below --max-seq-len ({self.max_seq_len}): "
                "the rest of the sequence is the audio the model generates"
            )

    def speakers(self) -> Voices:
        return Voices.parse(self.voices)


def trtllm_build_argv(options: BuildOptions, checkpoint_dir: Path, output_dir: Path) -> list[str]:
    """The trtllm-build command line for an in-flight batching engine.

    No FP8 flag of its own: with paged context attention (below) and an FP8 KV cache (an FP8 checkpoint's),
    trtllm-build turns on FP8 prefill attention itself, reading the cache in FP8 on every GPU that has it;
    passing it by compute capability would only name GPUs wrongly."""
    return [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--max_batch_size", str(options.max_batch_size),
        "--max_input_len", str(options.max_input_len),
        "--max_seq_len", str(options.max_seq_len),
        "--max_num_tokens", str(options.max_num_tokens),
        "--max_beam_width", str(options.max_beam_width),
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--gpt_attention_plugin", "auto",  # the checkpoint's dtype
        "--gemm_plugin", "auto",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",  # chunked prefill and KV cache reuse need it
        "--multiple_profiles", "enable",
        "--workers", str(options.tp_size),
        *options.extra_build_args,
    ]


def resolve_llm_dir(path: Path) -> Path:
    """The Hugging Face checkpoint folder: ``path`` itself, or ``path/llm`` when given a model set."""
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file() and (path / "llm" / "config.json").is_file():
        _log(f"{path} is a model set; using its llm/ folder")
        return path / "llm"
    return path


def check_checkpoint(llm_dir: Path, options: BuildOptions) -> dict:
    """Check that ``llm_dir`` is an Orpheus (Llama) checkpoint the options fit; return its config."""
    if not llm_dir.is_dir():
        raise BuildError(f"checkpoint directory {llm_dir} does not exist (pass a model set's llm/ folder)")
    config_path = llm_dir / "config.json"
    if not config_path.is_file():
        raise BuildError(
            f"{config_path} not found: --llm-dir must be a Hugging Face Llama checkpoint "
            "(config.json, *.safetensors, tokenizer.json), e.g. the llm/ folder `orpheus-triton download` writes"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise BuildError(f"{config_path} is not valid JSON: {error}") from None
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in architectures:
        raise BuildError(f"{config_path} describes {architectures or config.get('model_type')}, not a Llama model")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < MIN_VOCAB_SIZE:
        raise BuildError(
            f"{config_path} has vocab_size {vocab}; Orpheus checkpoints have {VOCAB_SIZE} ({MIN_VOCAB_SIZE} at "
            "least: Llama-3 plus the SNAC audio tokens the pipeline relies on)"
        )
    if not list(llm_dir.glob("*.safetensors")):
        raise BuildError(f"{llm_dir} holds no *.safetensors weights")
    if not (llm_dir / "tokenizer.json").is_file():
        _log(f"warning: {llm_dir} has no tokenizer.json; the preprocessing model will need it to serve")
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and options.max_seq_len > positions:
        raise BuildError(f"--max-seq-len {options.max_seq_len} exceeds the model's {positions} positions")
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 1
    if heads % options.tp_size:
        raise BuildError(f"--tp-size {options.tp_size} does not divide the model's {heads} KV heads")
    return config


def check_directories(llm_dir: Path, output_dir: Path, checkpoint_dir: Path | None) -> None:
    """Refuse directories the build would destroy or read from while writing: the engine directory is
    emptied before trtllm-build writes it, so it must not be or hold the checkpoint, the intermediate
    TensorRT-LLM checkpoint, or anything that is not an engine."""
    def overlap(a: Path, b: Path) -> bool:
        return a == b or a.is_relative_to(b) or b.is_relative_to(a)

    if overlap(output_dir, llm_dir):
        raise BuildError(f"--output-dir {output_dir} and the checkpoint {llm_dir} overlap: the engine directory "
                         "is emptied before the engine is written; choose one of its own (e.g. /engines/orpheus-3b)")
    if checkpoint_dir is not None and (overlap(checkpoint_dir, output_dir) or overlap(checkpoint_dir, llm_dir)):
        raise BuildError(f"--checkpoint-dir {checkpoint_dir} overlaps --output-dir or the checkpoint: give it "
                         "a folder of its own")
    entries = [child for child in (output_dir.iterdir() if output_dir.is_dir() else ())
               if child.name != VOLUME_ROOT_ENTRY]
    if entries:
        # What trtllm-build writes besides config.json and rank*.engine: managed weights, LoRA folders.
        foreign = sorted(child.name for child in entries
                         if (child.is_dir() and child.name != "lora")
                         or (child.suffix in (".safetensors", ".bin", ".pt") and not child.name.startswith("rank")))
        if foreign or not ((output_dir / "config.json").is_file() or (output_dir / METADATA).is_file()):
            raise BuildError(f"--output-dir {output_dir} holds {', '.join(foreign[:3]) or 'files'}, not an engine: "
                             "it is emptied by the build, so it is not touched; choose an empty or engine folder")


def check_rope_layout(config: dict, config_path: Path, transformers_version: str) -> None:
    """TensorRT-LLM's converter reads the checkpoint with the image's transformers. A config.json written
    by transformers 5 keeps rope_theta and the Llama-3 scaling inside ``rope_parameters``, which an older
    transformers ignores: the engine would be built with the default rope, every position wrong."""
    if "rope_theta" in config or "rope_parameters" not in config or int(transformers_version.split(".")[0]) >= 5:
        return
    from orpheus_triton.llama import rope_settings  # noqa: PLC0415 (imports torch)

    theta, scaling = rope_settings(config)
    raise BuildError(f"{config_path} keeps its rope settings in rope_parameters (transformers 5's layout), which "
                     f"this image's transformers {transformers_version} does not read: add \"rope_theta\": "
                     f"{json.dumps(theta)}, \"rope_scaling\": {json.dumps(scaling)} to it")


def check_toolchain() -> str:
    """Return the TensorRT-LLM version, or say why this environment cannot build engines."""
    where = f"Run this script inside {NGC_IMAGE} (see build_engines/README.md)."
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise BuildError(f"the tensorrt_llm package is not importable from {sys.executable}. {where}")
    try:
        tensorrt_llm = importlib.import_module("tensorrt_llm")
    except Exception as error:  # noqa: BLE001 (CUDA or MPI libraries missing, no driver, ...)
        raise BuildError(f"importing tensorrt_llm failed: {error}. {where}") from error
    if not hasattr(importlib.import_module("tensorrt_llm.models"), "LLaMAForCausalLM"):
        raise BuildError(f"tensorrt_llm {tensorrt_llm.__version__} no longer builds TensorRT engines "
                         "(tensorrt_llm.models.LLaMAForCausalLM is gone): use an image whose TensorRT-LLM still "
                         "has trtllm-build and the tensorrtllm backend, as build_engines/README.md says")
    if shutil.which("trtllm-build") is None:
        raise BuildError(f"trtllm-build is not on PATH (tensorrt_llm {tensorrt_llm.__version__} is). {where}")
    return str(tensorrt_llm.__version__)


MPI_JOB_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "PRTE_")  # what MPI_Init leaves in a process's environment


def without_mpi_job(environment: collections.abc.Mapping[str, str]) -> dict[str, str]:
    """``environment`` without the variables of this process's MPI job. Importing tensorrt_llm (to
    convert or quantize the checkpoint here) initialises MPI, which exports them: a trtllm-build that
    inherits them takes itself for another rank of this job and may hang or fail at its own MPI_Init
    (TensorRT-LLM drops them the same way before starting processes of its own)."""
    return {name: value for name, value in environment.items() if not name.startswith(MPI_JOB_PREFIXES)}


def gpu_name() -> str:
    try:
        import torch  # noqa: PLC0415

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        return "unknown"


def gpu_capability() -> tuple[int, int] | None:
    """The CUDA compute capability of GPU 0, or None where none is visible."""
    try:
        import torch  # noqa: PLC0415

        return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def _version(capability: tuple[int, int]) -> str:
    return ".".join(map(str, capability))


def check_quantization(options: BuildOptions, gpu: str, capability: tuple[int, int] | None) -> None:
    """Refuse FP8 on a GPU without FP8 arithmetic, before anything is generated or converted."""
    if options.quantization == "fp8" and (capability is None or capability < FP8_CAPABILITY):
        have = "an unknown compute capability" if capability is None else f"compute capability {_version(capability)}"
        raise BuildError(f"--quantization fp8 needs a GPU with FP8 arithmetic (compute capability 8.9 or later: "
                         f"L4, L40S, H100, H200, B200); {gpu} has {have}. Build without --quantization there")


def source_fingerprint(llm_dir: Path, tokenizer: bool = False) -> str:
    """Identifies the weights without reading them: config.json's bytes and each weight file's name and size;
    with ``tokenizer``, tokenizer.json's bytes too (an FP8 engine's calibration prompts are tokenized by it)."""
    digest = hashlib.sha256((llm_dir / "config.json").read_bytes())
    for weights in sorted(llm_dir.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    if tokenizer and (llm_dir / "tokenizer.json").is_file():
        digest.update((llm_dir / "tokenizer.json").read_bytes())
    return digest.hexdigest()[:16]


# Options that only shape the FP8 calibration: an unquantized engine does not depend on them.
CALIBRATION_OPTIONS = ("calibration_sequences", "calibration_length", "voices")


def engine_metadata(options: BuildOptions, llm_dir: Path, trtllm_version: str, gpu: str) -> dict:
    recorded = asdict(options) | {"extra_build_args": list(options.extra_build_args)}
    if options.quantization == "none":
        recorded = {name: value for name, value in recorded.items() if name not in CALIBRATION_OPTIONS}
    return {
        "options": recorded,
        "source": source_fingerprint(llm_dir, tokenizer=options.quantization != "none"),
        "tensorrt_llm": trtllm_version,
        "gpu": gpu,
    }


def engine_is_current(output_dir: Path, expected: dict) -> tuple[bool, str]:
    """Whether ``output_dir`` holds the engine ``expected`` (engine_metadata) describes, and if not, why."""
    if not (output_dir / "config.json").is_file() or not list(output_dir.glob("rank*.engine")):
        return False, f"no engine in {output_dir}"
    try:
        recorded = json.loads((output_dir / METADATA).read_text())
    except (OSError, ValueError):
        return False, f"{output_dir / METADATA} missing or unreadable"
    for key in ("options", "source", "tensorrt_llm", "gpu"):
        if recorded.get(key) != expected[key]:
            return False, f"{key} changed: built with {recorded.get(key)!r}, now {expected[key]!r}"
    return True, "engine is up to date"


def convert_checkpoint(llm_dir: Path, checkpoint_dir: Path, options: BuildOptions) -> None:
    """Hugging Face weights -> TensorRT-LLM checkpoint (one rank per tensor-parallel shard)."""
    from tensorrt_llm.mapping import Mapping  # noqa: PLC0415
    from tensorrt_llm.models import LLaMAForCausalLM  # noqa: PLC0415

    for rank in range(options.tp_size):
        mapping = Mapping(world_size=options.tp_size, rank=rank, tp_size=options.tp_size, pp_size=1)
        model = LLaMAForCausalLM.from_hugging_face(str(llm_dir), dtype=options.dtype, mapping=mapping)
        model.save_checkpoint(str(checkpoint_dir), save_config=rank == 0)
        del model
        gc.collect()


def quantize_checkpoint(llm_dir: Path, checkpoint_dir: Path, options: BuildOptions) -> None:
    """Hugging Face weights -> FP8 TensorRT-LLM checkpoint (weights, activations and KV cache in FP8).

    TensorRT-LLM's post-training quantization (NVIDIA ModelOpt) runs the model over the
    calibration set to set each tensor's scale; the set is Orpheus's own speech
    (orpheus_triton.calibration), written next to the checkpoint and removed after.
    """
    from tensorrt_llm.mapping import Mapping  # noqa: PLC0415
    from tensorrt_llm.models import LLaMAForCausalLM  # noqa: PLC0415

    try:  # where the LLM API publishes both (recent releases); older ones only have the modules below
        from tensorrt_llm.llmapi import QuantAlgo, QuantConfig  # noqa: PLC0415
    except ImportError:
        from tensorrt_llm.models.modeling_utils import QuantConfig  # noqa: PLC0415
        from tensorrt_llm.quantization import QuantAlgo  # noqa: PLC0415

    from orpheus_triton.calibration import read_back_length, write_calibration_set  # noqa: PLC0415

    calibration_dir = checkpoint_dir.with_name(checkpoint_dir.name + ".calibration")
    try:
        write_calibration_set(llm_dir, calibration_dir, count=options.calibration_sequences,
                              length=options.calibration_length, voices=options.speakers(), device="cuda", log=_log)
        mapping = Mapping(world_size=options.tp_size, tp_size=options.tp_size, pp_size=1)
        LLaMAForCausalLM.quantize(
            str(llm_dir), str(checkpoint_dir), dtype=options.dtype, mapping=mapping,
            quant_config=QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8),
            calib_dataset=str(calibration_dir), calib_batches=options.calibration_sequences,
            calib_max_seq_length=read_back_length(options.calibration_length),
        )
    finally:
        shutil.rmtree(calibration_dir, ignore_errors=True)


def _empty(directory: Path) -> None:
    """Remove what ``directory`` holds, keeping the directory (it may be a mount point, whose
    lost+found stays)."""
    for child in directory.iterdir() if directory.is_dir() else ():
        if child.name == VOLUME_ROOT_ENTRY:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _step(number: int, title: str):
    _log(f"step {number}/3: {title}")
    return time.monotonic()


def build(llm_dir: Path, output_dir: Path, options: BuildOptions, checkpoint_dir: Path | None = None,
          skip_if_built: bool = False, dry_run: bool = False) -> Path:
    """Check, convert and compile; return the engine directory."""
    options.check()
    _step(1, f"checking {llm_dir}")
    config = check_checkpoint(llm_dir, options)
    check_directories(llm_dir, output_dir, checkpoint_dir)
    fp8 = options.quantization == "fp8"
    _log(f"  Llama {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
         f"vocab {config.get('vocab_size')}; engine: {options.dtype}{', FP8' if fp8 else ''}, tp {options.tp_size}, "
         f"batch {options.max_batch_size}, input {options.max_input_len}, sequence {options.max_seq_len}")
    keep_checkpoint = checkpoint_dir is not None
    if dry_run:
        checkpoint_dir = checkpoint_dir or output_dir.with_name(output_dir.name + ".checkpoint")
        if fp8:
            _log(f"step 2/3 (dry run): {options.calibration_sequences} calibration sequences of "
                 f"{options.calibration_length} tokens (Orpheus prompts and the model's speech), then "
                 f"LLaMAForCausalLM.quantize({str(llm_dir)!r}, quant_algo FP8, kv_cache_quant_algo FP8)"
                 f" -> {checkpoint_dir}")
        else:
            _log(f"step 2/3 (dry run): LLaMAForCausalLM.from_hugging_face({str(llm_dir)!r}, dtype={options.dtype!r})"
                 f" -> {checkpoint_dir}")
        _log("step 3/3 (dry run): " + shlex.join(trtllm_build_argv(options, checkpoint_dir, output_dir)))
        if fp8:
            _log("  (trtllm-build turns FP8 prefill attention on for the FP8 KV cache itself)")
        return output_dir
    version = check_toolchain()
    check_rope_layout(config, llm_dir / "config.json", importlib.metadata.version("transformers"))
    gpu = gpu_name()
    if gpu in ("none", "unknown"):
        raise BuildError("no CUDA GPU is visible: an engine is compiled on the GPU model that will run it "
                         "(start the container with --gpus all)")
    capability = gpu_capability()
    check_quantization(options, gpu, capability)
    expected = engine_metadata(options, llm_dir, version, gpu)
    _log(f"  tensorrt_llm {version} on GPU {gpu}")
    if skip_if_built:
        current, reason = engine_is_current(output_dir, expected)
        if current:
            _log(f"{output_dir}: {reason}; nothing to build")
            return output_dir
        _log(f"building: {reason}")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is None:
        _remove_stale_checkpoints(output_dir)
        checkpoint_dir = Path(tempfile.mkdtemp(prefix=CHECKPOINT_PREFIX.format(output_dir.name),
                                               dir=output_dir.parent))
    else:  # TensorRT-LLM's save_checkpoint writes into it without creating it
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        if fp8:
            started = _step(2, "calibrating on Orpheus's own speech and quantizing the weights to an FP8 "
                               f"TensorRT-LLM checkpoint in {checkpoint_dir} (a few minutes)")
        else:
            started = _step(2, f"converting the Hugging Face weights to a TensorRT-LLM checkpoint in {checkpoint_dir}")
        try:
            (quantize_checkpoint if fp8 else convert_checkpoint)(llm_dir, checkpoint_dir, options)
        except Exception as error:
            raise BuildError(f"checkpoint {'quantization' if fp8 else 'conversion'} failed: {error}",
                             exit_code=1) from error
        _log(f"  {'quantized' if fp8 else 'converted'} in {time.monotonic() - started:.0f} s")
        _empty(output_dir)  # no stale engine or metadata survives a failed build
        argv = trtllm_build_argv(options, checkpoint_dir, output_dir)
        started = _step(3, "compiling the engine (several minutes): " + shlex.join(argv))
        result = subprocess.run(argv, check=False, env=without_mpi_job(os.environ))
        if result.returncode != 0:
            raise BuildError(f"trtllm-build exited with code {result.returncode} (its log is above)", exit_code=1)
        expected["built_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (output_dir / METADATA).write_text(json.dumps(expected, indent=2) + "\n")
        _log(f"  compiled in {time.monotonic() - started:.0f} s")
    finally:
        if not keep_checkpoint:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    _log(f"engine ready: {output_dir}")
    return output_dir


# The temporary checkpoint beside the engine folder (several GB): removed when the build ends, or by the
# next build where a killed one left it (SIGKILL skips every cleanup).
CHECKPOINT_PREFIX = ".{}.checkpoint-"


def _remove_stale_checkpoints(output_dir: Path) -> None:
    for stale in output_dir.parent.glob(f"{CHECKPOINT_PREFIX.format(output_dir.name)}*"):
        _log(f"removing {stale}, the temporary checkpoint of a build that did not finish")
        shutil.rmtree(stale, ignore_errors=True)


def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, the GPU entry point passing it on) ends the build as Ctrl-C does: through its
    cleanup (the temporary checkpoint removed; subprocess.run kills trtllm-build on the way out)."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def build_parser() -> argparse.ArgumentParser:
    defaults = BuildOptions()
    parser = argparse.ArgumentParser(
        prog="build_trtllm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llm-dir", required=True, help="Hugging Face Orpheus checkpoint (a model set's llm/)")
    parser.add_argument("--output-dir", required=True,
                        help="engine directory to write (emptied first: refused if it holds anything but an engine)")
    parser.add_argument("--checkpoint-dir", help="keep the TensorRT-LLM checkpoint here (default: temporary)")
    parser.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=defaults.quantization,
                        help="fp8: FP8 weights, activations and KV cache (Ada/Hopper and later; calibrated on "
                             "Orpheus's own speech)")
    parser.add_argument("--calibration-sequences", type=int, default=defaults.calibration_sequences,
                        help="fp8: sequences to calibrate on")
    parser.add_argument("--calibration-length", type=int, default=defaults.calibration_length,
                        help="fp8: tokens per calibration sequence (prompt and generated audio)")
    parser.add_argument("--voices", default=defaults.voices,
                        help="fp8: the checkpoint's speakers, comma-separated, for the calibration prompts "
                             "('none': a single-speaker fine-tune)")
    parser.add_argument("--tp-size", type=int, default=defaults.tp_size, help="tensor-parallel GPUs")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-input-len", type=int, default=defaults.max_input_len)
    parser.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    parser.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens)
    parser.add_argument("--trtllm-build-arg", action="append", default=[], metavar="ARG",
                        help="extra trtllm-build argument, repeatable (e.g. --trtllm-build-arg=--log_level=verbose)")
    parser.add_argument("--skip-if-built", action="store_true",
                        help="do nothing when --output-dir already holds this engine for this GPU")
    parser.add_argument("--dry-run", action="store_true", help="check the checkpoint and print the steps only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = BuildOptions(
        dtype=args.dtype, tp_size=args.tp_size, max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len, max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
        quantization=args.quantization, calibration_sequences=args.calibration_sequences,
        calibration_length=args.calibration_length, voices=args.voices,
        extra_build_args=tuple(args.trtllm_build_arg),
    )
    checkpoint_dir = Path(args.checkpoint_dir).expanduser().resolve() if args.checkpoint_dir else None
    try:
        build(resolve_llm_dir(Path(args.llm_dir)), Path(args.output_dir).expanduser().resolve(), options,
              checkpoint_dir=checkpoint_dir, skip_if_built=args.skip_if_built, dry_run=args.dry_run)
    except BuildError as error:
        _log(f"error: {error}")
        return error.exit_code
    return 0


if __name__ == "__main__":
    _stop_on_sigterm()
    sys.exit(main())
