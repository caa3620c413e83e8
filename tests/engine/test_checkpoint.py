"""Engine checkpoints: self-describing, atomic, local or S3; refusals name what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.builder import build_sam
from engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from engine.modeling.sam import Sam
from engine.predictor import SamPredictor
from storage.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny() -> Sam:
    torch.manual_seed(0)
    return build_sam("tiny")


def _outputs(model: Sam) -> tuple[np.ndarray, ...]:
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3)).astype(np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor.predict(np.array([[80, 60]]), np.array([1]), return_logits=True)


def test_round_trip_keeps_weights_outputs_and_description(tiny: Sam, tmp_path: Path) -> None:
    path = tmp_path / "models" / "v3.pt"
    path.parent.mkdir()
    save_checkpoint(
        tiny,
        str(path),
        version="v3",
        parent="v2",
        trained_on={"snapshot": 7, "stages": [1, 2], "masks": 1234},
        step=500,
        extra={"holdout_miou": 0.61},
    )
    model, meta = load_checkpoint(str(path))
    assert (meta.variant, meta.version, meta.parent, meta.step) == ("tiny", "v3", "v2", 500)
    assert meta.trained_on == {"snapshot": 7, "stages": [1, 2], "masks": 1234}
    assert meta.extra == {"holdout_miou": 0.61} and meta.image_size == 256
    assert meta.format_version == 1 and not meta.is_official and meta.created_at
    assert meta.build_args == tiny.build_args and model.build_args == tiny.build_args
    assert not model.training
    for a, b in zip(_outputs(tiny), _outputs(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in path.parent.iterdir()] == ["v3.pt"]  # no temporary file left


def test_file_is_plain_data_loadable_with_weights_only(tiny: Sam, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(tiny, str(path), version="v1")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["variant"] == "tiny"
    assert set(payload) >= {"build_args", "image_size", "model", "version", "parent", "step"}
    assert set(payload["model"]) == set(tiny.state_dict())


def test_build_args_rebuild_a_non_default_architecture(tmp_path: Path) -> None:
    model = build_sam("tiny", image_size=192, encoder_global_blocks=0)
    path = tmp_path / "m.pt"
    save_checkpoint(model, str(path))
    loaded = build_sam("tiny", checkpoint=str(path))
    assert loaded.img_size == 192 and len(loaded.image_encoder.global_blocks) == 0


def _saved_without(model: Sam, build_arg: str, path: Path) -> str:
    """``model`` saved as an engine checkpoint whose build_args lack ``build_arg`` (as written
    before that argument existed); returns the path."""
    save_checkpoint(model, str(path))
    payload = torch.load(path, weights_only=True)
    del payload["build_args"][build_arg]
    torch.save(payload, path)
    return str(path)


def test_checkpoints_from_before_prompt_maps_still_load(tmp_path: Path) -> None:
    # Such a checkpoint's build_args have no "prompt_maps" key and its weights no map embedding.
    old = build_sam("tiny", prompt_maps=False)
    loaded, meta = load_checkpoint(_saved_without(old, "prompt_maps", tmp_path / "old.pt"))
    assert meta.build_args["prompt_maps"] is False
    assert loaded.prompt_encoder.prompt_map_embed is None
    plain = tmp_path / "plain_old.pth"
    torch.save(old.state_dict(), plain)
    from_plain, _ = load_checkpoint(str(plain))
    assert from_plain.prompt_encoder.prompt_map_embed is None


def test_checkpoints_from_before_the_instance_code_still_load(tmp_path: Path) -> None:
    # Such a checkpoint's build_args have no "instance_dim" key and its weights no code head.
    old = build_sam("tiny", instance_dim=0)
    loaded, meta = load_checkpoint(_saved_without(old, "instance_dim", tmp_path / "old.pt"))
    assert meta.build_args["instance_dim"] == 0
    assert loaded.image_encoder.instance_head is None
    assert loaded.image_embedding_shape == (128, 32, 32)
    for dim in (0, 8):  # a plain state dict says by its code head's shape
        plain = tmp_path / f"plain_{dim}.pth"
        torch.save(build_sam("tiny", instance_dim=dim).state_dict(), plain)
        from_plain, meta = load_checkpoint(str(plain))
        assert meta.build_args["instance_dim"] == dim == from_plain.mask_decoder.instance_dim


def test_checkpoints_from_before_click_disks_still_load(tmp_path: Path) -> None:
    old = build_sam("tiny", click_disks=False)
    loaded, meta = load_checkpoint(_saved_without(old, "click_disks", tmp_path / "old.pt"))
    assert meta.build_args["click_disks"] is False and not loaded.mask_decoder.click_disks
    for disks in (False, True):  # a plain state dict says by its disk parameters
        plain = tmp_path / f"plain_{disks}.pth"
        torch.save(build_sam("tiny", click_disks=disks).state_dict(), plain)
        from_plain, meta = load_checkpoint(str(plain))
        assert meta.build_args["click_disks"] is disks is from_plain.mask_decoder.click_disks


def test_checkpoints_from_before_box_clicks_decode_boxes_as_before(tmp_path: Path) -> None:
    new = build_sam("tiny")
    assert new.box_clicks
    loaded, meta = load_checkpoint(_saved_without(new, "box_clicks", tmp_path / "old.pt"))
    assert meta.build_args["box_clicks"] is False and not loaded.box_clicks


def test_plain_state_dict_of_a_stride_4_tiny_is_inferred(tmp_path: Path) -> None:
    model = build_sam("tiny", encoder_out_stride=4)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded, meta = load_checkpoint(str(path))
    assert meta.build_args["encoder_out_stride"] == 4
    assert loaded.prompt_encoder.image_embedding_size == (64, 64)


def test_optimizer_state_round_trips(tiny: Sam, tmp_path: Path) -> None:
    model = build_sam("tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    model.mask_decoder.iou_token.weight.sum().backward()
    optimizer.step()
    path = tmp_path / "m.pt"
    save_checkpoint(model, str(path), optimizer_state=optimizer.state_dict(), step=1)
    restored, meta = load_checkpoint(str(path))
    assert meta.optimizer_state is not None and meta.step == 1
    resumed = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    resumed.load_state_dict(meta.optimizer_state)
    state = resumed.state_dict()["state"]
    original = optimizer.state_dict()["state"]
    assert state.keys() == original.keys()
    key = next(iter(original))
    assert torch.equal(state[key]["exp_avg"], original[key]["exp_avg"])


def test_checkpoint_of_another_variant_is_refused(tiny: Sam, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny, str(path))
    with pytest.raises(CheckpointError, match="'tiny' model, not 'vit_b'"):
        build_sam("vit_b", checkpoint=str(path))
    with pytest.raises(ConfigError, match="overrides"):
        build_sam("tiny", checkpoint=str(path), image_size=512)


def test_plain_state_dict_of_tiny_is_inferred(tiny: Sam, tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(tiny.state_dict(), path)
    model, meta = load_checkpoint(str(path))
    assert meta.variant == "tiny" and meta.is_official and meta.version is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_unreadable_or_foreign_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(str(garbage))
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    unknown = tmp_path / "unknown.pth"
    torch.save({"backbone.weight": torch.zeros(2)}, unknown)
    with pytest.raises(CheckpointError, match="pass variant="):
        load_checkpoint(str(unknown))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(str(unknown), variant="tiny")
    future = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": 99}, future)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(str(future))


def test_what_cannot_be_described_is_not_saved(tiny: Sam, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="trained_on"):
        save_checkpoint(tiny, str(tmp_path / "m.pt"), trained_on={"ids": {1, 2}})
    hand_made = Sam(
        image_encoder=tiny.image_encoder,
        prompt_encoder=tiny.prompt_encoder,
        mask_decoder=tiny.mask_decoder,
    )
    with pytest.raises(CheckpointError, match="build_args"):
        save_checkpoint(hand_made, str(tmp_path / "m.pt"))
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.s3
def test_round_trip_through_s3(tiny: Sam, s3_root) -> None:
    uri = f"{s3_root.root}/models/v1/model.pt"
    save_checkpoint(tiny, uri, version="v1", endpoint_url=s3_root.endpoint_url)
    model = build_sam("tiny", checkpoint=uri, endpoint_url=s3_root.endpoint_url)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())
    _, meta = load_checkpoint(uri, endpoint_url=s3_root.endpoint_url)
    assert meta.version == "v1"
    with pytest.raises(CheckpointError, match=r"absent\.pt"):
        load_checkpoint(f"{s3_root.root}/absent.pt", endpoint_url=s3_root.endpoint_url)
