"""Llama-3 in plain torch, with a slot-based static KV cache, loading Hugging Face checkpoints.

The model is written for a serving loop, not for training:

* The KV cache is preallocated for ``max_streams`` slots of ``max_seq_len``
  positions (plus the scratch slots where prompts are prefilled), one tensor
  [layer, keys/values, slot, position, kv head, dim] of which each layer's keys and
  values are views. A forward call works on a contiguous run of slots, so the
  decode step over the active streams ``0..n-1`` reads the cache through views
  and never gathers.
* Every row carries its own positions, so rows of different lengths share one
  batched forward; the mask hides each row's unused cache positions. On GPU a
  decode step reads only each row's own keys instead (``varlen_decode_attention``):
  with a mask every row would read as many as the longest one.

Checkpoints are read in Hugging Face's format (``config.json`` plus one or more
``*.safetensors`` files); Orpheus 3B is such a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cuda_graphs import GraphRefused, capture, capture_checked, padded_sizes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131_072

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face config.json. Raises ValueError for a Llama variant this model does not
        compute (biases in the projections, an activation other than SiLU): it would load and be wrong."""
        for field, plain in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if hf.get(field, plain) != plain:
                raise ValueError(f"config.json has {field} {hf[field]!r}; this Llama supports only {plain!r}")
        heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = rope_settings(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        )


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of a config.json in either layout: top-level ``rope_theta`` and
    ``rope_scaling`` (transformers 4, Orpheus's own checkpoint), or ``rope_parameters`` holding both
    (transformers 5 writes only that: read the old way, a fine-tune saved by it would load with the
    default theta and no Llama-3 scaling, every position wrong)."""
    parameters = hf.get("rope_parameters") or {}
    parameters = parameters.get("full_attention", parameters)  # per attention type in some models
    theta = hf.get("rope_theta", parameters.get("rope_theta", 10_000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and parameters.get("rope_type", parameters.get("type", "default")) != "default":
        scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    return theta, scaling


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3's long-context rescaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if absent := [key for key in needed if key not in scaling]:
            raise ValueError(f"llama3 rope scaling lacks {', '.join(absent)}")
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, default)")
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotary embedding (Hugging Face's half-split layout). x: [B, T, H, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention needs about a forward's rows, computed once per forward rather than
    once per layer (on a GPU each of these is a kernel or a few; 28 layers repeated them every step).

    ``positions`` [B, T] absolute positions of the rows' tokens, in slots ``first_slot``.. ; attention
    reads the first ``context_len`` cached positions, ``mask`` [B, 1, T, context_len] hiding what a
    query may not see; ``cache_rows`` [B, T] each token's row, for writing its keys and values;
    ``varlen``: the per-row decode attention's index tensors (``varlen_indices``) when it runs.
    """

    positions: torch.Tensor
    first_slot: int
    context_len: int
    mask: torch.Tensor
    cache_rows: torch.Tensor
    varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class RMSNorm(nn.Module):
    """Llama's RMSNorm through torch's own operator: in float32 for bf16/fp16 inputs, as Hugging Face
    computes it, scaled by the weight before the one rounding back (Hugging Face rounds first), and one
    fused kernel on GPUs where torch has it instead of seven elementwise ones."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        hd = config.head_dim
        # q, k and v projections in one matrix product (rows: q's, then k's, then v's; load_llama
        # concatenates a checkpoint's three): one kernel instead of three for every layer and step.
        self.qkv_proj = nn.Linear(config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None  # [slots, max_seq_len, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        batch, steps, _ = x.shape
        config, hd = self.config, self.config.head_dim
        heads, kv_heads = config.num_heads, config.num_kv_heads
        qkv = self.qkv_proj(x)
        # q's and k's heads side by side, rotated in one go (the same positions), v as it is
        qk = rotate(qkv[..., : (heads + kv_heads) * hd].view(batch, steps, heads + kv_heads, hd), cos, sin)
        q, k = qk.split([heads, kv_heads], dim=2)
        v = qkv[..., (heads + kv_heads) * hd :].view(batch, steps, kv_heads, hd)

        slots = slice(inputs.first_slot, inputs.first_slot + batch)
        # Llama.allocate_cache sets both before any forward (without them there is nowhere to attend)
        assert self.k_cache is not None and self.v_cache is not None
        k_cache, v_cache = self.k_cache[slots], self.v_cache[slots]  # views
        k_cache[inputs.cache_rows, inputs.positions] = k.to(k_cache.dtype)
        v_cache[inputs.cache_rows, inputs.positions] = v.to(v_cache.dtype)

        if steps == 1 and inputs.varlen is not None:
            y = varlen_decode_attention(q.to(k_cache.dtype), self.k_cache, self.v_cache, inputs.first_slot,
                                        inputs.positions, inputs.context_len, inputs.varlen)
        else:
            y = masked_attention(q, k_cache, v_cache, inputs.context_len, inputs.mask)
        return self.o_proj(y.to(x.dtype).reshape(batch, steps, -1))


# Attention kernels a masked attention may use on a GPU: all but cuDNN's, which torch prefers on Hopper
# (compute capability 9.0/10.0 with a recent cuDNN). cuDNN attention builds a graph for every new shape;
# prefill shapes (prompts x width) change with every burst of callers, and on an H100 every new shape in
# the serving path stalled all streams for about 2 s (perf/results/2026-11-26_h100). The other kernels
# are compiled ahead of time.
GPU_MASKED_ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_len: int,
                     mask: torch.Tensor) -> torch.Tensor:
    """Attention [B, T, heads, hd] of queries q [B, T, heads, hd] over their rows' cache [B, S, kv, hd],
    the first ``context_len`` positions, with ``mask`` [B, 1, T, context_len] hiding what a query may not see."""
    if q.is_cuda:
        with sdpa_kernel(GPU_MASKED_ATTENTION_KERNELS):
            return _masked_attention(q, k_cache, v_cache, context_len, mask)
    return _masked_attention(q, k_cache, v_cache, context_len, mask)


def _masked_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_len: int,
                      mask: torch.Tensor, expand_kv: bool | None = None) -> torch.Tensor:
    """``masked_attention``'s arithmetic. ``expand_kv`` (None: on a GPU): a prefill's keys and values are
    expanded to every query head first. A mask with ``enable_gqa`` leaves torch only its math kernel on a
    GPU (FlashAttention takes no mask, memory-efficient attention no grouped heads), which materialises
    every score in float32; expanded, memory-efficient attention takes it. On a CPU the grouped call is
    the one measured (its kernel handles both)."""
    batch, steps, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache[:, :context_len].transpose(1, 2)  # [B, kv_heads, L, hd]
    values = v_cache[:, :context_len].transpose(1, 2)
    q = q.transpose(1, 2)  # [B, heads, T, hd]
    if steps == 1:
        # A decode step: the query heads that share a KV head (consecutive, as in HF's
        # repeat_kv) become that KV head's queries, and the mask [B, 1, 1, L] holds for
        # all of them. Plain multi-head attention over the KV heads then needs no GQA
        # support from the kernel, so no backend expands keys and values to every
        # query head (1.1-1.5x faster on CPU).
        y = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, -1, hd), keys, values, attn_mask=mask)
        y = y.reshape(batch, heads, 1, hd)
    elif q.is_cuda if expand_kv is None else expand_kv:
        groups = heads // kv_heads  # query head h reads KV head h // groups, as enable_gqa and HF's repeat_kv
        keys, values = (t[:, :, None].expand(batch, kv_heads, groups, *t.shape[2:]).reshape(batch, heads,
                                                                                             *t.shape[2:])
                        for t in (keys, values))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2)


def _flash_attention(*args, **kwargs):
    """torch's FlashAttention entry (CUDA only); tests put a reference implementation in its place."""
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def varlen_indices(batch: int, first_slot: int, seq: int, positions: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``varlen_decode_attention``'s index tensors for rows ``first_slot``.. of a cache of ``seq`` positions
    per slot: each row's query start, its keys' start in the flattened cache and its key count."""
    query_starts = torch.arange(batch + 1, device=positions.device, dtype=torch.int32)
    key_starts = (query_starts + first_slot) * seq
    lengths = (positions.reshape(batch) + 1).to(torch.int32)
    return query_starts, key_starts, lengths


def varlen_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, first_slot: int,
                            positions: torch.Tensor, max_keys: int,
                            indices: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decode step's attention [B, 1, heads, hd] where row b reads only its own positions[b] + 1 keys.

    With a mask every row reads keys up to the longest row's context: at a few hundred
    streams of mixed lengths about twice the KV traffic, which is most of a step's memory
    reads. FlashAttention's variable-length kernel (in torch as aten._flash_attention_forward,
    CUDA and half precision only) takes each row's keys where they lie in the cache: row b's
    start is its slot's first position in the flattened cache, its length ``seqused_k``.
    Grouped-query heads are the kernel's own business. Row b's key at positions[b] must
    already be written. ``indices``: ``varlen_indices`` of these rows, if the caller has them.
    """
    batch, _, heads, hd = q.shape
    slots, seq, kv_heads, _ = k_cache.shape
    query_starts, key_starts, lengths = indices or varlen_indices(batch, first_slot, seq, positions)
    out = _flash_attention(
        q.reshape(batch, heads, hd), k_cache.view(slots * seq, kv_heads, hd), v_cache.view(slots * seq, kv_heads, hd),
        query_starts, key_starts, 1, max_keys, 0.0, False, False, seqused_k=lengths,
    )[0]
    return out.view(batch, 1, heads, hd)


def varlen_decode_works(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether ``varlen_decode_attention`` runs here and agrees with ``masked_attention``, tried on a
    small problem: it needs CUDA, half precision and a torch whose FlashAttention takes ``seqused_k``."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _agrees_with_masked(device, dtype, heads, kv_heads, head_dim)


def _agrees_with_masked(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    slots, seq = 5, 96
    k_cache = torch.randn(slots, seq, kv_heads, head_dim, device=device, generator=gen).to(dtype)
    v_cache = torch.randn(slots, seq, kv_heads, head_dim, device=device, generator=gen).to(dtype)
    q = torch.randn(3, 1, heads, head_dim, device=device, generator=gen).to(dtype)
    positions = torch.tensor([[5], [70], [0]], device=device)
    mask = (torch.arange(seq, device=device)[None, None, :] <= positions[:, :, None])[:, None]
    try:
        got = varlen_decode_attention(q, k_cache, v_cache, 1, positions, seq)
    except Exception as error:  # noqa: BLE001 (an older torch or GPU: the masked path serves)
        log.warning("per-row decode attention unavailable (%s); decode steps read keys up to the longest row", error)
        return False
    want = masked_attention(q, k_cache[1:4], v_cache[1:4], seq, mask)
    if not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2):
        log.warning("per-row decode attention disagrees with the masked path here; not used")
        return False
    return True


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        # gate and up projections in one matrix product (gate's rows, then up's; see load_llama)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-3 decoder; parameter names follow Hugging Face's, but for the fused projections that
    ``load_llama`` builds from a checkpoint's (``FUSED_PROJECTIONS``)."""

    inv_freq: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.max_seq_len = 0
        self.num_slots = 0
        self.kv_cache: torch.Tensor | None = None  # [layers, keys/values, slots, max_seq_len, kv_heads, head_dim]
        self.varlen_decode = False  # decode steps through varlen_decode_attention (GPU; use_varlen_decode)

    def allocate_cache(self, num_slots: int, max_seq_len: int) -> None:
        """Preallocate the KV cache; its size is fixed for the engine's lifetime."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        param = self.embed_tokens.weight
        # Every layer's keys and values in one tensor, each layer's k_cache and v_cache a view of it, so
        # that moving a slot (copy_slot: at every stream's end) is one copy instead of two per layer
        # (56 kernel launches and their Python on Orpheus 3B: 6-9% of a served engine step's host time at
        # 128-216 streams on an H100, perf/results/2026-11-27_h100).
        self.kv_cache = torch.zeros((len(self.layers), 2, num_slots, max_seq_len, self.config.num_kv_heads,
                                     self.config.head_dim), dtype=param.dtype, device=param.device)
        for layer, (keys, values) in zip(cast("Iterable[DecoderLayer]", self.layers), self.kv_cache, strict=True):
            layer.self_attn.k_cache, layer.self_attn.v_cache = keys, values
        self.max_seq_len, self.num_slots = max_seq_len, num_slots

    def use_varlen_decode(self, enabled: bool | None = None) -> bool:
        """Make decode steps read only each row's own keys (``varlen_decode_attention``); None: where
        that works (``varlen_decode_works``). Returns whether they do."""
        if enabled is None:
            config, weight = self.config, self.embed_tokens.weight
            enabled = varlen_decode_works(weight.device, weight.dtype, config.num_heads, config.num_kv_heads,
                                          config.head_dim)
        self.varlen_decode = enabled
        return enabled

    def copy_slot(self, source: int, target: int, length: int, count: int = 1) -> None:
        """Move the first ``length`` cached positions of ``count`` slots from ``source``.. to ``target``..
        (every layer's, in one copy; the two ranges must not overlap)."""
        assert self.kv_cache is not None  # slots exist once allocate_cache made them
        self.kv_cache[:, :, target : target + count, :length] = self.kv_cache[:, :, source : source + count, :length]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        first_slot: int = 0,
        context_len: int | None = None,
        last_only: bool = True,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits for ``tokens`` [B, T] at absolute ``positions`` [B, T], rows in slots first_slot.. .

        ``context_len`` bounds how much of the cache attention reads; it must cover
        every row's largest position. ``last_only`` returns logits of the last
        step only ([B, V]) instead of all steps ([B, T, V]). ``hidden_only`` returns the
        normed final hidden states instead of logits, for a sampler that computes only
        the logits it needs (see sampling.LmHead).
        """
        if context_len is None:
            context_len = int(positions.max()) + 1
        x = self.embed_tokens(tokens)
        angles = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, T, 1, D]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        batch, steps = tokens.shape
        key_positions = torch.arange(context_len, device=tokens.device)
        inputs = AttentionInputs(
            positions=positions, first_slot=first_slot, context_len=context_len,
            mask=(key_positions[None, None, :] <= positions[:, :, None])[:, None],  # [B, 1, T, L]
            cache_rows=torch.arange(batch, device=tokens.device)[:, None].expand(batch, steps),
            varlen=(varlen_indices(batch, first_slot, self.max_seq_len, positions)
                    if steps == 1 and self.varlen_decode else None),
        )
        for layer in self.layers:
            x = layer(x, cos, sin, inputs)
        if last_only:
            x = x[:, -1]
        x = self.norm(x)
        return x if hidden_only else self.lm_head(x).float()


# Each layer's weights as a Hugging Face checkpoint names them, and the fused matrices they load into.
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def checkpoint_names(config: LlamaConfig) -> list[str]:
    """The tensors a Hugging Face Llama checkpoint must hold for this config (without the "model." prefix)."""
    with torch.device("meta"):
        names = list(Llama(config).state_dict())
    wanted = []
    for name in names:
        fused = next((f for f in FUSED_PROJECTIONS if name.endswith("." + f)), None)
        prefix = name.removesuffix(fused) if fused else ""
        wanted += [prefix + part for part in FUSED_PROJECTIONS[fused]] if fused else [name]
    return wanted


def checkpoint_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``checkpoint_names`` with each tensor's shape, by arithmetic on the config (no model is built, not
    even on the meta device; tests hold the two to the same names and shapes)."""
    hidden, inter, vocab, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    layer = {
        "self_attn.q_proj.weight": (config.num_heads * hd, hidden),
        "self_attn.k_proj.weight": (config.num_kv_heads * hd, hidden),
        "self_attn.v_proj.weight": (config.num_kv_heads * hd, hidden),
        "self_attn.o_proj.weight": (hidden, config.num_heads * hd),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, hidden)}
    for index in range(config.num_layers):
        shapes |= {f"layers.{index}.{name}": shape for name, shape in layer.items()}
    return shapes | {"norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> None:
    """Replace each layer's q/k/v and gate/up weights in ``state`` by their concatenation (in place)."""
    for index in range(num_layers):
        prefix = f"layers.{index}."
        for fused, parts in FUSED_PROJECTIONS.items():
            state[prefix + fused] = torch.cat([state.pop(prefix + part) for part in parts])


def weight_files(path: Path) -> list[Path]:
    """A checkpoint's weight files: those its index (model.safetensors.index.json) names, else
    model.safetensors, else every *.safetensors (a stale file beside the shards must not be read)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to file names: not a safetensors index")
        names = sorted(set(weight_map.values()))
        if absent := [name for name in names if not (path / name).is_file()]:
            raise FileNotFoundError(f"{index} names {absent[:3]}, which {path} does not hold")
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"LLM directory {path} has no *.safetensors weights")
    return files


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file where it is not one (json's own message
    names only a line and column)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not JSON: it is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} holds a JSON {type(document).__name__}, not an object")
    return document


# config.json's fields that give the model's shapes: whole numbers >= 1 where given (the first five must be).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_key_value_heads", "head_dim")


def read_llama_config(path: str | Path) -> LlamaConfig:
    """The LlamaConfig of checkpoint directory ``path``'s config.json. Raises FileNotFoundError or ValueError
    naming the file and the problem: not JSON, not a Llama, a shape field missing or not a whole number,
    heads that do not group (json's, KeyError's and the rope's own messages named none of it)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"LLM directory {path} has no config.json (expected a Hugging Face Llama checkpoint)")
    hf_config = read_json_object(config_file)
    if hf_config.get("model_type", "llama") != "llama":
        raise ValueError(f"{config_file}: model_type {hf_config.get('model_type')!r} is not 'llama'")
    for index, field in enumerate(SHAPE_FIELDS):
        value = hf_config.get(field)
        if value is None and index < 5:
            raise ValueError(f"{config_file} lacks {field}: not a complete Llama config.json")
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{config_file} has {field} {value!r}: expected a whole number >= 1")
    heads, kv_heads = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads") or 0
    if kv_heads and heads % kv_heads:
        raise ValueError(f"{config_file} has num_attention_heads {heads}, not a multiple of num_key_value_heads "
                         f"{kv_heads}: each key/value head serves a whole group of query heads")
    try:
        config = LlamaConfig.from_hf(hf_config)
        rope_frequencies(config)  # an unknown or incomplete rope_scaling
    except (ValueError, TypeError) as error:  # from_hf's messages begin "config.json has ...": name the file
        detail = str(error)
        raise ValueError(f"{config_file} {detail.removeprefix('config.json ')}" if detail.startswith("config.json ")
                         else f"{config_file}: {detail}") from None
    return config


# The safetensors library's own bound on a header; a larger length is not a safetensors file's.
SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of safetensors ``file``, from its header alone (8 bytes giving the header's
    length, then the JSON header): what the checkpoint holds, without reading gigabytes of weights.

    Raises ValueError naming the file for one that is not a safetensors file (a Git LFS pointer, a damaged
    header) or is shorter than its header says (an interrupted download, which safetensors' loader
    otherwise reports inside the server, with no file named)."""
    size = file.stat().st_size
    with file.open("rb") as weights:
        start = weights.read(8)
        if start.startswith(b"version "):
            start += weights.read(56)
            if start.startswith(b"version https://git-lfs"):
                raise ValueError(f"{file} is a Git LFS pointer, not the weights: fetch them (git lfs pull)")
        if len(start) < 8:
            raise ValueError(f"{file} is not a safetensors file: it is {size} bytes long (cut short? fetch it again)")
        length = int.from_bytes(start[:8], "little")
        if length > SAFETENSORS_MAX_HEADER:
            raise ValueError(f"{file} is not a safetensors file: its first 8 bytes do not give a header length")
        if 8 + length > size:
            raise ValueError(f"{file} is cut short: {size:,} bytes, where its header alone takes {8 + length:,} "
                             "(an interrupted download or copy? fetch it again)")
        weights.seek(8)
        raw = weights.read(length)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{file} is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file: its header is not a JSON object")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and isinstance(shape, list) and all(type(n) is int for n in shape)):
            raise ValueError(f"{file} is not a safetensors file: its header's entry for {name!r} has no shape and "
                             "data offsets")
        shapes[name] = tuple(shape)
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ValueError(f"{file} is cut short: {size:,} bytes, where its header says {8 + length + end:,} "
                         "(an interrupted download or copy? fetch it again)")
    return shapes


def _shape_summary(config: LlamaConfig) -> str:
    return (f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}, intermediate_size "
            f"{config.intermediate_size}, num_hidden_layers {config.num_layers}, num_attention_heads "
            f"{config.num_heads}, num_key_value_heads {config.num_kv_heads}, head_dim {config.head_dim}")


def _first(names: list[str], limit: int = 3) -> str:
    return f"{names[:limit]}" + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_checkpoint(path: str | Path) -> LlamaConfig:
    """Refuse, from config.json and the safetensors headers alone, a checkpoint ``load_llama`` would refuse
    after reading every weight: a config.json that is not one, a weight file cut short, tensors missing,
    of shapes other than the config's, or with no place in the model. Returns the config.

    It costs milliseconds where loading costs seconds to minutes (6 GB for Orpheus 3B), so ``serve``
    runs it before tritonserver starts: inside the server a mismatch left only "failed to load all
    models", its reason buried in the server's log."""
    path = Path(path)
    config = read_llama_config(path)
    config_file = path / "config.json"
    wanted = checkpoint_shapes(config)
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in weight_files(path):
        for key, shape in safetensors_shapes(file).items():
            found[key.removeprefix("model.")] = (file, key, shape)
    if config.tie_word_embeddings:  # the head is the embeddings (load_llama ignores a checkpoint's own)
        wanted.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)
    advice = "use the config.json that came with these weights"
    if missing := sorted(name for name in wanted if name not in found):
        raise ValueError(f"checkpoint in {path} lacks {_first(missing)}, which its config.json calls for "
                         f"(num_hidden_layers {config.num_layers}, tie_word_embeddings "
                         f"{str(config.tie_word_embeddings).lower()}): {advice}")
    if unused := sorted(name for name in found if name not in wanted and not name.endswith("rotary_emb.inv_freq")):
        raise ValueError(f"checkpoint in {path} has tensors this Llama does not use: {_first(unused)} (its "
                         f"config.json has num_hidden_layers {config.num_layers}): {advice}, or a plain Llama's")
    if wrong := [name for name in wanted if found[name][2] != wanted[name]]:
        file, key, shape = found[wrong[0]]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise ValueError(f"{config_file} does not describe the weights in {file}: {key} is {list(shape)} there, "
                         f"{list(wanted[wrong[0]])} by the config ({_shape_summary(config)}){more}: {advice}")
    return config


def load_llama(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Llama:
    """Load a Hugging Face Llama checkpoint (config.json + *.safetensors) from a local directory."""
    path = Path(path)
    config = read_llama_config(path)
    files = weight_files(path)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    with torch.device("meta"):
        model = Llama(config)
    state = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = key.removeprefix("model.")
                state[name] = f.get_tensor(key).to(dtype)
    if config.tie_word_embeddings:  # untied, a missing head is an error below, not the embeddings
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    missing = sorted(name for name in checkpoint_names(config) if state.get(name) is None)
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {missing[:5]}")
    fuse_projections(state, config.num_layers)
    try:
        loaded = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shapes: the weights are not of the model config.json describes
        raise ValueError(f"checkpoint in {path} does not match its config.json: {error}") from None
    # Old checkpoints keep the rotary frequencies (recomputed here); anything else would be ignored.
    unexpected = [name for name in loaded.unexpected_keys if not name.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(f"checkpoint in {path} has tensors this Llama does not use: {sorted(unexpected)[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(config)
    # Serving never trains: no parameter records autograd history, whatever the caller's grad mode
    # (a CUDA graph captured with autograd on would keep every step's activations alive for backward).
    model.requires_grad_(False)
    return model.to(device).eval()


def kv_cache_bytes(config: LlamaConfig, slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache ``allocate_cache(slots, max_seq_len)`` makes (keys and values, every layer)."""
    per_position = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
    return slots * max_seq_len * per_position


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or on a CPU what Linux
    reports as available (MemAvailable); None where it cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class BucketedDecoder:
    """The decode step at a few fixed shapes, replayed from CUDA graphs on GPU.

    A decode step's shapes vary with the number of streams and the longest
    context. Rounding both up to buckets (batch: powers of two below
    ``batch_step``, then multiples of it up to the slot count; context:
    multiples of ``context_step``) leaves a bounded set of shapes, each captured
    once as a CUDA graph, so a step costs one graph launch whatever the batch.
    Multiples rather than powers of two above ``batch_step``: 216 streams run as
    224 rows, not 256 (a step's weight reads are the same, its compute and KV
    reads scale with the rows). Rows past the real batch read token 0 at
    position 0 and write only into free slots, which are overwritten when a
    stream moves in. On CPU the same padding runs eagerly (it keeps the
    logic testable; there is no launch overhead to save).
    """

    def __init__(self, model: Llama, context_step: int = 256, batch_step: int = 32, use_graphs: bool | None = None,
                 max_batch: int | None = None):
        device = model.embed_tokens.weight.device
        self.model = model
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.context_step = context_step
        # The decoding slots 0..max_batch-1 (by default all but the last slot; the engine says how many: the
        # slots past its streams' are its prefills' scratch slots)
        max_batch = model.num_slots - 1 if max_batch is None else max_batch
        self.batch_buckets = list(padded_sizes(max_batch, batch_step))
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Per-row key lengths where the GPU can (decided before any graph is captured).
        self.varlen = model.use_varlen_decode() if device.type == "cuda" else False

    def bucket(self, batch: int, context_len: int) -> tuple[int, int]:
        rows = next(b for b in self.batch_buckets if b >= batch)
        context = min(-(-context_len // self.context_step) * self.context_step, self.model.max_seq_len)
        return rows, context

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, context_len: int) -> torch.Tensor:
        """Final hidden states [B, H] for one decode step of slots 0..B-1."""
        batch = tokens.shape[0]
        rows, context = self.bucket(batch, context_len)
        self.tokens[:batch].copy_(tokens)
        self.tokens[batch:rows].zero_()
        self.positions[:batch].copy_(positions)
        self.positions[batch:rows].zero_()
        if not self.use_graphs:
            return self._forward(rows, context)[:batch]
        graph, out = self.graphs.get((rows, context)) or self._capture(rows, context)
        graph.replay()
        return out[:batch]

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, context) a decode step can run at."""
        contexts = sorted({self.bucket(1, length)[1]
                           for length in range(1, self.model.max_seq_len + 1, self.context_step)})
        return [(rows, context) for rows in self.batch_buckets for context in contexts]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every shape's graph now (a server's startup) instead of on first use, where a
        capture stalls every stream for a few forwards. Returns how many graphs were captured."""
        if not self.use_graphs:
            return 0
        self.tokens.zero_()
        self.positions.zero_()
        missing = [shape for shape in self.shapes() if shape not in self.graphs]
        for rows, context in missing:
            self._capture(rows, context)
        return len(missing)

    def _forward(self, rows: int, context: int) -> torch.Tensor:
        return self.model(self.tokens[:rows], self.positions[:rows], first_slot=0, context_len=context,
                          hidden_only=True)

    def _capture(self, rows: int, context: int):
        # Warm-up runs compute exactly this step (the buffers hold its inputs), so
        # the cache entries they write are the ones the replay writes again.
        graph, out = capture(lambda: self._forward(rows, context), self.tokens.device, self.pool)
        self.graphs[(rows, context)] = (graph, out)
        return graph, out


class BucketedPrefill:
    """Short prompts' prefill at a few fixed shapes, replayed from CUDA graphs on GPU.

    An eager prefill launches every layer's kernels from Python: about 6 ms of host time a forward on an
    H100's host whatever its size (perf/results/2026-11-27_h100, the check's new shapes), and served at a
    few hundred streams nearly every engine step prefills a newcomer: prefills took half the engine
    thread's time. Here up to ``max_rows`` prompts, padded to a power-of-two count of rows and width
    (``max_tokens`` positions at most in all), run as one captured graph: one launch. A graph's slots
    are fixed when it is captured, so the graphs prefill scratch slots ``first_slot``..
    ``first_slot + max_rows - 1``, from which the caller moves the prompts into their decode slots (one
    copy, ``Llama.copy_slot``). Padding rows and positions write entries that a row's mask hides until
    its own tokens overwrite them. Each graph is checked when it is captured against the same prefill run
    eagerly, on random prompts of several lengths; should one disagree or fail to capture, no prefill is
    taken here any more (``bucket`` says None: the caller prefills eagerly at the prompts' own shape; logged).
    On CPU (``use_graphs=False``) the same padding runs eagerly, to test it without a GPU.
    """

    MIN_WIDTH = 16

    def __init__(self, model: Llama, first_slot: int, max_rows: int, max_tokens: int, use_graphs: bool | None = None):
        device = model.embed_tokens.weight.device
        if first_slot + max_rows > model.num_slots:
            raise ValueError(f"{max_rows} scratch slots from slot {first_slot} do not fit {model.num_slots} slots")
        self.model = model
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.enabled = True  # False once a graph failed its check: prefills go back to the caller's eager path
        self.first_slot = first_slot
        self.max_tokens = max_tokens
        self.rows = [1 << i for i in range(max_rows.bit_length())]
        widest = min(max_tokens, model.max_seq_len)
        self.widths = [self.MIN_WIDTH << i for i in range(max(0, widest // self.MIN_WIDTH).bit_length())]
        self.tokens = torch.zeros(max_rows, max(self.widths, default=1), dtype=torch.long, device=device)
        self.last = torch.zeros(max_rows, dtype=torch.long, device=device)  # each row's last prompt position
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The (rows, width) a prefill of ``rows`` prompts up to ``width`` tokens runs at; None: not here."""
        padded_rows = next((r for r in self.rows if r >= rows), None)
        padded_width = next((w for w in self.widths if w >= width), None)
        if not self.enabled or padded_rows is None or padded_width is None or \
                padded_rows * padded_width > self.max_tokens:
            return None
        return padded_rows, padded_width

    def shapes(self) -> list[tuple[int, int]]:
        return [(r, w) for r in self.rows for w in self.widths if r * w <= self.max_tokens]

    def __call__(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Prefill ``tokens`` [B, T] (row b's prompt in its first last[b] + 1 positions) into the scratch
        slots; the normed final hidden state [B, H] at each row's last prompt position."""
        batch, width = tokens.shape
        shape = self.bucket(batch, width)
        if shape is None:
            raise ValueError(f"no prefill bucket for {batch} prompts of up to {width} tokens")
        rows, padded = shape
        self.tokens[:rows, :padded].zero_()
        self.tokens[:batch, :width].copy_(tokens)
        self.last[:rows].zero_()
        self.last[:batch].copy_(last)
        if not self.use_graphs:
            return self._forward(rows, padded)[:batch]
        if shape not in self.graphs:  # captured now: its check replayed it on these very inputs
            captured = self._capture(rows, padded)
            # its check failed (logged): this once at the padded shape, eagerly
            return (self._forward(rows, padded) if captured is None else captured[1])[:batch]
        graph, out = self.graphs[shape]
        graph.replay()
        return out[:batch]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every shape's graph now (a server's startup), each checked on random prompts of several
        lengths (the last row's the whole width). Returns how many were captured and kept (none once one
        failed its check: then every prefill is eager)."""
        if not self.use_graphs:
            return 0
        generator = torch.Generator(device=self.tokens.device).manual_seed(0)
        before = len(self.graphs)
        for rows, width in self.shapes():
            if (rows, width) in self.graphs:
                continue
            self.tokens.random_(0, self.model.config.vocab_size, generator=generator)
            self.last[:rows] = torch.linspace(width // 2, width - 1, rows, device=self.last.device).long()
            if self._capture(rows, width) is None:
                return 0
        return len(self.graphs) - before

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        positions = torch.arange(width, device=self.tokens.device).expand(rows, width)
        hidden = self.model(self.tokens[:rows, :width], positions, first_slot=self.first_slot, context_len=width,
                            last_only=False, hidden_only=True)
        return hidden[torch.arange(rows, device=hidden.device), self.last[:rows]]

    def _capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        try:
            graph, out = capture_checked(lambda: self._forward(rows, width), self.tokens.device, self.pool,
                                         tolerance=lambda eager: 1e-2 * max(1.0, eager.float().abs().max().item()))
        except GraphRefused as refused:
            self._give_up(f"{rows} x {width} tokens: {refused}")
            return None
        self.graphs[(rows, width)] = (graph, out)
        return graph, out

    def _give_up(self, why: str) -> None:
        log.warning("prefill: %s; prefilling eagerly", why)
        self.use_graphs = self.enabled = False
        self.graphs.clear()  # their memory back
