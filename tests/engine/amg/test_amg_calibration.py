"""The generator's gates calibrated to a model: the isotonic IoU map, its use by the generator,
and a fit on a trained model's holdout masks."""

from __future__ import annotations

import numpy as np
import pytest

from engine.amg import AutomaticMaskGenerator, GateCalibration, IouCalibration
from engine.amg.calibration import fit_gate_calibration, fit_iou_calibration
from engine.builder import build_sam
from engine.evaluation.interactive import EvalSample
from engine.synthetic import generate_scene
from storage.errors import ConfigError, InvalidInputError
from tests.fixtures.models import sharp_tiny_model


def test_isotonic_fit_recovers_a_steep_monotone_relation() -> None:
    # Like a young IoU head: answers in [0, 0.8], truth near 0 until 0.6, then close to 1.
    rng = np.random.default_rng(0)
    predicted = rng.uniform(0.0, 0.8, 4000)
    expected = 1.0 / (1.0 + np.exp(-(predicted - 0.65) * 40.0))
    true = np.clip(expected + rng.normal(0.0, 0.05, predicted.size), 0.0, 1.0)
    fitted = fit_iou_calibration(predicted, true, min_block=20, max_knots=48)

    assert len(fitted.raw) <= 48
    assert np.all(np.diff(fitted.raw) > 0) and np.all(np.diff(fitted.calibrated) >= 0)
    grid = np.array([0.2, 0.5, 0.6, 0.7, 0.75])
    reference = 1.0 / (1.0 + np.exp(-(grid - 0.65) * 40.0))
    np.testing.assert_allclose(fitted(grid), reference, atol=0.1)
    # The top is resolved: a gate at 0.88 is reachable, unlike with equal-count bins of 1/32.
    assert fitted(np.array([0.8]))[0] >= 0.9


def test_isotonic_fit_of_a_decreasing_relation_is_flat_at_the_mean() -> None:
    predicted = np.linspace(0.0, 1.0, 200)
    true = 1.0 - predicted
    fitted = fit_iou_calibration(predicted, true)
    np.testing.assert_allclose(fitted(predicted), np.full(200, true.mean()), atol=1e-6)


def test_a_head_that_answers_one_value_calibrates_to_the_mean_truth() -> None:
    fitted = fit_iou_calibration(np.full(100, 0.3), np.linspace(0.0, 1.0, 100))
    assert len(fitted.raw) == 1 and fitted.raw[0] == pytest.approx(0.3)
    np.testing.assert_allclose(fitted(np.array([0.0, 0.3, 1.0])), 0.5, atol=1e-6)


def test_bad_calibration_inputs_name_the_problem() -> None:
    with pytest.raises(InvalidInputError, match="pair up"):
        fit_iou_calibration(np.zeros(30), np.zeros(31))
    with pytest.raises(InvalidInputError, match="too few"):
        fit_iou_calibration(np.zeros(5), np.zeros(5))
    with pytest.raises(ConfigError, match="must increase"):
        IouCalibration((0.5, 0.4), (0.1, 0.2))
    with pytest.raises(ConfigError, match="'raw' and 'calibrated'"):
        IouCalibration.from_dict({"raw": [0.1]})
    with pytest.raises(ConfigError, match="not a gate calibration"):
        GateCalibration.from_dict({"iou": None})


def test_calibration_round_trips_through_json_values() -> None:
    calibration = GateCalibration(
        IouCalibration((0.1, 0.6), (0.05, 0.9)), stability_score_offset=0.25, masks=40, images=2
    )
    assert GateCalibration.from_dict(calibration.to_dict()) == calibration
    kwargs = calibration.generator_kwargs()
    assert kwargs == {
        "iou_calibration": {"raw": [0.1, 0.6], "calibrated": [0.05, 0.9]},
        "stability_score_offset": 0.25,
    }


@pytest.fixture(scope="module")
def sharp_tiny():
    return sharp_tiny_model()


def test_generator_gates_and_reports_the_calibrated_iou(sharp_tiny) -> None:
    image = generate_scene(np.random.default_rng(3), (96, 128)).image
    common = dict(points_per_side=5, stability_score_thresh=0.0, box_nms_thresh=1.0)
    raw = AutomaticMaskGenerator(sharp_tiny, pred_iou_thresh=0.0, **common).generate(image)
    assert len(raw) > 4
    # A map that is steep in the middle of the head's answers, flat outside its knots.
    answers = np.array([m["predicted_iou"] for m in raw])
    lo, mid, hi = np.percentile(answers, [10, 50, 90])
    calibration = IouCalibration((lo, mid, hi), (0.1, 0.5, 0.95))
    calibrated = AutomaticMaskGenerator(
        sharp_tiny, pred_iou_thresh=0.0, iou_calibration=calibration.to_dict(), **common
    ).generate(image)

    # The same masks (NMS may order ties of the flat ends differently), answers mapped.
    def key(m: dict) -> tuple:
        return m["segmentation"]["counts"], tuple(m["point_coords"][0])

    raw_answer = {key(m): m["predicted_iou"] for m in raw}
    assert sorted(map(key, calibrated)) == sorted(map(key, raw))
    np.testing.assert_allclose(
        [m["predicted_iou"] for m in calibrated],
        calibration(np.array([raw_answer[key(m)] for m in calibrated])),
        atol=1e-6,
    )
    # The gate reads the calibrated value: 0.5 keeps what the raw gate at the median keeps.
    gated = AutomaticMaskGenerator(
        sharp_tiny, pred_iou_thresh=0.5, iou_calibration=calibration, **common
    ).generate(image)
    assert len(gated) == int((answers > mid).sum())
    assert all(m["predicted_iou"] > 0.5 for m in gated)


def test_fit_on_a_trained_model_makes_its_predicted_iou_honest(
    trained_tiny_checkpoint: str,
) -> None:
    from tests.fixtures.models import FIXTURE_SCENES

    model = build_sam("tiny", checkpoint=trained_tiny_checkpoint)
    rng = np.random.default_rng(2024)

    def scenes(n: int) -> list[EvalSample]:
        out = []
        for i in range(n):
            scene = generate_scene(rng, (256, 256), min_objects=2, **FIXTURE_SCENES)
            out.append(EvalSample(image=scene.image, masks=scene.masks, image_id=str(i)))
        return out

    calibration = fit_gate_calibration(model, scenes(4), points_per_side=8, max_images=3)
    assert calibration.images == 3 and calibration.masks > 100
    assert calibration.stability_score_offset == pytest.approx(256 / 1024)
    assert calibration.iou is not None

    # On other scenes, the calibrated answers are closer to the masks' true IoU than the raw.
    generator = AutomaticMaskGenerator(
        model,
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        output_mode="binary_mask",
    )
    answers, truth = [], []
    for sample in scenes(3):
        gt = sample.masks.reshape(len(sample.masks), -1).astype(bool)
        for mask in generator.generate(sample.image):
            flat = mask["segmentation"].reshape(-1)
            inter = (gt & flat).sum(axis=1)
            union = (gt | flat).sum(axis=1)
            answers.append(mask["predicted_iou"])
            truth.append((inter / union).max())
    answers, truth = np.array(answers), np.array(truth)
    raw_error = np.abs(answers - truth).mean()
    calibrated_error = np.abs(calibration.iou(answers) - truth).mean()
    assert calibrated_error < 0.8 * raw_error, (calibrated_error, raw_error)
