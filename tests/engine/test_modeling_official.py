"""The ViT variants use the official segment-anything parameter layout.

The expected names and shapes are written out here by hand from the published architecture (not
taken from our modules), so a checkpoint saved by the original code loads with ``strict=True``.
vit_l / vit_h are checked on the meta device (names and shapes, no memory); vit_b is loaded for
real from a file written with these hand-made names, and gives identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.builder import build_sam
from engine.checkpoint import load_checkpoint
from storage.errors import CheckpointError

# (width, depth, heads, global attention blocks) of the official encoders.
_VITS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def official_layout(variant: str) -> dict[str, tuple[int, ...]]:
    """Every key of an official SAM checkpoint with its shape."""
    width, depth, heads, global_blocks = _VITS[variant]
    head_dim = width // heads
    layout: dict[str, tuple[int, ...]] = {
        "image_encoder.pos_embed": (1, 64, 64, width),
        "image_encoder.patch_embed.proj.weight": (width, 3, 16, 16),
        "image_encoder.patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        block = f"image_encoder.blocks.{i}."
        span = 2 * 64 - 1 if i in global_blocks else 2 * 14 - 1
        layout.update(
            {
                block + "norm1.weight": (width,),
                block + "norm1.bias": (width,),
                block + "attn.rel_pos_h": (span, head_dim),
                block + "attn.rel_pos_w": (span, head_dim),
                block + "attn.qkv.weight": (3 * width, width),
                block + "attn.qkv.bias": (3 * width,),
                block + "attn.proj.weight": (width, width),
                block + "attn.proj.bias": (width,),
                block + "norm2.weight": (width,),
                block + "norm2.bias": (width,),
                block + "mlp.lin1.weight": (4 * width, width),
                block + "mlp.lin1.bias": (4 * width,),
                block + "mlp.lin2.weight": (width, 4 * width),
                block + "mlp.lin2.bias": (width,),
            }
        )
    layout.update(
        {
            "image_encoder.neck.0.weight": (256, width, 1, 1),
            "image_encoder.neck.1.weight": (256,),
            "image_encoder.neck.1.bias": (256,),
            "image_encoder.neck.2.weight": (256, 256, 3, 3),
            "image_encoder.neck.3.weight": (256,),
            "image_encoder.neck.3.bias": (256,),
            "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
            "prompt_encoder.not_a_point_embed.weight": (1, 256),
            "prompt_encoder.no_mask_embed.weight": (1, 256),
            "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
            "prompt_encoder.mask_downscaling.0.bias": (4,),
            "prompt_encoder.mask_downscaling.1.weight": (4,),
            "prompt_encoder.mask_downscaling.1.bias": (4,),
            "prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2),
            "prompt_encoder.mask_downscaling.3.bias": (16,),
            "prompt_encoder.mask_downscaling.4.weight": (16,),
            "prompt_encoder.mask_downscaling.4.bias": (16,),
            "prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
            "prompt_encoder.mask_downscaling.6.bias": (256,),
            "mask_decoder.iou_token.weight": (1, 256),
            "mask_decoder.mask_tokens.weight": (4, 256),
            "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
            "mask_decoder.output_upscaling.0.bias": (64,),
            "mask_decoder.output_upscaling.1.weight": (64,),
            "mask_decoder.output_upscaling.1.bias": (64,),
            "mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2),
            "mask_decoder.output_upscaling.3.bias": (32,),
            "mask_decoder.transformer.norm_final_attn.weight": (256,),
            "mask_decoder.transformer.norm_final_attn.bias": (256,),
        }
    )
    for i in range(4):
        layout[f"prompt_encoder.point_embeddings.{i}.weight"] = (1, 256)
    for prefix in [f"mask_decoder.transformer.layers.{i}." for i in range(2)] + [
        "mask_decoder.transformer."
    ]:
        names = (
            ["final_attn_token_to_image"]
            if prefix.endswith("transformer.")
            else [
                "self_attn",
                "cross_attn_token_to_image",
                "cross_attn_image_to_token",
            ]
        )
        for name in names:
            inner = 256 if name == "self_attn" else 128
            for proj in ("q_proj", "k_proj", "v_proj"):
                layout[f"{prefix}{name}.{proj}.weight"] = (inner, 256)
                layout[f"{prefix}{name}.{proj}.bias"] = (inner,)
            layout[f"{prefix}{name}.out_proj.weight"] = (256, inner)
            layout[f"{prefix}{name}.out_proj.bias"] = (256,)
        if not prefix.endswith("transformer."):
            for norm in ("norm1", "norm2", "norm3", "norm4"):
                layout[f"{prefix}{norm}.weight"] = (256,)
                layout[f"{prefix}{norm}.bias"] = (256,)
            layout[prefix + "mlp.lin1.weight"] = (2048, 256)
            layout[prefix + "mlp.lin1.bias"] = (2048,)
            layout[prefix + "mlp.lin2.weight"] = (256, 2048)
            layout[prefix + "mlp.lin2.bias"] = (256,)
    for head, out in [(f"output_hypernetworks_mlps.{i}", 32) for i in range(4)] + [
        ("iou_prediction_head", 4)
    ]:
        for layer, (n_out, n_in) in enumerate([(256, 256), (256, 256), (out, 256)]):
            layout[f"mask_decoder.{head}.layers.{layer}.weight"] = (n_out, n_in)
            layout[f"mask_decoder.{head}.layers.{layer}.bias"] = (n_out,)
    return layout


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_has_the_official_names_and_shapes(variant: str) -> None:
    model = build_sam(variant, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_layout(variant)
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    # A strict reload of the official layout works (meta tensors: names and shapes only).
    tensors = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    model.load_state_dict(tensors, strict=True, assign=True)


@pytest.fixture(scope="module")
def official_vit_b_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A plain state dict under the official names, random values, written with torch.save."""
    gen = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(shape, generator=gen) * 0.02
        for name, shape in official_layout("vit_b").items()
    }
    path = tmp_path_factory.mktemp("official") / "sam_vit_b_random.pth"
    torch.save(state, path)
    return path, state


def test_official_layout_file_loads_strictly_and_identically(
    official_vit_b_file: tuple[Path, dict],
) -> None:
    path, written = official_vit_b_file
    model = build_sam("vit_b", checkpoint=str(path))
    loaded = model.state_dict()
    assert not model.training
    assert all(torch.equal(loaded[k], v) for k, v in written.items())
    # Inferred variant without being told, and refused as another variant.
    _, meta = load_checkpoint(str(path))
    assert meta.variant == "vit_b" and meta.is_official and meta.image_size == 1024
    with pytest.raises(CheckpointError, match="vit_l"):
        build_sam("vit_l", checkpoint=str(path))


@torch.no_grad()
def test_vit_b_reloaded_from_its_state_dict_computes_the_same_function(
    official_vit_b_file: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = official_vit_b_file
    original = build_sam("vit_b", checkpoint=str(path))
    resaved = tmp_path / "resaved.pth"
    torch.save(original.state_dict(), resaved)
    reloaded = build_sam("vit_b", checkpoint=str(resaved))
    # The whole ViT-B forward at 1024 px costs ~1 TFLOP (tens of seconds on 2 cores); compare
    # the parts it is made of instead: patch embedding, a windowed block (2x2 windows of 14), a
    # global block (on a smaller grid, which resamples its relative positions), the neck at the
    # real 64x64 grid, and the complete prompt encoder + mask decoder path.
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 256, 256)
    for a, b, x in [
        (original.image_encoder.patch_embed, reloaded.image_encoder.patch_embed, pixels),
        (
            original.image_encoder.blocks[0],
            reloaded.image_encoder.blocks[0],
            torch.randn(1, 28, 28, 768),
        ),
        (
            original.image_encoder.blocks[2],
            reloaded.image_encoder.blocks[2],
            torch.randn(1, 16, 16, 768),
        ),
    ]:
        assert torch.equal(a(x), b(x))
    neck_in = torch.randn(1, 768, 64, 64)
    embedding = original.image_encoder.neck(neck_in)
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.equal(embedding, reloaded.image_encoder.neck(neck_in))
    prompts = {
        "points": (torch.tensor([[[400.0, 300.0], [10.0, 900.0]]]), torch.tensor([[1, 0]])),
        "boxes": torch.tensor([[100.0, 120.0, 700.0, 800.0]]),
        "masks": torch.randn(1, 1, 256, 256),
    }
    outputs = []
    for model in (original, reloaded):
        sparse, dense = model.prompt_encoder(**prompts)
        outputs.append(
            model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        )
    assert outputs[0][0].shape == (1, 3, 256, 256)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_official_file_with_a_wrong_shape_names_the_key(tmp_path: Path) -> None:
    # Cheap stand-in for a corrupted official file: the tiny model's plain state dict.
    state = build_sam("tiny").state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    del state["prompt_encoder.no_mask_embed.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        build_sam("tiny", checkpoint=str(path))
    message = str(caught.value)
    assert "mask_decoder.iou_token.weight: checkpoint (1, 7) vs model (1, 128)" in message
    assert "prompt_encoder.no_mask_embed.weight" in message
    assert "image_encoder.extra.weight" in message
