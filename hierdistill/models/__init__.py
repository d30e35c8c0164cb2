"""Flax Linen networks of hierdistill: velocity backbones and discriminator heads.

Every velocity network is called as net.apply(variables, z, r, t, y, train=..., return_features=...)
and returns the mean velocity u(z, r, t | y) in float32 (r = None: the instantaneous velocity
v(z, t | y)). Models know nothing of losses or training.
"""
from hierdistill.models.awd import TokenDiscriminatorHead, token_weight_entropy
from hierdistill.models.dit import DIT_SIZES, DiT, dit_config, init_student_from_teacher
from hierdistill.models.mlp import MLPFlow
from hierdistill.models.registry import build, build_discriminator
from hierdistill.models.sana import SANA_SIZES, SanaTransformer, sana_config

__all__ = [
    "DIT_SIZES",
    "DiT",
    "MLPFlow",
    "SANA_SIZES",
    "SanaTransformer",
    "TokenDiscriminatorHead",
    "build",
    "build_discriminator",
    "dit_config",
    "init_student_from_teacher",
    "sana_config",
    "token_weight_entropy",
]
