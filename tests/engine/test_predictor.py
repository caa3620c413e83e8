"""SamPredictor, ResizeLongestSide and EmbeddingCache on the tiny model with random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.builder import build_sam
from engine.embeddings import EmbeddingCache
from engine.modeling.sam import Sam
from engine.predictor import SamPredictor
from engine.transforms import ResizeLongestSide
from storage.errors import ConfigError, ImageError, PromptError
from storage.mask_store import MaskStore


@pytest.fixture(scope="module")
def model() -> Sam:
    torch.manual_seed(0)
    sam = build_sam("tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make every parameter matter (zero-initialised ones included)
        for param in sam.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return sam


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((300, 400, 3), np.uint8)
    img[...] = rng.integers(0, 60, (1, 1, 3))
    img[80:220, 120:300] = (200, 40, 90)  # a rectangle on a dark background
    return img


@pytest.fixture
def predictor(model: Sam, image: np.ndarray) -> SamPredictor:
    p = SamPredictor(model)
    p.set_image(image)
    return p


def test_get_preprocess_shape_rounds_half_up() -> None:
    assert ResizeLongestSide.get_preprocess_shape(300, 400, 256) == (192, 256)
    assert ResizeLongestSide.get_preprocess_shape(1000, 700, 1024) == (1024, 717)
    assert ResizeLongestSide.get_preprocess_shape(10, 3, 1024) == (1024, 307)


@pytest.mark.parametrize("shape", [(300, 400, 3), (1000, 700, 3), (100, 80, 3)])
def test_apply_image_matches_pil_bilinear(shape: tuple[int, int, int]) -> None:
    # The original SAM resized with PIL's bilinear filter (antialiased when shrinking).
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.stack([(xx * 7 + yy * 3) % 256, (xx * yy) % 256, np.full_like(xx, 90)], -1)
    img = np.clip(img + rng.integers(0, 20, shape), 0, 255).astype(np.uint8)
    ours = ResizeLongestSide(256).apply_image(img)
    h, w = ResizeLongestSide.get_preprocess_shape(shape[0], shape[1], 256)
    assert ours.shape == (h, w, 3) and ours.dtype == np.uint8
    pil = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


def test_coords_and_boxes_scale_with_the_resize() -> None:
    transform = ResizeLongestSide(256)
    coords = np.array([[400.0, 300.0], [0.0, 0.0]])
    np.testing.assert_allclose(transform.apply_coords(coords, (300, 400)), [[256, 192], [0, 0]])
    np.testing.assert_allclose(
        transform.apply_boxes(np.array([[40, 30, 200, 150]]), (300, 400)), [[25.6, 19.2, 128, 96]]
    )
    as_torch = transform.apply_boxes_torch(torch.tensor([[40, 30, 200, 150]]), (300, 400))
    np.testing.assert_allclose(as_torch.numpy(), [[25.6, 19.2, 128, 96]], rtol=1e-6)
    assert coords[0, 0] == 400.0  # inputs untouched


def test_set_image_is_resize_normalise_pad_then_encode(
    predictor: SamPredictor, model: Sam, image: np.ndarray
) -> None:
    resized = ResizeLongestSide(256).apply_image(image)
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    padded = torch.zeros(1, 3, 256, 256)
    padded[0, :, :192, :256] = (x - mean) / std
    with torch.no_grad():
        expected = model.image_encoder(padded)
    torch.testing.assert_close(predictor.get_image_embedding(), expected)
    assert predictor.original_size == (300, 400) and predictor.input_size == (192, 256)
    assert predictor.is_image_set and predictor.device == torch.device("cpu")


def test_bgr_input_is_flipped_to_rgb(model: Sam, image: np.ndarray, predictor: SamPredictor):
    bgr = SamPredictor(model)
    bgr.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(bgr.get_image_embedding(), predictor.get_image_embedding())


def test_predict_outputs_in_original_pixels(predictor: SamPredictor) -> None:
    masks, iou, low_res = predictor.predict(np.array([[200, 150]]), np.array([1]))
    assert masks.shape == (3, 300, 400) and masks.dtype == bool
    assert iou.shape == (3,) and iou.dtype == np.float32
    assert low_res.shape == (3, 128, 128) and low_res.dtype == np.float32
    logits, _, _ = predictor.predict(
        np.array([[200, 150]]), np.array([1]), multimask_output=False, return_logits=True
    )
    assert logits.shape == (1, 300, 400) and logits.dtype == np.float32
    best = low_res[np.argmax(iou)][None]
    refined, _, _ = predictor.predict(
        np.array([[200, 150], [20, 20]]), np.array([1, 0]), mask_input=best, multimask_output=False
    )
    assert refined.shape == (1, 300, 400)


def test_predict_equals_predict_torch_with_transformed_prompts(predictor: SamPredictor) -> None:
    points, labels, box = (
        np.array([[200.0, 150.0], [50, 60]]),
        np.array([1, 0]),
        [120, 80, 300, 220],
    )
    masks, iou, low_res = predictor.predict(points, labels, box=np.array(box))
    scale = 256 / 400
    coords_t = torch.tensor(points * scale, dtype=torch.float32)[None]
    box_t = torch.tensor([box], dtype=torch.float32) * scale
    masks_t, iou_t, low_res_t = predictor.predict_torch(coords_t, torch.tensor([[1, 0]]), box_t)
    assert masks_t.shape == (1, 3, 300, 400)
    torch.testing.assert_close(torch.from_numpy(low_res), low_res_t[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(iou), iou_t[0])
    assert np.mean(masks != masks_t[0].numpy()) < 1e-3


def test_set_embedding_reproduces_set_image(predictor: SamPredictor, model: Sam) -> None:
    expected = predictor.predict(np.array([[200, 150]]), np.array([1]))
    other = SamPredictor(model)
    other.set_embedding(predictor.get_image_embedding()[0].clone(), (300, 400))
    assert other.input_size == (192, 256) and other.original_size == (300, 400)
    got = other.predict(np.array([[200, 150]]), np.array([1]))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    other.reset_image()
    assert not other.is_image_set and other.features is None
    with pytest.raises(ImageError, match="no image set"):
        other.get_image_embedding()


def test_predict_torch_batches_many_points(predictor: SamPredictor) -> None:
    coords = torch.rand(16, 1, 2) * torch.tensor([256.0, 192.0])
    masks, iou, low_res = predictor.predict_torch(coords, torch.ones(16, 1, dtype=torch.long))
    assert masks.shape == (16, 3, 300, 400) and iou.shape == (16, 3)
    assert low_res.shape == (16, 3, 128, 128)


def test_bfloat16_autocast_returns_float32_close_to_float32(
    model: Sam, predictor: SamPredictor
) -> None:
    # Decoder only: bf16 convolutions are emulated (slow) on CPUs without AVX512-BF16.
    half = SamPredictor(model, autocast_dtype=torch.bfloat16)
    half.set_embedding(predictor.get_image_embedding(), (300, 400))
    a = predictor.predict(np.array([[200, 150]]), np.array([1]), return_logits=True)
    b = half.predict(np.array([[200, 150]]), np.array([1]), return_logits=True)
    assert b[0].dtype == np.float32 and b[1].dtype == np.float32 and b[2].dtype == np.float32
    assert np.corrcoef(a[2].ravel(), b[2].ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_images_are_refused(model: Sam, bad: object, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        SamPredictor(model).set_image(bad)  # type: ignore[arg-type]


def test_bad_image_format_and_torch_image(model: Sam, image: np.ndarray) -> None:
    predictor = SamPredictor(model)
    with pytest.raises(ImageError, match="image_format"):
        predictor.set_image(image, image_format="RGBA")
    with pytest.raises(ImageError, match="longest side 256"):
        predictor.set_torch_image(torch.zeros(1, 3, 100, 200), (100, 200))
    with pytest.raises(ImageError, match="no image set"):
        predictor.predict(np.array([[1, 1]]), np.array([1]))
    with pytest.raises(ImageError, match="embedding must have shape"):
        predictor.set_embedding(torch.zeros(1, 256, 64, 64), (100, 100))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "no prompt"),
        ({"point_coords": np.array([[1, 1]])}, "point_labels"),
        ({"point_coords": np.array([[450, 10]]), "point_labels": np.array([1])}, "outside"),
        ({"point_coords": np.array([[10, -1]]), "point_labels": np.array([1])}, "outside"),
        ({"point_coords": np.array([[1, 1]]), "point_labels": np.array([1, 0])}, "point_labels"),
        ({"point_coords": np.array([[1, 1]]), "point_labels": np.array([5])}, "point_labels"),
        ({"point_coords": np.array([1, 1]), "point_labels": np.array([1])}, r"\(N, 2\)"),
        ({"point_coords": np.array([[np.nan, 1]]), "point_labels": np.array([1])}, "finite"),
        ({"box": np.array([10, 10, 500, 100])}, "outside"),
        ({"box": np.array([100, 10, 50, 100])}, "x0 <= x1"),
        ({"box": np.array([1, 2, 3])}, "box"),
        ({"mask_input": np.zeros((1, 256, 256))}, "mask_input"),
    ],
)
def test_bad_prompts_are_refused(predictor: SamPredictor, kwargs: dict, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        predictor.predict(**kwargs)


def test_bad_batched_prompts_are_refused(predictor: SamPredictor) -> None:
    with pytest.raises(PromptError, match="batch sizes differ"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=torch.zeros(3, 4))
    with pytest.raises(PromptError, match=r"\(B, N\)"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 2))


# ------------------------------------------------------------------------------ embedding cache


def test_cache_hit_sets_the_predictor_without_the_image(model: Sam, image: np.ndarray) -> None:
    cache = EmbeddingCache("tiny-v1", max_items=2)
    first = SamPredictor(model)
    cache.get_or_compute("img-a", image, first)
    second = SamPredictor(model)

    def never_called() -> np.ndarray:
        raise AssertionError("a cache hit must not read the image")

    cache.get_or_compute("img-a", never_called, second)
    torch.testing.assert_close(second.get_image_embedding(), first.get_image_embedding())
    assert second.input_size == (192, 256) and second.original_size == (300, 400)
    assert (cache.stats.computed, cache.stats.memory_hits) == (1, 1)


def test_cache_evicts_the_least_recently_used(model: Sam, image: np.ndarray) -> None:
    cache = EmbeddingCache("tiny-v1", max_items=2)
    predictor = SamPredictor(model)
    small = image[:100, :120].copy()
    for image_id in ("a", "b", "a", "c"):
        cache.get_or_compute(image_id, small, predictor)
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    assert cache.stats.computed == 3 and cache.stats.memory_hits == 1


def test_cache_backed_by_the_mask_store(model: Sam, image: np.ndarray, tmp_path: Path) -> None:
    store = MaskStore(str(tmp_path / "dataset"))
    predictor = SamPredictor(model)
    EmbeddingCache("tiny-v1", store=store).get_or_compute("img-a", image, predictor)
    stored = store.load_embedding("img-a", "tiny-v1")
    assert stored is not None and stored[0].shape == model.image_embedding_shape
    assert stored[1:] == ((300, 400), (192, 256))

    fresh = EmbeddingCache("tiny-v1", store=store)  # e.g. after a restart
    other = SamPredictor(model)
    fresh.get_or_compute("img-a", lambda: pytest.fail("image read on a store hit"), other)
    assert fresh.stats.store_hits == 1
    torch.testing.assert_close(other.get_image_embedding(), predictor.get_image_embedding())

    another_model = EmbeddingCache("tiny-v2", store=store)
    another_model.get_or_compute("img-a", image, other)
    assert another_model.stats.computed == 1


def test_cache_recomputes_an_embedding_of_another_shape(
    model: Sam, image: np.ndarray, tmp_path: Path
) -> None:
    store = MaskStore(str(tmp_path / "dataset"))
    store.save_embedding(
        "img-a", "v1", np.zeros((256, 64, 64), np.float32), (300, 400), (768, 1024)
    )
    cache = EmbeddingCache("v1", store=store)
    predictor = SamPredictor(model)
    cache.get_or_compute("img-a", image, predictor)
    assert cache.stats.computed == 1 and predictor.get_image_embedding().shape == (
        1,
        *model.image_embedding_shape,
    )


def test_cache_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_items"):
        EmbeddingCache("v1", max_items=0)
    with pytest.raises(ConfigError, match="model_version"):
        EmbeddingCache("")
