"""The batched, seeded SNAC decoder against the upstream Orpheus streaming decoder."""

import numpy as np
import pytest
from snac import SNAC

from orpheus_triton.constants import END_OF_SPEECH, SAMPLES_PER_FRAME
from orpheus_triton.frames import StreamFramer, audio_token_id
from orpheus_triton.snac_codec import load_snac, load_window_decoder

from reference_decoder import convert_to_audio, reference_decode


@pytest.fixture(scope="module")
def decoder(model_set):
    """The exact decoder: whole windows, dense convolutions row by row."""
    return load_window_decoder(model_set.snac, exact=True)


@pytest.fixture(scope="module")
def serving_decoder(model_set):
    """The default decoder: kept samples only, dense convolutions batched."""
    return load_window_decoder(model_set.snac)


@pytest.fixture(scope="module")
def upstream(model_set):
    return SNAC.from_pretrained(str(model_set.snac)).eval()  # upstream loader, local directory


def token_stream(seed, frames, allow_zero=False):
    codes = np.random.default_rng(seed).integers(0 if allow_zero else 1, 4096, frames * 7).tolist()
    return [audio_token_id(code, i) for i, code in enumerate(codes)] + [END_OF_SPEECH]


def serve_decode(decoder, tokens, lead_in=False):
    """A stream's audio chunks; without the lead-in frame unless asked: upstream's windows."""
    return decoder.decode(StreamFramer(lead_in=lead_in).push(tokens))


def test_matches_upstream_sample_for_sample(decoder, upstream):
    tokens = token_stream(1, frames=9)
    ours = serve_decode(decoder, tokens)
    theirs = reference_decode(upstream, tokens)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == np.int16 and a.shape == (SAMPLES_PER_FRAME,)
        np.testing.assert_array_equal(a, b)


def test_lead_in_and_lead_out_frames_are_upstreams_decode_of_their_windows(decoder, upstream):
    """With the lead-in and lead-out frames a stream gains one chunk in front, frame 0's audio, and two at
    the end, its last two frames': upstream's decode of those windows; every chunk between is upstream's."""
    tokens = token_stream(4, frames=6)
    framer = StreamFramer()
    windows = framer.push(tokens)
    windows += framer.finish()
    ours = decoder.decode(windows)
    theirs = reference_decode(upstream, tokens)
    assert len(ours) == len(theirs) + 3 == 6  # every frame of the stream
    for index in (0, -2, -1):
        window = windows[index]
        np.testing.assert_array_equal(ours[index], convert_to_audio(upstream, list(window.codes), window.frame_index))
    for a, b in zip(ours[1:-2], theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batched_across_streams_equals_each_stream_alone(decoder):
    streams = [token_stream(seed, frames=6) for seed in range(5)]
    framers = [StreamFramer() for _ in streams]
    windows = [f.push(t) for f, t in zip(framers, streams, strict=True)]
    # Interleave all windows of all streams into one batched call.
    batch = [w for group in zip(*windows, strict=True) for w in group]
    audio = decoder.decode(batch)
    for index, tokens in enumerate(streams):
        alone = serve_decode(decoder, tokens, lead_in=True)
        together = audio[index :: len(streams)]
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_array_equal(a, b)


def test_serving_decoder_is_within_one_int16_step_of_upstream(serving_decoder, upstream):
    tokens = token_stream(3, frames=12)
    ours = np.concatenate(serve_decode(serving_decoder, tokens)).astype(np.int32)
    theirs = np.concatenate(reference_decode(upstream, tokens)).astype(np.int32)
    assert ours.shape == theirs.shape == (9 * SAMPLES_PER_FRAME,)
    difference = np.abs(ours - theirs)
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


def test_serving_decoder_batched_is_within_one_step_of_alone(serving_decoder):
    streams = [token_stream(seed, frames=6) for seed in range(10, 14)]
    windows = [StreamFramer().push(t) for t in streams]
    audio = serving_decoder.decode([w for group in zip(*windows, strict=True) for w in group])
    for index, tokens in enumerate(streams):
        alone = np.concatenate(serve_decode(serving_decoder, tokens, lead_in=True)).astype(np.int32)
        together = np.concatenate(audio[index :: len(streams)]).astype(np.int32)
        assert np.abs(alone - together).max() <= 1


def test_unknown_decode_mode_and_noise_source_are_refused(model_set):
    from orpheus_triton.snac_codec import WindowDecoder

    with pytest.raises(ValueError, match="unknown SNAC decode mode 'fast'"):
        WindowDecoder(load_snac(model_set.snac), mode="fast")
    with pytest.raises(ValueError, match="unknown SNAC noise source 'global'"):
        WindowDecoder(load_snac(model_set.snac), noise="global")


def test_counter_noise_is_batch_independent_and_standard_normal():
    import torch

    from orpheus_triton.counter_noise import gaussian

    seeds = torch.tensor([7, 2**62 + 5, 123456789])
    batch = gaussian(seeds, counter=3, length=200_000)
    assert batch.shape == (3, 1, 200_000) and batch.dtype == torch.float32
    assert torch.equal(gaussian(seeds[1:2], counter=3, length=200_000)[0], batch[1])  # alone = in a batch
    assert torch.equal(gaussian(seeds, counter=3, length=100)[..., :100], batch[..., :100])  # prefix-stable
    for row in batch[:, 0].double():
        assert abs(row.mean()) < 0.01 and abs(row.std() - 1) < 0.01
        assert abs((row**4).mean() - 3) < 0.1  # Gaussian tails, not a uniform's
    other_block = gaussian(seeds, counter=4, length=200_000)
    assert abs(torch.corrcoef(torch.stack([batch[0, 0], other_block[0, 0]]))[0, 1]) < 0.01


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_a_shared_counter_hashed_on_the_host_gives_the_devices_keys():
    """row_keys hashes an int counter on the host (nothing to copy inside a CUDA graph): the same keys as
    the counter given as a tensor, per row."""
    import torch

    from orpheus_triton.counter_noise import hash32, row_keys

    values = torch.tensor([0, 1, 5, 2**31, 2**32 - 1, 0x9E3779B9 + 77])
    given = values.clone()
    assert hash32(values).tolist() == [hash32(v) for v in values.tolist()]
    assert torch.equal(values, given)  # hashed in place on a copy, never on the caller's tensor
    assert [hash32(v) for v in (0, 1, 77, 2**32 - 1)] == [_lowbias32(v) for v in (0, 1, 77, 2**32 - 1)]
    seeds = torch.tensor([7, 2**62 + 5, -3, 123456789])
    for counter in (0, 3, 2**40 + 9):
        assert torch.equal(row_keys(seeds, counter), row_keys(seeds, torch.full((4,), counter)))


def test_counter_noise_decoder_is_batch_independent_and_sounds_alike(model_set):
    """The GPU's noise source, run here: a stream's audio alone and batched agree, at upstream's loudness."""
    from orpheus_triton.snac_codec import DECODE_SPAN, NOISE_COUNTER, WindowDecoder

    counter = WindowDecoder(load_snac(model_set.snac), DECODE_SPAN, noise=NOISE_COUNTER)
    generators = load_window_decoder(model_set.snac)
    streams = [token_stream(seed, frames=6) for seed in range(20, 24)]
    windows = [StreamFramer().push(t) for t in streams]
    audio = counter.decode([w for group in zip(*windows, strict=True) for w in group])
    for index, tokens in enumerate(streams):
        alone = np.concatenate(serve_decode(counter, tokens, lead_in=True)).astype(np.int32)
        assert np.array_equal(alone, np.concatenate(serve_decode(counter, tokens, lead_in=True)))  # deterministic
        together = np.concatenate(audio[index :: len(streams)]).astype(np.int32)
        assert np.abs(alone - together).max() <= 1
        upstream_noise = np.concatenate(serve_decode(generators, tokens, lead_in=True)).astype(np.float64)
        assert not np.array_equal(alone, upstream_noise)  # other numbers ...
        ratio = np.sqrt(np.mean(alone.astype(np.float64) ** 2) / np.mean(upstream_noise**2))
        assert 0.8 < ratio < 1.25  # ... of the same kind


def test_code_zero_does_not_shift_frames(decoder, upstream):
    """Improvement over upstream: its `if token > 0` drops code 0 and misaligns every later frame."""
    tokens = token_stream(2, frames=8)
    with_zero = list(tokens)
    with_zero[9] = audio_token_id(0, 9)  # code 0 in frame 1, slot 2
    ours = serve_decode(decoder, with_zero)
    assert len(ours) == 5  # one window per frame from the 4th on, as for any stream of 8 frames
    fixed_reference = reference_decode(upstream, with_zero, drop_zero_codes=False)
    for a, b in zip(ours, fixed_reference, strict=True):
        np.testing.assert_array_equal(a, b)
    upstream_chunks = reference_decode(upstream, with_zero)  # verbatim upstream
    assert len(upstream_chunks) < len(ours)  # upstream loses audio after the zero


def test_missing_snac_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_snac(tmp_path)


def test_a_snac_folder_without_a_usable_snac_is_named(tmp_path):
    """Each way a SNAC folder can be wrong says which file and why (they were bare JSON, pickle or
    state-dict errors; a Git LFS pointer was met with advice to load it unsafely), and a SNAC of
    another rate or codebook layout is refused at load, not in its first decode."""
    import json

    import torch

    from orpheus_triton.demo_models import SNAC_24KHZ_CONFIG

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_snac(tmp_path / "nowhere")
    config, weights = tmp_path / "config.json", tmp_path / "pytorch_model.bin"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 79488254\n")
    config.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_snac(tmp_path)
    config.write_text(json.dumps({**SNAC_24KHZ_CONFIG, "sampling_rate": 32000, "vq_strides": [8, 4, 2, 1]}))
    with pytest.raises(ValueError, match=r"not a SNAC for Orpheus's codes: sampling_rate 32000 \(Orpheus needs "
                                         r"24000\); vq_strides \[8, 4, 2, 1\] \(Orpheus needs \[4, 2, 1\]\)"):
        load_snac(tmp_path)
    config.write_text(json.dumps({**SNAC_24KHZ_CONFIG, "attn_window_size": 32}))
    with pytest.raises(ValueError, match="attn_window_size 32"):
        load_snac(tmp_path)
    # a key left out is SNAC's default: attention with a window of 32 positions
    config.write_text(json.dumps({k: v for k, v in SNAC_24KHZ_CONFIG.items() if k != "attn_window_size"}))
    with pytest.raises(ValueError, match="attn_window_size 32"):
        load_snac(tmp_path)
    config.write_text(json.dumps(SNAC_24KHZ_CONFIG))
    with pytest.raises(ValueError, match="pytorch_model.bin is a Git LFS pointer, not the weights"):
        load_snac(tmp_path)
    weights.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="pytorch_model.bin could not be read as SNAC weights"):
        load_snac(tmp_path)
    small = {**SNAC_24KHZ_CONFIG, "encoder_dim": 4, "decoder_dim": 64}
    torch.save(SNAC(**small).state_dict(), weights)
    with pytest.raises(ValueError, match="pytorch_model.bin does not match .*config.json: Error"):
        load_snac(tmp_path)
    config.write_text(json.dumps({**small, "colour": "blue"}))
    with pytest.raises(ValueError, match="is not a SNAC config: .*colour"):
        load_snac(tmp_path)


def test_a_decoder_let_go_frees_its_model(model_set):
    """The span decoder's per-layer plans and rearranged weights live as long as their model (kept for
    good before, every model a process loaded stayed in memory)."""
    import gc
    import weakref

    decoder = load_window_decoder(model_set.snac)
    decoder.decode(StreamFramer(lead_in=False).push(token_stream(1, 5)))
    model = weakref.ref(decoder.model)
    del decoder
    gc.collect()
    assert model() is None


def test_snake_matches_upstream_bit_for_bit():
    import torch
    from snac.layers import Snake1d

    from orpheus_triton.snac_codec import Snake

    upstream = Snake1d(16)
    with torch.no_grad():
        upstream.alpha.copy_(torch.rand(1, 16, 1, generator=torch.Generator().manual_seed(0)) + 0.3)
        x = torch.randn(3, 16, 50, generator=torch.Generator().manual_seed(1)) * 3
        assert torch.equal(Snake(upstream)(x), upstream(x))


def test_round_sizes_are_powers_of_two_then_multiples_of_32_up_to_the_largest_round():
    from orpheus_triton.snac_codec import round_sizes

    assert round_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert round_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 96, 100)
    assert round_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert round_sizes(1) == (1,)
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        round_sizes(0)


def test_padded_calls_return_each_real_window_as_decoded_unpadded(model_set, monkeypatch):
    """The GPU decoder's padding (run here with its counter noise): only real rows come back, and
    each is what an unpadded call gives it; warm_up decodes every call size once."""
    from orpheus_triton import snac_codec
    from orpheus_triton.snac_codec import DECODE_SPAN, NOISE_COUNTER, WindowDecoder, warm_up

    model = load_snac(model_set.snac)
    plain = WindowDecoder(model, DECODE_SPAN, noise=NOISE_COUNTER)
    padded = WindowDecoder(model, DECODE_SPAN, noise=NOISE_COUNTER, sizes=(1, 2, 4, 8))
    assert [padded.rows_for(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    windows = [w for seed in range(30, 33) for w in StreamFramer(lead_in=False).push(token_stream(seed, frames=5))]
    assert len(windows) == 6  # 2 windows from each of 3 streams: padded to 8 rows
    expected = plain.decode(windows)
    got = padded.decode(windows)
    assert len(got) == len(windows)
    for one, other in zip(expected, got, strict=True):
        assert one.shape == (SAMPLES_PER_FRAME,)
        assert np.abs(one.astype(np.int32) - other).max() <= 1  # batch-independent noise, GEMM rounding

    calls, decode_kept = [], snac_codec.WindowDecoder._decode_kept
    monkeypatch.setattr(snac_codec.WindowDecoder, "_decode_kept", lambda self, latent: calls.append(
        latent.shape[0]) or decode_kept(self, latent))
    warm_up(padded)
    assert calls == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        WindowDecoder(model, DECODE_SPAN, sizes=(0, 4))


def test_a_cpu_decoder_decodes_exactly_its_windows(serving_decoder):
    assert serving_decoder.sizes == () and serving_decoder.rows_for(7) == 7


class ReplayEagerly:
    """A stand-in for a captured CUDA graph: replay runs the captured call again into the same output."""

    def __init__(self, run, skew=0.0):
        self.run, self.skew = run, skew
        self.out = run().clone()

    def replay(self):
        self.out.copy_(self.run() + self.skew)


def test_call_graphs_replay_each_size_and_fall_back_when_a_graph_is_wrong(model_set, monkeypatch):
    """The GPU decoder's call graphs (their bookkeeping, run here with an eager stand-in for capture):
    one graph per padded size, reused; real rows come back as the eager call gives them; a graph that
    fails to capture or disagrees with the eager call turns graphs off, with the eager call's audio."""
    from orpheus_triton import cuda_graphs
    from orpheus_triton.snac_codec import DECODE_SPAN, NOISE_COUNTER, CallGraphs, WindowDecoder

    model = load_snac(model_set.snac)
    eager = WindowDecoder(model, DECODE_SPAN, noise=NOISE_COUNTER, sizes=(1, 2, 4, 8))  # same shapes, no graphs
    windows = [w for seed in range(40, 43) for w in StreamFramer(lead_in=False).push(token_stream(seed, frames=5))]
    expected = {count: eager.decode(windows[:count]) for count in (3, 6)}

    captured = []

    def fake_capture(run, device, pool, skew=0.0):
        captured.append(run)
        graph = ReplayEagerly(run, skew)
        return graph, graph.out

    def graphed_decoder():
        decoder = WindowDecoder(model, DECODE_SPAN, noise=NOISE_COUNTER, sizes=(1, 2, 4, 8))
        decoder.graphs = CallGraphs(decoder)  # built only on a GPU otherwise
        return decoder

    monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
    decoder = graphed_decoder()
    for _ in range(2):
        for count in (6, 3, 6):
            got = decoder.decode(windows[:count])
            assert all(np.array_equal(a, b) for a, b in zip(got, expected[count], strict=True))
    assert sorted(decoder.graphs.graphs) == [4, 8] and len(captured) == 2  # one capture per size, reused

    monkeypatch.setattr(cuda_graphs, "capture", lambda run, device, pool: fake_capture(run, device, pool, skew=0.01))
    decoder = graphed_decoder()
    assert all(np.array_equal(a, b) for a, b in zip(decoder.decode(windows), expected[6], strict=True))
    assert decoder.graphs is None  # it disagreed: off

    def cannot_capture(run, device, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture", cannot_capture)
    decoder = graphed_decoder()
    assert all(np.array_equal(a, b) for a, b in zip(decoder.decode(windows), expected[6], strict=True))
    assert decoder.graphs is None


def test_only_a_gpu_decoder_gets_call_graphs(serving_decoder):
    assert serving_decoder.graphs is None
