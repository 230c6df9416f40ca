"""FlashAttention's variable-length forward (torch.ops.aten._flash_attention_forward), in plain torch.

The kernel is CUDA-only. This is what it computes, as far as the engine uses it,
so that the engine's per-row decode attention (llama.varlen_decode_attention)
can be checked on any machine: sequence b's queries q[cum_q[b]:cum_q[b+1]]
attend to the keys k[cum_k[b] : cum_k[b] + seqused_k[b]] (all of
cum_k[b]:cum_k[b+1] without seqused_k), query head h to KV head h // (heads / kv_heads).
"""

import math

import torch


def flash_attention_forward(q, k, v, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                            scale=None, seqused_k=None, **_):
    assert dropout_p == 0.0 and not is_causal and q.dim() == k.dim() == 3
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(len(cum_q) - 1):
        start = int(cum_k[b])
        used = int(seqused_k[b]) if seqused_k is not None else int(cum_k[b + 1]) - start
        assert used <= max_k
        keys = k[start : start + used].repeat_interleave(group, dim=1)  # [n, heads, d]
        values = v[start : start + used].repeat_interleave(group, dim=1)
        queries = q[int(cum_q[b]) : int(cum_q[b + 1])]  # [t, heads, d]
        weights = torch.einsum("thd,nhd->htn", queries, keys) * (scale or 1 / math.sqrt(q.shape[-1]))
        out[int(cum_q[b]) : int(cum_q[b + 1])] = torch.einsum("htn,nhd->thd", weights.softmax(-1), values)
    return out, None, None, None, None
