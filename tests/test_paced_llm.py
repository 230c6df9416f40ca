"""perf/paced_llm and perf/silent_snac: the llm stage's engine and the decoder's SNAC stood in for by ones
without a model, served through the real ensemble (the adapters and Triton as they are)."""

import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

from common import use_paced_llm, use_silent_snac  # noqa: E402 (perf/ is not a package)

from orpheus_triton import constants as c  # noqa: E402
from orpheus_triton.client import OrpheusClient  # noqa: E402


def test_the_paced_stand_in_serves_streams_at_its_pace_through_the_ensemble(model_set, tmp_path):
    from conftest import running_server, server_metric, server_settings, settled_server_metric

    from orpheus_triton.repository import render

    repository = render(server_settings(model_set), tmp_path / "repository")
    use_paced_llm(repository, 200.0)
    assert 'key: "paced_tokens_per_second", value: { string_value: "200.0" }' in (
        repository / c.LLM_MODEL / "config.pbtxt").read_text()
    with running_server(repository, tmp_path) as server:
        client = OrpheusClient(f"localhost:{server.ports.grpc}")
        started = time.perf_counter()
        results = [client.synthesize("paced", max_tokens=35, seed=seed) for seed in (1, 2)]
        took = time.perf_counter() - started
        # 35 tokens each at 200 a second: at least 0.175 s a stream, one after the other.
        assert took >= 2 * 35 / 200
        for result in results:
            # Five frames of audio tokens in the guard's slot layout: the decoder made a chunk of every one.
            assert result.audio.size == 5 * c.SAMPLES_PER_FRAME and np.abs(result.audio).max() > 0
            # First audio needs the lead-in frame's 21 tokens: 0.105 s at this pace.
            assert result.chunks[0].arrived >= c.LEAD_IN_TOKENS / 200
        assert settled_server_metric(server, "orpheus_llm_generated_tokens_total") == 70
        assert server_metric(server, "orpheus_llm_capped_requests_total") == 2


def test_the_silent_stand_in_answers_every_window_with_a_frame_of_silence(model_set, tmp_path):
    from conftest import running_server, server_settings, settled_server_metric

    from orpheus_triton.repository import render

    repository = render(server_settings(model_set), tmp_path / "repository")
    use_paced_llm(repository, 400.0)
    use_silent_snac(repository)
    model = (repository / c.DECODER_MODEL / "1" / "model.py").read_text()
    assert model.rstrip().endswith("load_window_decoder = load_silent_decoder\nwarm_up = warm_up_silent")
    with running_server(repository, tmp_path) as server:
        result = OrpheusClient(f"localhost:{server.ports.grpc}").synthesize("silent", max_tokens=35, seed=3)
        # The five frames of audio the paced tokens make with SNAC, every chunk whole frames, all silence.
        assert result.audio.size == 5 * c.SAMPLES_PER_FRAME and not result.audio.any()
        assert all(chunk.audio.size % c.SAMPLES_PER_FRAME == 0 for chunk in result.chunks)
        # The adapter in front of it ran as it does with SNAC: its rounds are counted.
        assert settled_server_metric(server, "orpheus_decoder_windows_total") == 5


def test_run_all_takes_the_paced_stand_in_only_without_the_comparisons(capsys):
    import pytest
    import run_all

    for argv in (["--paced-llm", "100"], ["--paced-llm", "-1", "--skip-comparisons"]):
        with pytest.raises(SystemExit):
            run_all.main(argv)
        assert "--paced-llm: want tokens a second > 0 (0: off), with --skip-comparisons" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_all.main(["--silent-snac"])
    assert "--silent-snac: only with --skip-comparisons" in capsys.readouterr().err


FAULTY_FIRST_ROUND = '''
class _FaultyFirstRound(SilentDecoder):
    """The silent decoder, but its first round's audio is malformed: no arrays at all."""

    rounds = 0

    def decode(self, windows):
        type(self).rounds += 1
        return [None] * len(windows) if self.rounds == 1 else super().decode(windows)


load_window_decoder = lambda *args, **kwargs: _FaultyFirstRound()  # noqa: E731
'''


@contextlib.contextmanager
def served_with_fault(model_set, tmp_path, model: str, fault: str):
    """The pipeline with both models stood in for and ``fault`` appended to ``model``'s model.py, served;
    yields a client of it."""
    from conftest import running_server, server_settings

    from orpheus_triton.repository import render

    repository = render(server_settings(model_set), tmp_path / "repository")
    use_paced_llm(repository, 400.0)
    use_silent_snac(repository)
    with open(repository / model / "1" / "model.py", "a") as source:
        source.write(fault)
    # A failed ensemble request stays counted in flight in tritonserver 2.51: its stop waits the exit timeout.
    with running_server(repository, tmp_path, extra=["--exit-timeout-secs=2"]) as server:
        yield OrpheusClient(f"localhost:{server.ports.grpc}")


def test_a_malformed_decoder_round_fails_its_streams_and_the_decoder_goes_on(model_set, tmp_path):
    """Whatever a round's SNAC call returns, its streams hear an error and the next round decodes: the
    decoder's worker outlives a bad round (its thread gone, every later stream would wait forever)."""
    from orpheus_triton.client import SynthesisError

    with served_with_fault(model_set, tmp_path, c.DECODER_MODEL, FAULTY_FIRST_ROUND) as client:
        with pytest.raises(SynthesisError, match="orpheus decoder"):
            client.synthesize("first", max_tokens=35, seed=3, timeout=30)
        result = client.synthesize("second", max_tokens=35, seed=3, timeout=30)
        assert result.audio.size == 5 * c.SAMPLES_PER_FRAME


FAULTY_PREPROCESSING = '''
_llm_inputs = llm_inputs


def llm_inputs(tokenizer, options, *args):  # a fault for one text, the real thing for the others
    if options.text == "boom":
        raise RuntimeError("a fault in preprocessing")
    return _llm_inputs(tokenizer, options, *args)
'''


def test_a_preprocessing_fault_fails_its_request_alone(model_set, tmp_path):
    from orpheus_triton.client import SynthesisError

    with served_with_fault(model_set, tmp_path, c.PREPROCESSING_MODEL, FAULTY_PREPROCESSING) as client:
        with pytest.raises(SynthesisError, match=r"orpheus preprocessing: internal error \(a fault in preprocessing\)"):
            client.synthesize("boom", max_tokens=35, seed=3, timeout=30)
        assert client.synthesize("fine", max_tokens=35, seed=3, timeout=30).audio.size == 5 * c.SAMPLES_PER_FRAME


def test_the_paced_stand_in_takes_a_gpu_engines_default_streams_where_the_config_leaves_them_to_the_device():
    """A rendered max_streams of "0" (by device) gave the stand-in no slot: every request waited for good."""
    sys.path.insert(0, str(ROOT / "perf" / "paced_llm"))
    from paced_engine import build_paced_engine  # noqa: PLC0415 (perf/paced_llm is the model's folder)

    from orpheus_triton.engine import MAX_STREAMS_BY_DEVICE

    params = {"paced_tokens_per_second": "100", "max_streams": "0"}
    assert build_paced_engine(params).max_streams == MAX_STREAMS_BY_DEVICE["cuda"]
    assert build_paced_engine({**params, "max_streams": "3"}).max_streams == 3
