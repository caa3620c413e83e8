"""engine.zoom_predictor.ZoomInPredictor against SamPredictor with a real trained tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.builder import build_sam
from engine.predictor import SamPredictor
from engine.synthetic import generate_scene, scene_rng
from engine.zoom_in import ZoomIn, logits_in_frame
from engine.zoom_predictor import ZoomInPredictor
from storage.errors import ImageError
from tests.fixtures.models import FIXTURE_SCENES


@pytest.fixture(scope="module")
def scene_and_predictor(trained_tiny_checkpoint: str):
    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint).eval()
    scene = generate_scene(scene_rng(515, 0), (256, 256), **FIXTURE_SCENES)
    predictor = SamPredictor(model)
    predictor.set_image(scene.image)
    return scene, predictor


def _centre(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return np.array([[xs[i], ys[i]]], dtype=np.float64)


def test_without_a_crop_it_answers_as_the_whole_image_predictor(scene_and_predictor) -> None:
    scene, predictor = scene_and_predictor
    never = ZoomIn(min_fraction=0.75, max_fraction=0.75)
    zooming = ZoomInPredictor(predictor, scene.image, never)
    click = _centre(scene.masks[0])
    got = zooming.predict(click, np.array([1]), multimask_output=True)
    want = predictor.predict(click, np.array([1]), multimask_output=True)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    assert zooming.crop is None


def test_a_small_object_is_answered_on_a_crop_and_the_next_click_reuses_it(
    scene_and_predictor,
) -> None:
    scene, predictor = scene_and_predictor
    # The object the whole-image predictor finds best (the fixture model is weak on some).
    fits = []
    for mask in scene.masks:
        found, scores, _ = predictor.predict(_centre(mask), np.array([1]))
        best = found[int(np.argmax(scores))]
        fits.append((best & mask).sum() / (best | mask).sum())
    target = scene.masks[int(np.argmax(fits))]
    tight = ZoomIn(first_expansion=1.2, expansion=1.2, max_fraction=1.0)
    zooming = ZoomInPredictor(predictor, scene.image, tight)
    click = _centre(target)
    masks, scores, low_res = zooming.predict(click, np.array([1]), multimask_output=True)
    assert zooming.crop is not None
    top, left, side = zooming.crop
    assert side < 256
    outside = np.ones(target.shape, dtype=bool)
    outside[top : top + side, left : left + side] = False
    assert masks.shape == (3, 256, 256) and not masks[:, outside].any()
    assert low_res.shape == (3, 128, 128) and scores.shape == (3,)

    # The answer is the crop's own: the same prompt on the crop image, shifted.
    crop_image = np.ascontiguousarray(scene.image[top : top + side, left : left + side])
    on_crop = SamPredictor(predictor.model)
    on_crop.set_image(crop_image)
    crop_masks, crop_scores, crop_low = on_crop.predict(
        click - [left, top], np.array([1]), multimask_output=True
    )
    assert np.array_equal(scores, crop_scores)
    assert np.array_equal(masks[:, top : top + side, left : left + side], crop_masks)

    # A second click, the answer fed back as SAM's tools do: the prompt is the answer's own
    # logits, the crop's low-res ones if the crop stayed, else its full-resolution ones cut to
    # the new crop (never the blurrier whole-image low-res grid).
    full, _, _ = zooming.predict(click, np.array([1]), multimask_output=True, return_logits=True)
    best = int(np.argmax(scores))
    second = np.array([click[0], click[0] + (1.0, 0.0)])
    masks2, scores2, _ = zooming.predict(
        second, np.array([1, 1]), mask_input=low_res[best : best + 1], multimask_output=False
    )
    assert zooming.crop is not None
    top2, left2, side2 = zooming.crop
    on_crop2 = SamPredictor(predictor.model)
    crop2 = scene.image[top2 : top2 + side2, left2 : left2 + side2]
    on_crop2.set_image(np.ascontiguousarray(crop2))
    if zooming.crop == (top, left, side):
        prompt = crop_low[best : best + 1]
    else:
        prompt = logits_in_frame(
            torch.from_numpy(full[best, top2 : top2 + side2, left2 : left2 + side2]),
            on_crop2.input_size,
            256,
            (128, 128),
        )[0].numpy()
    want_masks, want_scores, _ = on_crop2.predict(
        second - [left2, top2], np.array([1, 1]), mask_input=prompt, multimask_output=False
    )
    np.testing.assert_allclose(scores2, want_scores, atol=1e-6)
    assert np.array_equal(masks2[:, top2 : top2 + side2, left2 : left2 + side2], want_masks)


def test_zoom_in_predictor_refuses_an_image_of_another_size(scene_and_predictor) -> None:
    scene, predictor = scene_and_predictor
    with pytest.raises(ImageError, match="image is 100x256"):
        ZoomInPredictor(predictor, scene.image[:100])
    with pytest.raises(ImageError, match="with its image set"):
        ZoomInPredictor(SamPredictor(predictor.model), scene.image)
