"""The input pipeline: converted TFRecord shards -> batches of (image, mask).

One public builder, `make_dataset`; `TrainingOptions` says how a training stream is made.
Training: shuffled shard list -> parallel, non-deterministic interleave of readers ->
shuffle of the serialized records -> parse with `data_prep.schema` -> batch -> joint
augmentation of the batch (`trainer.augment`, unless the train step augments:
--augment_on=device) -> prefetch. With `cache` the parsed slices are kept in memory after
the first pass and shuffled there instead. With several datasets (`weights`), each one
runs that chain up to the parse, and a seeded `tf.data.Dataset.sample_from_datasets`
draws every slice from dataset i with probability weights[i] / sum(weights) before
batching, so one batch mixes the datasets.
Evaluation: shards in manifest order, no augmentation, every example exactly once.
With `data_service`, training runs that chain up to the augmentation on tf.data service
workers (`trainer.data_service`); only the cast, the batch timing and the prefetch stay in
this process.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tensorflow as tf

from data_prep import schema
from trainer import augment as augment_lib


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
  """How `make_dataset` builds an endless, shuffled, augmented training stream.

  Attributes:
    augment: augmentation ranges, or None for no augmentation.
    seed: seeds shuffling, the draw between datasets and augmentation (None:
      nondeterministic).
    shuffle_buffer: records in the shuffle buffer (of each dataset).
    cache: keep the parsed slices in memory after the first pass (parsing is
      deterministic; shuffling and augmentation stay random every pass). For splits that
      fit in memory; each pass then reads no file and decodes nothing.
    deterministic: keep the element order of the parallel reads, parses and augmentation
      (with a seed, the same batches every run; slower). False lets whichever element is
      ready first go ahead.
    weights: sampling weights (>= 0, not all 0), one per dataset of `make_dataset`'s
      `files`. Each dataset is read, shuffled (`shuffle_buffer` records each, seed + i)
      and cached on its own; a dataset of weight 0 is not read at all. None: one dataset.
    passes: passes over each dataset's shards before the stream ends (None: endless,
      what spine-train reads).
    data_service: "grpc://HOST:PORT" of a tf.data service dispatcher whose workers read,
      parse, batch and augment (their CPUs, not this process's); they open the files at
      the same paths. Each pass hands every shard to one worker, so every slice comes
      once per pass over all workers and all consumers. Needs a seed (every consumer must
      build the same dataset); not with `cache` (the workers read each pass) or
      `deterministic` (shards go to whichever worker asks first); `make_dataset`'s
      `input_context` then only sets the batch size (the shared job splits the data).
    job_name: with `data_service`: consumers (trainer processes) passing the same name
      share one job, each slice going to one of them; "": a job of this dataset's own.

  Raises:
    ValueError: `data_service` with `cache`, `deterministic` or no seed.
  """
  augment: augment_lib.AugmentConfig | None = None
  seed: int | None = None
  shuffle_buffer: int = 512
  cache: bool = False
  deterministic: bool = False
  weights: Sequence[float] | None = None
  passes: int | None = None
  data_service: str = ""
  job_name: str = ""

  def __post_init__(self):
    if self.data_service and (self.cache or self.deterministic or self.seed is None):
      raise ValueError("data_service: training only, with a seed, without cache or "
                       "deterministic")


def make_dataset(files: Sequence[str] | Sequence[Sequence[str]], *,
                 image_size: int, compression: str | Sequence[str],
                 global_batch_size: int, training: TrainingOptions | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 on_batch: Callable[[], None] | None = None,
                 protocols: Sequence[str] = ()) -> tf.data.Dataset:
  """Builds the dataset of (image float32 [B, S, S, 1], mask int32 [B, S, S, 1]).

  Args:
    files: shard paths (`data_prep.manifest.Manifest.files`); with `training.weights`, one
      list of shard paths per dataset.
    image_size: S, the manifest's square side (shared by every dataset).
    (Masks hold `schema.IGNORE_LABEL` on the padding around each slice, which losses and
    metrics skip; see `data_prep.schema.parse_example`.)
    compression: "" or "GZIP" (`Manifest.compression_type`); with
      `training.weights`, one per dataset (or one for all).
    global_batch_size: batch over all replicas; each input pipeline yields per-replica
      batches of global_batch_size / num_replicas_in_sync.
    training: repeat, shuffle, augment and drop the last partial batch, as these options
      say; None: one deterministic, unaugmented evaluation pass.
    input_context: given by `distribute_datasets_from_function`; training shards the
      input per worker with it.
    on_batch: training only: called (through `tf.py_function`) when a batch leaves the
      pipeline, before prefetch; the trainer uses it to time how long steps wait for
      input.
    protocols: the model's protocol heads in order (`unet.build_unet`). With two or
      more, each mask gets a second channel holding the index in `protocols` of its
      example's protocol (`schema.PROTOCOL`): masks int32 [B, S, S, 2], what
      `losses.make_loss(num_heads=...)` reads. An example of another protocol fails
      the read. Fewer than two: masks as above.

  Returns:
    A tf.data.Dataset.

  Raises:
    ValueError: when there is no file, a file is missing, or `training.weights` does not
      fit `files`.
  """
  sources = _sources(files, compression, training)
  batch_size = global_batch_size
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)

  def parse(serialized):
    example = schema.parse_example(serialized, image_size)
    if len(protocols) < 2:
      return example["image"], example["mask"]
    # The head index rides along as a mask channel: every step of the pipeline (cache,
    # shuffle, the draw between datasets, batch, augmentation) already carries masks.
    match = tf.equal(tf.constant(list(protocols)), example["protocol"])
    check = tf.debugging.assert_equal(
        tf.reduce_any(match), True,
        message=f"the protocol of an example is none of the model heads "
                f"{', '.join(protocols)}")
    with tf.control_dependencies([check]):
      head = tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.uint8)
    mask = example["mask"]
    return example["image"], tf.concat([mask, tf.fill(tf.shape(mask), head)], axis=-1)

  if training is None:
    return _evaluation_batches(*sources[0], parse=parse, batch_size=batch_size)
  ds = _training_slices(sources, parse=parse, options=training, input_context=input_context)
  # Batch before augmenting: vectorized ops over B slices cost far less than B small ones.
  ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=training.deterministic)
  if training.data_service:
    ds = _augmented_on_service(ds, training)
  elif training.augment is not None:
    ds = _augmented(ds, training)
  ds = ds.map(_to_model)
  if on_batch is not None:
    # After the service's `distribute`: a py_function cannot run on its workers.
    ds = _timed(ds, on_batch)
  # Last: the next batches are made while the model trains on this one.
  return ds.prefetch(tf.data.AUTOTUNE)


def _sources(files, compression, training: TrainingOptions | None
             ) -> list[tuple[list[str], str]]:
  """(shard paths, compression) of each dataset, every listed file checked to exist."""
  weights = training.weights if training is not None else None
  if weights is None:
    sources = [(list(files), compression)]
  else:
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
  return sources


def _to_model(image, mask):
  return image, tf.cast(mask, tf.int32)


def _evaluation_batches(files: list[str], compression: str, *, parse,
                        batch_size: int) -> tf.data.Dataset:
  """Every example once, in shard order: nothing shuffled, nothing dropped."""
  ds = tf.data.TFRecordDataset(files, compression_type=compression)
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(_to_model).batch(batch_size)
  return ds.prefetch(tf.data.AUTOTUNE)


def _training_slices(sources: list[tuple[list[str], str]], *, parse,
                     options: TrainingOptions, input_context) -> tf.data.Dataset:
  """The shuffled stream of parsed (image, mask) slices, drawn from the datasets by
  weight (with `data_service`: (image, mask, key), `_service_slices`)."""

  def slices(shard_files, compression_type, dataset_seed):
    if options.data_service:
      return _service_slices(shard_files, compression_type, parse=parse, seed=dataset_seed,
                             options=options)
    return _dataset_slices(shard_files, compression_type, parse=parse, seed=dataset_seed,
                           options=options, input_context=input_context)

  seed = options.seed
  if options.weights is None:
    return slices(*sources[0], seed)
  drawn = [(i, w) for i, w in enumerate(options.weights) if w > 0]
  parts = [slices(*sources[i], None if seed is None else seed + i) for i, _ in drawn]
  if len(parts) == 1:
    return parts[0]
  total = float(sum(w for _, w in drawn))
  # Every part repeats forever, so the mix never runs dry; seeded, the choice of dataset
  # per slice is the same every run (the order within each part is fixed by
  # `deterministic`). Mixed per slice, before batching: one batch holds several datasets.
  return tf.data.Dataset.sample_from_datasets(
      parts, weights=[w / total for _, w in drawn], seed=seed,
      stop_on_empty_dataset=False)


def _augmented(ds: tf.data.Dataset, options: TrainingOptions) -> tf.data.Dataset:
  """Batches augmented here, each with its own seed from a seeded random stream."""
  seeds = tf.data.Dataset.random(seed=options.seed).batch(2)
  return tf.data.Dataset.zip((ds, seeds)).map(
      lambda pair, s: augment_lib.augment_batch(pair[0], pair[1], s, options.augment),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)


def _augmented_on_service(ds: tf.data.Dataset, options: TrainingOptions) -> tf.data.Dataset:
  """Batches keyed-augmented (`_keyed_augment`) on the service workers and read from them."""
  ds = ds.map(lambda images, masks, keys: _keyed_augment(images, masks, keys, options.seed,
                                                          options.augment),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  # Everything above runs on the service workers. DYNAMIC (= "distributed_epoch"):
  # the dispatcher hands each element of the splittable source (`_service_slices`: one
  # shard of one pass) to one worker, and a job gives each batch to one consumer, so a
  # pass reads every slice once whatever the number of workers and trainer processes.
  # OFF ("parallel_epochs") would give every slice once per worker; the static
  # policies need a fixed worker list and a worker beside each trainer.
  return ds.apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=options.data_service, job_name=options.job_name or None))


def _timed(ds: tf.data.Dataset, on_batch: Callable[[], None]) -> tf.data.Dataset:
  """`ds` calling on_batch() as each batch passes."""
  def mark(image, mask):
    tick = tf.py_function(lambda: (on_batch(), 0)[1], [], tf.int32)
    with tf.control_dependencies([tick]):
      return tf.identity(image), mask
  return ds.map(mark)


def _dataset_slices(files: list[str], compression: str, *, parse, seed: int | None,
                    options: TrainingOptions, input_context) -> tf.data.Dataset:
  """One dataset's shuffled stream of parsed (image, mask) training slices (endless unless
  `options.passes`)."""
  cache, deterministic = options.cache, options.deterministic
  shuffle_buffer, passes = options.shuffle_buffer, options.passes
  ds = tf.data.Dataset.from_tensor_slices(list(files))
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  shard_files = num_pipelines > 1 and len(files) >= num_pipelines
  if shard_files:
    # Whole files per worker: no worker reads bytes it then throws away.
    ds = ds.shard(num_pipelines, pipeline_id)
  if not cache:
    # Reshuffle the file order every pass so shard boundaries do not recur in each epoch;
    # repeat the file list, not the records, so each pass reopens the shards.
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat(passes)
  ds = ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
      cycle_length=min(len(files), 8), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if num_pipelines > 1 and not shard_files:
    # Fewer files than workers: fall back to every n-th record.
    ds = ds.shard(num_pipelines, pipeline_id)
  if cache:
    # Cache after the parse, before shuffle and repeat: later passes decode nothing and
    # are still shuffled anew.
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic).cache()
    # The decoded slices are in memory already: the buffer holds references, not copies.
    return ds.shuffle(shuffle_buffer, seed=seed,
                      reshuffle_each_iteration=True).repeat(passes)
  # Shuffle the small serialized records, not the decoded float slices.
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


# Counter values of an endless service stream: more than any run reads (range() ends).
_ENDLESS = 2**62


def _service_slices(files: list[str], compression: str, *, parse, seed: int,
                    options: TrainingOptions) -> tf.data.Dataset:
  """One dataset's stream of (image, mask, key) as tf.data service workers make it.

  The splittable source is a counter, one value per shard per pass, not the file list:
  the dispatcher hands each value to one worker. On TF 2.21 a shuffled or repeated
  file list is not split that way (with two workers, a shuffled list was read twice
  per pass, a list repeated 3 times 5 times); the counter picks the shard of a fixed
  random order per pass instead. `key` [2] int64 (counter value, record index in the
  shard) tells every slice of the run apart and seeds the augmentation
  (`_keyed_augment`).
  """
  names = tf.constant(list(files))
  count = len(files)

  def shard(i):
    # Each pass its own order of the shards, the same on every worker: stateless.
    order = tf.stack([tf.constant(seed, tf.int64), i // count])
    return names[tf.random.experimental.index_shuffle(i % count, order, count - 1)], i

  def records(name, i):
    ds = tf.data.TFRecordDataset(name, compression_type=compression).enumerate()
    return ds.map(lambda r, record: (record, tf.stack([i, r])))

  passes = options.passes
  ds = tf.data.Dataset.range(count * passes if passes else _ENDLESS).map(shard)
  ds = ds.interleave(records, cycle_length=min(count, 8), block_length=1,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  # Shuffle the small serialized records, not the decoded float slices.
  ds = ds.shuffle(options.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  return ds.map(lambda record, key: (*parse(record), key),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)


def _keyed_augment(images, masks, keys, seed: int,
                   augment: augment_lib.AugmentConfig | None):
  """A service batch augmented with a seed from its first slice's key (None: keys
  dropped). Every worker runs the same graph, so a seeded random stream would give the
  k-th batch of each worker the same draws; the keys differ for every slice of a run."""
  if augment is None:
    return images, masks
  first = tf.stack([tf.constant(seed, tf.int64), keys[0, 0]])
  batch_seed = tf.random.experimental.stateless_fold_in(first, keys[0, 1])
  return augment_lib.augment_batch(images, masks, batch_seed, augment)
