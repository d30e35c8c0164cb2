"""Builds the Flax modules from configs (ml_collections.ConfigDict or plain dicts).

Model config: `name` in MODELS; every other key is a field of that module, checked here so a typo
fails before anything compiles. For 'dit', `size` may name a standard size ('S/2', 'DiT-XL/2');
explicit keys (hidden_size, depth, num_heads, patch_size) override it. Dtypes are strings.

  build(ConfigDict(name='dit', size='S/2', input_size=32, in_channels=4, num_classes=1000,
                   dtype='bfloat16', interval_conditioning=True))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Sequence

import jax.numpy as jnp
from flax import linen as nn

from hierdistill.models.awd import POOLINGS, TokenDiscriminatorHead
from hierdistill.models.dit import DiT, dit_config
from hierdistill.models.lightningdit import LightningDiT
from hierdistill.models.mlp import MLPFlow
from hierdistill.models.remat import remat_policy
from hierdistill.models.sana import SanaTransformer

MODELS = {"dit": DiT, "mlp": MLPFlow, "sana": SanaTransformer, "lightningdit": LightningDiT}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}
_DTYPE_KEYS = ("dtype", "param_dtype")
_TUPLE_KEYS = ("feature_layers",)


def _as_dict(config: Any) -> Dict[str, Any]:
  if hasattr(config, "to_dict"):  # ConfigDict
    return config.to_dict()
  if hasattr(config, "as_configdict"):  # FrozenConfigDict
    return config.as_configdict().to_dict()
  if isinstance(config, Mapping):
    return dict(config)
  raise TypeError(f"A model config must be a ConfigDict or a dict; got {type(config).__name__}.")


def _module_fields(cls: type) -> tuple:
  # 'name' and 'parent' are Flax's own dataclass fields, not model settings.
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("name", "parent"))


def _kwargs(cls: type, config: Dict[str, Any], where: str,
            also_valid: Sequence[str] = ()) -> Dict[str, Any]:
  """Checks the keys against cls's fields and converts dtype strings and lists.

  also_valid: keys the caller has already consumed, listed in the error message only.
  """
  valid = _module_fields(cls) + tuple(also_valid)
  kwargs = {}
  for key, value in config.items():
    if key not in valid or key in also_valid:
      raise ValueError(f"Unknown key {key!r} in the {where} config; valid: "
                       f"{', '.join(sorted(valid))}.")
    if key in _DTYPE_KEYS and isinstance(value, str):
      if value not in DTYPES:
        raise ValueError(f"Unknown {where} {key}={value!r}; valid: {', '.join(DTYPES)}.")
      value = DTYPES[value]
    if key in _TUPLE_KEYS and value is not None:
      value = tuple(int(i) for i in value)  # module fields must be hashable
    kwargs[key] = value
  return kwargs


def build(config: Any, *, ignore: Sequence[str] = ()) -> nn.Module:
  """The velocity network named by config.name ('dit' or 'mlp').

  ignore: keys of the config that belong to something else (skipped, not checked).
  Raises ValueError naming the key for an unknown name, size, dtype or field.
  """
  config = _as_dict(config)
  config = {k: v for k, v in config.items() if k not in ignore}
  name = config.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"Unknown model config.name={name!r}; valid: {', '.join(MODELS)}.")
  cls = MODELS[name]
  if name == "dit":
    size = config.pop("size", None)
    explicit = _kwargs(cls, config, "model ('dit')", also_valid=("name", "size"))
    try:
      kwargs = dict(dit_config(size)) if size is not None else {}
    except ValueError as e:
      raise ValueError(f"model config key 'size': {e}") from None
    kwargs.update(explicit)
  else:
    kwargs = _kwargs(cls, config, f"model ({name!r})", also_valid=("name",))
  if "remat_policy" in kwargs:
    remat_policy(kwargs["remat_policy"])  # an unknown name fails here, before anything traces
  return cls(**kwargs)


def build_discriminator(config: Any, *, ignore: Sequence[str] = ()) -> TokenDiscriminatorHead:
  """The discriminator head: keys pooling ('awd' | 'mean'), hidden, tau, dtype, param_dtype.

  ignore: keys of the config that belong to something else (e.g. which backbone layers feed
  the head, loss weights), skipped.
  """
  config = {k: v for k, v in _as_dict(config).items() if k not in ignore}
  kwargs = _kwargs(TokenDiscriminatorHead, config, "discriminator")
  pooling = kwargs.get("pooling", TokenDiscriminatorHead.pooling)
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown discriminator pooling={pooling!r}; valid: {', '.join(POOLINGS)}.")
  return TokenDiscriminatorHead(**kwargs)
