"""The simulated annotator: clicks like a person, pays time like one, and gets faster with a
better model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.annotators import GroundTruth, SimulatedAnnotator, TimeModel, click_until_target
from flows.config import parse_config
from flows.sources import load_pool_ground_truth, prepare_source, round_images
from storage import rle as rle_codec
from storage.mask_store import MaskRecord, MaskStore, make_mask_id


class _Answers:
    """A predictor seam that answers every click with fixed masks (the loop is under test)."""

    def __init__(self, mask: np.ndarray, score: float = 0.9) -> None:
        self.mask = mask
        self.score = score
        self.calls: list[tuple[np.ndarray, np.ndarray, bool]] = []

    def predict(self, *, point_coords, point_labels, mask_input, multimask_output):  # type: ignore[no-untyped-def]
        self.calls.append((point_coords.copy(), point_labels.copy(), multimask_output))
        n = 3 if multimask_output else 1
        masks = np.repeat(self.mask[None], n, axis=0)
        return masks, np.full(n, self.score, np.float32), np.zeros((n, 16, 16), np.float32)


def _square(h: int = 40, w: int = 40) -> np.ndarray:
    gt = np.zeros((h, w), bool)
    gt[10:30, 5:25] = True
    return gt


def test_one_click_at_the_centre_when_the_model_is_right() -> None:
    gt = _square()
    predictor = _Answers(gt)
    session = click_until_target(predictor, gt, iou_target=0.9, click_budget=5)
    assert session.clicks == 1 and not session.brushed
    ((coords, labels, multimask),) = predictor.calls
    assert multimask and labels.tolist() == [1]
    x, y = coords[0]
    assert 13 <= x <= 16 and 18 <= y <= 21  # the point farthest from the boundary
    assert np.array_equal(session.mask, gt)


def test_budget_then_brush_when_the_model_never_gets_there() -> None:
    gt = _square()
    predictor = _Answers(np.zeros_like(gt), score=0.1)
    session = click_until_target(predictor, gt, iou_target=0.9, click_budget=4)
    assert session.clicks == 4 and session.brushed
    assert np.array_equal(session.mask, gt)  # the brush finishes the mask
    # Only the first click asks for three masks; later clicks refine one.
    assert [c[2] for c in predictor.calls] == [True, False, False, False]
    assert [len(c[0]) for c in predictor.calls] == [1, 2, 3, 4]


def test_time_model_formula() -> None:
    t = TimeModel(seconds_per_object=4, seconds_per_click=2, brush_seconds=10, accept_seconds=1)
    assert t.mask_seconds(3, brushed=False) == 10
    assert t.mask_seconds(3, brushed=True) == 20
    assert t.fix_seconds(3, brushed=False) == 7  # checking, then the clicks: no search
    assert t.fix_seconds(3, brushed=True) == 17


def test_a_fix_goes_on_from_the_predictions_prompt_and_counts_only_new_clicks() -> None:
    gt = _square()
    near_miss = gt.copy()
    near_miss[10:30, 19:25] = False  # IoU 0.7: the model's mask misses the right part
    predictor = _Answers(gt)
    session = click_until_target(
        predictor,
        gt,
        iou_target=0.9,
        click_budget=5,
        start_points=[[8.0, 12.0]],
        start_mask=near_miss,
    )
    assert session.clicks == 1 and not session.brushed
    assert np.array_equal(session.mask, gt)
    # First the prediction's own prompt (three masks, to recover its logits), then the person's
    # click in the missed part, sent with the prompt point and no second ambiguity.
    (start_coords, _, start_multi), (coords, labels, multi) = predictor.calls
    assert start_coords.tolist() == [[8.0, 12.0]] and start_multi
    assert not multi and labels.tolist() == [1, 1] and coords[0].tolist() == [8.0, 12.0]
    assert 19 <= coords[1][0] <= 24  # inside the missed strip
    assert session.points[0] == [8.0, 12.0] and len(session.points) == 2

    # A start that already meets the target needs no click and no brush.
    done = click_until_target(
        _Answers(gt),
        gt,
        iou_target=0.6,
        click_budget=5,
        start_points=[[8, 12]],
        start_mask=near_miss,
    )
    assert done.clicks == 0 and not done.brushed and np.array_equal(done.mask, near_miss)


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[MaskStore, GroundTruth, list]:
    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "source": {"holdout_images": 1, "image_size": 128},
            "stage1": {"rounds": 1, "images_per_round": 2},
            "stage2": {"rounds": 1, "images_per_round": 1},
            "stage3": {"rounds": 1, "images_per_round": 1},
        }
    )
    store = MaskStore(config.root)
    prepare_source(store, config)
    return store, load_pool_ground_truth(store, config), round_images(store, config, 1, 0)


def _fresh_model() -> torch.nn.Module:
    from engine import build_sam

    torch.manual_seed(0)
    return build_sam("tiny")


def test_stage2_keeps_matching_predictions_and_clicks_the_rest(synthetic) -> None:
    store, truth, images = synthetic
    image = images[0]
    gt = truth.rles(image.image_id)
    assert len(gt) >= 2
    wrong = np.zeros(truth.masks(image.image_id).shape[1:], bool)
    wrong[:4, :4] = True
    # A near miss of object 1: its top rows cut off (IoU with the object in [0.5, 0.9)).
    near = truth.masks(image.image_id)[1].copy()
    rows = np.flatnonzero(near.any(axis=1))
    near[rows[0] : rows[0] + max(1, 2 * len(rows) // 5)] = False
    assert 0.5 <= rle_codec.iou(rle_codec.encode(near[None]), [gt[1]])[0, 0] < 0.9
    ys, xs = np.nonzero(near)
    point = [[float(xs.mean()), float(ys.mean())]]
    predictions = [
        MaskRecord(image.image_id, gt[0], 2, 0, "model", "pre", predicted_iou=0.97),
        MaskRecord(image.image_id, rle_codec.encode(wrong[None])[0], 2, 0, "model", "pre", 0.95),
        MaskRecord(
            image.image_id,
            rle_codec.encode(near[None])[0],
            2,
            0,
            "model",
            "pre",
            predicted_iou=0.9,
            point_coords=point,
        ),
    ]
    time_model = TimeModel()

    def review(annotator: SimulatedAnnotator) -> list[MaskRecord]:
        return annotator.annotate(
            [image],
            _fresh_model(),
            stage=2,
            round=0,
            run_id="r",
            model_version="v",
            predictions={image.image_id: predictions},
        )

    records = review(
        SimulatedAnnotator(
            store,
            truth,
            click_budget=2,
            time_model=time_model,
            image_budget_s=1e6,
            move_on_after_s=1e6,
        )
    )
    kept = [r for r in records if r.source == "model"]
    manual = [r for r in records if r.source == "manual"]
    assert len(kept) == 1 and kept[0].segmentation == gt[0]
    assert kept[0].clicks == 0 and kept[0].predicted_iou == pytest.approx(0.97)
    # With time to spare every other object is labelled by hand, each exactly once.
    assert len(manual) == len(gt) - 1
    assert all(r.predicted_iou is None for r in manual)
    # The near miss was fixed, from its prompt point: no time to find the object, fewer clicks.
    (fixed,) = [r for r in manual if r.point_coords and r.point_coords[0] == point[0]]
    assert fixed.mask_id == make_mask_id(image.image_id, "2", "0", "r", "manual", "object-1")
    assert fixed.clicks == len(fixed.point_coords) - 1
    brushed = fixed.lead_time_s > time_model.fix_seconds(fixed.clicks, brushed=False)
    assert fixed.lead_time_s == pytest.approx(time_model.fix_seconds(fixed.clicks, brushed))
    others = [r for r in manual if r is not fixed]
    assert all(r.clicks >= 1 for r in others)
    assert all(
        r.lead_time_s in {time_model.mask_seconds(r.clicks, b) for b in (False, True)}
        for r in others
    )
    assert len({r.mask_id for r in records}) == len(records)
    assert all((r.stage, r.round, r.run_id) == (2, 0, "r") for r in records)

    # Out of time after the first check: the near miss is deleted, nothing else is labelled.
    hurried = review(SimulatedAnnotator(store, truth, click_budget=2, image_budget_s=1.0))
    assert [r.source for r in hurried] == ["model"]


def test_the_image_budget_and_moving_on_in_stage_1_limit_masks_per_image(synthetic) -> None:
    store, truth, images = synthetic
    model = _fresh_model()
    patient = SimulatedAnnotator(
        store, truth, click_budget=2, image_budget_s=1e6, move_on_after_s=1e6
    )
    hasty = SimulatedAnnotator(store, truth, click_budget=2, image_budget_s=1.0)
    all_masks = patient.annotate(images, model, stage=1, round=0, run_id="r", model_version="v")
    one_each = hasty.annotate(images, model, stage=1, round=0, run_id="r", model_version="v")
    assert len(all_masks) == sum(len(truth.rles(i.image_id)) for i in images)
    assert len(one_each) == len(images)  # the first (largest) object of each image, no more
    # Stage 2 has no moving on (the paper's people add what is missing): only the budget stops.
    stage2 = SimulatedAnnotator(
        store, truth, click_budget=2, image_budget_s=1e6, move_on_after_s=1.0
    ).annotate(images, model, stage=2, round=0, run_id="r", model_version="v")
    assert len(stage2) == len(all_masks)
    # Deterministic: the same person on the same images makes the same masks.
    again = patient.annotate(images, model, stage=1, round=0, run_id="r", model_version="v")
    assert [r.mask_id for r in again] == [r.mask_id for r in all_masks]


def test_a_trained_model_saves_clicks_and_time(
    tmp_path: Path, trained_tiny_checkpoint: str
) -> None:
    from engine import build_sam
    from tests.fixtures.models import FIXTURE_SCENES

    # Scenes of the kind the fixture model learnt (a few large objects), at its input size.
    config = parse_config(
        {
            "root": str(tmp_path / "root"),
            "source": {"holdout_images": 1, "image_size": 256, "scene": FIXTURE_SCENES},
            "stage1": {"rounds": 1, "images_per_round": 3},
            "stage2": {"rounds": 1, "images_per_round": 1},
            "stage3": {"rounds": 1, "images_per_round": 1},
        }
    )
    store = MaskStore(config.root)
    prepare_source(store, config)
    truth, images = load_pool_ground_truth(store, config), round_images(store, config, 1, 0)
    annotator = SimulatedAnnotator(
        store, truth, iou_target=0.5, click_budget=6, image_budget_s=60.0, move_on_after_s=25.0
    )
    runs = {}
    for name, model in (
        ("untrained", _fresh_model()),
        ("trained", build_sam("tiny", checkpoint=trained_tiny_checkpoint)),
    ):
        records = annotator.annotate(
            images, model, stage=1, round=0, run_id="r", model_version=name
        )
        runs[name] = (
            np.mean([r.clicks for r in records]),
            np.mean([r.lead_time_s for r in records]),
            len(records) / len(images),
        )
    (clicks_u, seconds_u, per_image_u), (clicks_t, seconds_t, per_image_t) = (
        runs["untrained"],
        runs["trained"],
    )
    assert clicks_t < clicks_u
    assert seconds_t < seconds_u
    assert per_image_t >= per_image_u
