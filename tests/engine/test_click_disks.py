"""Click disks: a learned bump at every click on the mask logits (``tiny``)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.builder import build_sam
from engine.modeling.click_disks import INITIAL_SCALE, INITIAL_SIGMA, disk_maps


def test_disk_maps_peak_at_their_clicks_and_fall_off_as_a_gaussian() -> None:
    # A 16x16 grid over a 16x16 frame: grid pixel (i, j) is input pixel (j, i).
    coords = torch.tensor(
        [[[5.0, 3.0], [12.0, 12.0], [0.0, 15.0]], [[8.0, 8.0], [0.0, 0.0], [15.0, 15.0]]]
    )
    labels = torch.tensor([[1, 0, 1], [2, 3, -1]])  # row 1: box corners and padding only
    sigma = 2.0
    pos, neg = disk_maps(coords, labels, (16, 16), (16, 16), torch.tensor(math.log(sigma)))
    assert pos.shape == neg.shape == (2, 1, 16, 16)
    assert pos[0, 0, 3, 5] == pytest.approx(1.0) and pos[0, 0, 15, 0] == pytest.approx(1.0)
    assert neg[0, 0, 12, 12] == pytest.approx(1.0)
    # Two pixels to the right of the first click: exp(-4 / (2 sigma^2)).
    assert pos[0, 0, 3, 7] == pytest.approx(math.exp(-4 / (2 * sigma**2)), rel=1e-5)
    # The nearest click of a kind wins (max, not sum); the negative click adds nothing to pos.
    assert float(pos[0].max()) == pytest.approx(1.0)
    assert pos[0, 0, 12, 12] < 1e-3
    assert torch.all(pos[1] == 0) and torch.all(neg[1] == 0)


def test_disk_maps_on_a_coarser_grid_use_its_pixel_centres() -> None:
    # An 8x8 grid over a 16x16 frame: grid pixel i covers input pixels 2i and 2i+1 (centre
    # 2i + 0.5), so a click at input (4, 4) is 0.5 px from grid pixel (2, 2)'s centre each way.
    coords = torch.tensor([[[4.0, 4.0]]])
    pos, _ = disk_maps(coords, torch.tensor([[1]]), (8, 8), (16, 16), torch.tensor(0.0))
    assert pos[0, 0, 2, 2] == pytest.approx(math.exp(-0.5 / 2), rel=1e-5)
    # Input (4, 4) is as far from grid pixel (1, 1)'s centre (2.5, 2.5): 1.5 px each way.
    assert pos[0, 0, 1, 1] == pytest.approx(math.exp(-4.5 / 2), rel=1e-5)


def test_tiny_adds_the_disks_to_every_output_and_learns_them() -> None:
    torch.manual_seed(0)
    model = build_sam("tiny", image_size=64).train()
    decoder = model.mask_decoder
    assert decoder.click_disks and model.build_args["click_disks"] is True
    plain = build_sam("tiny", image_size=64, click_disks=False)
    assert not plain.mask_decoder.click_disks
    assert sorted(set(model.state_dict()) - set(plain.state_dict())) == [
        "mask_decoder.disk_log_sigma",
        "mask_decoder.disk_neg_scale",
        "mask_decoder.disk_pos_scale",
    ]
    plain.load_state_dict(model.state_dict(), strict=False)
    embedding = model.image_encoder(torch.randn(1, 3, 64, 64))
    clicks = (torch.tensor([[[10.0, 20.0], [40.0, 44.0]]]), torch.tensor([[1, 0]]))
    sparse, dense = model.prompt_encoder(points=clicks, boxes=None, masks=None)
    args = (embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
    with_disks, _ = decoder.predict_masks(*args, points=clicks)
    without, _ = plain.mask_decoder.predict_masks(*args, points=clicks)
    diff = with_disks - without  # (1, 4, 32, 32): the 64 px frame at stride 2
    # Input (10, 20) lies in grid pixel (10, 5) and (40, 44) in (22, 20), 0.5 px off each centre.
    at_click = INITIAL_SCALE * math.exp(-0.5 / (2 * INITIAL_SIGMA**2))
    torch.testing.assert_close(diff[0, :, 10, 5], torch.full((4,), at_click), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        diff[0, :, 22, 20], torch.full((4,), -at_click), rtol=1e-4, atol=1e-4
    )
    assert diff[0, :, 0, 31].abs().max() < 1e-3  # far from both clicks
    # Scales and width get gradients.
    with_disks[:, :, 10, 5].sum().backward()
    assert decoder.disk_pos_scale.grad is not None and decoder.disk_pos_scale.grad.abs().sum() > 0
    assert decoder.disk_log_sigma.grad is not None and decoder.disk_log_sigma.grad != 0


def test_a_decoder_with_neither_code_nor_disks_has_no_click_term() -> None:
    decoder = build_sam("tiny", image_size=64, instance_dim=0, click_disks=False).mask_decoder
    clicks = (torch.tensor([[[1.0, 1.0]]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="instance code or a decoder with click disks"):
        decoder.click_term(None, clicks, (16, 16))
