"""Cheaper but equal forms of the decoder's cross-attention when one side has few tokens.

The mask decoder attends between a handful of prompt tokens (5 output tokens + points, so
``n_tokens`` ~ 7) and thousands of image tokens (4096 for a 64x64 grid). The plain form projects
every image token to ``internal_dim`` (128) three times per layer. When ``num_heads * n_tokens <
internal_dim``, pulling the projections over to the token side is cheaper and exactly equal in
exact arithmetic (float results differ by rounding only):

- few queries, many keys (tokens -> image): ``(q Wq^T) (k Wk^T)^T = (q Wq^T Wk) k^T`` per head, and
  ``softmax(.) (v Wv^T + b) = (softmax(.) v) Wv^T + b`` because each softmax row sums to one;
  the key bias adds the same number to all of a query's logits, which softmax ignores.
- many queries, few keys (image -> tokens): ``(q Wq^T + bq) k^T = q (Wq^T k^T) + bq k^T`` per head,
  and the output projection folds into the token values: ``sum_h A_h (v_h Wo_h^T) + bo``.

Each function takes the layer (for its weights) and returns what ``layer(q, k, v)`` returns. An
input whose batch is 1 while the other side's is B is shared by all B prompts (broadcast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.modeling.transformer import Attention


def keys_folded_attention(layer: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention for few queries ``q (Bq, nq, C)`` over many keys ``k``/``v`` ``(Bk, nk, C)``."""
    heads, inner = layer.num_heads, layer.internal_dim
    head_dim, channels = inner // heads, k.shape[-1]
    batch, nq = max(q.shape[0], k.shape[0]), q.shape[1]
    projected = layer.q_proj(q).view(q.shape[0], nq, heads, head_dim)
    w_k = layer.k_proj.weight.view(heads, head_dim, channels)
    # Each query head pulled back through k_proj: (Bq, heads, nq, C), softmax scale included.
    q_tilde = torch.einsum("bnhd,hdc->bhnc", projected, w_k) * head_dim**-0.5
    if k.shape[0] == 1:  # keys shared by every prompt: one matrix product for all of them
        probs = (q_tilde.reshape(-1, channels) @ k[0].transpose(0, 1)).softmax(dim=-1)
        pooled = (probs @ v[0]).view(q.shape[0], heads, nq, channels)
    else:
        q_tilde = q_tilde.expand(batch, -1, -1, -1).reshape(batch, heads * nq, channels)
        probs = (q_tilde @ k.transpose(1, 2)).softmax(dim=-1)
        pooled = (probs @ v).view(batch, heads, nq, channels)
    w_v = layer.v_proj.weight.view(heads, head_dim, channels)
    values = torch.einsum("bhnc,hdc->bnhd", pooled, w_v) + layer.v_proj.bias.view(heads, head_dim)
    return layer.out_proj(values.reshape(pooled.shape[0], nq, inner))


def queries_folded_attention(layer: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention for many queries ``q (Bq, nq, C)`` over few keys ``k``/``v`` ``(Bk, nk, C)``."""
    heads, inner = layer.num_heads, layer.internal_dim
    head_dim, channels = inner // heads, q.shape[-1]
    bk, nk = k.shape[:2]
    batch, nq = max(q.shape[0], bk), q.shape[1]
    scale = head_dim**-0.5
    keys = layer.k_proj(k).view(bk, nk, heads, head_dim)
    values = layer.v_proj(v).view(bk, nk, heads, head_dim)
    w_q = layer.q_proj.weight.view(heads, head_dim, channels)
    # Logits laid out (keys, queries): the softmax then runs over a short strided axis with a
    # long contiguous inner one, which vectorises (a softmax over rows of ~7 does not).
    k_tilde = torch.einsum("bkhd,hdc->bhkc", keys, w_q).reshape(bk, heads * nk, channels) * scale
    k_bias = torch.einsum("bkhd,hd->bhk", keys, layer.q_proj.bias.view(heads, head_dim))
    k_bias = k_bias.reshape(bk, heads * nk, 1) * scale
    w_out = layer.out_proj.weight.view(-1, heads, head_dim)  # (C_out, heads, head_dim)
    v_tilde = torch.einsum("bkhd,ohd->bhko", values, w_out).reshape(bk, heads * nk, -1)
    if q.shape[0] == 1:  # image queries shared by every prompt: one product for all of them
        flat = k_tilde.reshape(bk * heads * nk, channels)
        logits_t = torch.addmm(k_bias.reshape(-1, 1), flat, q[0].transpose(0, 1))
    else:
        logits_t = torch.baddbmm(k_bias, k_tilde.expand(batch, -1, -1), q.transpose(1, 2))
    rows = logits_t.numel() // (heads * nk * nq)  # bk (shared queries) or batch
    probs_t = logits_t.view(rows, heads, nk, nq).softmax(dim=2).view(rows, heads * nk, nq)
    # Each query's probabilities sum to 1 per head, so to `heads` over all rows of v_tilde:
    # adding bias / heads to every row adds the output bias exactly once, without a pass over
    # the (queries x C) output.
    v_tilde = v_tilde + layer.out_proj.bias / heads
    return probs_t.expand(batch, -1, -1).transpose(1, 2) @ v_tilde.expand(batch, -1, -1)
