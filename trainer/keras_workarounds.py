"""Work-arounds for Keras 3.15 `fit` under MultiWorkerMirroredStrategy with >1 worker.

Keras 3's TF trainer breaks in two places when the strategy spans several workers (see
tensorflow/tensorflow#72388, "tf.distribute and keras 3 incompatibility: Invalid
reduction dimension 0 for input with 0 dimensions"):
  1. before training it calls `strategy.reduce("MEAN", (images, masks))` on one input
     batch only to learn shapes; a collective reduce of a tuple fails;
  2. after every step it reduces the scalar metric results with
     `strategy.reduce("MEAN", v, axis=0)`, and a scalar has no axis 0.
Both patches are applied only for a multi-worker strategy and touch private Keras
names; `tests/test_trainer_distribute.py` runs two workers so a Keras upgrade that
changes them fails loudly rather than silently.
"""
from __future__ import annotations

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as keras_tf_trainer

_original_reduce = keras_tf_trainer.reduce_per_replica


def _reduce_per_replica(values, strategy, reduction):
  if (reduction in ("auto", "mean")
      and keras_tf_trainer._collective_all_reduce_multi_worker(strategy)):  # pylint: disable=protected-access
    # Mean over all replicas of every worker, whatever the rank (scalars included).
    return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
  return _original_reduce(values, strategy, reduction)


def apply(model, strategy, per_replica_batch: int, image_size: int,
          label_channels: int = 1) -> None:
  """Patches Keras for `model.fit` under a multi-worker `strategy` (no-op otherwise).

  `label_channels`: of the training masks (2 with protocol heads: `losses.make_loss`).
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return
  keras_tf_trainer.reduce_per_replica = _reduce_per_replica
  batch = (tf.zeros([per_replica_batch, image_size, image_size, 1], tf.float32),
           tf.zeros([per_replica_batch, image_size, image_size, label_channels], tf.int32))

  def build(iterator=None, data_batch=None):
    del iterator, data_batch  # The shapes are known; no collective reduce of data.
    with strategy.scope():
      model._symbolic_build(data_batch=batch)  # pylint: disable=protected-access

  model._maybe_symbolic_build = build  # pylint: disable=protected-access
