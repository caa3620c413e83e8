"""Box prompts through virtual clicks (``tiny``'s ``box_clicks``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.builder import build_sam
from engine.modeling.box_clicks import box_fit, decode_box_clicks, virtual_clicks
from engine.predictor import SamPredictor


def test_virtual_clicks_are_a_3x3_grid_inside_the_box() -> None:
    clicks = virtual_clicks(torch.tensor([[10.0, 20.0, 110.0, 60.0]]))
    assert clicks.shape == (1, 9, 2)
    xs = sorted({round(float(x), 3) for x in clicks[0, :, 0]})
    ys = sorted({round(float(y), 3) for y in clicks[0, :, 1]})
    assert xs == [40.0, 60.0, 80.0] and ys == [32.0, 40.0, 48.0]
    assert clicks[0, 4].tolist() == [60.0, 40.0]  # the centre in the middle


def test_box_fit_is_the_iou_of_the_masks_tight_box_with_the_prompt() -> None:
    # A 16x16 low-res grid over a 64 px frame: each low-res pixel is 4x4 input pixels.
    logits = torch.full((1, 3, 16, 16), -1.0)
    logits[0, 0, 2:6, 3:8] = 1.0  # exactly the prompt box: input x 12..31, y 8..23
    logits[0, 1, 2:6, 3:5] = 1.0  # its left part: 8 of 20 px wide
    logits[0, 1, 4, 4] = -1.0  # a hole changes no tight box
    box = torch.tensor([[12.0, 8.0, 31.0, 23.0]])  # inclusive ends
    fit = box_fit(logits, box, input_size=64)
    torch.testing.assert_close(fit, torch.tensor([[1.0, 8 / 20, 0.0]]))


def _model_and_image() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_sam("tiny", image_size=64)
    embedding = model.image_encoder(torch.randn(1, 3, 64, 64))
    return model, embedding


@torch.no_grad()
def test_the_answer_is_the_virtual_click_that_scores_best() -> None:
    model, embedding = _model_and_image()
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]])
    low, iou = decode_box_clicks(model, embedding, boxes, multimask_output=True)
    assert low.shape == (2, 3, 32, 32) and iou.shape == (2, 3)
    # Each candidate on its own, through the ordinary prompt path: the box plus one click.
    for i in range(2):
        scores, answers = [], []
        for click in virtual_clicks(boxes[i : i + 1])[0]:
            points = (click.view(1, 1, 2), torch.ones((1, 1), dtype=torch.int64))
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes[i : i + 1], masks=None)
            one, one_iou = model.mask_decoder(
                embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, False, points
            )
            answers.append(one[0, 0])
            scores.append(float(box_fit(one, boxes[i : i + 1], 64)[0, 0] + one_iou[0, 0]))
        order = np.argsort(scores)[::-1][:3]
        for rank, j in enumerate(order):
            torch.testing.assert_close(low[i, rank], answers[j], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_tiny_decodes_a_lone_box_with_virtual_clicks_and_vits_do_not() -> None:
    model, _ = _model_and_image()
    assert model.box_clicks and model.build_args["box_clicks"] is True
    assert build_sam("vit_b", device="meta").box_clicks is False
    predictor = SamPredictor(model)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    box = np.array([4, 4, 40, 30])
    with_clicks = predictor.predict(box=box, multimask_output=False)[2]
    model.box_clicks = False
    plain = predictor.predict(box=box, multimask_output=False)[2]
    moved = predictor.transform.apply_boxes_torch(torch.as_tensor(box[None]).float(), (48, 64))
    sparse, dense = model.prompt_encoder(points=None, boxes=moved, masks=None)
    direct, _ = model.mask_decoder(
        predictor.features, model.prompt_encoder.get_dense_pe(), sparse, dense, False
    )
    np.testing.assert_allclose(plain, direct[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(with_clicks, plain)
    # A box with clicks of the annotator's own is decoded as given, either way.
    model.box_clicks = True
    point = np.array([[20.0, 20.0]])
    both = predictor.predict(point, np.array([1]), box=box, multimask_output=False)[2]
    model.box_clicks = False
    both_plain = predictor.predict(point, np.array([1]), box=box, multimask_output=False)[2]
    np.testing.assert_array_equal(both, both_plain)


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_forward_takes_the_same_path(multimask: bool) -> None:
    model, _ = _model_and_image()
    image = torch.randint(0, 255, (3, 64, 64)).float()
    box = torch.tensor([[4.0, 6.0, 40.0, 30.0]])
    out = model([{"image": image, "original_size": (64, 64), "boxes": box}], multimask)[0]
    embedding = model.image_encoder(model.preprocess(image)[None])
    low, _ = decode_box_clicks(model, embedding, box, multimask)
    torch.testing.assert_close(out["low_res_logits"], low)
