"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block runs (1) token self-attention, (2) token -> image cross-attention, (3) an MLP on the
tokens, (4) image -> token cross-attention; a final token -> image attention follows the blocks.
Positional encodings are re-added to queries and keys at every attention layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from engine.modeling.common import MLPBlock
from engine.modeling.factored_attention import keys_folded_attention, queries_folded_attention


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention."""

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        use_sdpa: bool = True,
    ) -> None:
        """
        Args:
            depth: number of two-way blocks (2 in SAM).
            embedding_dim: width of tokens and image embedding.
            num_heads: attention heads; must divide ``embedding_dim // attention_downsample_rate``.
            mlp_dim: hidden width of the token MLP.
            attention_downsample_rate: cross-attention projects to ``embedding_dim / rate``.
            use_sdpa: use ``F.scaled_dot_product_attention`` in every attention layer.
        """
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                use_sdpa=use_sdpa,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, use_sdpa=use_sdpa
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_embedding: ``(B, C, h, w)``, or ``(1, C, h, w)`` shared by all B prompts.
            image_pe: ``(B, C, h, w)`` or ``(1, C, h, w)`` positional encoding of the image grid.
            point_embedding: ``(B, N, C)`` prompt and output tokens (also their positional query).

        Returns:
            ``(B, N, C)`` processed tokens and ``(B, h * w, C)`` processed image tokens.
        """
        # Token-major and contiguous once, so the layer norms and projections below never copy.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        if image_pe.shape[0] > 1 and image_pe.stride(0) == 0:
            image_pe = image_pe[:1]  # an expanded batch: keep one copy and broadcast it
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(
                queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe
            )
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        if keys.shape[0] != queries.shape[0]:  # image shared by all prompts and no layer ran
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention, token->image, MLP, image->token; post-norm after each residual."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, use_sdpa=use_sdpa)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, use_sdpa=use_sdpa
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, use_sdpa=use_sdpa
        )
        # The first block sees the raw tokens, which already are positional encodings.
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``.

    ``forward`` picks the cheapest of three equal forms by counting multiply-adds: the plain
    one (SDPA or explicit softmax), or one of the folded forms of
    :mod:`engine.modeling.factored_attention` when one side has few tokens. ``use_factored =
    False`` forces the plain form. A query or key batch of 1 against a batch of B on the other
    side is shared by all B (the decoder's first layer, where every prompt sees the same image).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        *,
        use_sdpa: bool = True,
        use_factored: bool = True,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the internal width {self.internal_dim}"
            )
        self.use_sdpa = use_sdpa
        self.use_factored = use_factored
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q (Bq, Nq, C)``, ``k``/``v`` ``(Bk, Nk, C)`` with Bq == Bk or one of them 1 ->
        ``(max(Bq, Bk), Nq, C)``."""
        form = self.cheapest_form(q.shape[0], q.shape[1], k.shape[0], k.shape[1])
        if form == "keys_folded":
            return keys_folded_attention(self, q, k, v)
        if form == "queries_folded":
            return queries_folded_attention(self, q, k, v)
        return self._plain(q, k, v)

    def cheapest_form(self, bq: int, nq: int, bk: int, nk: int) -> str:
        """ "plain", "keys_folded" or "queries_folded", by dominant multiply-add counts."""
        if not self.use_factored:
            return "plain"
        c, inner, heads, b = self.embedding_dim, self.internal_dim, self.num_heads, max(bq, bk)
        costs = {
            "plain": bq * nq * c * inner
            + 2 * bk * nk * c * inner
            + 2 * b * nq * nk * inner
            + b * nq * inner * c,
            "keys_folded": bq * nq * c * inner + 2 * b * heads * nq * nk * c + b * nq * inner * c,
            "queries_folded": 2 * bk * nk * c * inner + 2 * b * nq * heads * nk * c,
        }
        return min(costs, key=costs.__getitem__)

    def _plain(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bq, nq = q.shape[:2]
        bk = k.shape[0]
        qh = self._separate_heads(self.q_proj(q))
        kh = self._separate_heads(self.k_proj(k))
        vh = self._separate_heads(self.v_proj(v))
        if bk == 1 and bq > 1:  # shared keys: all prompts' queries in one sequence
            qh = qh.transpose(0, 1).reshape(1, self.num_heads, bq * nq, -1)
        elif bq == 1 and bk > 1:
            qh = qh.expand(bk, -1, -1, -1)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            attn = (qh @ kh.transpose(-2, -1)) / math.sqrt(qh.shape[-1])
            out = torch.softmax(attn, dim=-1) @ vh
        if bk == 1 and bq > 1:
            out = out.reshape(self.num_heads, bq, nq, -1).transpose(0, 1)
        b, heads, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
