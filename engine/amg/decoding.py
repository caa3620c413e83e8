"""Point prompts through SAM's prompt encoder and mask decoder, upscaling only what survives.

The mask decoder (see ``engine.modeling.mask_decoder``) has two parts: the two-way transformer,
whose IoU token gives every mask's predicted IoU, and the output upscaling (two transposed
convolutions to ``4x`` the embedding grid) that, dotted with per-token hypernetwork weights,
gives the low-res logits. The generator drops most masks on predicted IoU alone, so
:class:`PointDecoder` runs the transformer for every prompt but the upscaling only for prompts
with a mask that passed, and only over the embedding rows and columns that map into the image
(a 3:2 photo leaves a third of the square input as padding). The transposed convolutions have
kernel 2 and stride 2 and the norm acts per pixel, so a cropped embedding gives exactly the
logits of the uncropped one over the same region. It follows the decoder's fast paths: the
image goes in once for the whole batch (no mask prompt), and the upscaling runs as
``MaskDecoder.upscale_cells`` (cell order) with the pixel shuffle done on the masks.

Uses the decoder's own modules (``iou_token``, ``mask_tokens``, ``transformer``,
``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``, and
``click_term`` and ``score_masks`` for a model with an instance code or click disks), so it
computes what ``MaskDecoder.forward(..., multimask_output=True)`` computes for single positive
points. A decoder that scores masks from their logits (``iou_from_mask``) needs every prompt's
logits on the whole low-res grid before the IoU gate; :meth:`PointDecoder.run` computes them
then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.modeling.mask_decoder import is_batch_broadcast
from engine.modeling.sam import Sam

__all__ = ["DecodedPrompts", "PointDecoder"]

# Prompts whose upscaled image tokens are held at once.
_UPSCALE_CHUNK = 16


@dataclass
class DecodedPrompts:
    """The transformer's output for a batch of ``B`` point prompts.

    Attributes:
        iou_predictions: ``(B, 3)`` predicted IoU of each multimask output.
        mask_tokens: ``(B, 4, C)`` transformed mask tokens (token 0 is the single-mask one).
        image_tokens: ``(B, h, w, C)`` transformed image embedding of each prompt (channels-last).
        point_coords: ``(B, 1, 2)`` the points, xy pixels in the model's input frame.
    """

    iou_predictions: torch.Tensor
    mask_tokens: torch.Tensor
    image_tokens: torch.Tensor
    point_coords: torch.Tensor


class PointDecoder:
    """Decodes single positive points on one image embedding.

    Args:
        model: the SAM model whose prompt encoder and mask decoder run.
        embedding: ``(1, C, h, w)`` image embedding (``SamPredictor.get_image_embedding()``).
        low_res_rows, low_res_cols: how many leading low-res rows and columns the caller needs;
            the upscaling runs only over the embedding cells that produce them.
    """

    def __init__(self, model: Sam, embedding: torch.Tensor, low_res_rows: int, low_res_cols: int):
        self.model = model
        decoder = model.mask_decoder
        grid_h, grid_w = model.prompt_encoder.image_embedding_size
        low_h, low_w = model.prompt_encoder.mask_input_size
        # Each embedding cell becomes a (low_h / grid_h) x (low_w / grid_w) block of logits.
        self._rows = min(grid_h, -(-low_res_rows * grid_h // low_h))
        self._cols = min(grid_w, -(-low_res_cols * grid_w // low_w))
        self.low_res_size = (self._rows * low_h // grid_h, self._cols * low_w // grid_w)
        # The SAM embedding, and the instance code when the model has one.
        self._embedding, self._code = decoder.split_embedding(embedding)
        self._image_pe = model.prompt_encoder.get_dense_pe()
        self._output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)

    @torch.inference_mode()
    def run(self, point_coords: torch.Tensor) -> DecodedPrompts:
        """Transformer pass for points ``(B, 2)`` (x, y) in the model's input frame, pixels."""
        model = self.model
        decoder = model.mask_decoder
        batch = point_coords.shape[0]
        coords = point_coords.to(self._embedding.device, torch.float32)[:, None, :]
        labels = torch.ones((batch, 1), dtype=torch.int64, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        tokens = self._output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
        # No mask prompt: every prompt sees the same image, so it goes in once (batch 1) and
        # the transformer shares its first layer's image-side work across the batch; a model
        # with prompt maps has a dense embedding per prompt.
        src = self._embedding + (dense[:1] if is_batch_broadcast(dense) else dense)
        _, c, h, w = src.shape
        hs, keys = decoder.transformer(src, self._image_pe[:1], tokens)
        iou = decoder.iou_prediction_head(hs[:, 0, :])
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        image_tokens = keys.reshape(batch, h, w, c)  # channels-last
        decoded = DecodedPrompts(iou[:, 1:], mask_tokens, image_tokens, coords)
        if decoder.iou_from_mask is not None:
            prompts = torch.arange(batch, device=coords.device)
            scores = []
            for start in range(0, batch, _UPSCALE_CHUNK):
                chunk = prompts[start : start + _UPSCALE_CHUNK]
                logits = self._multimask_logits(decoded, chunk, whole_grid=True)
                scores.append(decoder.score_masks(iou[chunk, 1:], logits, slice(1, 4)))
            decoded.iou_predictions = torch.cat(scores)
        return decoded

    @torch.inference_mode()
    def low_res_logits(
        self, decoded: DecodedPrompts, prompt_index: torch.Tensor, output_index: torch.Tensor
    ) -> torch.Tensor:
        """Low-res logits ``(K, rows, cols)`` of the chosen masks: multimask output
        ``output_index[k]`` (0..2) of prompt ``prompt_index[k]``, over the leading
        ``low_res_size`` rows and columns, in the order given."""
        device = decoded.image_tokens.device
        out = torch.empty((prompt_index.numel(), *self.low_res_size), device=device)
        if prompt_index.numel() == 0:
            return out
        prompt_index, output_index = prompt_index.to(device), output_index.to(device)
        prompts, inverse = torch.unique(prompt_index, return_inverse=True)
        # Upscaled maps are (C / 8) x 16 times the embedding per prompt (~8 MB at 64x64 grid):
        # a few prompts at a time keep memory flat.
        for start in range(0, prompts.numel(), _UPSCALE_CHUNK):
            chunk = prompts[start : start + _UPSCALE_CHUNK]
            logits = self._multimask_logits(decoded, chunk)  # (P, 3, rows, cols)
            picked = (inverse >= start) & (inverse < start + chunk.numel())
            out[picked] = logits[inverse[picked] - start, output_index[picked]]
        return out

    def _multimask_logits(
        self, decoded: DecodedPrompts, prompts: torch.Tensor, *, whole_grid: bool = False
    ) -> torch.Tensor:
        decoder = self.model.mask_decoder
        rows, cols = decoded.image_tokens.shape[1:3] if whole_grid else (self._rows, self._cols)
        src = decoded.image_tokens[prompts, :rows, :cols, :]
        # The decoder's upscaling leaves output pixels in cell order; the (3x smaller) masks
        # are put back in image order below.
        cells = decoder.upscale_cells(src)  # (P, 16 rows cols, C / 8)
        tokens = decoded.mask_tokens[prompts]
        # Token 1 + m is multimask output m (token 0 is the single-mask output).
        hyper = torch.stack(
            [decoder.output_hypernetworks_mlps[t](tokens[:, t, :]) for t in range(1, 4)], dim=1
        )  # (P, 3, C / 8)
        logits = _cells_to_image(hyper @ cells.transpose(1, 2), rows, cols)
        if self._code is not None or decoder.click_disks:
            # The clicks' term (code affinity, disks), on the whole low-res grid then cropped.
            coords = decoded.point_coords[prompts]
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
            full = self.model.prompt_encoder.mask_input_size
            term = decoder.click_term(self._code, (coords, labels), full, slice(1, 4))
            logits = logits + term[..., : logits.shape[-2], : logits.shape[-1]]
        return logits


def _cells_to_image(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(P, M, 16 rows cols)`` in ``MaskDecoder.upscale_cells``' order -- (i, j, di, dj, di',
    dj') for pixel ``(4i + 2di + di', 4j + 2dj + dj')`` -- to ``(P, M, 4 rows, 4 cols)``."""
    p, m = values.shape[:2]
    grid = values.reshape(p, m, rows, cols, 2, 2, 2, 2)
    return grid.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(p, m, 4 * rows, 4 * cols)
