"""The config.pbtxt templates agree with orpheus_triton.constants and render into loadable configs."""

import re
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orpheus_triton import constants as c
from orpheus_triton.preprocess import OUT_REPETITION_PENALTY, OUT_TEMPERATURE
from orpheus_triton.repository import MODELS, RepositorySettings, render


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, model_config_pb2.ModelConfig]:
    out = render(RepositorySettings(llm_dir="/models/llm", snac_dir="/models/snac"), tmp_path_factory.mktemp("r"))
    parsed = {}
    for model in MODELS:
        text = (out / model / "config.pbtxt").read_text()
        assert "${" not in text
        assert (out / model / "1").is_dir()
        parsed[model] = text_format.Parse(text, model_config_pb2.ModelConfig())
    return parsed


def names(tensors):
    return [t.name for t in tensors]


def test_ensemble_public_contract(configs):
    ensemble = configs[c.ENSEMBLE_MODEL]
    assert ensemble.name == c.ENSEMBLE_MODEL and ensemble.max_batch_size == 0
    assert ensemble.model_transaction_policy.decoupled
    assert names(ensemble.input) == [c.IN_TEXT, c.IN_VOICE, c.IN_MAX_TOKENS, c.IN_TEMPERATURE, c.IN_TOP_P,
                                     c.IN_REPETITION_PENALTY, c.IN_SEED]
    assert [i.name for i in ensemble.input if not i.optional] == [c.IN_TEXT]
    types = {i.name: model_config_pb2.DataType.Name(i.data_type) for i in ensemble.input}
    assert types == {c.IN_TEXT: "TYPE_STRING", c.IN_VOICE: "TYPE_STRING", c.IN_MAX_TOKENS: "TYPE_INT32",
                     c.IN_TEMPERATURE: "TYPE_FP32", c.IN_TOP_P: "TYPE_FP32", c.IN_REPETITION_PENALTY: "TYPE_FP32",
                     c.IN_SEED: "TYPE_UINT64"}
    audio, finish_reason = ensemble.output
    assert (audio.name, list(audio.dims), audio.data_type) == (c.OUT_AUDIO, [-1], model_config_pb2.TYPE_INT16)
    assert (finish_reason.name, list(finish_reason.dims), finish_reason.data_type) == (
        c.OUT_FINISH_REASON, [1], model_config_pb2.TYPE_STRING)
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        c.PREPROCESSING_MODEL, c.LLM_MODEL, c.DECODER_MODEL]


def test_every_mapped_tensor_exists_with_the_constant_names(configs):
    for step in configs[c.ENSEMBLE_MODEL].ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) <= set(names(model.input)), step.model_name
        assert set(step.output_map) <= set(names(model.output)), step.model_name
    llm = configs[c.LLM_MODEL]
    assert {c.LLM_INPUT_IDS, c.LLM_INPUT_LENGTHS, c.LLM_REQUEST_OUTPUT_LEN, c.LLM_END_ID, c.LLM_PAD_ID,
            c.LLM_STREAMING, c.LLM_TEMPERATURE, c.LLM_TOP_P, c.LLM_TOP_K, c.LLM_REPETITION_PENALTY, c.LLM_SEED,
            c.LLM_AUDIO_GUARD, c.LLM_STOP, c.REQUEST_START} == set(names(llm.input))
    assert names(llm.output) == [c.LLM_OUTPUT_IDS, c.LLM_SEQUENCE_LENGTH, c.REQUEST_START, c.LLM_FINISH_REASON]
    assert llm.model_transaction_policy.decoupled
    decoder = configs[c.DECODER_MODEL]
    assert names(decoder.input) == [c.DECODER_TOKENS, c.REQUEST_START, c.DECODER_STOP, c.DECODER_FINISH_REASON]
    assert names(decoder.output) == [c.DECODER_AUDIO, c.DECODER_FINISH_REASON]
    assert c.REQUEST_START in names(configs[c.PREPROCESSING_MODEL].output)
    assert decoder.model_transaction_policy.decoupled and decoder.HasField("dynamic_batching")
    pre_outputs = set(names(configs[c.PREPROCESSING_MODEL].output))
    assert {OUT_TEMPERATURE, OUT_REPETITION_PENALTY} <= pre_outputs


def test_unknown_placeholder_is_named(tmp_path):
    templates = tmp_path / "templates"
    for model in MODELS:
        (templates / model).mkdir(parents=True)
        (templates / model / "config.pbtxt").write_text('name: "x"')
    (templates / c.LLM_MODEL / "config.pbtxt").write_text('name: "${no_such_setting}"')
    with pytest.raises(ValueError, match="no_such_setting"):
        render(RepositorySettings(llm_dir="a", snac_dir="b"), tmp_path / "out", templates=Path(templates))


def test_llm_responses_larger_than_a_decoder_request_are_refused_at_render(tmp_path):
    from orpheus_triton.decode_rounds import MAX_REQUEST_FRAMES

    settings = RepositorySettings(llm_dir="a", snac_dir="b", tokens_per_response=MAX_REQUEST_FRAMES * 7 + 1)
    with pytest.raises(ValueError, match="tokens_per_response 225 must be from 1 to 224"):
        render(settings, tmp_path / "r")


def test_render_replaces_only_a_model_repository(tmp_path):
    """A mistyped output folder (a model set, a home folder) must not be deleted to make room."""
    settings = RepositorySettings(llm_dir="a", snac_dir="b")
    render(settings, tmp_path / "r")
    render(settings, tmp_path / "r")  # rendered before: replaced
    (tmp_path / "r" / "notes.txt").write_text("kept")
    render(settings, tmp_path / "r")  # still marked as rendered
    assert not (tmp_path / "r" / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert render(settings, empty) == empty
    precious = tmp_path / "models"
    (precious / "llm").mkdir(parents=True)
    (precious / "llm" / "model.safetensors").write_text("weights")
    (precious / "README").write_text("kept")
    with pytest.raises(ValueError, match=r"holds files that are not a model repository's \(README, llm\)"):
        render(settings, precious)
    assert (precious / "llm" / "model.safetensors").read_text() == "weights"
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        render(settings, tmp_path / "file")
    older = tmp_path / "older"  # a repository rendered before the mark: every entry a model folder
    for model in MODELS:
        (older / model).mkdir(parents=True)
        (older / model / "config.pbtxt").write_text("")
    render(settings, older)


def test_decoder_exactness_renders_as_a_model_parameter(configs, tmp_path):
    assert configs[c.DECODER_MODEL].parameters["exact"].string_value == "false"
    for model in (c.DECODER_MODEL, c.LLM_MODEL):
        assert configs[model].parameters["cpu_threads"].string_value == "auto"
    out = render(RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac", decoder_exact=True), tmp_path / "r")
    exact = text_format.Parse((out / c.DECODER_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert exact.parameters["exact"].string_value == "true"


def test_serve_options_reach_the_rendered_repository(tmp_path, monkeypatch):
    from orpheus_triton.cli import _render, build_parser
    from orpheus_triton.demo_models import ModelSet

    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path))
    models = ModelSet(tmp_path / "models")
    for flags, exact in (([], "false"), (["--decoder-exact", "--decoder-cpu-threads", "2", "--no-graph-sampling",
                                          "--no-overlap", "--prefill-tokens", "512", "--no-lead-in", "--no-lead-out",
                                          "--max-queue-seconds", "2.5", "--max-queue", "32",
                                          "--cancel-check-seconds", "0.25", "--response-threads", "3",
                                          "--voices", "pierre,amelie", "--default-voice", "amelie"],
                                         "true")):
        args = build_parser().parse_args(["serve", *(["--max-streams", "3"] if flags else []), *flags])
        repository = _render(args, models)
        decoder = text_format.Parse((repository / c.DECODER_MODEL / "config.pbtxt").read_text(),
                                    model_config_pb2.ModelConfig())
        llm = text_format.Parse((repository / c.LLM_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert decoder.parameters["exact"].string_value == exact
        assert decoder.parameters["lead_in"].string_value == ("false" if flags else "true")
        assert decoder.parameters["lead_out"].string_value == ("false" if flags else "true")
        assert decoder.parameters["cpu_threads"].string_value == ("2" if flags else "auto")
        assert llm.parameters["cpu_threads"].string_value == "auto"
        assert llm.parameters["max_streams"].string_value == ("3" if flags else "0")  # 0: by device
        assert llm.parameters["graph_sampling"].string_value == ("false" if flags else "true")  # on by default
        assert llm.parameters["overlap"].string_value == ("false" if flags else "auto")  # auto: on a GPU
        assert llm.parameters["prefill_chunk"].string_value == ("512" if flags else "0")  # 0: by device
        assert llm.parameters["max_queue_seconds"].string_value == ("2.5" if flags else "0.0")  # 0: no limit
        assert llm.parameters["max_queue"].string_value == ("32" if flags else "256")
        assert llm.parameters["cancel_check_seconds"].string_value == ("0.25" if flags else str(c.CANCEL_CHECK_SECONDS))
        for model in (llm, decoder):
            assert model.parameters["response_thread"].string_value == ("3" if flags else "auto")
        preprocessing = text_format.Parse((repository / c.PREPROCESSING_MODEL / "config.pbtxt").read_text(),
                                          model_config_pb2.ModelConfig())
        assert preprocessing.parameters["voices"].string_value == ("pierre,amelie" if flags else ",".join(c.VOICES))
        assert preprocessing.parameters["default_voice"].string_value == ("amelie" if flags else "")
    overlapped = _render(build_parser().parse_args(["serve", "--overlap"]), models)  # on a CPU too, when asked
    llm = text_format.Parse((overlapped / c.LLM_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert llm.parameters["overlap"].string_value == "true"


def test_the_newcomer_round_renders_as_a_decoder_parameter(tmp_path):
    from dataclasses import replace

    from orpheus_triton.repository import RepositorySettings, render

    settings = RepositorySettings(llm_dir="-", snac_dir="-")
    off = replace(settings, decoder_newcomer_horizon=0)
    for value, want in ((settings, str(c.NEWCOMER_ROUND_HORIZON)), (off, "0")):
        repository = render(value, tmp_path / want)
        decoder = text_format.Parse((repository / c.DECODER_MODEL / "config.pbtxt").read_text(),
                                    model_config_pb2.ModelConfig())
        assert decoder.parameters["newcomer_horizon"].string_value == want


def test_a_bad_voice_list_is_refused_before_serving(tmp_path, monkeypatch, capsys):
    from orpheus_triton.cli import main

    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr("orpheus_triton.cli._model_set", lambda models: None)  # no model set needed to get here
    assert main(["serve", "--voices", "pierre,amelie", "--default-voice", "tara"]) != 0
    assert "default voice 'tara' is not one of the voices: pierre, amelie" in capsys.readouterr().err


def test_bad_thread_counts_are_refused_before_serving(capsys):
    from orpheus_triton.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--llm-cpu-threads", "0"])
    assert "expected 'auto' or a whole number >= 1, got '0'" in capsys.readouterr().err
    for bad in ("0", "-5", "many"):
        for option in ("--prefill-tokens", "--max-streams", "--max-seq-len"):
            with pytest.raises(SystemExit):
                build_parser().parse_args(["serve", option, bad])
            assert f"expected a whole number >= 1, got '{bad}'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            build_parser().parse_args(["say", "hi", "--max-tokens", bad])
        assert (f"max_tokens must be in [7, 8192] (7 tokens: one SNAC frame, the least that gives audio), got {bad}"
                if bad != "many" else "expected a whole number, got 'many'") in capsys.readouterr().err
    for bad in ("0", "65536", "-1", "http"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--grpc-port", bad])
        assert f"expected a port from 1 to 65535, got '{bad}'" in capsys.readouterr().err
    for bad in ("-1", str(2**64), "random"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["say", "hi", "--seed", bad])
        assert f"expected a whole number from 0 to {2**64 - 1}, got '{bad}'" in capsys.readouterr().err
    assert build_parser().parse_args(["say", "hi", "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    for bad in ("http://localhost:8001", "HTTPS://host:8001", "localhost"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["say", "hi", "--url", bad])
        assert f"expected the gRPC endpoint as HOST:PORT, e.g. localhost:8001 (no http://: the server's gRPC port, " \
               f"not its HTTP one), got '{bad}'" in capsys.readouterr().err
    assert build_parser().parse_args(["say", "hi", "--url", "unix:///tmp/triton.sock"]).url == "unix:///tmp/triton.sock"
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--max-queue-seconds", bad])
        assert f"expected seconds >= 0, got '{bad}'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--cancel-check-seconds", bad])
        assert f"expected seconds >= 0, got '{bad}'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--response-threads", bad])
        assert f"expected auto or a number of threads from 0 to 16, got '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--response-threads", "17"])


def test_say_refuses_an_output_it_cannot_write_before_asking_the_server(tmp_path, capsys):
    from orpheus_triton.cli import main

    for output, message in ((tmp_path / "missing" / "x.wav", f"the folder {tmp_path / 'missing'} does not exist"),
                            (tmp_path, f"-o {tmp_path} is a folder; give a file name, e.g. -o {tmp_path / 'out.wav'}")):
        with pytest.raises(SystemExit, match=message):  # not "no ready Triton server at localhost:1"
            main(["say", "hi", "-o", str(output), "--url", "localhost:1"])


def test_demo_refuses_what_would_fail_its_request_before_starting_a_server(tmp_path, capsys, monkeypatch):
    from orpheus_triton import cli

    def no_models(_):
        raise AssertionError("a model set was prepared before the check")

    monkeypatch.setattr(cli, "_model_set", no_models)
    assert cli.main(["demo", "  ", "-o", str(tmp_path / "x.wav")]) == 2
    assert "error: text is empty; send the words to speak" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the folder .* does not exist"):
        cli.main(["demo", "Hello", "-o", str(tmp_path / "missing" / "x.wav")])


def test_unusable_device_and_taken_port_are_refused_before_any_model_loads(capsys, monkeypatch):
    import socket

    import torch

    from orpheus_triton import cli
    from orpheus_triton.server import free_port

    def no_models(_):
        raise AssertionError("a model set was prepared before the check")

    monkeypatch.setattr(cli, "_model_set", no_models)
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    assert cli.main(["serve", "--device", "tpu", *ports]) == 2
    assert "--device 'tpu': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["serve", "--device", "cuda:0", *ports]) == 2
        assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--metrics-port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"metrics port {port} is not free" in error and "pick another with --metrics-port" in error
    same = str(free_port())
    assert cli.main(["serve", "--grpc-port", same, "--http-port", str(free_port()), "--metrics-port", same]) == 2
    assert f"--grpc-port and --metrics-port are both {same}: each endpoint needs a port of its own" in \
        capsys.readouterr().err


def test_render_with_relay_puts_the_relay_in_front_of_the_torch_engine(configs, tmp_path):
    from orpheus_triton.repository import RelaySettings, render_with_relay

    settings = RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac")
    out = render_with_relay(settings, tmp_path / "r", RelaySettings(engine_seed_input="seed"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*MODELS, c.ENGINE_MODEL])

    def parse(model):
        return text_format.Parse((out / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    relay, engine = parse(c.LLM_MODEL), parse(c.ENGINE_MODEL)
    assert engine.name == c.ENGINE_MODEL and engine.backend == relay.backend == "python"
    assert engine.parameters["tokens_per_response"].string_value == "1"  # token by token, as TensorRT-LLM
    assert relay.parameters["tokens_per_response"].string_value == str(c.TOKENS_PER_FRAME)
    assert relay.parameters["engine_model"].string_value == c.ENGINE_MODEL
    assert relay.parameters["engine_seed_input"].string_value == "seed"
    assert relay.parameters["cancel_check_seconds"].string_value == str(settings.llm_cancel_check_seconds)
    assert list(relay.input) == list(configs[c.LLM_MODEL].input)
    assert list(relay.output) == list(configs[c.LLM_MODEL].output)
    assert (out / c.LLM_MODEL / "1" / "model.py").read_text().find("RelayStreams") > 0


def test_raw_pcm_is_not_written_to_a_terminal(monkeypatch, capsys):
    import sys

    from orpheus_triton.cli import main

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with pytest.raises(SystemExit) as stopped:
        main(["say", "hello", "-o", "-", "--url", "localhost:1"])
    assert "a terminal cannot show" in str(stopped.value)


def test_say_names_a_stream_that_timed_out_as_such(monkeypatch, capsys, tmp_path):
    """TimeoutError is an OSError: `say` reported a stream's timeout as the output failing to be written."""
    from orpheus_triton import cli

    def stalls(*args, **kwargs):
        raise TimeoutError("the stream did not end within its 600 s timeout")

    monkeypatch.setattr(cli, "_synthesize", stalls)
    assert cli.main(["say", "hello", "-o", str(tmp_path / "out.wav"), "--url", "localhost:1"]) == 1
    err = capsys.readouterr().err
    assert "error: the stream did not end within its 600 s timeout" in err and "writing" not in err


def test_a_wheel_carries_every_template(tmp_path):
    """`pip install .` (not editable) or a wheel: the package carries model_repository/ itself and
    renders from it the same repositories as a checkout does."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("orpheus_triton-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = (
        "import sys; from pathlib import Path; import orpheus_triton\n"
        "from orpheus_triton.repository import RelaySettings, RepositorySettings, render, render_with_relay\n"
        "assert Path(orpheus_triton.__file__).is_relative_to(sys.argv[1]), orpheus_triton.__file__\n"
        "settings = RepositorySettings(llm_dir='/m/llm', snac_dir='/m/snac')\n"
        "render(settings, Path(sys.argv[2]) / 'plain')\n"
        "render_with_relay(settings, Path(sys.argv[2]) / 'relay', RelaySettings())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), str(tmp_path / "wheel")], check=True,
                   env=env, cwd=tmp_path)
    settings = RepositorySettings(llm_dir="/m/llm", snac_dir="/m/snac")
    from orpheus_triton.repository import RelaySettings, render_with_relay

    render(settings, tmp_path / "checkout" / "plain")
    render_with_relay(settings, tmp_path / "checkout" / "relay", RelaySettings())

    def files(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}

    for kind in ("plain", "relay"):
        from_wheel, from_checkout = files(tmp_path / "wheel" / kind), files(tmp_path / "checkout" / kind)
        assert from_wheel == from_checkout and any(name.endswith("model.py") for name in from_wheel)
        models = {p.parent.name for p in (tmp_path / "checkout" / kind).glob("*/config.pbtxt")}
        assert {p.parent.name for p in (tmp_path / "wheel" / kind).glob("*/1") if p.is_dir()} == models


def test_help_says_every_options_default(capsys):
    """Ports, the say's endpoint and the sampling options showed no default in --help; the benchmarks'
    options without help text showed nothing at all."""
    import argparse

    from orpheus_triton.arguments import DefaultsHelpFormatter
    from orpheus_triton.cli import build_parser

    def help_of(*command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    serve = help_of("serve")
    assert all(f"(default {port})" in serve for port in (c.DEFAULT_GRPC_PORT, c.DEFAULT_HTTP_PORT,
                                                          c.DEFAULT_METRICS_PORT))
    assert "--llm-cpu-threads auto|N" in serve
    say = help_of("say")
    assert f"(default {c.DEFAULT_GRPC_URL}, serve's --grpc-port)" in say
    for default in (c.DEFAULT_TEMPERATURE, c.DEFAULT_TOP_P, c.DEFAULT_REPETITION_PENALTY):
        assert f"server default {default:g})" in say
    assert "(default 0)" in say and f"(default {c.DEFAULT_MAX_TOKENS}," in say

    parser = argparse.ArgumentParser(prog="bench", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--levels", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="runs")
    parser.add_argument("--seconds", default=5, help="how long (default: as long as it takes)")
    parser.add_argument("--out", help="where")
    parser.add_argument("--quick", action="store_true", help="fewer")
    text = " ".join(parser.format_help().split())
    assert "--levels LEVELS (default: 1,2)" in text and "runs (default: 3)" in text
    assert "how long (default: as long as it takes) " in text and "where --quick fewer" in text


@pytest.mark.parametrize("url", ["localhost:99999", "localhost:0", ":8001", "localhost:80x"])
def test_an_endpoint_without_a_usable_port_is_refused_as_it_is_parsed(url, capsys):
    from orpheus_triton.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["say", "hi", "--url", url])
    assert f"expected HOST:PORT with a port from 1 to 65535, e.g. {c.DEFAULT_GRPC_URL}, got {url!r}" \
        in capsys.readouterr().err


def test_grpc_targets_of_every_form_pass_and_an_unbracketed_ipv6_address_is_refused():
    """gRPC's scheme forms (dns:, ipv4:, ipv6:, vsock:) were read as HOST:PORT: refused as unbracketed IPv6
    addresses, or probed as hosts named "dns:localhost"."""
    from orpheus_triton.arguments import check_grpc_url, grpc_host_port

    for target in ("localhost:8001", "[::1]:8001", "[fe80::1%eth0]:8001", "my-host.example:8001", "unix:/tmp/s",
                   "dns:///localhost:8001", "dns:localhost:8001", "ipv4:127.0.0.1:8001", "ipv6:[::1]:8001"):
        assert check_grpc_url(target) == target
    assert grpc_host_port("ipv4:127.0.0.1:8001") is None and grpc_host_port("[::1]:8001") == ("[::1]", "8001")
    for target in ("::1:8001", "fe80::1%eth0:8001"):
        with pytest.raises(ValueError, match=r"an IPv6 address goes in brackets before its port, e\.g\. \[::1\]:8001"):
            check_grpc_url(target)


@pytest.mark.parametrize("name", ["speech.mp3", "speech.OGG", "speech.flac"])
def test_say_refuses_to_write_a_wav_under_a_compressed_formats_name(name, tmp_path):
    from orpheus_triton.cli import main

    with pytest.raises(SystemExit, match=f"-o {tmp_path / name}: the output is a WAV file .* name it "
                                         f"{tmp_path / 'speech.wav'} and convert it"):
        main(["say", "hi", "-o", str(tmp_path / name), "--url", "localhost:1"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_max_seq_len_too_short_for_any_request_is_refused_before_the_models_load(command, model_set, capsys,
                                                                                  monkeypatch):
    """The server started and then refused every request, naming the text as the problem."""
    from orpheus_triton import cli
    from orpheus_triton.preprocess import check_max_seq_len
    from orpheus_triton.prompt import ENGLISH_VOICES, load_tokenizer
    from orpheus_triton.server import free_port

    def no_render(*_):
        raise AssertionError("the repository was rendered before the check")

    monkeypatch.setattr(cli, "_model_set", lambda _: model_set)
    monkeypatch.setattr(cli, "_render", no_render)
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    assert cli.main([command, "--max-seq-len", "10", *(ports if command == "serve" else [])]) == 2
    error = capsys.readouterr().err
    assert "error: --max-seq-len 10: max_seq_len 10 (prompt + audio tokens per stream) is too short for any " \
           "request: a one-word prompt takes" in error
    shortest = int(re.search(r"(\d+) at the least", error).group(1))
    tokenizer = load_tokenizer(model_set.llm)
    check_max_seq_len(tokenizer, ENGLISH_VOICES, shortest)  # the least it names is enough
    with pytest.raises(ValueError, match="too short for any request"):
        check_max_seq_len(tokenizer, ENGLISH_VOICES, shortest - 1)


def test_serve_says_once_when_the_server_is_ready(capsys):
    from orpheus_triton.cli import _announcing_ready
    from orpheus_triton.server import Ports

    answers = iter([False, True, True])
    ready = _announcing_ready(Ports(8101, 8100, 8102), lambda port: next(answers))
    assert [ready(), ready(), ready()] == [False, True, True]
    lines = [line for line in capsys.readouterr().err.splitlines() if "ready" in line]
    assert lines == ['[orpheus-triton] ready: every model loaded; gRPC on :8101 (try `orpheus-triton say "Hello" '
                     '--url localhost:8101`), HTTP on :8100, metrics on http://localhost:8102/metrics']


def test_a_refusal_to_retry_raises_server_unavailable_and_say_exits_75(monkeypatch, capsys, tmp_path):
    """`server busy` and `server shutting down` are the server's 'not now': a voice agent retries them on
    another server, and catches them without reading messages; `say` exits EX_TEMPFAIL for them."""
    from orpheus_triton import cli
    from orpheus_triton.client import ServerUnavailable, SynthesisError, _stream_failure

    for message in (f"in ensemble 'orpheus', orpheus llm: {c.SERVER_BUSY}: 256 requests already queued",
                    f"in ensemble 'orpheus', orpheus: {c.SERVER_SHUTTING_DOWN}: it takes no new streams"):
        assert type(_stream_failure("u", message, unavailable=False, first=True)) is ServerUnavailable
    for message in ("orpheus: unknown voice 'bob'", f"in ensemble 'orpheus', orpheus: unknown voice "
                                                    f"'{c.SERVER_BUSY}'; choose one of: tara"):
        assert type(_stream_failure("u", message, unavailable=False, first=True)) is SynthesisError

    def busy(*args, **kwargs):
        raise ServerUnavailable(f"orpheus llm: {c.SERVER_BUSY}: 256 requests already queued")

    monkeypatch.setattr(cli, "_synthesize", busy)
    assert cli.main(["say", "hello", "-o", str(tmp_path / "out.wav")]) == cli.RETRY_LATER_STATUS == 75
    assert f"error: orpheus llm: {c.SERVER_BUSY}" in capsys.readouterr().err


def test_run_folders_of_processes_that_are_gone_are_removed(tmp_path):
    """A launcher killed outright (SIGKILL, the out-of-memory killer) never removes its rendered repository:
    a cache kept across containers filled with them. A folder whose lock no live process holds goes."""
    import subprocess
    import sys

    from orpheus_triton.repository import release_run_folder, run_folder

    # A process that makes its folder and is killed outright.
    code = ("import sys, time, pathlib; from orpheus_triton.repository import run_folder; "
            "print(run_folder(pathlib.Path(sys.argv[1])), flush=True); time.sleep(60)")
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    gone = Path(killed.stdout.readline().strip())
    live = run_folder(tmp_path)  # this process's: held
    (live / "config.pbtxt").write_text("kept")
    assert gone.is_dir() and gone.with_suffix(".lock").is_file()
    killed.kill()
    killed.wait()
    another = run_folder(tmp_path)
    assert not gone.exists() and not gone.with_suffix(".lock").exists()  # its process is gone
    assert (live / "config.pbtxt").read_text() == "kept" and another.is_dir() and another != live
    # A lock file is locked before it takes its name: one being made (under .pending-) is left alone, one
    # whose launcher died making it goes once it is a minute old.
    import os

    making, abandoned = tmp_path / ".pending-repository-a.lock", tmp_path / ".pending-repository-b.lock"
    making.touch()
    abandoned.touch()
    os.utime(abandoned, (time.time() - 120, time.time() - 120))
    third = run_folder(tmp_path)
    assert making.exists() and not abandoned.exists()
    making.unlink()
    for folder in (live, another, third):
        release_run_folder(folder)
    assert list(tmp_path.iterdir()) == []
