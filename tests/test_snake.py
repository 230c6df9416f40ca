"""Snake with its scales folded into the convolutions beside it computes what upstream's decoder does."""

import shutil

import pytest
import torch
from snac import SNAC
from snac.layers import Snake1d

from orpheus_triton.snac_codec import load_snac
from orpheus_triton.snake import FoldedSnake, Snake, numpy_sine


@pytest.fixture(scope="module")
def upstream(model_set):
    return SNAC.from_pretrained(str(model_set.snac)).eval()


def decode(decoder, latent):
    torch.manual_seed(5)  # the same noise for both: SeededNoise without generators draws as upstream does
    with torch.no_grad():
        return decoder(latent)


def test_random_alphas_cover_signs_and_scales(upstream):
    alphas = torch.cat([m.alpha.view(-1) for m in upstream.decoder.modules() if isinstance(m, Snake1d)])
    assert (alphas < 0).any() and alphas.abs().min() < 0.5 and alphas.abs().max() > 2


def test_every_snake_of_the_decoder_is_folded_and_the_audio_is_the_same(upstream, model_set):
    model = load_snac(model_set.snac)
    snakes = [m for m in upstream.decoder.modules() if isinstance(m, Snake1d)]
    folded = [m for m in model.decoder.modules() if isinstance(m, FoldedSnake)]
    assert len(folded) == len(snakes) == 29
    # Behind a depthwise convolution (each residual unit's second Snake) alpha x comes from the convolution.
    assert sum(m.input_scaled for m in folded) == 12
    latent = torch.randn(2, 768, 16, generator=torch.Generator().manual_seed(0))
    want, got = decode(upstream.decoder, latent), decode(model.decoder, latent)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_the_exact_decoder_keeps_upstreams_arithmetic(model_set):
    model = load_snac(model_set.snac, batch_invariant=True)
    assert not any(isinstance(m, FoldedSnake) for m in model.modules())
    assert any(type(m) is Snake for m in model.modules())


def test_a_snake_with_alpha_near_zero_is_left_as_it_is(model_set, tmp_path):
    """Folding would scale the next convolution's weights by 1/alpha: not for an alpha this small."""
    shutil.copytree(model_set.snac, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    first = next(name for name in state if name.startswith("decoder.") and name.endswith(".alpha"))
    state[first][0, 0, 0] = 1e-5
    torch.save(state, weights)
    model = load_snac(tmp_path)
    assert sum(isinstance(m, FoldedSnake) for m in model.decoder.modules()) == 28
    assert type(next(m for m in model.decoder.modules() if isinstance(m, Snake))) is Snake
    latent = torch.randn(1, 768, 16, generator=torch.Generator().manual_seed(1))
    upstream = SNAC.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(decode(model.decoder, latent), decode(upstream.decoder, latent), rtol=1e-4, atol=2e-5)


def test_numpy_sine_matches_torchs_on_any_layout():
    """NumPy's sine (CPU, float32), the folded Snakes' on one thread: within 2e-7 of torch's, on contiguous
    signals and on cuts of longer ones (the span decoder's strided views) alike."""
    signal = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(2)) * 20
    for u in (signal, signal[:, 5:30], signal.transpose(1, 2), signal[:, :0]):
        got = numpy_sine(u)
        assert got.shape == u.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, torch.sin(u), rtol=0, atol=2e-7)


def test_the_folded_snakes_take_numpys_sine_on_one_thread_only(monkeypatch):
    from orpheus_triton import snake  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(snake, "numpy_sine", lambda u: calls.append(u) or numpy_sine(u))
    signal = torch.randn(2, 8, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        snake.sine(signal)
        assert len(calls) == 1
        snake.sine(signal.double())  # not float32
        snake.sine(signal.clone().requires_grad_())  # autograd needs torch's
        torch.set_num_threads(2)  # torch's spreads over the threads
        torch.testing.assert_close(snake.sine(signal), torch.sin(signal), rtol=0, atol=0)
        assert len(calls) == 1
    finally:
        torch.set_num_threads(threads)
