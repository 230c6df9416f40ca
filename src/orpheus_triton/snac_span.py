"""Run SNAC's decoder for a span of output samples only: the span's receptive field, layer by layer.

An Orpheus window decodes 4 frames (8192 samples) and keeps only the second
(samples 2048-4095). Every layer of SNAC's decoder is local in time
(convolutions, transposed convolutions, elementwise activations, per-sample
noise), so the kept samples depend on a limited stretch of each layer's output.
Walking the layers backwards gives that stretch: about 87% of the first
upsampling block's output, but only a quarter to a third of the three later
blocks, where most of the work is. Computing just those stretches, in a
time-major layout where every dense layer is one matrix product over the whole
batch (see ``run_span``), cuts a window's CPU time to under half of a whole
decode alone and to about a quarter in a batch of 8. Each kept position is the same sum over the same inputs as in the
full decode, and noise is drawn at full length and then cut, so the generators
advance exactly as upstream's do; the convolution kernels may block shorter
inputs differently, so a few positions round differently (one int16 step at
most after conversion, on about 0.4% of samples: tests/test_snac.py).

Layers this module does not know (SNAC's local attention, in a model whose
config sets ``attn_window_size``, as the 32 and 44 kHz ones do; the 24 kHz one
Orpheus decodes with has none) make ``SpanDecoder.supports`` false; callers then
decode whole windows.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Protocol, cast

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
def _per_module(function):
    """Cache ``function(module, *args)`` for as long as the module lives: a decoder's plans and rearranged
    weights go with its model (cached by lru_cache, every model a process loaded stayed in memory).
    They are computed at the first decode: a model's weights must not change after it."""
    results: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(function)
    def cached(module: nn.Module, *args):
        per_module = results.setdefault(module, {})
        if args not in per_module:
            per_module[args] = function(module, *args)
        return per_module[args]

    return cached


@_per_module
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
        padding = cast("tuple[int, ...]", conv.padding)  # a string ('same') only for a Conv1d
        (k,), (s,), (p,), (op,), (d,) = conv.kernel_size, conv.stride, padding, conv.output_padding, conv.dilation
        if d != 1 or op > p:
            raise UnsupportedLayer(f"transposed convolution with dilation {d}, output_padding {op}")
        return (length - 1) * s - 2 * p + k + op
    if isinstance(conv, nn.Conv1d):
        (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
        if s != 1 or not isinstance(conv.padding, tuple) or 2 * conv.padding[0] != d * (k - 1):
            raise UnsupportedLayer(f"convolution with stride {s}, padding {conv.padding!r} (not 'same')")
        return length + 2 * conv.padding[0] - d * (k - 1)
    raise UnsupportedLayer(f"no span rule for {type(module).__name__}")


@_per_module
def input_span(module: nn.Module, out: Span, length: int) -> Span:
    """The input positions ``module``'s outputs in ``out`` depend on (input has ``length`` positions)."""
    if _children(module) is not None:
        return _plan(module, out, length)[1]
    if isinstance(module, ResidualUnit):
        inner = input_span(module.block, out, length)
        return Span(min(inner.start, out.start), max(inner.stop, out.stop))
    if _is_pointwise(module) or _is_noise(module):
        return out
    # Every other leaf is a convolution: output_length raises UnsupportedLayer for one that is not.
    conv = cast("nn.Conv1d | nn.ConvTranspose1d", _conv_of(module))
    (k,), (p,) = conv.kernel_size, cast("tuple[int, ...]", conv.padding)  # 'same' checked in output_length
    if isinstance(conv, nn.ConvTranspose1d):
        s = conv.stride[0]
        # Output t sums input i over taps j with t = i*s - p + j, 0 <= j < k.
        return Span(-((k - 1 - out.start - p) // s), (out.stop - 1 + p) // s + 1).clamp(length)
    d = conv.dilation[0]
    span = Span(out.start - p, out.stop - p + d * (k - 1)).clamp(length)
    if _is_depthwise(conv) and (span.stop - span.start) % d:
        # A few more positions (not needed, but real) make the stretch a whole number of
        # d-position groups, so _depthwise can view it without copying it into a padded buffer.
        stop = min(span.stop + (span.start - span.stop) % d, length)
        span = Span(max(span.start - (span.start - stop) % d, 0), stop)
    return span


@_per_module
def _plan(container: nn.Module, out: Span, length: int) -> tuple[tuple[tuple[nn.Module, int, Span], ...], Span]:
    """A container's layers as (layer, its input length, the output span it must produce), in order,
    and the input span the container needs for ``out``."""
    children = _children(container)
    assert children is not None  # both callers plan containers only (``_children`` not None)
    lengths = [length]
    for child in children[:-1]:
        lengths.append(output_length(child, lengths[-1]))
    spans = [out]
    for child, child_length in zip(reversed(children), reversed(lengths), strict=True):
        spans.insert(0, input_span(child, spans[0], child_length))
    return tuple(zip(children, lengths, spans[1:], strict=True)), spans[0]


class _NoiseLayer(Protocol):
    """What ``_run`` uses of a noise layer (``_is_noise``: snac_codec's SeededNoise)."""

    linear: nn.Conv1d

    def draw_noise(self, batch: int, length: int, like: torch.Tensor) -> torch.Tensor: ...


def _is_noise(module: nn.Module) -> bool:
    return hasattr(module, "draw_noise")


def run_span(module: nn.Module, x: torch.Tensor, x_start: int, length: int, out: Span) -> torch.Tensor:
    """``module``'s output at ``out``, from ``x`` = its input's positions ``x_start`` onwards.

    ``x`` and the result are [batch, channels, time], as SNAC's layers take them;
    ``length`` is the full input length (where zero padding really begins and ends);
    ``x`` must cover ``input_span(module, out, length)``.

    Inside, signals are time-major ([batch, time, channels]): every dense layer is
    then one matrix product over all rows and positions, a transposed convolution's
    phases interleave by a reshape, and dilated depthwise convolutions become
    undilated ones on a zero-copy view. In the usual [B, C, T] layout the CPU
    kernels for depthwise and short dense convolutions slow down with the batch
    (a batch of 8 cost 1.2-2x what its rows cost one by one); time-major, a batch
    costs less than its rows.
    """
    return _run(module, x.transpose(1, 2), x_start, length, out).transpose(1, 2)


def _run(module: nn.Module, x: torch.Tensor, x_start: int, length: int, out: Span) -> torch.Tensor:
    """``run_span`` on time-major signals [batch, time, channels]."""
    if _children(module) is not None:
        for child, child_length, child_out in _plan(module, out, length)[0]:
            x = _run(child, x, x_start, child_length, child_out)
            x_start = child_out.start
        return x
    if isinstance(module, ResidualUnit):
        return _cut(x, x_start, out) + _run(module.block, x, x_start, length, out)
    if _is_pointwise(module):
        return _pointwise(module, _cut(x, x_start, out))
    if _is_noise(module):
        x = _cut(x, x_start, out)
        noisy = cast(_NoiseLayer, module)
        noise = noisy.draw_noise(x.shape[0], length, x)[..., out.start : out.stop]  # [B, 1, T]
        # Upstream's x + noise * h, in place on the fresh h: addcmul with a broadcast noise runs 1.6x slower.
        return _dense(noisy.linear, x).mul_(noise.transpose(1, 2)).add_(x)
    # Every other leaf is a convolution: output_length raises UnsupportedLayer for one that is not.
    conv = cast("nn.Conv1d | nn.ConvTranspose1d", _conv_of(module))
    rowwise = conv is not module  # RowwiseConv1d: keep its one-row-at-a-time rounding
    needed = input_span(module, out, length)
    x = _cut(x, x_start, needed)
    if isinstance(conv, nn.ConvTranspose1d):
        if _polyphase_weights(conv) is not None:
            return _run_polyphase(conv, rowwise, x, needed, length, out)

        def transposed(rows):  # without the layer's padding: the cut below drops those positions
            return F.conv_transpose1d(rows, conv.weight, conv.bias, stride=conv.stride, groups=conv.groups)

        y = _rows(lambda rows: _channels_first(transposed, rows), x, rowwise)
        return _cut(y, needed.start * conv.stride[0] - conv.padding[0], out)
    # A 'same' convolution on a stretch: its zero padding lands where the stretch ends, outside
    # ``out`` unless the stretch ends where the signal does (then it is the layer's own padding).
    (p,) = cast("tuple[int, ...]", conv.padding)  # not 'same': output_length checked
    if _is_depthwise(conv):
        y = _depthwise(conv, x)  # batch-invariant: no row loop needed
    elif conv.groups == 1:
        y = _rows(lambda rows: _dense(conv, _pad(rows, p, p)), x, rowwise)
    else:
        y = _rows(lambda rows: _channels_first(conv, rows), x, rowwise)
    return _cut(y, needed.start, out)


def _rows(fn, x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``fn`` on the whole batch, or on one row at a time where the layer asks for batch-invariant rounding."""
    if rowwise and x.shape[0] > 1:
        return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])
    return fn(x)


def _channels_first(fn, x: torch.Tensor) -> torch.Tensor:
    """A layer with no time-major form, applied in its own [B, C, T] layout."""
    return fn(x.transpose(1, 2)).transpose(1, 2)


def _pointwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    time_major = getattr(module, "forward_time_major", None)
    if time_major is not None:
        return time_major(x)
    if isinstance(module, nn.Tanh | nn.Identity):
        return module(x)
    return _channels_first(module, x)


def _shifted_products(x: torch.Tensor, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                      step: int) -> torch.Tensor:
    """sum_j x[t + j*step] @ weights[j].T (+ bias) on time-major ``x`` [B, n, C] -> [B, n - (k-1)*step, out].

    All rows and positions are one flat matrix and each tap one product with a
    shifted (contiguous) slice of it, accumulated in place: no copies of the
    input per tap. Sums that straddle two rows land past each row's last valid
    position and are cut off.
    """
    batch, steps, channels = x.shape
    flat, row_stride = _flat_rows(x)
    valid = flat.shape[0] - (len(weights) - 1) * step
    y = torch.empty(batch * row_stride, weights[0].shape[0], dtype=x.dtype, device=x.device)
    head = y[:valid]
    if bias is None:
        torch.mm(flat[:valid], weights[0].t(), out=head)
    else:
        torch.addmm(bias, flat[:valid], weights[0].t(), out=head)
    for j, weight in enumerate(weights[1:], start=1):
        head.addmm_(flat[j * step : j * step + valid], weight.t())
    return y.view(batch, row_stride, -1)[:, : steps - (len(weights) - 1) * step]


def _flat_rows(x: torch.Tensor, max_gap: float = 0.25) -> tuple[torch.Tensor, int]:
    """Time-major ``x`` [B, n, C] as one matrix of positions, and the distance in rows between its batch rows.

    A contiguous ``x`` is simply [B*n, C]. A cut of a longer signal (a view
    whose batch rows lie ``row_stride`` > n positions apart) is read in place,
    gap positions included, instead of being copied: products over the gaps
    cost (row_stride - n) / n more work, which a cut of a few positions makes
    cheaper than the copy. Wider gaps, and any other layout, are copied.
    """
    batch, steps, channels = x.shape
    if x.is_contiguous():
        return x.view(batch * steps, channels), steps
    batch_stride, time_stride, channel_stride = x.stride()
    row_stride = batch_stride // channels
    if (time_stride, channel_stride) == (channels, 1) and batch_stride % channels == 0 \
            and steps <= row_stride <= steps * (1 + max_gap):
        rows = (batch - 1) * row_stride + steps
        return x.as_strided((rows, channels), (channels, 1)), row_stride
    return x.contiguous().view(batch * steps, channels), steps


@_per_module
def _taps(conv: nn.Conv1d) -> tuple[torch.Tensor, ...]:
    """A dense convolution's weight per tap, [out, in] each."""
    weight = conv.weight.detach()
    return tuple(weight[:, :, j].contiguous() for j in range(weight.shape[-1]))


def _dense(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A groups=1, stride-1 convolution without padding on time-major ``x``."""
    return _shifted_products(x, _taps(conv), conv.bias, conv.dilation[0])


@_per_module
def _phase_weights(conv: nn.Conv1d, phases: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A depthwise convolution's weights repeated for ``phases`` interleaved copies of its channels."""
    weight = conv.weight.detach().repeat(phases, 1, 1).unsqueeze(2)  # [(phase, channel), 1, 1, k]
    bias = None if conv.bias is None else conv.bias.detach().repeat(phases)
    return weight, bias


def _is_depthwise(conv: nn.Conv1d) -> bool:
    """A depthwise convolution of the form ``_depthwise`` runs (odd kernel: whole groups of padding)."""
    return conv.groups == conv.in_channels == conv.out_channels > 1 and conv.kernel_size[0] % 2 == 1


def _depthwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 'same' depthwise convolution (any dilation d) on time-major ``x`` [B, T, C], same length out.

    Positions t = q*d + r with the same r only ever meet each other, so [B, T, C]
    viewed as [B, T/d, d*C] (no copy) turns it into an undilated depthwise
    convolution over d*C channels, whose 'same' padding is (k-1)/2 groups on each
    side: a channels-last 2-D convolution, the fast kernel, where the dilated one
    in [B, C, T] is 5-10x slower. ``input_span`` makes T a multiple of d wherever
    the signal allows; otherwise zeros complete the last group.
    """
    (k,), (d,) = conv.kernel_size, conv.dilation
    batch, steps, channels = x.shape
    x = _pad(x, 0, -steps % d).contiguous()  # a plain copy: reshape's own copy of a cut is 2-3x slower
    image = x.reshape(batch, 1, -1, d * channels).permute(0, 3, 1, 2)  # [B, d*C, 1, T/d], channels-last
    weight, bias = _phase_weights(conv, d)
    y = F.conv2d(image, weight, bias, padding=(0, (k - 1) // 2), groups=d * channels)
    return y.permute(0, 2, 3, 1).reshape(batch, -1, channels)[:, :steps]


@_per_module
def _polyphase_weights(conv: nn.ConvTranspose1d) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """A stride-s, kernel-2s transposed convolution as a 2-tap convolution with s x the output channels.

    Output position u = t + padding = s*m + r sums two inputs: x[m] through tap r
    and x[m-1] through tap r + s. So all s phases are one convolution over
    (x[m-1], x[m]) whose output channels are (r, out), and in time-major layout
    its rows [m, (r, out)] are already the outputs in order (s*m + r). On CPU
    that runs 1.2-4x faster than the transposed convolution (the same sums in
    another order, so a few positions round differently). Returns the two taps'
    weights [(r, out), in] and the bias, or None where the layer is not of this
    form (and the transposed convolution runs as it is).
    """
    padding = cast("tuple[int, ...]", conv.padding)  # a string ('same') only for a Conv1d
    (k,), (s,), (d,), (op,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.output_padding, padding
    if conv.groups != 1 or d != 1 or k != 2 * s or op > p:
        return None
    w = conv.weight.detach()  # [in, out, 2s]

    def tap(kernel_positions: torch.Tensor) -> torch.Tensor:  # [in, out, s] -> [(r, out), in]
        return kernel_positions.permute(2, 1, 0).reshape(s * w.shape[1], w.shape[0]).contiguous()

    bias = None if conv.bias is None else conv.bias.detach().repeat(s)
    return (tap(w[:, :, s:]), tap(w[:, :, :s])), bias  # x[m-1] through taps r + s, x[m] through taps r


def _run_polyphase(conv: nn.ConvTranspose1d, rowwise: bool, x: torch.Tensor, x_span: Span, length: int,
                   out: Span) -> torch.Tensor:
    """Outputs ``out`` of ``conv`` from time-major ``x`` (input positions ``x_span``), via ``_polyphase_weights``."""
    taps, bias = _polyphase_weights(conv)
    (s,), (p,) = conv.stride, cast("tuple[int, ...]", conv.padding)  # a string ('same') only for a Conv1d
    first, last = (out.start + p) // s, (out.stop - 1 + p) // s  # the m of the first and last output
    inputs = Span(first - 1, last + 1)
    real = inputs.clamp(length)
    x = _pad(_cut(x, x_span.start, real), real.start - inputs.start, inputs.stop - real.stop)
    y = _rows(lambda rows: _shifted_products(rows, taps, bias, 1), x, rowwise)  # [B, m, (r, out)]
    y = y.reshape(y.shape[0], -1, taps[0].shape[0] // s)  # [B, s*m + r, out]
    return _cut(y, first * s - p, out)


def _pad(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Time-major ``x`` with zero positions added at both ends, as a new contiguous tensor (``x``
    itself when none are added). ``F.pad`` would also zero the interior it then overwrites."""
    if before == after == 0:
        return x
    batch, steps, channels = x.shape
    padded = x.new_empty(batch, before + steps + after, channels)
    padded[:, :before].zero_()
    padded[:, before + steps :].zero_()
    padded[:, before : before + steps] = x
    return padded


def _cut(x: torch.Tensor, x_start: int, span: Span) -> torch.Tensor:
    """Positions ``span`` of time-major ``x``, whose first position is ``x_start``."""
    if span.start < x_start or span.stop > x_start + x.shape[1]:
        raise AssertionError(f"span {span} outside the computed positions {x_start}..{x_start + x.shape[1]}")
    return x[:, span.start - x_start : span.stop - x_start]


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
