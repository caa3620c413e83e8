"""SAM's prompt encoder: points and boxes become sparse tokens, a mask prompt a dense map.

Coordinates are (x, y) pixels in the model's input frame (the resized, padded square image of
side ``input_image_size``). Point labels: 1 foreground, 0 background, -1 padding (no point);
labels 2 and 3 mark a box's top-left and bottom-right corners given as points (an extension that
lets one batch mix boxes and clicks; the official labels -1/0/1 behave exactly as the original).
Mask prompts are low-resolution logits ``(B, 1, 4 * grid_h, 4 * grid_w)`` (256x256 for 1024 px).

``prompt_maps=True`` (the ``tiny`` variant; off for the official ViTs, whose checkpoints have no
such weights) also draws the points and the box onto the embedding grid, as click maps in
interactive segmentation (Xu et al. 2016; RITM): a Gaussian of one cell around each positive
and each negative point and the box's inside, three channels mapped by a 1x1 conv and added to
the dense embedding. The mask decoder then sees where the prompts are in the image features
themselves, and a model trained from scratch need not first learn to read the Fourier features
of the sparse tokens. The sparse tokens are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.modeling.common import LayerNorm2d

#: Label values understood by the point embedding.
PAD_LABEL, NEGATIVE_LABEL, POSITIVE_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = (
    -1,
    0,
    1,
    2,
    3,
)


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the mask decoder."""

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        prompt_maps: bool = False,
    ) -> None:
        """
        Args:
            embed_dim: width of every prompt token and of the dense embedding.
            image_embedding_size: ``(h, w)`` of the image embedding grid, tokens.
            input_image_size: ``(H, W)`` of the padded encoder input, pixels.
            mask_in_chans: hidden channels of the mask-prompt conv stack.
            prompt_maps: also add the prompts drawn on the grid to the dense embedding.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Index 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # Two stride-2 convs bring the 4x mask down to the embedding grid; indexes match the
        # official checkpoint names (mask_downscaling.0/1/3/4/6).
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self.prompt_map_embed = nn.Conv2d(3, embed_dim, kernel_size=1) if prompt_maps else None
        self._dense_pe: torch.Tensor | None = None
        self._dense_pe_key: tuple[object, ...] | None = None

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every embedding-grid cell centre: ``(1, embed_dim, h, w)``.

        Cached: it depends only on the (fixed, non-trained) Gaussian matrix, and recomputing
        sin/cos over the whole grid is a noticeable part of a click on CPU. The cache is keyed on
        the matrix's storage and version counter, so loading a state dict invalidates it.
        """
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        key = (gaussian.device, gaussian.data_ptr(), gaussian._version)
        if self._dense_pe_key != key or self._dense_pe is None:
            # A normal tensor even when first asked for under inference_mode, so a later
            # training step may use it.
            with torch.inference_mode(False), torch.no_grad():
                dense_pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
                # Channels-last: the decoder reads it as h * w tokens of C without a copy.
                self._dense_pe = dense_pe.contiguous(memory_format=torch.channels_last)
            self._dense_pe_key = key
        return self._dense_pe

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 2)`` xy pixels + ``(B, N)`` labels -> ``(B, N (+1 if pad), embed_dim)``."""
        points = points + 0.5  # a pixel's centre, not its corner
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD_LABEL)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        # A padding point carries no position, only the learned "not a point" embedding.
        out = torch.where(labels == PAD_LABEL, self.not_a_point_embed.weight.to(pe.dtype), pe)
        for label in range(self.num_point_embeddings):
            out = out + (labels == label).to(pe.dtype) * self.point_embedding(label)
        return out

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` XYXY pixels -> ``(B, 2, embed_dim)``: corner encodings + corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embedding(2), self.point_embedding(3)], dim=0)
        return pe + corner_embed[None]

    def point_embedding(self, label: int) -> torch.Tensor:
        """The learned ``(1, embed_dim)`` embedding of a point label 0..3."""
        embedding: nn.Embedding = self.point_embeddings[label]  # type: ignore[assignment]
        return embedding.weight

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 4h, 4w)`` mask logits -> ``(B, embed_dim, h, w)``."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse ``(B, N, embed_dim)`` and dense ``(B, embed_dim, h, w)`` embeddings.

        B comes from the first prompt given (points, then boxes, then masks), or is 1.
        """
        batch = _batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((batch, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, pad=boxes is None)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        return sparse, self.embed_dense(points, boxes, masks, batch=batch)

    def embed_dense(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        *,
        batch: int,
    ) -> torch.Tensor:
        """The dense ``(batch, embed_dim, h, w)`` embedding: the mask prompt or the no-mask
        embedding, plus the prompt maps when the model has them."""
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        if self.prompt_map_embed is not None:
            maps = self.draw_prompt_maps(points, boxes, batch=batch)
            dense = dense + self.prompt_map_embed(maps.to(dense.dtype))
        return dense

    def draw_prompt_maps(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        *,
        batch: int,
    ) -> torch.Tensor:
        """Points and boxes drawn on the embedding grid: ``(batch, 3, h, w)`` float in [0, 1].

        Channel 0: max over positive points of a Gaussian (sigma one cell) centred on the point;
        channel 1: the same for negative points; channel 2: 1 where a cell's centre lies inside
        the box (from ``boxes`` or from corner points labelled 2 and 3). Padding points draw
        nothing.
        """
        h, w = self.image_embedding_size
        height, width = self.input_image_size
        device = self.no_mask_embed.weight.device
        cell_y, cell_x = height / h, width / w
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * cell_y
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * cell_x
        maps = torch.zeros((batch, 3, h, w), device=device)
        box = torch.zeros((batch, 4), device=device)  # XYXY, pixel centres
        has_box = torch.zeros(batch, dtype=torch.bool, device=device)
        if points is not None:
            coords, labels = points
            coords = coords.float() + 0.5  # a pixel's centre, as embed_points
            dx = xs.view(1, 1, 1, w) - coords[..., 0].view(batch, -1, 1, 1)
            dy = ys.view(1, 1, h, 1) - coords[..., 1].view(batch, -1, 1, 1)
            gauss = torch.exp(-0.5 * ((dx / cell_x) ** 2 + (dy / cell_y) ** 2))  # (B, N, h, w)
            for channel, label in ((0, POSITIVE_LABEL), (1, NEGATIVE_LABEL)):
                chosen = (labels == label).view(batch, -1, 1, 1)
                maps[:, channel] = (gauss * chosen).amax(dim=1)
            top_left = labels == BOX_TOP_LEFT_LABEL
            bottom_right = labels == BOX_BOTTOM_RIGHT_LABEL
            corners = [
                (coords * top_left[..., None]).sum(1),
                (coords * bottom_right[..., None]).sum(1),
            ]
            box = torch.cat(corners, dim=-1)
            has_box = top_left.any(1) & bottom_right.any(1)
        if boxes is not None:
            box = boxes.float().reshape(batch, 4) + 0.5
            has_box = torch.ones_like(has_box)
        inside_x = (xs[None] >= box[:, 0:1]) & (xs[None] <= box[:, 2:3])  # (B, w)
        inside_y = (ys[None] >= box[:, 1:2]) & (ys[None] <= box[:, 3:4])  # (B, h)
        maps[:, 2] = (inside_y[:, :, None] & inside_x[:, None, :] & has_box.view(-1, 1, 1)).float()
        return maps


def _batch_size(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if masks is not None:
        return masks.shape[0]
    return 1


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D positions (Tancik et al. 2020).

    ``pe(p) = [sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` for ``p`` in ``[0, 1]^2`` and a fixed
    Gaussian matrix ``G`` of shape ``(2, num_pos_feats)``; output width ``2 * num_pos_feats``.
    """

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``(..., 2)`` xy in ``[0, 1]`` to ``(..., 2 * num_pos_feats)``."""
        gaussian = self.positional_encoding_gaussian_matrix
        projected = (2 * coords - 1) @ gaussian.to(coords.dtype)
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an ``(h, w)`` grid: ``(2 * num_pos_feats, h, w)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encode ``(B, N, 2)`` xy pixels of an image of ``image_size = (H, W)`` pixels."""
        size_xy = coords_input.new_tensor([image_size[1], image_size[0]])
        return self.encode((coords_input / size_xy).float())
