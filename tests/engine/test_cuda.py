"""The engine on a CUDA device gives what it gives on the CPU: the predictor, the automatic mask
generator and a training step. Skipped where no GPU is present (CI has none); run on a GPU
machine with ``pytest tests/engine/test_cuda.py``.

TF32 is switched off for both devices' runs so the two differ only by float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engine.amg import AutomaticMaskGenerator
from engine.builder import build_sam
from engine.modeling.sam import Sam
from engine.predictor import SamPredictor
from engine.synthetic import generate_scene
from engine.training import SyntheticTrainingData, TrainConfig, train
from storage import rle
from tests.fixtures.models import sharp_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def models() -> tuple[Sam, Sam]:
    """The same random-weight tiny model on the CPU and on the GPU, its mask logits scaled up
    so masks are confident (plain random weights give logits near 0)."""
    cpu = sharp_tiny_model()
    return cpu.eval(), copy.deepcopy(cpu).to("cuda").eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_scene(np.random.default_rng(3), (96, 128)).image


def test_predictor_on_cuda_matches_the_cpu(models: tuple[Sam, Sam], image: np.ndarray) -> None:
    outputs = []
    for model in models:
        predictor = SamPredictor(model)
        predictor.set_image(image)
        outputs.append(
            predictor.predict(
                point_coords=np.array([[40.0, 30.0], [90.0, 60.0]]),
                point_labels=np.array([1, 0]),
                multimask_output=True,
            )
        )
    (masks_cpu, iou_cpu, low_cpu), (masks_gpu, iou_gpu, low_gpu) = outputs
    assert isinstance(masks_gpu, np.ndarray) and masks_gpu.shape == masks_cpu.shape
    np.testing.assert_allclose(iou_gpu, iou_cpu, atol=1e-3)
    np.testing.assert_allclose(low_gpu, low_cpu, atol=1e-2 * float(np.abs(low_cpu).max()))
    assert (masks_gpu != masks_cpu).mean() < 1e-3


def test_automatic_masks_on_cuda_match_the_cpu(models: tuple[Sam, Sam], image: np.ndarray) -> None:
    results = [
        AutomaticMaskGenerator(
            model, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0
        ).generate(image)
        for model in models
    ]
    cpu, gpu = results
    assert len(cpu) > 0 and len(gpu) == len(cpu)
    ious = rle.iou([m["segmentation"] for m in gpu], [m["segmentation"] for m in cpu])
    match = ious.argmax(axis=1)
    assert sorted(match.tolist()) == list(range(len(cpu))), "not one-to-one"
    assert ious.max(axis=1).min() >= 0.95
    for g, c in zip(gpu, (cpu[j] for j in match), strict=True):
        assert abs(g["predicted_iou"] - c["predicted_iou"]) < 1e-2
        assert abs(g["stability_score"] - c["stability_score"]) < 2e-2


def test_training_steps_on_cuda() -> None:
    torch.manual_seed(0)
    model = build_sam("tiny", device="cuda")
    data = SyntheticTrainingData(model.img_size)
    # 4 rounds, 1 without a new point: the random choice of that round runs on the GPU too.
    config = TrainConfig(steps=4, warmup_steps=1, num_rounds=4, no_point_rounds=1, focal_weight=0)
    result = train(model, data, config, progress=False)
    assert result.step == 4
    assert all(np.isfinite(log.loss) for log in result.history)
    assert next(model.parameters()).device.type == "cuda"
