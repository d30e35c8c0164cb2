"""Flax Linen networks of hierdistill: velocity backbones and discriminator heads.

Every velocity network is called as net.apply(variables, z, r, t, y, train=..., return_features=...)
and returns the mean velocity u(z, r, t | y) in float32 (r = None: the instantaneous velocity
v(z, t | y)). Models know nothing of losses or training.
"""
from hierdistill.models.awd import TokenDiscriminatorHead, token_weight_entropy
from hierdistill.models.clip import CLIP, CLIP_VIT_L14, clip_score, preprocess_images
from hierdistill.models.dcae import DCAE_F32C32, AutoencoderDC
from hierdistill.models.dit import DIT_SIZES, DiT, dit_config
from hierdistill.models.gemma2 import GEMMA2_2B, GEMMA2_SIZES, Gemma2Encoder
from hierdistill.models.mlp import MLPFlow
from hierdistill.models.registry import build, build_discriminator
from hierdistill.models.sana import SANA_SIZES, SanaTransformer, sana_config
from hierdistill.models.student import init_student_from_teacher, student_of

__all__ = [
    "AutoencoderDC",
    "CLIP",
    "CLIP_VIT_L14",
    "DCAE_F32C32",
    "DIT_SIZES",
    "DiT",
    "GEMMA2_2B",
    "GEMMA2_SIZES",
    "Gemma2Encoder",
    "MLPFlow",
    "SANA_SIZES",
    "SanaTransformer",
    "TokenDiscriminatorHead",
    "build",
    "build_discriminator",
    "clip_score",
    "dit_config",
    "init_student_from_teacher",
    "preprocess_images",
    "sana_config",
    "student_of",
    "token_weight_entropy",
]
