"""SAM's mask decoder: output tokens (1 IoU + 4 mask tokens) run through the two-way transformer
with the prompt tokens; the image tokens are upscaled 4x and dotted with per-token hypernetwork
weights to give low-resolution mask logits ``(B, M, 4h, 4w)`` (256x256 for a 64x64 grid).

Mask token 0 is the single-mask output (used when several prompts make the target clear);
tokens 1..3 are the multimask outputs for ambiguous prompts (whole, part, sub-part).

With ``instance_dim > 0`` (``tiny``) the image embedding carries a packed instance code after its
``transformer_dim`` channels, and every output gets a click-affinity term on its logits (see
``engine.modeling.instance_embedding``); the decoder then needs the clicks themselves
(``points``), not only their tokens. Such a decoder also scores each output from its own logits
(``iou_from_mask`` on :func:`mask_statistics`, added to the IoU token's prediction): once the
click term shapes the masks, the IoU token barely varies from prompt to prompt, and a head that
reads it alone learns each output's mean IoU and nothing per mask.

With ``click_disks`` (``tiny``) every output also gets a learned Gaussian bump at each click
(``engine.modeling.click_disks``), so the clicked pixel follows the click.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from engine.modeling.click_disks import INITIAL_SCALE, disk_maps, initial_log_sigma
from engine.modeling.common import MLP, LayerNorm2d
from engine.modeling.instance_embedding import click_affinity, unpack_cells
from engine.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts mask logits and their IoU from an image embedding and prompt embeddings."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        instance_dim: int = 0,
        click_disks: bool = False,
        input_image_size: tuple[int, int] = (1024, 1024),
    ) -> None:
        """
        Args:
            transformer_dim: width of the tokens and the image embedding.
            transformer: the two-way transformer.
            num_multimask_outputs: masks returned for an ambiguous prompt (3 in SAM).
            iou_head_depth, iou_head_hidden_dim: the MLP that predicts each mask's IoU.
            instance_dim: channels of the instance code packed in the image embedding (0: none).
            click_disks: add a learned bump at every click to the logits.
            input_image_size: ``(H, W)`` of the model's input frame, pixels (where the clicks
                are given; used with an instance code or click disks).
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        # Indexes 0/1/2/3 match the official names output_upscaling.{0,1,3}.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.instance_dim = instance_dim
        self.input_image_size = input_image_size
        if instance_dim > 0:
            # Per output, how strongly the click affinity (in logits per unit of code distance)
            # adds to the mask; 3 makes a pixel at the margin's end flip sign at init.
            self.instance_pos_scale = nn.Parameter(torch.full((self.num_mask_tokens,), 3.0))
            self.instance_neg_scale = nn.Parameter(torch.full((self.num_mask_tokens,), 3.0))
        self.click_disks = click_disks
        if click_disks:
            self.disk_pos_scale = nn.Parameter(torch.full((self.num_mask_tokens,), INITIAL_SCALE))
            self.disk_neg_scale = nn.Parameter(torch.full((self.num_mask_tokens,), INITIAL_SCALE))
            self.disk_log_sigma = nn.Parameter(torch.tensor(initial_log_sigma()))
        # Mask-aware IoU: statistics of an output's logits and which output it is -> a
        # correction to the token's IoU; zero at init, so it starts as SAM's head.
        self.iou_from_mask: MLP | None = None
        if instance_dim > 0:
            self.iou_from_mask = MLP(MASK_STATISTICS + self.num_mask_tokens, 64, 1, 3)
            last = self.iou_from_mask.layers[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: ``(1, C, h, w)`` shared by every prompt, or ``(B, C, h, w)`` one per
                prompt (training batches prompts from several images).
            image_pe: ``(1, C, h, w)`` dense positional encoding.
            sparse_prompt_embeddings: ``(B, N, C)`` point/box tokens.
            dense_prompt_embeddings: ``(B, C, h, w)`` mask-prompt (or no-mask) embedding.
            multimask_output: return the 3 multimask outputs instead of the single mask.
            points: the point prompts ``(B, N, 2)`` xy input-frame pixels and ``(B, N)`` labels,
                as given to the prompt encoder (read only with an instance code).

        Returns:
            mask logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``, M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, points
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` outputs: logits ``(B, 4, 4h, 4w)`` and IoU ``(B, 4)``."""
        batch = sparse_prompt_embeddings.shape[0]
        image_embeddings, code = self.split_embedding(image_embeddings)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)], 1)

        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or the "
                f"number of prompts {batch}"
            )
        if image_embeddings.shape[0] == 1 and is_batch_broadcast(dense_prompt_embeddings):
            # No mask prompt: every prompt sees the same image, so the transformer's first
            # layer does its image-side work once for the whole batch.
            src = image_embeddings + dense_prompt_embeddings[:1]
        else:
            src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        _, c, h, w = src.shape

        hs, src = self.transformer(src, image_pe[:1], tokens)
        b = hs.shape[0]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        cells = self.upscale_cells(src.reshape(b, h, w, c))  # (B, 16 h w, C / 8)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, num_mask_tokens, C / 8)
        masks = _cells_to_image(hyper_in @ cells.transpose(1, 2), h, w)
        if points is not None and (code is not None or self.click_disks):
            masks = masks + self.click_term(code, points, masks.shape[-2:])
        return masks, self.score_masks(self.iou_prediction_head(iou_token_out), masks)

    def score_masks(
        self, iou_pred: torch.Tensor, logits: torch.Tensor, outputs: slice = slice(None)
    ) -> torch.Tensor:
        """The predicted IoU ``(B, M)`` of outputs ``outputs`` given the token's prediction
        ``iou_pred`` and their low-res logits ``(B, M, H, W)`` (unchanged without
        ``iou_from_mask``). The statistics are detached: the IoU loss trains this head only."""
        if self.iou_from_mask is None:
            return iou_pred
        stats = mask_statistics(logits.detach())
        which = torch.eye(self.num_mask_tokens, device=stats.device, dtype=stats.dtype)[outputs]
        features = torch.cat([stats, which.expand(stats.shape[0], -1, -1)], dim=-1)
        return iou_pred + self.iou_from_mask(features)[..., 0].to(iou_pred.dtype)

    def split_embedding(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, C', h, w)`` -> the SAM embedding ``(B, transformer_dim, h, w)`` and the
        instance code ``(B, D, H, W)`` (None without one)."""
        if self.instance_dim == 0:
            return embedding, None
        c = self.transformer_dim
        return embedding[:, :c], unpack_cells(embedding[:, c:], self.instance_dim)

    def click_term(
        self,
        code: torch.Tensor | None,
        points: tuple[torch.Tensor, torch.Tensor],
        size: tuple[int, int] | torch.Size,
        outputs: slice = slice(None),
    ) -> torch.Tensor:
        """The clicks' logits ``(B, M, *size)`` for the chosen outputs (all by default): the
        instance code's affinity (with a ``code``) plus the click disks (with ``click_disks``)."""
        coords, labels = points
        terms: list[torch.Tensor] = []
        if code is not None:
            positive, negative = click_affinity(code, coords, labels, self.input_image_size)
            pos_scale = self.instance_pos_scale[outputs].view(1, -1, 1, 1)
            neg_scale = self.instance_neg_scale[outputs].view(1, -1, 1, 1)
            affinity = pos_scale * positive - neg_scale * negative
            if affinity.shape[-2:] != tuple(size):
                affinity = F.interpolate(
                    affinity, size=tuple(size), mode="bilinear", align_corners=False
                )
            terms.append(affinity)
        if self.click_disks:
            positive, negative = disk_maps(
                coords,
                labels,
                (int(size[0]), int(size[1])),
                self.input_image_size,
                self.disk_log_sigma,
            )
            pos_scale = self.disk_pos_scale[outputs].view(1, -1, 1, 1)
            neg_scale = self.disk_neg_scale[outputs].view(1, -1, 1, 1)
            terms.append(pos_scale * positive - neg_scale * negative)
        if not terms:
            raise ValueError("click_term needs an instance code or a decoder with click disks")
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def upscale(self, x: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` on a channels-last map: ``(B, h, w, C)`` -> ``(B, 4h, 4w, C/8)``."""
        h, w = x.shape[1:3]
        cells = self.upscale_cells(x)
        return _cells_to_image(cells.transpose(1, 2), h, w).permute(0, 2, 3, 1)

    def upscale_cells(self, x: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` of ``(B, h, w, C)`` with the output pixels left in cell order:
        ``(B, 16 h w, C/8)``, rows ordered (i, j, di, dj, di', dj') for the output pixel
        ``(4i + 2di + di', 4j + 2dj + dj')``.

        Same maths as the ``ConvTranspose2d -> LayerNorm2d -> GELU -> ConvTranspose2d -> GELU``
        stack (and its parameters), but a 2x2 stride-2 transposed convolution is one matrix
        product per input pixel, and the per-pixel steps do not care about pixel order, so the
        pixel shuffle is left to the (16x smaller) masks. Several times faster on CPU.
        """
        deconv1, norm, act1, deconv2, act2 = cast(
            tuple[nn.ConvTranspose2d, LayerNorm2d, nn.Module, nn.ConvTranspose2d, nn.Module],
            tuple(self.output_upscaling),
        )
        b, h, w, c = x.shape
        y = _deconv2x2_rows(x.reshape(b * h * w, c), deconv1.weight, deconv1.bias)
        y = act1(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
        y = act2(_deconv2x2_rows(y, deconv2.weight, deconv2.bias))
        return y.reshape(b, 16 * h * w, -1)


def _deconv2x2_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``ConvTranspose2d(kernel_size=2, stride=2)`` applied to pixels given as rows ``(N, Cin)``;
    weight ``(Cin, Cout, 2, 2)``. Returns ``(4N, Cout)``, the 4 output pixels of input row n at
    rows 4n + 2di + dj: ``out[4n + 2di + dj, o] = sum_c x[n, c] * weight[c, o, di, dj] + bias[o]``.
    """
    c_in, c_out = weight.shape[:2]
    flat_weight = weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # columns (di, dj, o)
    if bias is None:
        return (x @ flat_weight.to(x.dtype)).reshape(-1, c_out)
    y = torch.addmm(bias.repeat(4).to(x.dtype), x, flat_weight.to(x.dtype))
    return y.reshape(-1, c_out)


def _cells_to_image(cells: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, M, 16 h w)`` values in cell order (see ``upscale_cells``) -> ``(B, M, 4h, 4w)``."""
    b, m = cells.shape[:2]
    grid = cells.reshape(b, m, h, w, 2, 2, 2, 2)  # i, j, di, dj, di', dj'
    return grid.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, m, 4 * h, 4 * w)


def is_batch_broadcast(x: torch.Tensor) -> bool:
    """Whether every batch entry of ``x`` is the same memory (an ``expand``-ed tensor)."""
    return x.shape[0] == 1 or x.stride(0) == 0


#: Number of features :func:`mask_statistics` gives each mask.
MASK_STATISTICS = 6


def mask_statistics(logits: torch.Tensor) -> torch.Tensor:
    """Features of low-res mask logits ``(B, M, H, W)`` that tell a good mask from a bad one:
    ``(B, M, 6)`` area fraction, log area, stability (pixels above +1 over pixels above -1),
    the share of those in the uncertain band (-1, 1], mean confidence inside the mask
    (``tanh(logit / 4)``), and the log of the boundary's length over a square's of that area
    (fragmented masks score high)."""
    values = logits.float()
    inside = values > 0
    n = values.shape[-2] * values.shape[-1]
    flat = values.flatten(2)
    area = inside.flatten(2).sum(-1).float()
    high = (flat > 1).sum(-1).float()
    low = (flat > -1).sum(-1).float()
    stability = torch.where(low > 0, high / low.clamp(min=1), torch.ones_like(low))
    band = torch.where(low > 0, (low - high) / low.clamp(min=1), torch.zeros_like(low))
    confidence = torch.tanh(F.relu(flat) / 4).sum(-1) / area.clamp(min=1)
    edges = (inside[..., 1:, :] != inside[..., :-1, :]).flatten(2).sum(-1) + (
        inside[..., :, 1:] != inside[..., :, :-1]
    ).flatten(2).sum(-1)
    ragged = torch.log1p(edges.float() / (4 * area.sqrt()).clamp(min=1))
    log_area = torch.log1p(area) / math.log1p(n)
    return torch.stack([area / n, log_area, stability, band, confidence, ragged], dim=-1)
