"""The ``tiny`` image encoder: a small conv net with an FPN-style fusion, built to train from
scratch on a CPU in minutes.

Input ``(B, 3, img_size, img_size)`` normalised pixels (256 px by default); output
``(B, out_chans, img_size / 8, img_size / 8)``, a 32x32 grid at 256 px, so the mask decoder's 4x
upscaling gives 128x128 low-res masks (``out_stride=4`` fuses onto the stride-4 grid instead:
64x64 at 256 px). Why this shape:

- convolutions carry the locality prior a ViT has to learn from data, so a few hundred images
  are enough to get useful masks;
- the stride-16 stage ends in one global self-attention block, so every cell sees the whole
  image (SAM's "whole object" outputs need context);
- the stride-4 features are folded into the stride-8 grid (space-to-depth convolution) to keep
  boundary detail the 4x mask upscaling can use;
- GroupNorm, not BatchNorm: training batches are a handful of images.

``instance_dim > 0`` adds an :class:`~engine.modeling.instance_embedding.InstanceHead`: a
stride-2 instance code packed after the embedding's channels (see that module).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.modeling.common import LayerNorm2d, MLPBlock
from engine.modeling.instance_embedding import InstanceHead, pack_cells


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class ConvNormAct(nn.Sequential):
    """``Conv2d -> GroupNorm -> GELU``; ``stride=2`` halves the map."""

    def __init__(self, in_chans: int, out_chans: int, *, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(
                in_chans,
                out_chans,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                bias=False,
            ),
            _group_norm(out_chans),
            nn.GELU(),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (pre-activation ResNet style)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.gelu(self.norm1(x)))
        y = self.conv2(F.gelu(self.norm2(y)))
        return x + y


class GlobalAttentionBlock(nn.Module):
    """Pre-norm transformer block over all cells of an ``(B, C, h, w)`` map, learned positions."""

    def __init__(self, channels: int, *, num_heads: int, grid: int, use_sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.use_sdpa = use_sdpa
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, channels))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = MLPBlock(channels, 4 * channels, act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed
        qkv = self.qkv(self.norm1(tokens)).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            out = attn.softmax(dim=-1) @ v
        tokens = tokens + self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class TinyImageEncoder(nn.Module):
    """Four-stage conv encoder (strides 2, 4, 8, 16) fused onto the stride-8 grid."""

    def __init__(
        self,
        *,
        img_size: int = 256,
        in_chans: int = 3,
        widths: tuple[int, int, int, int] = (32, 64, 128, 256),
        depths: tuple[int, int, int, int] = (0, 1, 2, 2),
        out_chans: int = 256,
        num_global_blocks: int = 1,
        num_heads: int = 8,
        use_sdpa: bool = True,
        out_stride: int = 8,
        instance_dim: int = 0,
    ) -> None:
        """
        Args:
            img_size: side of the square (padded) input, pixels; a multiple of 16.
            widths: channels of the stride 2, 4, 8 and 16 stages.
            depths: residual blocks in each stage (after its strided conv).
            out_chans: channels of the output embedding (the prompt embedding width).
            num_global_blocks: transformer blocks over the stride-16 map.
            num_heads: heads of those blocks.
            use_sdpa: use ``F.scaled_dot_product_attention`` in them.
            out_stride: 8 (the default) or 4: the grid the features are fused onto; 4 gives a
                grid twice as fine (and low-res masks at the input's size) for ~4x the decoder
                work.
            instance_dim: channels of the stride-2 instance code (0: none); the output then
                has ``out_chans + (out_stride / 2)**2 * instance_dim`` channels.
        """
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        if out_stride not in (4, 8):
            raise ValueError(f"out_stride must be 4 or 8, got {out_stride}")
        self.img_size = img_size
        self.out_stride = out_stride
        chans = (in_chans, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(chans[i], chans[i + 1], stride=2),
                *(ResidualBlock(chans[i + 1]) for _ in range(depths[i])),
            )
            for i in range(4)
        )
        self.global_blocks = nn.ModuleList(
            GlobalAttentionBlock(
                widths[3], num_heads=num_heads, grid=img_size // 16, use_sdpa=use_sdpa
            )
            for _ in range(num_global_blocks)
        )
        # FPN-style fusion on the stride-8 grid: stride-4 detail by a 2x2/2 conv (space to depth),
        # stride-8 features by 1x1, stride-16 context by 1x1 then 2x upsampling.
        detail_kernel = 2 if out_stride == 8 else 1
        self.lateral_detail = nn.Conv2d(
            widths[1], out_chans, kernel_size=detail_kernel, stride=detail_kernel
        )
        self.lateral_mid = nn.Conv2d(widths[2], out_chans, kernel_size=1)
        self.lateral_context = nn.Conv2d(widths[3], out_chans, kernel_size=1)
        self.neck = nn.Sequential(
            LayerNorm2d(out_chans),
            nn.GELU(),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.instance_dim = instance_dim
        self.instance_head = (
            InstanceHead(
                embed_chans=out_chans, s4_chans=widths[1], s2_chans=widths[0], dim=instance_dim
            )
            if instance_dim > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> ``(B, C, S/s, S/s)`` embedding (``s`` the out
        stride; ``C`` is ``out_chans`` plus the packed instance code, if any)."""
        s2 = self.stages[0](x)
        s4 = self.stages[1](s2)
        s8 = self.stages[2](s4)
        s16 = self.stages[3](s8)
        for block in self.global_blocks:
            s16 = block(s16)
        up = 8 // self.out_stride  # from stride 8 to the output grid
        mid = self.lateral_mid(s8)
        if up > 1:
            mid = F.interpolate(mid, scale_factor=float(up), mode="nearest")
        context = F.interpolate(self.lateral_context(s16), scale_factor=2.0 * up, mode="nearest")
        embedding = self.neck(self.lateral_detail(s4) + mid + context)
        if self.instance_head is None:
            return embedding
        code = self.instance_head(embedding, s4, s2)
        return torch.cat([embedding, pack_cells(code, embedding.shape[-2:])], dim=1)
