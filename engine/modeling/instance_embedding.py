"""Instance embeddings: a per-pixel code in which pixels of one object lie close together, and the
click affinity the mask decoder adds to its logits (the ``tiny`` variant; off for the ViTs).

Why: a SAM decoder trained from scratch first has to learn which pixels belong with the clicked
one, and from a few hundred CPU steps it answers a lone click with a blob of the mean object size.
Proposal-free instance segmentation learns exactly that grouping from a dense loss on every
pixel of every annotated object (De Brabandere et al. 2017, "Semantic Instance Segmentation with
a Discriminative Loss Function"; ``engine.training.losses.instance_loss``); interactive
segmentation then reads it at the clicks. The encoder's :class:`InstanceHead` maps its stride-2,
-4 and -8 features to a ``dim``-channel map at stride 2; the decoder adds, to every mask output
``k``, ``pos_scale[k] * (margin - d+) - neg_scale[k] * relu(margin - d-)``, where ``d+`` (``d-``)
is a pixel's distance in that code to the nearest positive (negative) click. A box prompt has no
click and gets no term. The SAM decoder still predicts the rest (boundaries, context, boxes).

Packing: the map is stored inside the image embedding, ``factor**2 * dim`` channels after the
``C`` SAM channels of each grid cell (``factor`` = map pixels per cell side), so everything that
caches or passes an image embedding around (predictor, embedding store, training batches) works
unchanged; :func:`unpack_cells` takes it back out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CODE_STRIDE", "MARGIN", "InstanceHead", "click_affinity", "pack_cells", "unpack_cells"]

#: Input pixels per instance-code pixel.
CODE_STRIDE = 2

#: The distance in the code below which a pixel counts as the clicked object's: half the
#: distance the loss pushes two objects' means apart (``2 * margin``).
MARGIN = 1.5


class InstanceHead(nn.Module):
    """Stride-8 embedding + stride-4 and stride-2 features -> ``(B, dim, S/2, S/2)`` code."""

    def __init__(self, *, embed_chans: int, s4_chans: int, s2_chans: int, dim: int) -> None:
        super().__init__()
        hidden = 32
        self.from_embedding = nn.Conv2d(embed_chans, hidden, kernel_size=1)
        self.from_s4 = nn.Conv2d(s4_chans, hidden, kernel_size=1)
        self.from_s2 = nn.Conv2d(s2_chans, hidden, kernel_size=1)
        self.head = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            # No bias: only distances in the code matter, so a shift gets no gradient, and
            # Adam would turn its rounding noise into full-size steps.
            nn.Conv2d(hidden, dim, kernel_size=1, bias=False),
        )

    def forward(self, embedding: torch.Tensor, s4: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.from_embedding(embedding), size=s4.shape[-2:], mode="bilinear")
        x = F.interpolate(x + self.from_s4(s4), size=s2.shape[-2:], mode="bilinear")
        return self.head(x + self.from_s2(s2))


def pack_cells(code: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, D, f*h, f*w)`` -> ``(B, f*f*D, h, w)``: each grid cell holds its f x f pixels."""
    b, d, big_h, big_w = code.shape
    h, w = grid
    f = big_h // h
    if big_h != f * h or big_w != f * w:
        raise ValueError(f"code of {big_h}x{big_w} does not tile the {h}x{w} grid")
    return code.reshape(b, d, h, f, w, f).permute(0, 3, 5, 1, 2, 4).reshape(b, f * f * d, h, w)


def unpack_cells(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_cells`: ``(B, f*f*D, h, w)`` -> ``(B, D, f*h, f*w)``."""
    b, chans, h, w = packed.shape
    f = round((chans // dim) ** 0.5)
    if f * f * dim != chans:
        raise ValueError(f"{chans} packed channels are not f*f*{dim}")
    cells = packed.reshape(b, f, f, dim, h, w).permute(0, 3, 4, 1, 5, 2)
    return cells.reshape(b, dim, f * h, f * w)


def click_affinity(
    code: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    input_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each pixel of the code looks like the clicks.

    Args:
        code: ``(1 or B, D, H, W)`` instance code of the image (one shared or one per prompt).
        coords: ``(B, N, 2)`` xy pixels in the model's input frame.
        labels: ``(B, N)`` point labels (1 positive, 0 negative; others ignored).
        input_size: ``(H_in, W_in)`` of the input frame, pixels.

    Returns:
        ``positive`` ``(B, 1, H, W)``: ``MARGIN - d+`` (0 for a prompt without a positive click)
        and ``negative`` ``(B, 1, H, W)``: ``relu(MARGIN - d-)``, distances to the nearest click.
    """
    b = labels.shape[0]
    d, h, w = code.shape[1:]
    rows = ((coords[..., 1] + 0.5) * h / input_size[0]).long().clamp(0, h - 1)
    cols = ((coords[..., 0] + 0.5) * w / input_size[1]).long().clamp(0, w - 1)
    pixels = code.flatten(2).transpose(1, 2)  # (1 or B, HW, D)
    index = rows * w + cols  # (B, N)
    if pixels.shape[0] == 1:
        at_clicks = pixels[0][index]  # (B, N, D)
        pixels = pixels.expand(b, -1, -1)
    else:
        at_clicks = torch.gather(pixels, 1, index[..., None].expand(-1, -1, d))
    # Exact differences (not the matmul expansion): a click sits at distance 0 from itself.
    dist = torch.cdist(at_clicks, pixels, compute_mode="donot_use_mm_for_euclid_dist")
    far = torch.full_like(dist, torch.finfo(dist.dtype).max)
    positive = labels == 1
    negative = labels == 0
    d_pos = torch.where(positive[..., None], dist, far).amin(dim=1)
    d_neg = torch.where(negative[..., None], dist, far).amin(dim=1)
    pos = torch.where(positive.any(dim=1, keepdim=True), MARGIN - d_pos, torch.zeros_like(d_pos))
    neg = F.relu(MARGIN - d_neg)
    return pos.reshape(b, 1, h, w), neg.reshape(b, 1, h, w)
