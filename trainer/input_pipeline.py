"""The input pipeline: converted TFRecord shards -> batches of (image, mask).

One public builder, `make_dataset`. Training: shuffled shard list -> parallel,
non-deterministic interleave of readers -> shuffle of the serialized records -> parse
with `data_prep.schema` -> batch -> joint augmentation of the batch (`trainer.augment`,
unless the train step augments: --augment_on=device) -> prefetch. With cache=True the
parsed slices are kept in memory after the first pass and shuffled there instead. With
several datasets (`weights`), each one runs that chain up to the parse, and a seeded
`tf.data.Dataset.sample_from_datasets` draws every slice from dataset i with probability
weights[i] / sum(weights) before batching, so one batch mixes the datasets.
Evaluation: shards in manifest order, no augmentation, every example exactly once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from data_prep import schema
from trainer import augment as augment_lib

def make_dataset(files: Sequence[str] | Sequence[Sequence[str]], *,
                 image_size: int, compression: str | Sequence[str],
                 global_batch_size: int, training: bool,
                 input_context: tf.distribute.InputContext | None = None,
                 augment: augment_lib.AugmentConfig | None = None,
                 seed: int | None = None, shuffle_buffer: int = 512,
                 cache: bool = False,
                 on_batch: Callable[[], None] | None = None,
                 deterministic: bool = False,
                 weights: Sequence[float] | None = None) -> tf.data.Dataset:
  """Builds the dataset of (image float32 [B, S, S, 1], mask int32 [B, S, S, 1]).

  Args:
    files: shard paths (`data_prep.manifest.shard_paths`); with `weights`, one list of
      shard paths per dataset.
    image_size: S, the manifest's square side (shared by every dataset).
    (Masks hold `schema.IGNORE_LABEL` on the padding around each slice, which losses and
    metrics skip; see `data_prep.schema.parse_example`.)
    compression: "" or "GZIP" (`data_prep.manifest.compression_type`); with `weights`,
      one per dataset (or one for all).
    global_batch_size: batch over all replicas; each input pipeline yields per-replica
      batches of global_batch_size / num_replicas_in_sync.
    training: repeat forever, shuffle, augment and drop the last partial batch; else one
      deterministic, unaugmented pass.
    input_context: given by `distribute_datasets_from_function`; training shards the
      input per worker with it.
    augment: augmentation ranges, or None for no augmentation.
    seed: seeds shuffling and augmentation (None: nondeterministic).
    shuffle_buffer: records in the shuffle buffer.
    cache: training only: keep the parsed slices in memory after the first pass (parsing
      is deterministic; shuffling and augmentation stay random every pass). For splits
      that fit in memory; each pass then reads no file and decodes nothing.
    deterministic: training only: keep the element order of the parallel reads, parses
      and augmentation (with a seed, the same batches every run; slower). False lets
      whichever element is ready first go ahead.
    on_batch: called (through `tf.py_function`) when a batch leaves the pipeline, before
      prefetch; the trainer uses it to time how long steps wait for input.
    weights: training only: sampling weights (>= 0, not all 0), one per dataset of
      `files`. Each dataset is read, shuffled (`shuffle_buffer` records each, seed + i)
      and cached on its own; a dataset of weight 0 is not read at all.

  Returns:
    A tf.data.Dataset.

  Raises:
    ValueError: when there is no file, a file is missing, or `weights` does not fit.
  """
  if weights is None:
    sources = [(list(files), compression)]
  else:
    if not training:
      raise ValueError("weights mix training datasets; evaluate each dataset on its own")
    compressions = ([compression] * len(files) if isinstance(compression, str)
                    else list(compression))
    if not len(weights) == len(files) == len(compressions):
      raise ValueError(f"{len(weights)} weights for {len(files)} datasets with "
                       f"{len(compressions)} compression types; expected one of each per "
                       "dataset")
    if any(not w >= 0 for w in weights) or not any(weights):
      raise ValueError(f"weights {list(weights)}: expected values >= 0, not all 0")
    sources = [(list(f), c) for f, c in zip(files, compressions)]
  for shard_files, _ in sources:
    if not shard_files:
      raise ValueError("no shard files to read")
    missing = [f for f in shard_files if not tf.io.gfile.exists(f)]
    if missing:
      raise ValueError(f"shard files listed in the manifest are missing: {missing[:3]}")
  batch_size = global_batch_size
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)

  def parse(serialized):
    example = schema.parse_example(serialized, image_size)
    return example["image"], example["mask"]

  def to_model(image, mask):
    return image, tf.cast(mask, tf.int32)

  if not training:
    ds = tf.data.TFRecordDataset(list(files), compression_type=compression)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(to_model).batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)

  def slices(shard_files, compression_type, dataset_seed):
    return _training_slices(shard_files, compression_type, parse=parse,
                            input_context=input_context, seed=dataset_seed,
                            shuffle_buffer=shuffle_buffer, cache=cache,
                            deterministic=deterministic)

  if weights is None:
    ds = slices(*sources[0], seed)
  else:
    drawn = [(i, w) for i, w in enumerate(weights) if w > 0]
    parts = [slices(*sources[i], None if seed is None else seed + i) for i, _ in drawn]
    if len(parts) == 1:
      ds = parts[0]
    else:
      total = float(sum(w for _, w in drawn))
      # Every part repeats forever, so the mix never runs dry; seeded, the choice of
      # dataset per slice is the same every run (the order within each part is fixed by
      # `deterministic`).
      ds = tf.data.Dataset.sample_from_datasets(
          parts, weights=[w / total for _, w in drawn], seed=seed,
          stop_on_empty_dataset=False)
  # Batch before augmenting: vectorized ops over B slices cost far less than B small ones.
  ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic)
  if augment is not None:
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(
        lambda pair, s: augment_lib.augment_batch(pair[0], pair[1], s, augment),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  ds = ds.map(to_model)
  if on_batch is not None:
    def mark(image, mask):
      tick = tf.py_function(lambda: (on_batch(), 0)[1], [], tf.int32)
      with tf.control_dependencies([tick]):
        return tf.identity(image), mask
    ds = ds.map(mark)
  return ds.prefetch(tf.data.AUTOTUNE)


def _training_slices(files: list[str], compression: str, *, parse, input_context,
                     seed: int | None, shuffle_buffer: int, cache: bool,
                     deterministic: bool) -> tf.data.Dataset:
  """One dataset's endless, shuffled stream of parsed (image, mask) training slices."""
  ds = tf.data.Dataset.from_tensor_slices(list(files))
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  shard_files = num_pipelines > 1 and len(files) >= num_pipelines
  if shard_files:
    # Whole files per worker: no worker reads bytes it then throws away.
    ds = ds.shard(num_pipelines, pipeline_id)
  if not cache:
    # Reshuffle the file order every pass so shard boundaries do not recur in each epoch.
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
      cycle_length=min(len(files), 8), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if num_pipelines > 1 and not shard_files:
    # Fewer files than workers: fall back to every n-th record.
    ds = ds.shard(num_pipelines, pipeline_id)
  if cache:
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic).cache()
    # The decoded slices are in memory already: the buffer holds references, not copies.
    return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  # Shuffle the small serialized records, not the decoded float slices.
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
