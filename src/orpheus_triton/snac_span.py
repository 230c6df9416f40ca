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
    children = _children(module)
    if children is not None:
        lengths = [length]
        for child in children:
            lengths.append(output_length(child, lengths[-1]))
        for child, child_length in zip(reversed(children), reversed(lengths[:-1]), strict=True):
            out = input_span(child, out, child_length)
        return out
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


def _is_noise(module: nn.Module) -> bool:
    return hasattr(module, "draw_noise")


def run_span(module: nn.Module, x: torch.Tensor, x_start: int, length: int, out: Span) -> torch.Tensor:
    """``module``'s output at ``out``, from ``x`` = its input's positions ``x_start`` onwards.

    ``length`` is the full input length (where zero padding really begins and ends);
    ``x`` must cover ``input_span(module, out, length)``.
    """
    children = _children(module)
    if children is not None:
        lengths = [length]
        for child in children:
            lengths.append(output_length(child, lengths[-1]))
        spans = [out]
        for child, child_length in zip(reversed(children), reversed(lengths[:-1]), strict=True):
            spans.insert(0, input_span(child, spans[0], child_length))
        for child, child_length, child_out in zip(children, lengths[:-1], spans[1:], strict=True):
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
            self.needed = input_span(decoder, out, latent_length)
            self.supports = 0 <= out.start < out.stop <= full
        except UnsupportedLayer:
            self.supports = False

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.shape[-1] != self.latent_length:
            raise ValueError(f"latent of {latent.shape[-1]} positions, expected {self.latent_length}")
        return run_span(self.decoder, latent, 0, self.latent_length, self.out)
