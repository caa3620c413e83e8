"""IoU-gated decoding and low-res upsampling against the model's own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engine.amg.decoding import PointDecoder
from engine.amg.stability import stability_score
from engine.amg.upsampling import LogitUpsampler
from engine.builder import build_sam


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam("tiny")


def test_point_decoder_equals_the_mask_decoder(tiny) -> None:
    torch.manual_seed(1)
    embedding = torch.randn(1, *tiny.image_embedding_shape)  # with the packed instance code
    points = torch.rand(10, 2) * 256
    clicks = (points[:, None], torch.ones(10, 1, dtype=torch.int64))
    with torch.inference_mode():
        sparse, dense = tiny.prompt_encoder(points=clicks, boxes=None, masks=None)
        low_res, iou = tiny.mask_decoder(
            image_embeddings=embedding,
            image_pe=tiny.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            points=clicks,
        )
    decoder = PointDecoder(tiny, embedding, 86, 128)
    assert decoder.low_res_size == (88, 128)  # whole embedding cells: 22 of 32 rows
    decoded = decoder.run(points)
    torch.testing.assert_close(decoded.iou_predictions, iou, rtol=0, atol=1e-6)
    prompts, outputs = torch.tensor([3, 1, 3, 7, 9]), torch.tensor([0, 2, 1, 2, 0])
    got = decoder.low_res_logits(decoded, prompts, outputs)
    torch.testing.assert_close(got, low_res[prompts, outputs, :88, :], rtol=0, atol=1e-5)
    assert decoder.low_res_logits(decoded, prompts[:0], outputs[:0]).shape == (0, 88, 128)


CASES = [
    # low-res size, model input side, resized input (H, W), original (H, W)
    ((128, 128), 256, (171, 256), (683, 1024)),  # tiny on a 3:2 photo: two interpolations
    ((256, 256), 1024, (683, 1024), (683, 1024)),  # ViT on a 1024-px photo: one
    ((128, 128), 256, (256, 200), (300, 234)),  # a crop smaller than the input: downsampling
    ((256, 256), 1024, (1024, 768), (1500, 1125)),
]


def _published_postprocess(logits, side, resized, original):
    """SAM's postprocess_masks as published: F.interpolate to the square input, crop, resize."""
    up = F.interpolate(logits[:, None], (side, side), mode="bilinear", align_corners=False)
    up = up[..., : resized[0], : resized[1]]
    return F.interpolate(up, original, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize(("low", "side", "resized", "original"), CASES)
def test_upsample_equals_postprocess_masks(tiny, low, side, resized, original) -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, *low) * 8
    expected = _published_postprocess(logits, side, resized, original).numpy()
    upsampler = LogitUpsampler(low, side, resized, original)
    rows, cols = upsampler.needed_low_res
    # The decoder hands over whole embedding cells (multiples of 4 low-res rows).
    rows, cols = min(low[0], -(-rows // 4) * 4), min(low[1], -(-cols // 4) * 4)
    got = upsampler.upsample(logits[:, :rows, :cols])
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-5 * float(logits.abs().max()))
    transposed = upsampler.upsample(logits[:, :rows, :cols], transposed=True)
    np.testing.assert_allclose(transposed.transpose(0, 2, 1), got, rtol=0, atol=1e-3)

    # The model's own postprocessing (whichever backend it uses) agrees too.
    class _Frame:  # postprocess_masks reads only img_size
        img_size = side

    model_out = type(tiny).postprocess_masks(_Frame(), logits[:, None], resized, original)
    np.testing.assert_allclose(model_out[:, 0].numpy(), got, rtol=0, atol=1e-3)
    with pytest.raises(ValueError):
        upsampler.upsample(logits[:, : upsampler.needed_low_res[0] - 1, :])


@pytest.mark.parametrize(("low", "side", "resized", "original"), CASES)
def test_stability_bound_is_never_below_the_score(low, side, resized, original) -> None:
    gen = torch.Generator().manual_seed(3)
    # Smooth logits with real boundaries, plus sharp step masks (where the bound is tight).
    smooth = torch.nn.functional.avg_pool2d(torch.randn(6, 1, *low, generator=gen), 9, 1, 4)[:, 0]
    smooth = smooth * torch.tensor([4.0, 4.0, 40.0, 40.0, 200.0, 200.0])[:, None, None]
    steps = torch.full((3, *low), -20.0)
    steps[0, 10:60, 20:90] = 20.0
    steps[1, :, :5] = 20.0
    steps[2, 30:31, 30:31] = 3.0
    logits = torch.cat([smooth, steps])
    upsampler = LogitUpsampler(low, side, resized, original)
    full = torch.from_numpy(upsampler.upsample(logits))
    exact = stability_score(full, 0.0, 1.0).numpy()
    bound = upsampler.stability_upper_bound(logits.numpy(), 0.0, 1.0)
    finite = ~np.isnan(exact)
    assert (bound[finite] >= exact[finite]).all()
    assert np.isinf(bound[~finite]).all() or (~finite).sum() == 0
    # Useful: soft, unstable masks are rejected before any upsampling.
    assert (bound[:2] < 0.5).all()
