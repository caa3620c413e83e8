"""Numerical tests of SAM's pieces against their definitions (tiny model and small modules)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engine.builder import build_sam, build_sam_from_args, resolve_build_args
from engine.modeling.common import LayerNorm2d
from engine.modeling.factored_attention import keys_folded_attention, queries_folded_attention
from engine.modeling.image_encoder import Attention as VitAttention
from engine.modeling.image_encoder import window_partition, window_unpartition
from engine.modeling.prompt_encoder import PositionEmbeddingRandom
from engine.modeling.sam import Sam
from engine.modeling.transformer import Attention as TwoWayAttention
from storage.errors import ConfigError


@pytest.fixture(scope="module")
def tiny() -> Sam:
    torch.manual_seed(0)
    model = build_sam("tiny")
    _randomise(model)
    return model


def _randomise(model: torch.nn.Module, std: float = 0.05) -> None:
    """Replace zero/one initialisations (rel pos, norms, embeddings) by random values, so that
    every parameter influences the outputs the tests compare."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * std)


def test_layer_norm_2d_matches_definition() -> None:
    norm = LayerNorm2d(5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 3, 4) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(-1, 1, 1)
    expected = expected + norm.bias.view(-1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "ws"), [(64, 64, 14), (14, 28, 14), (5, 9, 4), (3, 3, 7)])
def test_window_partition_round_trip(h: int, w: int, ws: int) -> None:
    x = torch.randn(2, h, w, 3)
    windows, (hp, wp) = window_partition(x, ws)
    assert (hp % ws, wp % ws) == (0, 0) and hp - h < ws and wp - w < ws
    assert windows.shape == (2 * (hp // ws) * (wp // ws), ws, ws, 3)
    # The second window of the first image is the top row's second tile (zero-padded).
    if wp // ws > 1:
        tile = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))[0, :ws, ws : 2 * ws]
        torch.testing.assert_close(windows[1], tile, rtol=0, atol=0)
    torch.testing.assert_close(window_unpartition(windows, ws, (hp, wp), (h, w)), x, rtol=0, atol=0)


def _rel_pos_bias_by_definition(
    q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """bias[b, (i, j), (k, l)] = q[b, i, j] . Rh[i - k + h - 1] + q[b, i, j] . Rw[j - l + w - 1]."""
    b = q.shape[0]
    bias = torch.zeros(b, h * w, h * w)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for m in range(w):
                    qv = q[:, i * w + j]
                    bias[:, i * w + j, k * w + m] = (
                        qv @ rel_h[i - k + h - 1] + qv @ rel_w[j - m + w - 1]
                    )
    return bias


def test_vit_attention_with_rel_pos_matches_definition_with_and_without_sdpa() -> None:
    torch.manual_seed(0)
    h, w, dim, heads = 4, 3, 16, 2
    attn = VitAttention(dim, num_heads=heads, use_rel_pos=True, input_size=(h, w))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(2, h, w, dim)
    # Reference written from the definition: softmax(q k^T / sqrt(d) + rel-pos bias) v.
    qkv = attn.qkv(x).reshape(2, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, 2 * heads, h * w, -1).unbind(0)
    logits = q @ k.transpose(1, 2) / math.sqrt(dim // heads)
    logits = logits + _rel_pos_bias_by_definition(q, attn.rel_pos_h, attn.rel_pos_w, h, w)
    out = (logits.softmax(-1) @ v).view(2, heads, h, w, -1).permute(0, 2, 3, 1, 4)
    expected = attn.proj(out.reshape(2, h, w, dim))
    with torch.no_grad():
        for use_sdpa in (True, False):
            attn.use_sdpa = use_sdpa
            torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


def test_two_way_attention_sdpa_equals_manual_softmax() -> None:
    torch.manual_seed(0)
    attn = TwoWayAttention(32, 4, downsample_rate=2)
    q, k, v = torch.randn(3, 7, 32), torch.randn(3, 50, 32), torch.randn(3, 50, 32)
    with torch.no_grad():
        attn.use_sdpa = True
        fast = attn(q, k, v)
        attn.use_sdpa = False
        slow = attn(q, k, v)
        qh = attn.q_proj(q).reshape(3, 7, 4, 4).transpose(1, 2)
        kh = attn.k_proj(k).reshape(3, 50, 4, 4).transpose(1, 2)
        vh = attn.v_proj(v).reshape(3, 50, 4, 4).transpose(1, 2)
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1)
        expected = attn.out_proj((weights @ vh).transpose(1, 2).reshape(3, 7, 16))
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, expected, rtol=1e-5, atol=1e-5)


def test_random_fourier_encoding_formula() -> None:
    pe = PositionEmbeddingRandom(8)
    p = torch.rand(5, 2)
    g = pe.positional_encoding_gaussian_matrix
    proj = 2 * math.pi * ((2 * p - 1) @ g)
    torch.testing.assert_close(pe.encode(p), torch.cat([proj.sin(), proj.cos()], dim=-1))


def test_dense_pe_is_the_encoding_of_cell_centres(tiny: Sam) -> None:
    encoder = tiny.prompt_encoder
    h, w = encoder.image_embedding_size
    dense = encoder.get_dense_pe()
    assert dense.shape == (1, encoder.embed_dim, h, w)
    for i, j in [(0, 0), (3, 17), (h - 1, w - 1)]:
        centre = torch.tensor([(j + 0.5) / w, (i + 0.5) / h])
        torch.testing.assert_close(dense[0, :, i, j], encoder.pe_layer.encode(centre))


def test_point_embeddings_by_label(tiny: Sam) -> None:
    encoder = tiny.prompt_encoder
    points = torch.tensor([[[10.0, 20.0], [100.0, 50.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    with torch.no_grad():
        out = encoder.embed_points(points, labels, pad=True)
        pe = encoder.pe_layer.forward_with_coords(points + 0.5, encoder.input_image_size)
    assert out.shape == (1, 4, encoder.embed_dim)
    torch.testing.assert_close(out[0, 0], pe[0, 0] + encoder.point_embeddings[1].weight[0])
    torch.testing.assert_close(out[0, 1], pe[0, 1] + encoder.point_embeddings[0].weight[0])
    # A -1 label and the appended padding point carry only the "not a point" embedding.
    torch.testing.assert_close(out[0, 2], encoder.not_a_point_embed.weight[0])
    torch.testing.assert_close(out[0, 3], encoder.not_a_point_embed.weight[0])


def _brute_force_prompt_maps(
    encoder: torch.nn.Module, points: list[tuple[float, float, int]], box: list[float] | None
) -> torch.Tensor:
    """The three prompt maps of one prompt set, cell by cell from the documented definition."""
    h, w = encoder.image_embedding_size
    height, width = encoder.input_image_size
    cy, cx = height / h, width / w
    maps = torch.zeros(3, h, w)
    for i in range(h):
        for j in range(w):
            y, x = (i + 0.5) * cy, (j + 0.5) * cx
            for px, py, label in points:
                if label in (0, 1):
                    g = math.exp(-0.5 * (((x - px - 0.5) / cx) ** 2 + ((y - py - 0.5) / cy) ** 2))
                    channel = 0 if label == 1 else 1
                    maps[channel, i, j] = max(float(maps[channel, i, j]), g)
            if box is not None:
                x0, y0, x1, y1 = (v + 0.5 for v in box)
                maps[2, i, j] = float(x0 <= x <= x1 and y0 <= y <= y1)
    return maps


def test_prompt_maps_match_their_definition(tiny: Sam) -> None:
    encoder = tiny.prompt_encoder
    clicks = [(100.0, 50.0, 1), (30.0, 200.0, 0), (7.0, 7.0, 1), (0.0, 0.0, -1)]
    points = torch.tensor([[[x, y] for x, y, _ in clicks]])
    labels = torch.tensor([[label for _, _, label in clicks]])
    drawn = encoder.draw_prompt_maps((points, labels), None, batch=1)
    torch.testing.assert_close(drawn[0], _brute_force_prompt_maps(encoder, clicks, None))
    # A box given as corner points (labels 2, 3) draws the same as the same box given as a box.
    box = [20.0, 30.0, 200.0, 221.0]
    corners = torch.tensor([[[20.0, 30.0], [200.0, 221.0]]])
    as_points = encoder.draw_prompt_maps((corners, torch.tensor([[2, 3]])), None, batch=1)
    as_box = encoder.draw_prompt_maps(None, torch.tensor([box]), batch=1)
    expected = _brute_force_prompt_maps(encoder, [], box)
    torch.testing.assert_close(as_points[0], expected)
    torch.testing.assert_close(as_box[0], expected)
    assert expected[2].sum() > 0 and expected[:2].sum() == 0


def test_prompt_maps_reach_the_dense_embedding(tiny: Sam) -> None:
    encoder = tiny.prompt_encoder
    points = torch.tensor([[[100.0, 50.0]], [[200.0, 180.0]]])
    labels = torch.ones((2, 1), dtype=torch.int64)
    with torch.no_grad():
        _, dense = encoder(points=(points, labels), boxes=None, masks=None)
        maps = encoder.draw_prompt_maps((points, labels), None, batch=2)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        expected = no_mask + encoder.prompt_map_embed(maps)
    torch.testing.assert_close(dense, expected)
    assert not torch.allclose(dense[0], dense[1])  # a dense embedding per prompt


def test_official_variants_have_no_prompt_maps() -> None:
    for variant in ("vit_b", "vit_l", "vit_h"):
        assert resolve_build_args({"variant": variant})["prompt_maps"] is False
    model = build_sam("vit_b", device="meta")
    assert model.prompt_encoder.prompt_map_embed is None
    assert not any("prompt_map" in key for key in model.state_dict())


def test_box_embedding_is_its_corners_encoding_plus_corner_embeddings(tiny: Sam) -> None:
    encoder = tiny.prompt_encoder
    boxes = torch.tensor([[12.0, 30.0, 200.0, 180.0], [0.0, 0.0, 255.0, 255.0]])
    corners = boxes.reshape(-1, 2, 2)
    with torch.no_grad():
        box_tokens = encoder.embed_boxes(boxes)
        corner_pe = encoder.pe_layer.forward_with_coords(corners + 0.5, encoder.input_image_size)
        as_points = encoder.embed_points(corners, torch.tensor([[2, 3], [2, 3]]), pad=False)
    expected = corner_pe + torch.stack(
        [encoder.point_embeddings[2].weight[0], encoder.point_embeddings[3].weight[0]]
    )
    torch.testing.assert_close(box_tokens, expected)
    torch.testing.assert_close(as_points, expected)
    sparse, dense = encoder(points=None, boxes=boxes, masks=None)
    assert sparse.shape == (2, 2, encoder.embed_dim)
    with torch.no_grad():
        maps = encoder.prompt_map_embed(encoder.draw_prompt_maps(None, boxes, batch=2))
    torch.testing.assert_close(
        dense, encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand(2, -1, 32, 32) + maps
    )


def _decode(model: Sam, embedding: torch.Tensor, multimask: bool, masks=None, n: int = 5):
    gen = torch.Generator().manual_seed(3)
    points = torch.rand(n, 2, 2, generator=gen) * model.img_size
    labels = torch.tensor([[1, 0]] * n)
    sparse, dense = model.prompt_encoder(points=(points, labels), boxes=None, masks=masks)
    return model.mask_decoder(
        embedding,
        model.prompt_encoder.get_dense_pe(),
        sparse,
        dense,
        multimask_output=multimask,
        points=(points, labels),
    )


@torch.no_grad()
def test_multimask_and_single_mask_shapes(tiny: Sam) -> None:
    embedding = torch.randn(1, *tiny.image_embedding_shape)
    low_res, iou = _decode(tiny, embedding, multimask=True)
    assert low_res.shape == (5, 3, 128, 128) and iou.shape == (5, 3)
    single, single_iou = _decode(tiny, embedding, multimask=False)
    assert single.shape == (5, 1, 128, 128) and single_iou.shape == (5, 1)
    every, every_iou = tiny.mask_decoder.predict_masks(
        embedding,
        tiny.prompt_encoder.get_dense_pe(),
        *tiny.prompt_encoder(
            points=(torch.rand(5, 2, 2) * 256, torch.ones(5, 2, dtype=torch.long)),
            boxes=None,
            masks=None,
        ),
    )
    assert every.shape == (5, 4, 128, 128) and every_iou.shape == (5, 4)


@torch.no_grad()
def test_mask_prompt_changes_the_output(tiny: Sam) -> None:
    embedding = torch.randn(1, *tiny.image_embedding_shape)
    plain, _ = _decode(tiny, embedding, multimask=False, n=1)
    mask_a = torch.full((1, 1, 128, 128), -8.0)
    mask_a[..., 20:80, 30:90] = 8.0
    mask_b = -mask_a
    with_a, _ = _decode(tiny, embedding, multimask=False, masks=mask_a, n=1)
    with_b, _ = _decode(tiny, embedding, multimask=False, masks=mask_b, n=1)
    assert (with_a - plain).abs().mean() > 1e-3
    assert (with_a - with_b).abs().mean() > 1e-3


@torch.no_grad()
def test_channels_last_upscaling_equals_the_conv_transpose_stack(tiny: Sam) -> None:
    x = torch.randn(2, 6, 5, 128)
    fast = tiny.mask_decoder.upscale(x)
    reference = tiny.mask_decoder.output_upscaling(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert fast.shape == (2, 24, 20, 16)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_one_embedding_per_prompt_equals_a_shared_embedding(tiny: Sam) -> None:
    embedding = torch.randn(1, *tiny.image_embedding_shape)
    shared, shared_iou = _decode(tiny, embedding, multimask=True, n=3)
    per_prompt, per_iou = _decode(tiny, embedding.expand(3, -1, -1, -1), multimask=True, n=3)
    torch.testing.assert_close(per_prompt, shared)
    torch.testing.assert_close(per_iou, shared_iou)


@torch.no_grad()
def test_sdpa_switch_gives_the_same_model_outputs(tiny: Sam) -> None:
    image = torch.randint(0, 256, (3, 256, 192)).float()
    record = {
        "image": image,
        "original_size": (400, 300),
        "point_coords": torch.tensor([[[50.0, 60.0]]]),
        "point_labels": torch.tensor([[1]]),
    }
    try:
        tiny.use_sdpa = True
        fast = tiny([record], multimask_output=True)[0]
        tiny.use_sdpa = False
        assert not tiny.use_sdpa
        slow = tiny([record], multimask_output=True)[0]
    finally:
        tiny.use_sdpa = True
    torch.testing.assert_close(fast["low_res_logits"], slow["low_res_logits"], rtol=1e-4, atol=1e-4)
    assert fast["masks"].shape == (1, 3, 400, 300) and fast["masks"].dtype == torch.bool


def test_preprocess_normalises_then_pads_bottom_right(tiny: Sam) -> None:
    x = torch.randint(0, 256, (1, 3, 200, 256)).float()
    out = tiny.preprocess(x)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert out.shape == (1, 3, 256, 256)
    torch.testing.assert_close(out[..., :200, :], (x - mean) / std)
    assert torch.count_nonzero(out[..., 200:, :]) == 0


def test_postprocess_maps_low_res_logits_to_the_original_image(tiny: Sam) -> None:
    # Original 300x400 (HxW) -> input 192x256; a square of the input frame's low-res logits
    # lands on the matching square of the original image.
    low_res = torch.full((1, 1, 128, 128), -10.0)
    low_res[..., 16:48, 32:64] = 10.0  # input pixels y 32..96, x 64..128
    masks = tiny.postprocess_masks(low_res, input_size=(192, 256), original_size=(300, 400)) > 0
    assert masks.shape == (1, 1, 300, 400)
    ys, xs = torch.nonzero(masks[0, 0], as_tuple=True)
    scale = 400 / 256
    assert abs(ys.min().item() - 32 * scale) <= 2 and abs(ys.max().item() + 1 - 96 * scale) <= 2
    assert abs(xs.min().item() - 64 * scale) <= 2 and abs(xs.max().item() + 1 - 128 * scale) <= 2


@pytest.mark.parametrize("stride", [8, 4])
def test_tiny_encoder_output_and_gradients(stride: int) -> None:
    torch.manual_seed(0)
    model = build_sam("tiny", encoder_out_stride=stride).train()
    embedding = model.image_encoder(torch.randn(2, 3, 256, 256))
    grid = 256 // stride
    assert embedding.shape == (2, *model.image_embedding_shape)
    assert model.image_embedding_shape == (128 + (128 // grid) ** 2 * 16, grid, grid)
    assert model.prompt_encoder.image_embedding_size == (grid, grid)
    assert model.prompt_encoder.mask_input_size == (4 * grid, 4 * grid)
    embedding.square().mean().backward()
    without_grad = [n for n, p in model.image_encoder.named_parameters() if p.grad is None]
    assert without_grad == []
    with torch.no_grad():  # the whole model runs on the finer grid
        sparse, dense = model.prompt_encoder(
            points=(torch.tensor([[[100.0, 60.0]]]), torch.tensor([[1]])), boxes=None, masks=None
        )
        low_res, _ = model.mask_decoder(
            embedding[:1], model.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
    assert low_res.shape == (1, 3, 4 * grid, 4 * grid)


def test_build_args_rebuild_the_same_architecture() -> None:
    model = build_sam("tiny", image_size=320)
    assert model.img_size == 320 and model.prompt_encoder.image_embedding_size == (40, 40)
    again = build_sam_from_args(model.build_args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert model.build_args == resolve_build_args({"variant": "tiny", "image_size": 320})


def test_unknown_variant_or_argument_is_refused() -> None:
    with pytest.raises(ConfigError, match="vit_x"):
        build_sam("vit_x")
    with pytest.raises(ConfigError, match="encoder_dept"):
        build_sam("vit_b", encoder_dept=3)


def test_sam_forward_thresholds_postprocessed_logits(tiny: Sam) -> None:
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 256, 256))).float()
    record = {
        "image": image,
        "original_size": (256, 256),
        "boxes": torch.tensor([[10.0, 10, 90, 90]]),
    }
    out = tiny([record], multimask_output=False)[0]
    expected = tiny.postprocess_masks(out["low_res_logits"], (256, 256), (256, 256)) > 0.0
    assert torch.equal(out["masks"], expected)
    assert out["iou_predictions"].shape == (1, 1)


@pytest.mark.parametrize(
    ("bq", "nq", "bk", "nk"),
    [
        (1, 7, 1, 300),
        (4, 7, 4, 300),
        (4, 7, 1, 300),
        (1, 300, 4, 7),
        (4, 300, 4, 7),
        (4, 300, 1, 7),
    ],
)
def test_factored_attention_forms_equal_the_plain_form(bq: int, nq: int, bk: int, nk: int):
    torch.manual_seed(0)
    attn = TwoWayAttention(64, 8, downsample_rate=2)
    q, k, v = torch.randn(bq, nq, 64), torch.randn(bk, nk, 64), torch.randn(bk, nk, 64)
    batch = max(bq, bk)
    with torch.no_grad():
        attn.use_factored = False
        plain = attn(q.expand(batch, -1, -1), k.expand(batch, -1, -1), v.expand(batch, -1, -1))
        keys_folded = keys_folded_attention(attn, q, k, v)
        queries_folded = queries_folded_attention(attn, q, k, v)
        attn.use_factored = True
        chosen = attn(q, k, v)
    for out in (keys_folded, queries_folded, chosen):
        assert out.shape == (batch, nq, 64)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    expected = "keys_folded" if nq < nk else "queries_folded"
    assert attn.cheapest_form(bq, nq, bk, nk) in (expected, "plain")


@torch.no_grad()
def test_decoder_forms_agree_on_a_batch_of_prompts(tiny: Sam) -> None:
    embedding = torch.randn(1, *tiny.image_embedding_shape)
    fast = _decode(tiny, embedding, multimask=True, n=6)
    try:
        for module in tiny.modules():
            if isinstance(module, TwoWayAttention):
                module.use_factored = False
        plain = _decode(tiny, embedding.expand(6, -1, -1, -1).contiguous(), multimask=True, n=6)
    finally:
        for module in tiny.modules():
            if isinstance(module, TwoWayAttention):
                module.use_factored = True
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("input_size", "original_size"), [((192, 256), (300, 400)), ((256, 200), (1024, 800))]
)
def test_cpu_postprocessing_equals_the_interpolate_definition(
    tiny: Sam, input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    low_res = torch.randn(2, 3, 128, 128) * 4
    fast = tiny.postprocess_masks(low_res, input_size, original_size)
    up = F.interpolate(low_res, (256, 256), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    expected = F.interpolate(up, original_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
    with_grad = tiny.postprocess_masks(low_res.requires_grad_(), input_size, original_size)
    torch.testing.assert_close(with_grad.detach(), expected)


def test_dense_pe_cache_follows_the_gaussian_matrix() -> None:
    model = build_sam("tiny")
    before = model.prompt_encoder.get_dense_pe().clone()
    state = model.state_dict()
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    state[key] = torch.randn_like(state[key])
    model.load_state_dict(state)
    after = model.prompt_encoder.get_dense_pe()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model.prompt_encoder.pe_layer((32, 32)).unsqueeze(0))
