"""Model checkpoints: self-describing files the engine writes, and official SAM state dicts.

An engine checkpoint is one ``torch.save`` file (loadable with ``weights_only=True``) holding::

    format          "sam-data-engine/checkpoint"
    format_version  1
    variant         "tiny" | "vit_b" | "vit_l" | "vit_h"
    build_args      every argument build_sam used (rebuilds the architecture alone)
    image_size      encoder input side, pixels
    model           the state dict (float tensors on the CPU)
    version, parent model version strings (or None)
    trained_on      what data it saw (JSON-like dict, e.g. dataset snapshot and mask counts)
    step            optimisation steps done
    optimizer       optimizer state dict (or None)
    extra           any other JSON-like facts
    created_at      ISO 8601 UTC time of the save

An official checkpoint (``sam_vit_b_01ec64.pth`` and friends) is a plain ``{name: tensor}`` dict;
its variant is given by the caller or inferred from the patch-embedding width. Either kind may
live at a local path or an ``s3://`` URI; writes are atomic (readers never see half a file).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from engine.builder import VARIANTS, build_sam_from_args, resolve_build_args
from engine.modeling.sam import Sam
from storage.errors import CheckpointError, DataEngineError
from storage.location import read_uri, write_uri_atomic

FORMAT = "sam-data-engine/checkpoint"
FORMAT_VERSION = 1
_MAX_LISTED = 12
#: Width of image_encoder.patch_embed.proj in the official checkpoints -> variant.
_VIT_WIDTHS = {
    int(args["encoder_embed_dim"]): name
    for name, args in VARIANTS.items()
    if "encoder_embed_dim" in args
}


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (official state dicts: ``format_version == 0``)."""

    variant: str
    build_args: dict[str, Any]
    image_size: int
    format_version: int
    version: str | None = None
    parent: str | None = None
    trained_on: dict[str, Any] | None = None
    step: int | None = None
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)
    extra: dict[str, Any] | None = None
    created_at: str | None = None

    @property
    def is_official(self) -> bool:
        """True for a plain state dict (no metadata), as the official SAM releases are."""
        return self.format_version == 0


def save_checkpoint(
    model: Sam,
    uri: str,
    *,
    version: str | None = None,
    parent: str | None = None,
    trained_on: dict[str, Any] | None = None,
    step: int | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
) -> None:
    """Write ``model`` and its description to ``uri`` (local path or ``s3://``), atomically.

    ``trained_on`` and ``extra`` must be JSON-like (dicts, lists, str, numbers, bools, None).
    """
    if not model.build_args.get("variant"):
        raise CheckpointError(
            "model has no build_args (it was not made by build_sam); cannot describe it"
        )
    for name, value in (("trained_on", trained_on), ("extra", extra)):
        _check_json_like(name, value)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.build_args["variant"],
        "build_args": json.loads(json.dumps(model.build_args)),
        "image_size": model.img_size,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "version": version,
        "parent": parent,
        "trained_on": trained_on,
        "step": None if step is None else int(step),
        "optimizer": _to_cpu(optimizer_state),
        "extra": extra,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_uri_atomic(str(uri), buffer.getvalue(), endpoint_url=endpoint_url)


def load_checkpoint(
    uri: str,
    *,
    variant: str | None = None,
    map_location: torch.device | str = "cpu",
    endpoint_url: str | None = None,
) -> tuple[Sam, CheckpointMeta]:
    """Load an engine checkpoint or an official state dict into a new model (eval mode).

    Args:
        uri: local path or ``s3://`` URI.
        variant: the expected variant; required when it cannot be inferred from a plain state
            dict. A checkpoint of another variant raises ``CheckpointError``.
        map_location: device of the returned model.

    Raises:
        CheckpointError: unreadable file, unknown format, other variant, or keys/shapes that do
            not match the variant (the message names them).
    """
    payload = _read(str(uri), endpoint_url)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        meta, state_dict = _engine_meta(payload, uri)
    elif (
        isinstance(payload, dict)
        and payload
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())
    ):
        meta, state_dict = _plain_meta(payload, variant, uri)
    else:
        raise CheckpointError(
            f"{uri!r} is neither a sam-data-engine checkpoint nor a plain state dict of tensors"
        )
    if variant is not None and meta.variant != variant:
        raise CheckpointError(f"checkpoint {uri!r} holds a {meta.variant!r} model, not {variant!r}")
    model = _materialise(meta.build_args, state_dict, uri)
    return model.to(map_location).eval(), meta


def _read(uri: str, endpoint_url: str | None) -> Any:
    try:
        data = read_uri(uri, endpoint_url=endpoint_url)
    except DataEngineError as err:
        raise CheckpointError(f"cannot read checkpoint {uri!r}: {err}") from err
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{uri!r} is not a loadable torch checkpoint: {err}") from err


def _engine_meta(payload: dict[str, Any], uri: str) -> tuple[CheckpointMeta, dict[str, Any]]:
    format_version = int(payload.get("format_version", -1))
    if not 1 <= format_version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{uri!r} has checkpoint format_version {format_version}; this engine reads 1.."
            f"{FORMAT_VERSION}"
        )
    try:
        stored = dict(payload["build_args"])
        # Checkpoints written before prompt maps existed were built without them.
        stored.setdefault("prompt_maps", False)
        stored.setdefault("instance_dim", 0)  # nor the instance code
        stored.setdefault("click_disks", False)  # nor click disks
        stored.setdefault("box_clicks", False)  # and decoded boxes as SAM does
        if stored.get("encoder") == "conv":
            stored.setdefault("encoder_out_stride", 8)
        build_args = resolve_build_args(stored)
    except DataEngineError as err:
        raise CheckpointError(f"{uri!r} has unusable build_args: {err}") from err
    meta = CheckpointMeta(
        variant=str(build_args["variant"]),
        build_args=build_args,
        image_size=int(build_args["image_size"]),
        format_version=format_version,
        version=payload.get("version"),
        parent=payload.get("parent"),
        trained_on=payload.get("trained_on"),
        step=payload.get("step"),
        optimizer_state=payload.get("optimizer"),
        extra=payload.get("extra"),
        created_at=payload.get("created_at"),
    )
    return meta, payload["model"]


def _plain_meta(
    state_dict: dict[str, torch.Tensor], variant: str | None, uri: str
) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    inferred = infer_variant(state_dict)
    if inferred is None and variant is None:
        raise CheckpointError(
            f"cannot tell the variant of the plain state dict {uri!r} (no "
            f"image_encoder.patch_embed.proj.weight or image_encoder.lateral_mid.weight); pass "
            f"variant="
        )
    if variant is not None and inferred is not None and inferred != variant:
        raise CheckpointError(
            f"state dict {uri!r} has the shapes of {inferred!r}, not of {variant!r}"
        )
    name = str(variant or inferred)
    # A plain state dict says by its keys whether the model drew prompt maps.
    inferred_args: dict[str, Any] = {
        "variant": name,
        "prompt_maps": "prompt_encoder.prompt_map_embed.weight" in state_dict,
    }
    code_head = state_dict.get("image_encoder.instance_head.head.3.weight")
    if code_head is not None or "image_encoder.lateral_mid.weight" in state_dict:
        inferred_args["instance_dim"] = 0 if code_head is None else int(code_head.shape[0])
    inferred_args["click_disks"] = "mask_decoder.disk_log_sigma" in state_dict
    detail = state_dict.get("image_encoder.lateral_detail.weight")
    if detail is not None:  # the conv encoder's fusion kernel is 2 on a stride-8 grid, 1 on 4
        inferred_args["encoder_out_stride"] = 8 if int(detail.shape[-1]) == 2 else 4
    try:
        build_args = resolve_build_args(inferred_args)
    except DataEngineError as err:
        raise CheckpointError(str(err)) from err
    meta = CheckpointMeta(
        variant=name,
        build_args=build_args,
        image_size=int(build_args["image_size"]),
        format_version=0,
    )
    return meta, state_dict


def infer_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The variant whose shapes a plain state dict has, or None when it cannot be told."""
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        return _VIT_WIDTHS.get(int(patch.shape[0]))
    if "image_encoder.lateral_mid.weight" in state_dict:
        return "tiny"
    return None


def _materialise(build_args: dict[str, Any], state_dict: dict[str, Any], uri: str) -> Sam:
    # Build on the meta device (no memory, no random init: vit_h has 640M parameters), check
    # names and shapes, then adopt the loaded tensors as the parameters.
    model = build_sam_from_args(build_args, device="meta")
    expected = model.state_dict()
    _check_keys_and_shapes(expected, state_dict, uri, str(build_args["variant"]))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers are not in any state dict; make them from the build arguments.
    model.pixel_mean = torch.tensor(build_args["pixel_mean"], dtype=torch.float32).view(-1, 1, 1)
    model.pixel_std = torch.tensor(build_args["pixel_std"], dtype=torch.float32).view(-1, 1, 1)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left_on_meta, f"tensors not materialised: {left_on_meta}"
    return model


def _check_keys_and_shapes(
    expected: dict[str, torch.Tensor], got: dict[str, Any], uri: str, variant: str
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(got))
        if not isinstance(got[k], torch.Tensor) or tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_listing(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {uri!r} does not fit variant {variant!r}: " + "; ".join(problems)
        )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def _check_json_like(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{name} must be JSON-like (dict/list/str/number/bool/None): {err}"
        ) from None


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) optimizer state with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
