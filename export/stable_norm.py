"""GroupNormalization with float64 statistics, for the exported graphs.

Why: Keras 3's `GroupNormalization` takes each group's mean and variance with one float32
reduction over H x W x channels-of-the-group. On a serving canvas that is ~300k values
per group (384 x 384 x 2 for the spine2d models), and TensorFlow's float32 reduction
there is off by up to 3e-3 relative in the variance; the first normalization of a
trained U-Net turns a 5e-7 input difference into 1e-2, and the probabilities end up
0.012-0.018 away from a float64 run of the same weights. Another runtime (ONNX Runtime)
sums in another order and lands as far away elsewhere: 0.019-0.024 between the two.
Summing the statistics in float64 makes both exact to float32 (probabilities within
5e-6 of float64 in TF and in ONNX Runtime). The normalization itself, everything else and
the weights stay float32; the formula is the layer's own (two-pass variance,
rsqrt(var + epsilon), gamma, beta).

The trained `best.keras` keeps the stock layer (it must load without custom objects);
only the graphs built by `export/serving.py` use `with_stable_statistics`.
"""
from __future__ import annotations

import keras
import tensorflow as tf


class StableGroupNormalization(keras.layers.GroupNormalization):
  """`keras.layers.GroupNormalization` whose mean and variance are summed in float64."""

  def call(self, inputs):
    rank = len(inputs.shape)
    if self.axis not in (-1, rank - 1):  # the U-Net's layout; others keep Keras' code
      return super().call(inputs)
    channels = inputs.shape[-1]
    shape = tf.shape(inputs)
    grouped = tf.reshape(tf.cast(inputs, tf.float32),
                         tf.concat([shape[:-1], [self.groups, channels // self.groups]], 0))
    axes = list(range(1, rank - 1)) + [rank]  # spatial axes and the channels of a group
    mean, inv = self._moments(grouped, axes)
    per_channel = [self.groups, channels // self.groups]
    if self.scale:
      inv = inv * tf.reshape(tf.cast(self.gamma, tf.float32), per_channel)
    offset = -mean * inv
    if self.center:
      offset = offset + tf.reshape(tf.cast(self.beta, tf.float32), per_channel)
    return tf.cast(tf.reshape(grouped * inv + offset, shape), self.compute_dtype)

  def _moments(self, grouped: tf.Tensor, axes: list[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """(mean, rsqrt(variance + epsilon)) over `axes`, float32, summed in float64."""
    x64 = tf.cast(grouped, tf.float64)
    mean = tf.reduce_mean(x64, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x64 - mean), axes, keepdims=True)
    inv = tf.cast(tf.math.rsqrt(variance + self.epsilon), tf.float32)
    return tf.cast(mean, tf.float32), inv


class Float32GroupNormalization(StableGroupNormalization):
  """The same layer with float32 statistics summed in stages, for LiteRT (no float64).

  Each mean is taken one axis at a time (channels of the group, then columns, then
  rows): every float32 sum has at most max(H, W) terms instead of H x W x channels, and
  equal-size means of means are the overall mean. Measured on a 384 x 384 x 4 input
  (tests/test_export_litert.py): within 1.3e-6 of float64, Keras' own layer 2.2e-4.
  """

  def _moments(self, grouped: tf.Tensor, axes: list[int]) -> tuple[tf.Tensor, tf.Tensor]:
    def staged_mean(x):
      for axis in sorted(axes, reverse=True):
        x = tf.reduce_mean(x, axis, keepdims=True)
      return x

    mean = staged_mean(grouped)
    variance = staged_mean(tf.square(grouped - mean))
    return mean, tf.math.rsqrt(variance + self.epsilon)


def with_stable_statistics(model: keras.Model, *, float64: bool = True) -> keras.Model:
  """`model` with every GroupNormalization made a `StableGroupNormalization`.

  float64=False: a `Float32GroupNormalization` instead (no float64 op, for LiteRT).
  Returns `model` itself when it has none; otherwise a clone holding the same weights.
  """
  if not any(isinstance(layer, keras.layers.GroupNormalization) for layer in model.layers):
    return model

  def clone(layer):
    stable = StableGroupNormalization if float64 else Float32GroupNormalization
    cls = stable if type(layer) is keras.layers.GroupNormalization else layer.__class__
    return cls.from_config(layer.get_config())

  stable = keras.models.clone_model(model, clone_function=clone)
  stable.set_weights(model.get_weights())
  return stable
