"""Run SNAC's decoder for a span of output samples only: the span's receptive field, layer by layer.

An Orpheus window decodes 4 frames (8192 samples) and keeps only the second
(samples 2048-4095). Every layer of SNAC's decoder is local in time
(convolutions, transposed convolutions, elementwise activations, per-sample
noise), so the kept samples depend on a limited stretch of each layer's output.
Walking the layers backwards gives that stretch: about 87% of the first
upsampling block's output, but only a quarter to a third of the three later
blocks, where most of the work is. Computing just those stretches cuts a
window's CPU time to about 0.6x alone (and makes batching pay, see
snac_codec). Each kept position is the same sum over the same inputs as in the
full decode, and noise is drawn at full length and then cut, so the generators
advance exactly as upstream's do; the convolution kernels may block shorter
inputs differently, so a few positions round differently (one int16 step at
most after conversion, on about 0.4% of samples: tests/test_snac.py).

Layers this module does not know (SNAC's local attention, used by the 32 and
44 kHz models, not by the 24 kHz one Orpheus decodes with) make
``SpanDecoder.supports`` false; callers then decode whole windows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from snac.layers import Decoder, DecoderBlock, ResidualUnit, Snake1d
from torch import nn


@dataclass(frozen=True)
class Span:
    """Positions ``start`` .. ``stop - 1`` of a layer's full-length signal."""

    start: int
    stop: int

    def clamp(self, length: int) -> Span:
        return Span(max(self.start, 0), min(self.stop, length))


class UnsupportedLayer(ValueError):
    pass


_ELEMENTWISE = (Snake1d, nn.Tanh, nn.Identity)


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, _ELEMENTWISE) or getattr(module, "pointwise", False)


def _conv_of(module: nn.Module) -> nn.Conv1d | nn.ConvTranspose1d | None:
    """The convolution inside ``module`` (itself, or one wrapped by RowwiseConv1d)."""
    conv = getattr(module, "conv", module)
    return conv if isinstance(conv, nn.Conv1d | nn.ConvTranspose1d) else None


def _children(module: nn.Module) -> list[nn.Module] | None:
    """The layers a container runs in order, or None for a leaf."""
    if isinstance(module, nn.Sequential):
        return list(module)
    if isinstance(module, DecoderBlock):
        return list(module.block)
    if isinstance(module, Decoder):
        return list(module.model)
    return None


# Both rules are pure functions of (layer, span, length) and run for every layer on
# every decode: cached, a decode's bookkeeping costs lookups instead of recursion.
@functools.lru_cache(maxsize=65536)
def output_length(module: nn.Module, length: int) -> int:
    """Length of ``module``'s output for an input of ``length`` positions."""
    children = _children(module)
    if children is not None:
        for child in children:
            length = output_length(child, length)
        return length
    if isinstance(module, ResidualUnit):
        if output_length(module.block, length) != length:
            raise UnsupportedLayer("residual unit that changes the length")
        return length
    if _is_pointwise(module) or _is_noise(module):
        return length
    conv = _conv_of(module)
    if isinstance(conv, nn.ConvTranspose1d):
        (k,), (s,), (p,), (op,), (d,) = conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation
        if d != 1 or op > p:
            raise UnsupportedLayer(f"transposed convolution with dilation {d}, output_padding {op}")
        return (length - 1) * s - 2 * p + k + op
    if isinstance(conv, nn.Conv1d):
        (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
        if s != 1 or not isinstance(conv.padding, tuple) or 2 * conv.padding[0] != d * (k - 1):
            raise UnsupportedLayer(f"convolution with stride {s}, padding {conv.padding!r} (not 'same')")
        return length + 2 * conv.padding[0] - d * (k - 1)
    raise UnsupportedLayer(f"no span rule for {type(module).__name__}")


@functools.lru_cache(maxsize=65536)
def input_span(module: nn.Module, out: Span, length: int) -> Span:
    """The input positions ``module``'s outputs in ``out`` depend on (input has ``length`` positions)."""
    if _children(module) is not None:
        return _plan(module, out, length)[1]
    if isinstance(module, ResidualUnit):
        inner = input_span(module.block, out, length)
        return Span(min(inner.start, out.start), max(inner.stop, out.stop))
    if _is_pointwise(module) or _is_noise(module):
        return out
    conv = _conv_of(module)
    (k,), (p,) = conv.kernel_size, conv.padding
    if isinstance(conv, nn.ConvTranspose1d):
        s = conv.stride[0]
        # Output t sums input i over taps j with t = i*s - p + j, 0 <= j < k.
        return Span(-((k - 1 - out.start - p) // s), (out.stop - 1 + p) // s + 1).clamp(length)
    d = conv.dilation[0]
    return Span(out.start - p, out.stop - p + d * (k - 1)).clamp(length)


@functools.lru_cache(maxsize=65536)
def _plan(container: nn.Module, out: Span, length: int) -> tuple[tuple[tuple[nn.Module, int, Span], ...], Span]:
    """A container's layers as (layer, its input length, the output span it must produce), in order,
    and the input span the container needs for ``out``."""
    children = _children(container)
    lengths = [length]
    for child in children[:-1]:
        lengths.append(output_length(child, lengths[-1]))
    spans = [out]
    for child, child_length in zip(reversed(children), reversed(lengths), strict=True):
        spans.insert(0, input_span(child, spans[0], child_length))
    return tuple(zip(children, lengths, spans[1:], strict=True)), spans[0]


def _is_noise(module: nn.Module) -> bool:
    return hasattr(module, "draw_noise")


def run_span(module: nn.Module, x: torch.Tensor, x_start: int, length: int, out: Span) -> torch.Tensor:
    """``module``'s output at ``out``, from ``x`` = its input's positions ``x_start`` onwards.

    ``length`` is the full input length (where zero padding really begins and ends);
    ``x`` must cover ``input_span(module, out, length)``.
    """
    if _children(module) is not None:
        for child, child_length, child_out in _plan(module, out, length)[0]:
            x = run_span(child, x, x_start, child_length, child_out)
            x_start = child_out.start
        return x
    if isinstance(module, ResidualUnit):
        y = run_span(module.block, x, x_start, length, out)
        return _cut(x, x_start, out) + y
    if _is_pointwise(module):
        return module(_cut(x, x_start, out))
    if _is_noise(module):
        x = _cut(x, x_start, out)
        noise = module.draw_noise(x.shape[0], length, x)[..., out.start : out.stop]
        return x + noise * module.linear(x)
    conv = _conv_of(module)
    rowwise = conv is not module  # RowwiseConv1d: keep its one-row-at-a-time rounding
    needed = input_span(module, out, length)
    x = _cut(x, x_start, needed)
    if isinstance(conv, nn.ConvTranspose1d) and _polyphase_weights(conv) is not None:
        return _run_polyphase(conv, rowwise, x, needed, length, out)
    if isinstance(conv, nn.ConvTranspose1d):
        def apply(rows):
            return F.conv_transpose1d(rows, conv.weight, conv.bias, stride=conv.stride, groups=conv.groups)
        y_start = needed.start * conv.stride[0] - conv.padding[0]
    else:
        # The layer itself, on a shorter stretch: its zero padding lands where the stretch ends,
        # outside ``out`` unless the stretch ends where the signal does. (Calling it, rather than
        # padding by hand, keeps the kernel choice and so the rounding of depthwise layers.)
        apply = conv
        y_start = needed.start
    y = torch.cat([apply(x[i : i + 1]) for i in range(x.shape[0])]) if rowwise and x.shape[0] > 1 else apply(x)
    return _cut(y, y_start, out)


@functools.lru_cache(maxsize=256)
def _polyphase_weights(conv: nn.ConvTranspose1d) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A stride-s, kernel-2s transposed convolution as a kernel-2 convolution with s x the outputs.

    Output position u = t + padding = s*m + r sums two inputs: x[m] through tap r
    and x[m-1] through tap r + s. So each phase r is an ordinary 2-tap
    convolution, and all s phases are one convolution with s x the output
    channels, whose outputs are then interleaved. On CPU that runs 1.2-4x faster
    than the transposed convolution (the same sums in another order, so a few
    positions round differently). Returns None where the layer is not of this
    form (and the transposed convolution runs as it is).
    """
    (k,), (s,), (d,), (op,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.output_padding, conv.padding
    if conv.groups != 1 or d != 1 or k != 2 * s or op > p:
        return None
    w = conv.weight.detach()  # [in, out, 2s]
    taps = torch.stack((w[:, :, s:], w[:, :, :s]), dim=-1)  # [in, out, s, 2]: tap 0 sees x[m-1], tap 1 x[m]
    weight = taps.permute(2, 1, 0, 3).reshape(s * w.shape[1], w.shape[0], 2).contiguous()  # [(r, out), in, 2]
    bias = None if conv.bias is None else conv.bias.detach().repeat(s)
    return weight, bias


def _run_polyphase(conv: nn.ConvTranspose1d, rowwise: bool, x: torch.Tensor, x_span: Span, length: int,
                   out: Span) -> torch.Tensor:
    """Outputs ``out`` of ``conv`` from ``x`` (input positions ``x_span``), via ``_polyphase_weights``."""
    weight, bias = _polyphase_weights(conv)
    (s,), (p,) = conv.stride, conv.padding
    first, last = (out.start + p) // s, (out.stop - 1 + p) // s  # the m of the first and last output
    inputs = Span(first - 1, last + 1)
    real = inputs.clamp(length)
    x = F.pad(_cut(x, x_span.start, real), (real.start - inputs.start, inputs.stop - real.stop))

    def apply(rows):
        return F.conv1d(rows, weight, bias)

    y = torch.cat([apply(x[i : i + 1]) for i in range(x.shape[0])]) if rowwise and x.shape[0] > 1 else apply(x)
    batch, channels, steps = y.shape[0], weight.shape[0] // s, y.shape[-1]
    y = y.view(batch, s, channels, steps).permute(0, 2, 3, 1).reshape(batch, channels, steps * s)
    return _cut(y, first * s - p, out)


def _cut(x: torch.Tensor, x_start: int, span: Span) -> torch.Tensor:
    if span.start < x_start or span.stop > x_start + x.shape[-1]:
        raise AssertionError(f"span {span} outside the computed positions {x_start}..{x_start + x.shape[-1]}")
    return x[..., span.start - x_start : span.stop - x_start]


class SpanDecoder:
    """SNAC's decoder for output samples ``out`` only (see the module docstring)."""

    def __init__(self, decoder: nn.Module, latent_length: int, out: Span):
        self.decoder, self.latent_length, self.out = decoder, latent_length, out
        try:
            full = output_length(decoder, latent_length)
            self.supports = 0 <= out.start < out.stop <= full
        except UnsupportedLayer:
            self.supports = False

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.shape[-1] != self.latent_length:
            raise ValueError(f"latent of {latent.shape[-1]} positions, expected {self.latent_length}")
        return run_span(self.decoder, latent, 0, self.latent_length, self.out)
