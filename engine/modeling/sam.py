"""``Sam``: image encoder + prompt encoder + mask decoder, with the pre/post-processing that maps
between original-image pixels and the model's padded square input frame."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.modeling.box_clicks import decode_box_clicks
from engine.modeling.image_encoder import Attention as VitAttention
from engine.modeling.image_encoder import ImageEncoderViT
from engine.modeling.instance_embedding import CODE_STRIDE
from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.prompt_encoder import PromptEncoder
from engine.modeling.tiny_encoder import GlobalAttentionBlock, TinyImageEncoder
from engine.modeling.transformer import Attention as TwoWayAttention

#: ImageNet RGB mean and std in 0..255 pixel units, as SAM normalises its input.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Promptable segmentation model.

    Attributes:
        image_encoder: the ViT or tiny encoder, mapping ``(B, 3, S, S)`` normalised pixels to
            ``(B, C, h, w)``; ``S`` is its ``img_size``.
        prompt_encoder, mask_decoder: see their modules.
        mask_threshold: logit above which a pixel is in the mask (0.0: probability 0.5).
        image_format: the channel order the model expects ("RGB").
        build_args: the variant and every argument ``build_sam`` used, so a checkpoint can
            rebuild the model; empty when the model was assembled by hand.
        box_clicks: decode a box without clicks as the box plus virtual clicks inside it
            (:mod:`engine.modeling.box_clicks`; ``tiny``); False decodes it as SAM does.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT | TinyImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        build_args: dict[str, Any] | None = None,
        box_clicks: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: the official checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.build_args: dict[str, Any] = dict(build_args or {})
        self.box_clicks = box_clicks

    @property
    def img_size(self) -> int:
        """Side of the square encoder input, pixels (1024 for ViT variants, 256 for tiny)."""
        return int(self.image_encoder.img_size)

    @property
    def image_embedding_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one image's embedding as the encoder returns it: the prompt
        width, plus the packed instance code's channels when the model has one."""
        h, w = self.prompt_encoder.image_embedding_size
        chans = self.prompt_encoder.embed_dim
        if self.mask_decoder.instance_dim:
            per_side = self.img_size // CODE_STRIDE // h
            chans += per_side * per_side * self.mask_decoder.instance_dim
        return chans, h, w

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def variant(self) -> str | None:
        return self.build_args.get("variant")

    @property
    def use_sdpa(self) -> bool:
        """Whether attention layers use ``F.scaled_dot_product_attention`` (else explicit maths)."""
        return all(m.use_sdpa for m in self._attention_layers())

    @use_sdpa.setter
    def use_sdpa(self, enabled: bool) -> None:
        for module in self._attention_layers():
            module.use_sdpa = bool(enabled)

    @property
    def use_factored_attention(self) -> bool:
        """Whether the decoder may use the folded cross-attention forms (see
        :mod:`engine.modeling.factored_attention`); False forces the plain form."""
        return all(m.use_factored for m in self.modules() if isinstance(m, TwoWayAttention))

    @use_factored_attention.setter
    def use_factored_attention(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, TwoWayAttention):
                module.use_factored = bool(enabled)

    def _attention_layers(self) -> list[VitAttention | TwoWayAttention | GlobalAttentionBlock]:
        kinds = (VitAttention, TwoWayAttention, GlobalAttentionBlock)
        return [m for m in self.modules() if isinstance(m, kinds)]

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Predict masks end to end for a list of images with their prompts (no gradients).

        Each input dict holds ``image`` ``(3, H, W)`` already resized (longest side ``img_size``),
        ``original_size`` ``(H0, W0)``, and optionally ``point_coords`` ``(B, N, 2)`` xy pixels,
        ``point_labels`` ``(B, N)``, ``boxes`` ``(B, 4)`` XYXY pixels (both in the resized frame)
        and ``mask_inputs`` ``(B, 1, 4h, 4w)`` logits. Each output dict holds ``masks`` ``(B, M,
        H0, W0)`` bool, ``iou_predictions`` ``(B, M)`` and ``low_res_logits`` ``(B, M, 4h, 4w)``.
        """
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input], 0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            low_res, iou = self.decode_prompts(
                embedding.unsqueeze(0),
                points=points,
                boxes=record.get("boxes"),
                masks=record.get("mask_inputs"),
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def decode_prompts(
        self,
        image_embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder then mask decoder for prompts on one image's embedding ``(1, C, h,
        w)``; returns low-res logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``. With
        ``box_clicks``, boxes given alone go through :func:`decode_box_clicks`."""
        if self.box_clicks and boxes is not None and points is None and masks is None:
            return decode_box_clicks(self, image_embeddings, boxes, multimask_output)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            points=points,
        )

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: Sequence[int],
        original_size: Sequence[int],
    ) -> torch.Tensor:
        """Upscale ``(B, M, h, w)`` logits to the padded input, drop the padding, resize to the
        original image: returns ``(B, M, H0, W0)`` float32 logits.

        Both resizes are bilinear with half-pixel centres (``align_corners=False``). On the CPU
        without autograd they run through OpenCV, which samples the same grid and agrees with
        ``F.interpolate`` to float rounding (~1e-5 relative) but is several times faster: at
        SA-1B image sizes this step would otherwise dominate a click.

        Args:
            input_size: ``(H, W)`` of the resized image before padding, pixels.
            original_size: ``(H0, W0)`` of the original image, pixels.
        """
        input_hw = (int(input_size[0]), int(input_size[1]))
        size = (int(original_size[0]), int(original_size[1]))
        if masks.device.type == "cpu" and not (torch.is_grad_enabled() and masks.requires_grad):
            return _postprocess_cv2(masks, self.img_size, input_hw, size)
        masks = F.interpolate(
            masks.float(), (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_hw[0], : input_hw[1]]
        return F.interpolate(masks, size, mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(..., 3, H, W)`` 0..255 RGB pixels and zero-pad bottom/right to
        ``img_size`` square (padding is 0 after normalisation, i.e. the mean colour)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))


def _postprocess_cv2(
    masks: torch.Tensor, img_size: int, input_hw: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """:meth:`Sam.postprocess_masks` for CPU tensors, one ``cv2.resize`` pair per mask."""
    low_res = masks.detach().float().numpy()
    b, m = low_res.shape[:2]
    out = np.empty((b, m, *size), dtype=np.float32)
    for i in range(b):
        for j in range(m):
            padded = cv2.resize(
                np.ascontiguousarray(low_res[i, j]),
                (img_size, img_size),
                interpolation=cv2.INTER_LINEAR,
            )
            cropped = padded[: input_hw[0], : input_hw[1]]
            if cropped.shape == size:
                out[i, j] = cropped
            else:
                cv2.resize(
                    cropped, (size[1], size[0]), dst=out[i, j], interpolation=cv2.INTER_LINEAR
                )
    return torch.from_numpy(out)
