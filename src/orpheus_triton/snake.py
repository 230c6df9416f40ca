"""SNAC's Snake activation, x + sin(alpha x)^2 / alpha: upstream's arithmetic in eager ops, and folded.

Snake sits between convolutions all through SNAC's decoder, and its five
elementwise passes over the signal are a quarter of a batched decode's CPU time:
work batching cannot share. Its two per-channel scales are linear, so they can
move into the convolutions beside it (``fold_snake_scales``): the 1/alpha into
the weights of the convolution it feeds, and the alpha into the convolution
that feeds it, where there is one. What is left, u + sin(u)^2 on u = alpha x,
is two passes (three where alpha x must still be formed). Every output is the
same sum as before with its factors in another order: a few positions round
differently, as the span decode's shortened products already make them.
"""

from __future__ import annotations

from typing import TypeGuard, cast

import numpy as np
import torch
from snac.layers import Snake1d
from torch import nn

# A Snake whose alpha comes this close to 0 is left as it is: folding 1/alpha into the next
# weights would scale them by more than 1000 (upstream adds 1e-9 to alpha before dividing).
MIN_FOLDED_ALPHA = 1e-3


class Snake(nn.Module):
    """SNAC's Snake activation without TorchScript and in place.

    Upstream's scripted ``snake`` is bit for bit the same arithmetic, but on CPU it
    ran 1.4-10x slower than these in-place eager ops for the shapes a decode sees
    (it was a quarter of a batched window decode).
    """

    pointwise = True  # for snac_span: output position t depends on input position t only

    def __init__(self, snake: Snake1d):
        super().__init__()
        self.alpha = snake.alpha  # same attribute name: upstream state dicts still load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(x, self.alpha)

    def forward_time_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same on [batch, time, channels] (snac_span's layout)."""
        return self.activate(x, self.alpha.view(1, 1, -1))

    def activate(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        y = torch.mul(x, alpha).sin_()
        # y * y, not square_(): the same products (pow special-cases 2), but square_ runs 1.7x slower on CPU.
        y.mul_(y).mul_((alpha + 1e-9).reciprocal())
        return y.add_(x)


class FoldedSnake(Snake):
    """A Snake whose 1/alpha the next convolution applies: alpha x + sin(alpha x)^2.

    ``input_scaled``: the convolution before it already multiplied by alpha, so
    its input is u = alpha x and it computes u + sin(u)^2.
    """

    def __init__(self, snake: Snake, input_scaled: bool):
        nn.Module.__init__(self)
        self.alpha = snake.alpha
        self.input_scaled = input_scaled

    def activate(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        u = x if self.input_scaled else x * alpha
        s = sine(u)
        return torch.addcmul(u, s, s, out=s)


def sine(u: torch.Tensor) -> torch.Tensor:
    """sin(u) as a new tensor: NumPy's sine where torch runs one CPU thread (``numpy_sine``), else torch's.

    The serving decoder runs one thread on a CPU by default. With more, torch's sine
    spreads over them and NumPy's single-threaded one saves no CPU time (alternating
    runs: perf/results/2026-11-26_cpu-2core-amd-epyc-sine).
    """
    if u.device.type == "cpu" and u.dtype == torch.float32 and not u.requires_grad and torch.get_num_threads() == 1:
        return numpy_sine(u)
    return torch.sin(u)


def numpy_sine(u: torch.Tensor) -> torch.Tensor:
    """sin(u) of a float32 CPU tensor through NumPy's vectorized sine, as a new tensor.

    The sine was a fifth of a batched serving decode on an AMD EPYC (Zen 4) core, where
    torch's float32 sine took 1.3-1.5 ns an element and NumPy's 0.56-0.62 ns (its SIMD
    sine; both within 1e-7 of the float64 sine): one thread's batched decode 10% less
    CPU time, a lone window's 5.5%. Only the folded Snakes use it: their decoder already
    rounds a few positions differently from upstream, while the exact decoder's Snake
    keeps torch's sine, bit for bit upstream's.
    """
    out = torch.empty(u.shape, dtype=u.dtype)
    np.sin(u.numpy(), out=out.numpy())
    return out


def _is_conv(module: nn.Module) -> TypeGuard[nn.Conv1d | nn.ConvTranspose1d]:
    """A convolution whose channels can be scaled one by one: dense or depthwise."""
    conv = cast("nn.Conv1d | nn.ConvTranspose1d", module)  # its attributes read only once type() says so
    return type(module) in (nn.Conv1d, nn.ConvTranspose1d) and (
        conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels)


@torch.no_grad()
def _scale_input_channels(conv: nn.Conv1d | nn.ConvTranspose1d, scale: torch.Tensor) -> None:
    if isinstance(conv, nn.ConvTranspose1d) or conv.groups > 1:  # weight [in, ...] or depthwise [C, 1, k]
        conv.weight.mul_(scale.view(-1, 1, 1))
    else:  # [out, in, k]
        conv.weight.mul_(scale.view(1, -1, 1))


@torch.no_grad()
def _scale_output_channels(conv: nn.Conv1d | nn.ConvTranspose1d, scale: torch.Tensor) -> None:
    if isinstance(conv, nn.ConvTranspose1d) and conv.groups == 1:  # [in, out, k]
        conv.weight.mul_(scale.view(1, -1, 1))
    else:  # [out, in / groups, k]
        conv.weight.mul_(scale.view(-1, 1, 1))
    if conv.bias is not None:
        conv.bias.mul_(scale)


def fold_snake_scales(model: nn.Module) -> int:
    """Fold every Snake's scales into its neighbouring convolutions (see the module docstring), in place.

    Only a Snake that feeds a convolution directly (in an ``nn.Sequential``, the only
    consumer of its output) is folded; its alpha moves into the convolution before it
    when that one feeds nothing else. Returns how many Snakes were folded.
    """
    folded = 0
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        layers = list(container)
        for index, layer in enumerate(layers[:-1]):
            following = layers[index + 1]
            if type(layer) is not Snake or not _is_conv(following):
                continue
            alpha = layer.alpha.detach().view(-1)
            if alpha.numel() != following.in_channels or alpha.abs().min() < MIN_FOLDED_ALPHA:
                continue
            _scale_input_channels(following, (alpha + 1e-9).reciprocal())
            previous = layers[index - 1] if index > 0 else None
            input_scaled = previous is not None and _is_conv(previous) and previous.out_channels == alpha.numel()
            if input_scaled:  # previous is a convolution (_is_conv)
                _scale_output_channels(cast("nn.Conv1d | nn.ConvTranspose1d", previous), alpha)
            container[index] = FoldedSnake(layer, input_scaled)
            folded += 1
    return folded
