"""The instance code: packing into the image embedding, click affinity, the discriminative loss,
and that the decoder's logits follow the code."""

from __future__ import annotations

import pytest
import torch

from engine.builder import build_sam
from engine.modeling.instance_embedding import (
    MARGIN,
    click_affinity,
    pack_cells,
    unpack_cells,
)
from engine.modeling.mask_decoder import MASK_STATISTICS, mask_statistics
from engine.training.losses import instance_loss


def test_pack_and_unpack_are_inverse_and_keep_each_cells_pixels() -> None:
    code = torch.randn(2, 5, 12, 8)
    packed = pack_cells(code, (3, 2))
    assert packed.shape == (2, 4 * 4 * 5, 3, 2)
    # Cell (1, 0) holds code pixels rows 4..7, cols 0..3, channel-major per pixel.
    cell = packed[0, :, 1, 0].reshape(4, 4, 5)
    torch.testing.assert_close(cell.permute(2, 0, 1), code[0, :, 4:8, 0:4])
    torch.testing.assert_close(unpack_cells(packed, 5), code)
    with pytest.raises(ValueError, match="does not tile"):
        pack_cells(code, (5, 2))


def _two_region_code() -> torch.Tensor:
    """A (1, 2, 8, 8) code: left half at (0, 0), right half at (4, 0)."""
    code = torch.zeros(1, 2, 8, 8)
    code[0, 0, :, 4:] = 4.0
    return code


def test_click_affinity_marks_the_clicked_region() -> None:
    code = _two_region_code()
    # Input frame 16x16 px: the code is at stride 2. A positive click on the left, a negative
    # on the right, a box prompt (no click) in the third row.
    coords = torch.tensor([[[2.0, 5.0]], [[12.0, 5.0]], [[0.0, 0.0]]])
    labels = torch.tensor([[1], [0], [2]])
    pos, neg = click_affinity(code, coords, labels, (16, 16))
    assert pos.shape == neg.shape == (3, 1, 8, 8)
    assert torch.allclose(pos[0, 0, :, :4], torch.tensor(MARGIN))  # same code as the click
    assert torch.allclose(pos[0, 0, :, 4:], torch.tensor(MARGIN - 4.0))  # 4 units away
    assert torch.all(neg[0] == 0)  # no negative click
    assert torch.allclose(neg[1, 0, :, 4:], torch.tensor(MARGIN))
    assert torch.all(neg[1, 0, :, :4] == 0)
    assert torch.all(pos[1] == 0) and torch.all(pos[2] == 0) and torch.all(neg[2] == 0)


def test_the_decoders_single_click_logits_follow_the_code() -> None:
    torch.manual_seed(0)
    model = build_sam("tiny").eval()
    c, h, w = model.image_embedding_shape
    sam_part = torch.randn(1, 128, h, w)
    code = torch.zeros(1, 16, 4 * h, 4 * w)
    code[:, 0, :, 64:] = 6.0  # the right half is another object
    embedding = torch.cat([sam_part, pack_cells(code, (h, w))], dim=1)
    assert embedding.shape == (1, c, h, w)
    clicks = (torch.tensor([[[40.0, 100.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=clicks, boxes=None, masks=None)
        args = (embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        with_term, _ = model.mask_decoder(*args, points=clicks)
        without, _ = model.mask_decoder(*args)
    diff = with_term - without  # the term alone: +scale*MARGIN left, negative right
    assert torch.all(diff[..., :, :60] > 0) and torch.all(diff[..., :, 68:] < 0)


def test_instance_loss_is_zero_for_a_separating_code_and_trains_one() -> None:
    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[0, :, :8] = True
    gt[1, :, 8:] = True
    gt[2, :8, :8] = True  # inside mask 0 (a part of it): pulled, never pushed from it
    index = torch.tensor([0, 0, 0])
    separated = torch.zeros(1, 2, 8, 8)
    separated[0, 0, :, 4:] = 2 * MARGIN + 0.1
    assert instance_loss(separated, gt, index).item() == pytest.approx(0.0, abs=1e-6)
    assert instance_loss(torch.zeros(1, 2, 8, 8), gt, index).item() > 1.0
    # Two images: masks of different images are never pushed apart.
    assert instance_loss(torch.zeros(2, 2, 8, 8), gt[:2], torch.tensor([0, 1])).item() == 0.0

    torch.manual_seed(0)
    code = (torch.randn(1, 2, 8, 8) * 0.1).requires_grad_()
    optimizer = torch.optim.Adam([code], lr=0.1)
    first = instance_loss(code, gt, index).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = instance_loss(code, gt, index)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first
    left, right = code[0, :, :, :4].mean((1, 2)), code[0, :, :, 4:].mean((1, 2))
    assert (left - right).norm() > 2 * MARGIN - 0.1


def test_a_model_without_a_code_has_the_plain_embedding() -> None:
    model = build_sam("tiny", instance_dim=0)
    assert model.image_embedding_shape == (128, 32, 32)
    assert model.image_encoder(torch.randn(1, 3, 256, 256)).shape == (1, 128, 32, 32)
    assert model.mask_decoder.split_embedding(torch.randn(1, 128, 32, 32))[1] is None


def test_mask_statistics_tell_a_clean_mask_from_a_ragged_one() -> None:
    clean = torch.full((16, 16), -8.0)
    clean[4:12, 4:12] = 8.0  # a sharp 8x8 square
    ragged = torch.full((16, 16), -8.0)
    ragged[::2, ::2] = 0.5  # 64 scattered, barely positive pixels
    stats = mask_statistics(torch.stack([clean, ragged])[None])
    assert stats.shape == (1, 2, MASK_STATISTICS)
    area, _, stability, band, confidence, boundary = stats[0].unbind(-1)
    torch.testing.assert_close(area, torch.tensor([0.25, 0.25]))
    assert stability[0] == 1.0 and stability[1] == 0.0  # nothing of the ragged one above +1
    assert band[0] == 0.0 and band[1] == 1.0
    assert confidence[0] > 0.9 > 0.2 > confidence[1]
    assert boundary[1] > boundary[0] + 1.0


def test_the_mask_aware_iou_head_starts_as_the_token_head_and_reads_the_logits() -> None:
    torch.manual_seed(0)
    decoder = build_sam("tiny", image_size=64).mask_decoder
    assert decoder.iou_from_mask is not None
    token_iou = torch.rand(2, 4)
    logits = torch.randn(2, 4, 16, 16) * 4
    torch.testing.assert_close(decoder.score_masks(token_iou, logits), token_iou)  # zero at init
    with torch.no_grad():
        decoder.iou_from_mask.layers[-1].weight.normal_()
    moved = decoder.score_masks(token_iou, logits)
    assert not torch.allclose(moved, token_iou)
    # Each output is scored from its own logits and its index: scoring outputs 1..3 alone
    # gives what scoring all four gives for them (the generator scores only those).
    torch.testing.assert_close(
        decoder.score_masks(token_iou[:, 1:], logits[:, 1:], slice(1, 4)), moved[:, 1:]
    )
    # A model without an instance code keeps SAM's head.
    plain = build_sam("tiny", image_size=64, instance_dim=0).mask_decoder
    assert plain.iou_from_mask is None
    assert plain.score_masks(token_iou, logits) is token_iou
