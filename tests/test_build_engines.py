"""build_engines/: the TensorRT-LLM build steps and the GPU repository, checked without a GPU or TensorRT-LLM."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orpheus_triton.constants import (
    DECODER_MODEL,
    DECODER_TOKENS,
    DRAIN_FILE_ENV,
    ENGINE_MODEL,
    ENSEMBLE_MODEL,
    LLM_AUDIO_GUARD,
    LLM_FINISH_REASON,
    LLM_MODEL,
    LLM_OUTPUT_IDS,
    LLM_SEED,
    PREPROCESSING_MODEL,
    REQUEST_START,
    TOKENS_PER_FRAME,
    VOCAB_SIZE,
)
from orpheus_triton.demo_models import DEMO_LLM_SHAPE, ModelSet, llama_config
from orpheus_triton.llm_relay import ENGINE_OUTPUTS, EngineInputs
from orpheus_triton.repository import MODELS, RepositorySettings, render
from orpheus_triton.serving import stop_request_inputs

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"build_engines_{name}", ROOT / "build_engines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


build_trtllm = _load("build_trtllm")
gpu_repository = _load("render_gpu_repository")

SETTINGS = RepositorySettings(llm_dir="/models/llm", snac_dir="/models/snac", device="cuda")
ENGINE_DIR = "/engines/orpheus-3b"


# --- helpers -----------------------------------------------------------------------------------

def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def flag_values(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (argv[0] is the program)."""
    pairs = argv[1:]
    assert all(flag.startswith("--") for flag in pairs[::2]), pairs
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def fake_checkpoint(root: Path, **overrides) -> Path:
    """An Orpheus-shaped HF folder: real config.json, a placeholder weights file, a tokenizer.json."""
    llm = root / "llm"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text(json.dumps(llama_config(DEMO_LLM_SHAPE) | overrides))
    (llm / "model.safetensors").write_bytes(b"\0" * 16)
    (llm / "tokenizer.json").write_text("{}")
    return llm


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "repository"
    trt = gpu_repository.TrtllmSettings(engine_dir=ENGINE_DIR, triton_max_batch_size=128)
    return gpu_repository.render_gpu_repository(SETTINGS, trt, out)


@pytest.fixture(scope="module")
def configs(gpu_repo) -> dict[str, model_config_pb2.ModelConfig]:
    return {model: parse_config(gpu_repo / model / "config.pbtxt") for model in (*MODELS, ENGINE_MODEL)}


def ensemble_step(ensemble: model_config_pb2.ModelConfig, model: str):
    (step,) = [s for s in ensemble.ensemble_scheduling.step if s.model_name == model]
    return step


# --- trtllm-build command line ------------------------------------------------------------------

def test_build_argv_enables_inflight_batching_features():
    argv = build_trtllm.trtllm_build_argv(build_trtllm.BuildOptions(), Path("/ckpt"), Path("/engine"))
    assert argv[0] == "trtllm-build"
    flags = flag_values(argv)
    assert flags["--checkpoint_dir"] == "/ckpt" and flags["--output_dir"] == "/engine"
    assert flags["--kv_cache_type"] == "paged"
    assert flags["--remove_input_padding"] == "enable"
    assert flags["--gpt_attention_plugin"] == "auto"  # follows the checkpoint's dtype (bf16)
    assert flags["--context_fmha"] == "enable"
    assert flags["--use_paged_context_fmha"] == "enable"
    assert (flags["--max_batch_size"], flags["--max_input_len"], flags["--max_seq_len"]) == ("256", "2048", "4096")
    assert flags["--max_beam_width"] == "1"


def test_build_argv_follows_options_and_appends_extra_arguments():
    options = build_trtllm.BuildOptions(max_batch_size=32, max_input_len=512, max_seq_len=2048, max_num_tokens=4096,
                                        tp_size=2, extra_build_args=("--log_level", "verbose"))
    flags = flag_values(build_trtllm.trtllm_build_argv(options, Path("c"), Path("e")))
    assert flags["--max_batch_size"] == "32"
    assert flags["--max_input_len"] == "512"
    assert flags["--max_seq_len"] == "2048"
    assert flags["--max_num_tokens"] == "4096"
    assert flags["--workers"] == "2"
    assert flags["--log_level"] == "verbose"


def test_fp8_engines_leave_fp8_prefill_attention_to_trtllm_build():
    """trtllm-build turns FP8 context attention on itself for an FP8 KV cache with paged context attention,
    on every GPU with FP8 (Ada too), so the command passes paged context attention and no FP8 attention flag
    (a build's own command line on an H100, where the flag used to be added: test_fp8_build_quantizes_instead_of_
    converting_and_is_rebuilt_when_that_changes)."""
    fp8 = flag_values(build_trtllm.trtllm_build_argv(build_trtllm.BuildOptions(quantization="fp8"), Path("c"),
                                                     Path("e")))
    assert "--use_fp8_context_fmha" not in fp8 and fp8["--use_paged_context_fmha"] == "enable"
    assert fp8["--gemm_plugin"] == "auto"  # FP8 products from the checkpoint's quantization, at any batch


@pytest.mark.parametrize(("capability", "refused"), [((8, 0), True), (None, True), ((8, 9), False), ((9, 0), False)])
def test_fp8_is_refused_on_gpus_without_fp8_arithmetic(capability, refused):
    fp8 = build_trtllm.BuildOptions(quantization="fp8")
    if refused:
        with pytest.raises(build_trtllm.BuildError, match="needs a GPU with FP8 arithmetic.*NVIDIA A100"):
            build_trtllm.check_quantization(fp8, "NVIDIA A100-SXM4-80GB", capability)
    else:
        build_trtllm.check_quantization(fp8, "NVIDIA H100 80GB HBM3", capability)
    build_trtllm.check_quantization(build_trtllm.BuildOptions(), "NVIDIA A100-SXM4-80GB", (8, 0))


def test_parser_defaults_suit_orpheus():
    args = build_trtllm.build_parser().parse_args(["--llm-dir", "m/llm", "--output-dir", "e"])
    assert (args.dtype, args.max_batch_size, args.max_input_len, args.max_seq_len) == ("bfloat16", 256, 2048, 4096)
    assert not args.skip_if_built and not args.dry_run


@pytest.mark.parametrize(("options", "message"), [
    ({"max_input_len": 4096, "max_seq_len": 4096}, "below --max-seq-len"),
    ({"max_batch_size": 0}, "--max-batch-size must be at least 1"),
    ({"dtype": "float32"}, "--dtype"),
    ({"quantization": "int4"}, "--quantization must be one of none, fp8"),
    ({"calibration_sequences": 0}, "--calibration-sequences must be at least 1"),
    ({"calibration_length": 32}, "--calibration-length must be at least 64"),
    ({"voices": "tara,tara"}, "--voices: .*more than once"),
])
def test_options_are_checked(options, message):
    with pytest.raises(build_trtllm.BuildError, match=message):
        build_trtllm.BuildOptions(**options).check()


# --- checkpoint checks and the missing toolchain ----------------------------------------------------

def test_checkpoint_check_accepts_an_orpheus_llama(tmp_path):
    llm = fake_checkpoint(tmp_path)
    config = build_trtllm.check_checkpoint(llm, build_trtllm.BuildOptions())
    assert config["vocab_size"] == VOCAB_SIZE
    # Orpheus's pretrained checkpoint (and fine-tunes of it) has one id fewer; every audio token still fits.
    pretrained = fake_checkpoint(tmp_path / "pretrained", vocab_size=VOCAB_SIZE - 1)
    assert build_trtllm.check_checkpoint(pretrained, build_trtllm.BuildOptions())["vocab_size"] == VOCAB_SIZE - 1


def test_a_model_set_whose_vocabulary_lacks_the_audio_tokens_is_refused(tmp_path):
    """The torch engine would have failed every stream's first step (the audio-token guard indexes past it)."""
    from orpheus_triton.constants import MIN_VOCAB_SIZE
    from orpheus_triton.demo_models import ModelSet

    fake_checkpoint(tmp_path, vocab_size=128_256)
    with pytest.raises(ValueError, match=f"vocab_size 128256: not an Orpheus checkpoint, whose audio tokens need "
                                         f"{MIN_VOCAB_SIZE} ids at least"):
        ModelSet(tmp_path).check()


def test_model_set_root_resolves_to_its_llm_folder(tmp_path):
    llm = fake_checkpoint(tmp_path)
    assert build_trtllm.resolve_llm_dir(tmp_path) == llm.resolve()
    assert build_trtllm.resolve_llm_dir(llm) == llm.resolve()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vocab_size": 128_256}, "Orpheus checkpoints have 156940"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama model"),
    ({"max_position_embeddings": 2048}, "exceeds the model's 2048 positions"),
])
def test_checkpoint_check_names_the_problem(tmp_path, overrides, message):
    llm = fake_checkpoint(tmp_path, **overrides)
    with pytest.raises(build_trtllm.BuildError, match=message):
        build_trtllm.check_checkpoint(llm, build_trtllm.BuildOptions())


def test_checkpoint_check_wants_config_and_weights(tmp_path):
    with pytest.raises(build_trtllm.BuildError, match="does not exist"):
        build_trtllm.check_checkpoint(tmp_path / "missing", build_trtllm.BuildOptions())
    with pytest.raises(build_trtllm.BuildError, match="config.json not found"):
        build_trtllm.check_checkpoint(tmp_path, build_trtllm.BuildOptions())
    llm = fake_checkpoint(tmp_path)
    (llm / "model.safetensors").unlink()
    with pytest.raises(build_trtllm.BuildError, match="no \\*.safetensors"):
        build_trtllm.check_checkpoint(llm, build_trtllm.BuildOptions())


def test_wrong_checkpoint_fails_before_anything_is_built(tmp_path, capsys):
    assert build_trtllm.main(["--llm-dir", str(tmp_path), "--output-dir", str(tmp_path / "engine")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_missing_tensorrt_llm_is_reported_with_the_image_to_use(tmp_path, capsys):
    fake_checkpoint(tmp_path)
    code = build_trtllm.main(["--llm-dir", str(tmp_path), "--output-dir", str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tensorrt_llm package is not importable" in err
    assert "trtllm-python-py3" in err
    assert not (tmp_path / "engine").exists()


def test_dry_run_prints_every_step_without_tensorrt_llm(tmp_path, capsys):
    fake_checkpoint(tmp_path)
    engine = tmp_path / "engine"
    assert build_trtllm.main(["--llm-dir", str(tmp_path), "--output-dir", str(engine), "--dry-run",
                              "--max-batch-size", "64"]) == 0
    err = capsys.readouterr().err
    assert "step 1/3" in err and "step 2/3" in err and "step 3/3" in err
    assert "LLaMAForCausalLM.from_hugging_face" in err
    assert f"trtllm-build --checkpoint_dir {engine}.checkpoint --output_dir {engine}" in err
    assert "--max_batch_size 64" in err
    assert not engine.exists()


def test_dry_run_of_an_fp8_build_names_its_calibration(tmp_path, capsys):
    fake_checkpoint(tmp_path)
    engine = tmp_path / "engine"
    assert build_trtllm.main(["--llm-dir", str(tmp_path), "--output-dir", str(engine), "--dry-run",
                              "--quantization", "fp8", "--calibration-sequences", "64"]) == 0
    err = capsys.readouterr().err
    assert "engine: bfloat16, FP8" in err
    assert "64 calibration sequences of 1024 tokens" in err and "LLaMAForCausalLM.quantize" in err
    assert "--use_fp8_context_fmha" not in err and "turns FP8 prefill attention on" in err
    assert not engine.exists()


def test_no_gpu_is_reported_before_converting(tmp_path, monkeypatch, capsys):
    fake_checkpoint(tmp_path)
    monkeypatch.setattr(build_trtllm, "check_toolchain", lambda: "1.1.0")
    monkeypatch.setattr(build_trtllm, "gpu_name", lambda: "none")
    assert build_trtllm.main(["--llm-dir", str(tmp_path), "--output-dir", str(tmp_path / "engine")]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


class StandIns:
    """TensorRT-LLM's two steps replaced by stand-ins that record their calls and write what they would."""

    def __init__(self, monkeypatch, build_exit_code: int = 0):
        self.conversions, self.quantizations, self.builds = [], [], []
        self.build_exit_code = build_exit_code
        monkeypatch.setattr(build_trtllm, "check_toolchain", lambda: "1.1.0")
        monkeypatch.setattr(build_trtllm, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(build_trtllm, "gpu_capability", lambda: (9, 0))
        monkeypatch.setattr(build_trtllm, "convert_checkpoint", self.convert)
        monkeypatch.setattr(build_trtllm, "quantize_checkpoint", self.quantize)
        monkeypatch.setattr(build_trtllm.subprocess, "run", self.run)

    def convert(self, llm_dir, checkpoint_dir, options):
        self.conversions.append(checkpoint_dir)
        (checkpoint_dir / "config.json").write_text("{}")

    def quantize(self, llm_dir, checkpoint_dir, options):
        self.quantizations.append(options)
        (checkpoint_dir / "config.json").write_text("{}")

    def run(self, argv, check, env):
        assert not [name for name in env if name.startswith(("OMPI_", "PMIX_"))]  # not another rank of ours
        assert env["PATH"] == os.environ["PATH"]
        self.builds.append(argv)
        flags = flag_values(argv)
        assert (Path(flags["--checkpoint_dir"]) / "config.json").is_file()
        output = Path(flags["--output_dir"])
        output.mkdir(parents=True, exist_ok=True)
        if self.build_exit_code == 0:
            (output / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 256}}))
            (output / "rank0.engine").write_bytes(b"engine")
        return build_trtllm.subprocess.CompletedProcess(argv, self.build_exit_code)


def test_build_converts_compiles_records_and_cleans_up(tmp_path, monkeypatch):
    # As importing tensorrt_llm (MPI_Init) leaves them: trtllm-build inheriting them may hang as another rank
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("PMIX_SERVER_URI41", "pmix-server.1234;tcp4://127.0.0.1:40000")
    fake_checkpoint(tmp_path / "models")
    engines = tmp_path / "engines"
    stand_ins = StandIns(monkeypatch)
    argv = ["--llm-dir", str(tmp_path / "models"), "--output-dir", str(engines / "orpheus-3b"), "--skip-if-built"]
    assert build_trtllm.main(argv) == 0
    assert len(stand_ins.conversions) == len(stand_ins.builds) == 1
    metadata = json.loads((engines / "orpheus-3b" / build_trtllm.METADATA).read_text())
    assert metadata["gpu"] == "NVIDIA H100 80GB HBM3" and metadata["tensorrt_llm"] == "1.1.0"
    assert metadata["options"]["max_batch_size"] == 256
    assert sorted(p.name for p in engines.iterdir()) == ["orpheus-3b"]  # the temporary checkpoint is gone

    assert build_trtllm.main(argv) == 0  # same engine: nothing to do
    assert len(stand_ins.builds) == 1
    assert build_trtllm.main([*argv, "--max-batch-size", "64"]) == 0  # other options: rebuilt
    assert len(stand_ins.builds) == 2
    assert json.loads((engines / "orpheus-3b" / build_trtllm.METADATA).read_text())["options"]["max_batch_size"] == 64


def test_directories_the_build_would_destroy_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """The engine directory is emptied before trtllm-build writes it: pointed at the model set, the
    checkpoint, a folder of other things, or holding the intermediate checkpoint, it is refused."""
    llm = fake_checkpoint(tmp_path / "models")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    (tmp_path / "other" / "engines").mkdir()
    stand_ins = StandIns(monkeypatch)
    for output, extra, message in (
        (tmp_path / "models", [], "overlap"),
        (llm, [], "overlap"),
        (tmp_path / "other", [], "holds engines, not an engine"),
        (tmp_path / "engine", ["--checkpoint-dir", str(tmp_path / "engine" / "ckpt")], "--checkpoint-dir"),
        (tmp_path / "engine", ["--checkpoint-dir", str(llm)], "--checkpoint-dir"),
    ):
        code = build_trtllm.main(["--llm-dir", str(tmp_path / "models"), "--output-dir", str(output), *extra])
        assert code == 2 and message in capsys.readouterr().err, output
    assert not stand_ins.conversions and sorted(p.name for p in llm.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "other" / "notes.txt").read_text() == "kept"


def test_an_engine_folder_with_what_trtllm_build_writes_beside_the_engine_is_rebuilt(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "models")
    engine = tmp_path / "engine"
    (engine / "lora" / "0").mkdir(parents=True)
    for name in ("config.json", "rank0.engine", "rank0_managed_weights.safetensors", "quant_cfg.json"):
        (engine / name).write_text("{}")
    (tmp_path / "volume" / "lost+found").mkdir(parents=True)  # a fresh volume's root
    stand_ins = StandIns(monkeypatch)
    for output in (engine, tmp_path / "volume"):
        assert build_trtllm.main(["--llm-dir", str(tmp_path / "models"), "--output-dir", str(output)]) == 0
    assert len(stand_ins.builds) == 2
    assert (tmp_path / "volume" / "lost+found").is_dir()


def test_a_new_checkpoint_dir_is_made_and_kept(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "models")
    stand_ins = StandIns(monkeypatch)
    checkpoint = tmp_path / "work" / "ckpt"
    assert build_trtllm.main(["--llm-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "engine"),
                              "--checkpoint-dir", str(checkpoint)]) == 0
    assert stand_ins.conversions == [checkpoint] and (checkpoint / "config.json").is_file()


def test_a_transformers_5_config_is_refused_where_the_images_transformers_would_misread_its_rope(tmp_path):
    from orpheus_triton.demo_models import llama_config

    old = llama_config(DEMO_LLM_SHAPE)
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": old["rope_theta"], **old["rope_scaling"]}
    path = tmp_path / "config.json"
    build_trtllm.check_rope_layout(old, path, "4.56.0")
    build_trtllm.check_rope_layout(new, path, "5.0.0")
    expected = r'add "rope_theta": 500000.0, "rope_scaling": \{"rope_type": "llama3", "factor": 32.0'
    with pytest.raises(build_trtllm.BuildError, match=expected):
        build_trtllm.check_rope_layout(new, path, "4.56.0")


def test_fp8_build_quantizes_instead_of_converting_and_is_rebuilt_when_that_changes(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "models")
    engine = tmp_path / "engines" / "orpheus-3b"
    stand_ins = StandIns(monkeypatch)
    argv = ["--llm-dir", str(tmp_path / "models"), "--output-dir", str(engine), "--skip-if-built"]
    assert build_trtllm.main([*argv, "--quantization", "fp8", "--calibration-length", "768"]) == 0
    (options,) = stand_ins.quantizations
    assert (options.quantization, options.calibration_length, options.calibration_sequences) == ("fp8", 768, 256)
    assert not stand_ins.conversions
    assert "--use_fp8_context_fmha" not in flag_values(stand_ins.builds[0])
    recorded = json.loads((engine / build_trtllm.METADATA).read_text())["options"]
    assert recorded["quantization"] == "fp8"
    assert build_trtllm.main([*argv, "--quantization", "fp8", "--calibration-length", "768"]) == 0  # up to date
    assert len(stand_ins.builds) == 1
    assert build_trtllm.main(argv) == 0  # unquantized now: rebuilt, by conversion
    assert len(stand_ins.builds) == 2 and len(stand_ins.conversions) == 1
    assert build_trtllm.main([*argv, "--voices", "none"]) == 0  # calibration options do not matter to it
    assert len(stand_ins.builds) == 2


def test_fp8_on_an_a100_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    fake_checkpoint(tmp_path / "models")
    stand_ins = StandIns(monkeypatch)
    monkeypatch.setattr(build_trtllm, "gpu_name", lambda: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(build_trtllm, "gpu_capability", lambda: (8, 0))
    engine = tmp_path / "engines" / "orpheus-3b"
    assert build_trtllm.main(["--llm-dir", str(tmp_path / "models"), "--output-dir", str(engine),
                              "--quantization", "fp8"]) == 2
    assert "compute capability 8.0" in capsys.readouterr().err
    assert not stand_ins.quantizations and not stand_ins.builds and not engine.exists()


def test_failed_compile_leaves_no_engine_that_looks_built(tmp_path, monkeypatch, capsys):
    fake_checkpoint(tmp_path / "models")
    engine = tmp_path / "engines" / "orpheus-3b"
    engine.mkdir(parents=True)
    (engine / build_trtllm.METADATA).write_text("{}")  # from an earlier build
    StandIns(monkeypatch, build_exit_code=1)
    assert build_trtllm.main(["--llm-dir", str(tmp_path / "models"), "--output-dir", str(engine)]) == 1
    assert "trtllm-build exited with code 1" in capsys.readouterr().err
    assert not (engine / build_trtllm.METADATA).exists()
    assert sorted(p.name for p in engine.parent.iterdir()) == ["orpheus-3b"]


# --- --skip-if-built ---------------------------------------------------------------------------------

def test_engine_is_current_only_for_the_same_build(tmp_path):
    llm = fake_checkpoint(tmp_path)
    engine = tmp_path / "engine"
    options = build_trtllm.BuildOptions()
    expected = build_trtllm.engine_metadata(options, llm, "1.1.0", "NVIDIA H100 80GB HBM3")
    assert build_trtllm.engine_is_current(engine, expected) == (False, f"no engine in {engine}")

    engine.mkdir()
    (engine / "config.json").write_text("{}")
    (engine / "rank0.engine").write_bytes(b"")
    assert not build_trtllm.engine_is_current(engine, expected)[0]  # no metadata: an interrupted build
    (engine / build_trtllm.METADATA).write_text(json.dumps(expected | {"built_at": "earlier"}))
    assert build_trtllm.engine_is_current(engine, expected) == (True, "engine is up to date")

    other_gpu = build_trtllm.engine_metadata(options, llm, "1.1.0", "NVIDIA A100-SXM4-80GB")
    current, reason = build_trtllm.engine_is_current(engine, other_gpu)
    assert not current and reason.startswith("gpu changed")
    bigger = build_trtllm.engine_metadata(build_trtllm.BuildOptions(max_batch_size=512), llm, "1.1.0",
                                          "NVIDIA H100 80GB HBM3")
    assert not build_trtllm.engine_is_current(engine, bigger)[0]
    (llm / "model.safetensors").write_bytes(b"\0" * 32)  # other weights
    reweighted = build_trtllm.engine_metadata(options, llm, "1.1.0", "NVIDIA H100 80GB HBM3")
    assert build_trtllm.engine_is_current(engine, reweighted)[1].startswith("source changed")


def test_an_fp8_engine_is_rebuilt_for_another_tokenizer_and_an_unquantized_one_is_not(tmp_path):
    """An FP8 engine's scales come from calibration prompts the checkpoint's tokenizer.json tokenizes."""
    llm = fake_checkpoint(tmp_path)
    (llm / "tokenizer.json").write_text('{"version": "1.0"}')
    fp8, plain = build_trtllm.BuildOptions(quantization="fp8"), build_trtllm.BuildOptions()
    before = {options: build_trtllm.engine_metadata(options, llm, "1.1.0", "H100") for options in (fp8, plain)}
    (llm / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": []}')
    after = {options: build_trtllm.engine_metadata(options, llm, "1.1.0", "H100") for options in (fp8, plain)}
    assert before[fp8]["source"] != after[fp8]["source"]
    assert before[plain]["source"] == after[plain]["source"]


# --- the GPU repository -----------------------------------------------------------------------------

GPU_MODELS = (*MODELS, ENGINE_MODEL)


def test_every_rendered_config_parses_and_has_no_placeholders(gpu_repo, configs):
    assert sorted(p.name for p in gpu_repo.iterdir() if p.is_dir()) == sorted(GPU_MODELS)
    for model in GPU_MODELS:
        text = (gpu_repo / model / "config.pbtxt").read_text()
        assert "${" not in text, model
        assert configs[model].name == model


def test_engine_is_served_by_the_tensorrtllm_backend(gpu_repo, configs):
    engine = configs[ENGINE_MODEL]
    assert engine.backend == "tensorrtllm"
    assert engine.model_transaction_policy.decoupled
    assert engine.max_batch_size == 128
    parameters = {key: value.string_value for key, value in engine.parameters.items()}
    assert parameters["gpt_model_type"] == "inflight_fused_batching"
    assert parameters["gpt_model_path"] == ENGINE_DIR
    assert parameters["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert 0 < float(parameters["kv_cache_free_gpu_mem_fraction"]) <= 1
    assert parameters["exclude_input_in_output"] == "true"  # stream only the generated tokens
    # read unconditionally at load by current backends (the model fails to load without them); empty: off
    for name in ("tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"):
        assert parameters[name] == "", name
    assert (gpu_repo / ENGINE_MODEL / "1").is_dir()
    assert list((gpu_repo / ENGINE_MODEL / "1").iterdir()) == []  # no model.py for the C++ backend


def test_llm_is_the_relay_in_front_of_the_engine(gpu_repo, configs):
    relay = configs[LLM_MODEL]
    assert relay.backend == "python" and relay.model_transaction_policy.decoupled
    assert (gpu_repo / LLM_MODEL / "1" / "model.py").is_file()
    parameters = {key: value.string_value for key, value in relay.parameters.items()}
    assert parameters["engine_model"] == ENGINE_MODEL
    assert parameters["engine_seed_input"] == "seed"
    assert parameters["engine_audio_guard"] == "false"  # TensorRT-LLM has no audio-token guard
    assert parameters["tokens_per_response"] == str(TOKENS_PER_FRAME)
    assert relay.instance_group[0].count == gpu_repository.TrtllmSettings.relay_instances


def test_the_other_models_are_the_standard_ones(gpu_repo, tmp_path):
    standard = render(SETTINGS, tmp_path / "standard")
    for model in (ENSEMBLE_MODEL, PREPROCESSING_MODEL, DECODER_MODEL):
        assert (gpu_repo / model / "config.pbtxt").read_text() == (standard / model / "config.pbtxt").read_text()
    for model in (PREPROCESSING_MODEL, DECODER_MODEL):
        assert (gpu_repo / model / "1" / "model.py").is_file()


def test_ensemble_feeds_the_llm_tensors_it_declares_with_matching_types(configs):
    ensemble, llm = configs[ENSEMBLE_MODEL], configs[LLM_MODEL]
    producers = {}  # ensemble tensor -> dtype of the model output that produces it
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name == LLM_MODEL:
            continue
        outputs = {o.name: o.data_type for o in configs[step.model_name].output}
        producers |= {tensor: outputs[name] for name, tensor in step.output_map.items()}
    llm_inputs = {i.name: i for i in llm.input}
    step = ensemble_step(ensemble, LLM_MODEL)
    for name, tensor in step.input_map.items():
        assert name in llm_inputs, f"the ensemble feeds {name!r}, which the llm does not declare"
        assert llm_inputs[name].data_type == producers[tensor], name
    required = {i.name for i in llm.input if not i.optional}
    assert required <= set(step.input_map), "a required llm input is not fed by the ensemble"

    llm_outputs = {o.name: o.data_type for o in llm.output}
    decoder_inputs = {i.name: i.data_type for i in configs[DECODER_MODEL].input}
    decoder_step = ensemble_step(ensemble, DECODER_MODEL)
    for name, tensor in step.output_map.items():
        assert name in llm_outputs
        consumers = [n for n, t in decoder_step.input_map.items() if t == tensor]
        assert all(decoder_inputs[n] == llm_outputs[name] for n in consumers)
    assert step.output_map[LLM_OUTPUT_IDS] == decoder_step.input_map[DECODER_TOKENS]


def test_relay_has_the_torch_engines_contract(configs, tmp_path):
    torch_llm = parse_config(render(SETTINGS, tmp_path / "standard") / LLM_MODEL / "config.pbtxt")
    relay = configs[LLM_MODEL]
    assert list(relay.input) == list(torch_llm.input)
    assert list(relay.output) == list(torch_llm.output)
    assert relay.max_batch_size == torch_llm.max_batch_size


def test_engine_takes_every_input_the_relay_sends_it(configs):
    """What the relay forwards (EngineInputs.map) is declared by the TensorRT-LLM model, type and shape alike.
    The request's start is the relay's own: taken off the inputs and answered with every response
    (serving.serve_llm_requests), never sent to the engine; so is the finish reason (TensorRT-LLM has none)."""
    relay = configs[LLM_MODEL]
    engine_io = {t.name: t for t in [*configs[ENGINE_MODEL].input, *configs[ENGINE_MODEL].output]}
    parameters = {key: value.string_value for key, value in relay.parameters.items()}
    mapping = EngineInputs(seed=parameters["engine_seed_input"], audio_guard=False)
    sent = mapping.map({i.name: np.zeros((1, 1), np.int32) for i in relay.input
                        if i.name not in (LLM_AUDIO_GUARD, REQUEST_START)})
    relay_inputs = {i.name: i for i in relay.input}
    relay_name = {mapping.seed: LLM_SEED}
    for name in sent:
        ours, theirs = relay_inputs[relay_name.get(name, name)], engine_io[name]
        assert (theirs.data_type, list(theirs.dims)) == (ours.data_type, list(ours.dims)), name
    for output in (o for o in relay.output if o.name not in (REQUEST_START, LLM_FINISH_REASON)):
        theirs = engine_io[output.name]
        assert (theirs.data_type, list(theirs.dims)) == (output.data_type, list(output.dims)), output.name
    required = {i.name for i in configs[ENGINE_MODEL].input if not i.optional}
    assert required <= set(sent)
    # and the stop request's tensors too
    assert set(stop_request_inputs()) <= set(engine_io)
    # TensorRT-LLM's backend answers with an error unless output_ids and sequence_length are both requested
    assert set(ENGINE_OUTPUTS) == {"output_ids", "sequence_length"} <= {o.name for o in configs[ENGINE_MODEL].output}


def test_seed_goes_to_the_backends_seed_input(configs, tmp_path):
    seed = next(i for i in configs[ENGINE_MODEL].input if i.name == "seed")
    assert seed.data_type == model_config_pb2.TYPE_UINT64

    legacy = gpu_repository.TrtllmSettings(engine_dir=ENGINE_DIR, seed_tensor=LLM_SEED)
    repo = gpu_repository.render_gpu_repository(SETTINGS, legacy, tmp_path / "legacy")
    assert LLM_SEED in {i.name for i in parse_config(repo / ENGINE_MODEL / "config.pbtxt").input}
    relay = parse_config(repo / LLM_MODEL / "config.pbtxt")
    assert relay.parameters["engine_seed_input"].string_value == LLM_SEED


def parse_config_text(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("kv_cache_free_gpu_mem_fraction", 1.5, "kv_cache_free_gpu_mem_fraction"),
    ("batch_scheduler_policy", "fifo", "batch_scheduler_policy"),
    ("seed_tensor", "rng", "seed_tensor"),
    ("triton_max_batch_size", 0, "max batch size"),
    ("relay_instances", 0, "relay_instances"),
])
def test_trtllm_settings_are_checked(tmp_path, field, value, message):
    trt = gpu_repository.TrtllmSettings(engine_dir=ENGINE_DIR, **{field: value})
    with pytest.raises(ValueError, match=message):
        gpu_repository.render_gpu_repository(SETTINGS, trt, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_max_utilization_without_chunked_context_is_refused(tmp_path, capsys):
    """TensorRT-LLM's executor refuses, in that combination, every streaming request whose prompt + max_tokens
    passes the engine's max_input_len (2048 by default, where requests may take 4096 positions)."""
    trt = gpu_repository.TrtllmSettings(engine_dir=ENGINE_DIR, batch_scheduler_policy="max_utilization",
                                        enable_chunked_context=False)
    with pytest.raises(ValueError, match="max_utilization needs chunked context"):
        gpu_repository.render_gpu_repository(SETTINGS, trt, tmp_path / "repo")
    for each in ({"batch_scheduler_policy": "max_utilization"}, {"enable_chunked_context": False}):
        gpu_repository.render_gpu_repository(SETTINGS, gpu_repository.TrtllmSettings(engine_dir=ENGINE_DIR, **each),
                                             tmp_path / "repo")


@pytest.mark.parametrize("option", ["--max-batch-size", "--relay-instances", "--decoder-max-batch-size",
                                    "--preprocessing-instances"])
def test_counts_below_one_are_refused_while_parsing(option, capsys):
    """--max-batch-size 0 read as "the engine's" before; the others failed later or rendered a bad config."""
    with pytest.raises(SystemExit) as exit_info:
        gpu_repository.main(["--models", "m", "--engine-dir", "e", option, "0"])
    assert exit_info.value.code == 2 and f"argument {option}: expected a whole number >= 1" in capsys.readouterr().err


def test_max_batch_size_and_length_default_to_the_engines(tmp_path, monkeypatch, capsys):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 96, "max_seq_len": 3000,
                                                                     "max_input_len": 1500}}))
    assert gpu_repository.engine_build_setting(engine, "max_batch_size") == 96
    assert gpu_repository.engine_build_setting(tmp_path / "none", "max_batch_size") is None

    models = tmp_path / "models"
    monkeypatch.setattr(ModelSet, "check", lambda self: None)  # the model set's files are checked elsewhere
    out = tmp_path / "repo"
    argv = ["--models", str(models), "--engine-dir", str(engine), "--out", str(out)]
    assert gpu_repository.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    engine_config = parse_config(out / ENGINE_MODEL / "config.pbtxt")
    assert engine_config.max_batch_size == 96
    assert {k: v.string_value for k, v in engine_config.parameters.items()}["gpt_model_path"] == str(engine)
    preprocessing = parse_config(out / PREPROCESSING_MODEL / "config.pbtxt")
    assert preprocessing.parameters["llm_dir"].string_value == str(models / "llm")
    assert preprocessing.parameters["max_seq_len"].string_value == "3000"  # default max_tokens fitted to it
    assert preprocessing.parameters["max_prompt_tokens"].string_value == "1500"  # longer prompts refused there

    assert gpu_repository.main([*argv, "--max-batch-size", "8", "--seed-tensor", LLM_SEED,
                                "--relay-instances", "2", "--voices", "jana,thomas,max"]) == 0
    assert parse_config(out / ENGINE_MODEL / "config.pbtxt").max_batch_size == 8
    assert parse_config(out / LLM_MODEL / "config.pbtxt").instance_group[0].count == 2
    assert parse_config(out / PREPROCESSING_MODEL / "config.pbtxt").parameters["voices"].string_value == \
        "jana,thomas,max"
    assert gpu_repository.main([*argv, "--voices", "jana,thomas", "--default-voice", "tara"]) == 2
    assert "default voice 'tara' is not one of the voices: jana, thomas" in capsys.readouterr().err


def test_serve_runs_tritonserver_as_orpheus_triton_serve_does(tmp_path, monkeypatch):
    """--serve starts the image's tritonserver and waits on it as `serve` does (signals passed on, a backend stub
    that dies after loading stops the server with exit status 1): it no longer replaces itself with the server."""
    from orpheus_triton import server

    monkeypatch.setattr(ModelSet, "check", lambda self: None)
    monkeypatch.setattr(gpu_repository.shutil, "which", lambda name: f"/opt/tritonserver/bin/{name}")
    monkeypatch.setattr(gpu_repository, "TRITON_BACKENDS", tmp_path / "no-backends-folder")
    started, waited = [], []
    monkeypatch.setattr(server, "start_server", lambda repository, ports, extra, environment: started.append(
        (repository, ports, extra)) or "the server process")
    monkeypatch.setattr(server, "run_in_foreground", lambda process, exit_timeout, ready, log, drain: waited.append(
        (process, exit_timeout, ready, drain)) or 1)
    monkeypatch.setattr(server, "http_ready", lambda port: port == 8123)
    argv = ["--models", str(tmp_path), "--engine-dir", str(tmp_path / "engine"), "--out", str(tmp_path / "repo"),
            "--serve", "--http-port", "8123", "--exit-timeout", "12"]
    assert gpu_repository.main(argv) == 1  # the server's exit status
    [(repository, ports, extra)] = started
    # 12 s for the drain, tritonserver's own exit timeout after it
    assert repository == tmp_path / "repo" and ports.http == 8123 and extra == [
        f"--exit-timeout-secs={server.DRAINED_EXIT_SECONDS}"]
    [(process, exit_timeout, ready, drain)] = waited
    assert process == "the server process" and exit_timeout == 12 and ready() and drain.metrics_port == 8002


def _serving_stand_ins(tmp_path, monkeypatch) -> list[dict]:
    """--serve in the TensorRT-LLM image, its tritonserver a stand-in that exits 0: the environments it got."""
    from orpheus_triton import server

    monkeypatch.setattr(ModelSet, "check", lambda self: None)
    monkeypatch.setattr(gpu_repository.shutil, "which", lambda name: f"/opt/tritonserver/bin/{name}")
    monkeypatch.setattr(gpu_repository, "TRITON_BACKENDS", tmp_path / "no-backends-folder")
    environments = []
    monkeypatch.setattr(server, "start_server", lambda repository, ports, extra, environment: environments.append(
        environment) or "the server process")
    monkeypatch.setattr(server, "run_in_foreground", lambda process, exit_timeout, ready, log, drain: 0)
    return environments


def test_serve_with_mps_runs_the_server_under_a_daemon_of_its_own(tmp_path, monkeypatch, capsys):
    """--serve --mps (the GPU image's `docker run ... --mps`): the server gets the daemon's environment; without
    --serve, or without nvidia-cuda-mps-control, it is refused saying why."""
    import contextlib

    from orpheus_triton import mps

    environments = _serving_stand_ins(tmp_path, monkeypatch)
    monkeypatch.setattr(mps, "mps_daemon", lambda log: contextlib.nullcontext({"CUDA_MPS_PIPE_DIRECTORY": "/p"}))
    argv = ["--models", str(tmp_path), "--engine-dir", str(tmp_path / "engine"), "--out", str(tmp_path / "repo"),
            "--mps"]
    assert gpu_repository.main(argv) == 2 and "--mps is for the server: give --serve too" in capsys.readouterr().err
    assert gpu_repository.main([*argv, "--serve"]) == 0
    [environment] = environments  # the daemon's, and the drain's flag, new to the run (gone after it)
    assert environment["CUDA_MPS_PIPE_DIRECTORY"] == "/p" and not Path(environment[DRAIN_FILE_ENV]).parent.exists()

    def unavailable(log):
        raise mps.MpsUnavailable("no nvidia-cuda-mps-control on PATH")

    monkeypatch.setattr(mps, "mps_daemon", unavailable)
    assert gpu_repository.main([*argv, "--serve"]) == 2
    assert "error: --mps: no nvidia-cuda-mps-control on PATH" in capsys.readouterr().err


def test_serve_needs_the_trtllm_image(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ModelSet, "check", lambda self: None)
    monkeypatch.setattr(gpu_repository.shutil, "which", lambda name: None)
    argv = ["--models", str(tmp_path), "--engine-dir", str(tmp_path / "engine"), "--out", str(tmp_path / "repo"),
            "--serve"]
    assert gpu_repository.main(argv) == 2
    assert "tritonserver is not on PATH" in capsys.readouterr().err


def test_a_stopped_build_cleans_up_and_the_next_removes_what_a_killed_one_left(tmp_path):
    """SIGTERM ends build_trtllm.py through its cleanup (the temporary checkpoint removed, trtllm-build
    killed by subprocess.run on the way out); a build killed outright (SIGKILL skips every cleanup) left
    its checkpoint, several GB, on the engine volume for good: the next build removes it."""
    import signal
    import subprocess
    import time

    script = (
        f"import sys, time; sys.path.insert(0, {str(ROOT / 'build_engines')!r}); import build_trtllm\n"
        "build_trtllm._stop_on_sigterm()\n"
        "try:\n    print('building', flush=True); time.sleep(30)\n"
        f"finally:\n    open({str(tmp_path / 'cleaned')!r}, 'w').write('yes')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "building\n"
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 128 + signal.SIGTERM and (tmp_path / "cleaned").read_text() == "yes"

    engines = tmp_path / "engines"
    for left in (".orpheus-3b.checkpoint-x1y2", ".orpheus-3b.checkpoint-z3"):
        (engines / left / "rank0").mkdir(parents=True)
    (engines / ".other-engine.checkpoint-a1").mkdir()  # another engine's build, maybe running: kept
    (engines / "orpheus-3b").mkdir()
    build_trtllm._remove_stale_checkpoints(engines / "orpheus-3b")
    assert sorted(p.name for p in engines.iterdir()) == [".other-engine.checkpoint-a1", "orpheus-3b"]


@pytest.mark.parametrize("has_llama", [True, False])
def test_a_tensorrt_llm_without_the_engine_workflow_is_named_before_anything_runs(monkeypatch, has_llama):
    """TensorRT-LLM's later releases drop the TensorRT engine workflow (tensorrt_llm.models' classes,
    trtllm-build): an image that has it no more failed mid-conversion with an ImportError."""
    import importlib.machinery
    import types

    package = types.ModuleType("tensorrt_llm")
    package.__spec__ = importlib.machinery.ModuleSpec("tensorrt_llm", None, is_package=True)
    package.__version__ = "9.0.0"
    models = types.ModuleType("tensorrt_llm.models")
    if has_llama:
        models.LLaMAForCausalLM = object
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.models", models)
    monkeypatch.setattr(build_trtllm.shutil, "which", lambda name: f"/usr/local/bin/{name}")
    if has_llama:
        assert build_trtllm.check_toolchain() == "9.0.0"
    else:
        with pytest.raises(build_trtllm.BuildError, match=r"tensorrt_llm 9.0.0 no longer builds TensorRT engines"):
            build_trtllm.check_toolchain()


@pytest.mark.parametrize("world_size,preset", [(1, None), (2, None), (4, "0")])
def test_a_tensor_parallel_engine_is_served_in_orchestrator_mode(tmp_path, monkeypatch, capsys, world_size, preset):
    """One tritonserver is a world of one MPI process: the backend refused an engine built with --tp-size 2.
    In orchestrator mode (TRTLLM_ORCHESTRATOR=1) it spawns a worker per GPU; one the operator set is kept."""
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 64}, "pretrained_config": {
        "mapping": {"world_size": world_size, "tp_size": world_size, "pp_size": 1}}}))
    assert gpu_repository.engine_world_size(engine) == world_size
    assert gpu_repository.engine_world_size(tmp_path / "none") == 1
    if preset is None:
        monkeypatch.delenv("TRTLLM_ORCHESTRATOR", raising=False)
    else:
        monkeypatch.setenv("TRTLLM_ORCHESTRATOR", preset)
    environments = _serving_stand_ins(tmp_path, monkeypatch)
    assert gpu_repository.main(["--models", str(tmp_path), "--engine-dir", str(engine), "--out",
                                str(tmp_path / "repo"), "--serve"]) == 0
    [environment] = environments
    orchestrated = world_size > 1 and preset is None
    assert environment.get("TRTLLM_ORCHESTRATOR") == ("1" if orchestrated else None)
    assert ("spawns a worker per GPU" in capsys.readouterr().err) == orchestrated


def test_quantization_reads_back_whole_calibration_sequences(tmp_path, monkeypatch):
    """TensorRT-LLM encodes the calibration texts again (its tokenizer's BOS in front) and cuts them at
    calib_max_seq_length: at --calibration-length itself every sequence lost its last token."""
    import types

    from orpheus_triton import calibration

    quantized = {}

    class Llama:
        @staticmethod
        def quantize(*args, **kwargs):
            quantized.update(kwargs, calibration=sorted(p.name for p in Path(kwargs["calib_dataset"]).iterdir()))

    fake = {"tensorrt_llm": types.ModuleType("tensorrt_llm"),
            "tensorrt_llm.mapping": types.SimpleNamespace(Mapping=lambda **kwargs: kwargs),
            "tensorrt_llm.models": types.SimpleNamespace(LLaMAForCausalLM=Llama),
            "tensorrt_llm.llmapi": types.SimpleNamespace(QuantAlgo=types.SimpleNamespace(FP8="FP8"),
                                                         QuantConfig=lambda **kwargs: kwargs)}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(calibration, "write_calibration_set", lambda llm_dir, out_dir, **kwargs: (
        Path(out_dir).mkdir(), (Path(out_dir) / calibration.CALIBRATION_FILE).write_text("{}\n")))
    options = build_trtllm.BuildOptions(quantization="fp8", calibration_length=512)
    build_trtllm.quantize_checkpoint(tmp_path / "llm", tmp_path / "checkpoint", options)
    assert quantized["calib_max_seq_length"] == 513 and quantized["calibration"] == [calibration.CALIBRATION_FILE]
    assert not (tmp_path / "checkpoint.calibration").exists()  # removed after
