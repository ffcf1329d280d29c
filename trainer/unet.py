"""U-Net for 2D slices, built only from standard Keras 3 layers (no I/O, no loss).

The saved model therefore loads with `keras.models.load_model(path, compile=False)` and
no custom objects, and the exporter can wrap it without importing `trainer`.

With several labelling protocols (`spine-convert --protocol`), one shared body feeds one
1x1 output head per protocol (MultiTalent, Ulrich et al. 2023): the layer
`schema.head_layer(name)` per protocol, concatenated in the given (sorted) order into
the model's one output "logits" [N, H, W, P * num_classes], head p in channels
p*C..(p+1)*C-1. The trainer picks each example's head (`losses.head_logits`); the
exporter cuts out one head as a model of its own.
"""
from __future__ import annotations

import math
from typing import Sequence

import keras

from data_prep import schema

NORMS = ("batch", "group", "none")


def _norm(x, kind: str, filters: int, name: str):
  if kind == "batch":
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)
  if kind == "group":
    # Batch statistics of 1-2 slices per replica are noise; groups do not care.
    return keras.layers.GroupNormalization(groups=math.gcd(filters, 8), name=f"{name}_gn")(x)
  return x


def _block(x, filters: int, norm: str, dropout: float, name: str):
  for i in (1, 2):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=norm == "none",
                            kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
    x = _norm(x, norm, filters, f"{name}_{i}")
    x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
  if dropout > 0:
    x = keras.layers.SpatialDropout2D(dropout, name=f"{name}_drop")(x)
  return x


def build_unet(*, num_classes: int = 3, base_filters: int = 32, depth: int = 4,
               dropout: float = 0.0, norm: str = "batch",
               input_shape: tuple = (None, None, 1),
               protocols: Sequence[str] = ()) -> keras.Model:
  """Builds a U-Net returning per-pixel logits.

  Args:
    num_classes: output channels (background, disc, vertebra).
    base_filters: filters of the first level; doubled at every level down.
    depth: number of 2x downsamplings; H and W must be divisible by 2**depth.
    dropout: SpatialDropout2D rate after every conv block (0 disables it).
    norm: "batch", "group" or "none" after every convolution.
    input_shape: (H, W, 1); None sizes keep the model fully convolutional.
    protocols: the labelling protocols to give a head each, sorted, unique names
      (`schema.check_protocol`). Fewer than two: the one head "logits" (the model has
      no protocol name in it then).

  Returns:
    A functional keras.Model with input "image" [N, H, W, 1] and float32 logits
    [N, H, W, P * num_classes] (float32 even under a mixed precision policy), P =
    max(1, len(protocols)).

  Raises:
    ValueError: on an unknown norm, a non-positive size argument, or protocols that are
      malformed, repeated or not sorted.
  """
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
  if num_classes < 1 or base_filters < 1 or depth < 1 or not 0 <= dropout < 1:
    raise ValueError(f"invalid U-Net arguments: num_classes={num_classes}, "
                     f"base_filters={base_filters}, depth={depth}, dropout={dropout}")
  for name in protocols:
    schema.check_protocol(name)
  if list(protocols) != sorted(set(protocols)):
    raise ValueError(f"protocols {list(protocols)}: expected sorted, unique names (the "
                     "order of the heads)")
  inputs = keras.Input(shape=input_shape, name="image")
  x = inputs
  skips = []
  for level in range(depth):
    x = _block(x, base_filters * 2**level, norm, dropout, f"down{level}")
    skips.append(x)
    x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
  x = _block(x, base_filters * 2**depth, norm, dropout, "bottom")
  for level in reversed(range(depth)):
    filters = base_filters * 2**level
    x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_tconv")(x)
    x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
    x = _block(x, filters, norm, dropout, f"up{level}")
  # Logits in float32: the softmax/Dice that follow need the range and precision.
  if len(protocols) < 2:
    logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)
  else:
    heads = [keras.layers.Conv2D(num_classes, 1, dtype="float32",
                                 name=schema.head_layer(name))(x) for name in protocols]
    logits = keras.layers.Concatenate(dtype="float32", name="logits")(heads)
  return keras.Model(inputs, logits, name="unet")
