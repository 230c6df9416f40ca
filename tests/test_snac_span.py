"""Decoding only the kept span of a window: every layer's span rule against the full computation."""

import numpy as np
import pytest
import torch
from snac import SNAC
from snac.layers import Snake1d
from torch import nn

from orpheus_triton.constants import WINDOW_KEEP_END, WINDOW_KEEP_START
from orpheus_triton.frames import Window
from orpheus_triton.snac_codec import DECODE_FULL, DECODE_SPAN, RowwiseConv1d, Snake, WindowDecoder, load_snac
from orpheus_triton.snac_span import Span, SpanDecoder, _dense, _flat_rows, input_span, output_length, run_span

LAYERS = {
    "conv k7": nn.Conv1d(6, 5, 7, padding=3),
    "conv k3 dilated, no bias": nn.Conv1d(6, 5, 3, padding=2, dilation=2, bias=False),
    "grouped conv": nn.Conv1d(6, 4, 3, padding=1, groups=2),
    "depthwise dilated": nn.Conv1d(6, 6, 7, padding=27, dilation=9, groups=6),
    "depthwise dilated, even kernel": nn.Conv1d(6, 6, 4, padding=3, dilation=2, groups=6),
    "pointwise, row by row": RowwiseConv1d(nn.Conv1d(6, 4, 1)),
    "transposed x8": nn.ConvTranspose1d(6, 3, 16, stride=8, padding=4),
    "transposed x3, output padding": nn.ConvTranspose1d(6, 3, 6, stride=3, padding=2, output_padding=1),
    "transposed, kernel 5 stride 2": nn.ConvTranspose1d(6, 3, 5, stride=2, padding=1),
    "snake": Snake(Snake1d(6)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("where", ["middle", "start", "end", "all"])
def test_layer_span_equals_the_full_output(name, where):
    layer = LAYERS[name]
    length = 40
    x = torch.randn(2, 6, length, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = layer(x)
        n = output_length(layer, length)
        assert full.shape[-1] == n
        out = {"middle": Span(n // 3, n // 2), "start": Span(0, 5), "end": Span(n - 7, n), "all": Span(0, n)}[where]
        needed = input_span(layer, out, length)
        # Only the needed inputs are handed over: the span rule must not read beyond them.
        part = run_span(layer, x[..., needed.start : needed.stop], needed.start, length, out)
    torch.testing.assert_close(part, full[..., out.start : out.stop], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cut", "in_place"), [((2, 38), True), ((10, 20), False)])
def test_dense_layers_read_a_cut_signal_in_place(cut, in_place):
    """A cut of a time-major signal [B, T, C] is one matrix with gap rows (computed, then dropped), not a copy;
    a cut that leaves wide gaps is copied instead."""
    conv = nn.Conv1d(6, 5, 3, dilation=2)
    signal = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(2))
    part = signal[:, cut[0] : cut[1]]
    flat, row_stride = _flat_rows(part)
    assert (flat.untyped_storage().data_ptr() == signal.untyped_storage().data_ptr()) == in_place
    assert row_stride == (40 if in_place else cut[1] - cut[0])
    with torch.no_grad():
        expected = conv(part.transpose(1, 2).contiguous()).transpose(1, 2)
        torch.testing.assert_close(_dense(conv, part), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def snac(model_set):
    return load_snac(model_set.snac)


def seeded(model, seeds):
    for block in model.modules():
        if hasattr(block, "draw_noise"):
            block.generators = [torch.Generator().manual_seed(s) for s in seeds]


def test_decoder_span_equals_the_kept_part_of_a_full_decode(snac):
    latent = torch.randn(3, 768, 16, generator=torch.Generator().manual_seed(1))
    span = SpanDecoder(snac.decoder, 16, Span(WINDOW_KEEP_START, WINDOW_KEEP_END))
    assert span.supports
    with torch.inference_mode():
        seeded(snac, [5, 6, 7])
        full = snac.decoder(latent)[..., WINDOW_KEEP_START:WINDOW_KEEP_END]
        seeded(snac, [5, 6, 7])
        kept = span(latent)
    torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="latent of 12 positions, expected 16"):
        span(latent[..., :12])


def test_layers_without_a_span_rule_fall_back_to_whole_windows():
    """SNAC's local attention (32/44 kHz models) has no span rule: those decode whole windows."""
    torch.manual_seed(0)
    model = SNAC(sampling_rate=24000, encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=64,
                 decoder_rates=[8, 8, 4, 2], attn_window_size=8, codebook_size=4096, codebook_dim=8,
                 vq_strides=[4, 2, 1], noise=True, depthwise=True).eval()
    assert not SpanDecoder(model.decoder, 16, Span(WINDOW_KEEP_START, WINDOW_KEEP_END)).supports
    windows = [Window(tuple(range(100, 128)), frame_index=3)]
    span_mode, full_mode = WindowDecoder(model, DECODE_SPAN), WindowDecoder(model, DECODE_FULL)
    torch.manual_seed(1)  # upstream noise blocks draw from the global generator
    first = span_mode.decode(windows)[0]
    torch.manual_seed(1)
    np.testing.assert_array_equal(first, full_mode.decode(windows)[0])
