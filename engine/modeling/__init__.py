"""SAM's modules, one per file: encoders, prompt encoder, two-way transformer, mask decoder."""

from engine.modeling.common import MLP, LayerNorm2d, MLPBlock
from engine.modeling.image_encoder import ImageEncoderViT
from engine.modeling.mask_decoder import MaskDecoder
from engine.modeling.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from engine.modeling.sam import Sam
from engine.modeling.tiny_encoder import TinyImageEncoder
from engine.modeling.transformer import TwoWayTransformer

__all__ = [
    "MLP",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Sam",
    "TinyImageEncoder",
    "TwoWayTransformer",
]
