"""Partially labelled data: unannotated classes are unknown, never background.

A vertebra-only folder converted with `--annotated_labels=2` stores that fact with every
example; parsing turns its unlabelled pixels into the set label {background, disc}; the
marginal losses never punish a disc predicted there, and the metrics do not count disc
where it is unknown.
"""
import numpy as np
import pytest
import tensorflow as tf

from data_prep import manifest as manifest_lib
from data_prep import metrics
from data_prep import phantom
from data_prep import schema
from data_prep import writer
from trainer import losses

BG_OR_DISC = schema.set_label((0, 1))


def test_set_labels_and_allowed_classes_twins():
  assert BG_OR_DISC == schema.SET_LABEL + 0b011
  assert schema.set_label((0, 1, 2)) == schema.IGNORE_LABEL
  assert schema.unlabelled_value((2,)) == BG_OR_DISC
  assert schema.unlabelled_value((0, 1, 2)) == 0
  values = np.array([0, 1, 2, BG_OR_DISC, schema.set_label((0, 2)), 255, 7])
  expected = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 1, 1]]
  np.testing.assert_array_equal(schema.allowed_classes(values), expected)
  np.testing.assert_array_equal(schema.tf_allowed_classes(values).numpy(), expected)


def test_annotated_labels_survive_conversion_and_parse_as_unknown(tmp_path):
  raw = tmp_path / "raw"
  phantom.write_2d_dataset(raw, num_cases=3, seed=1, min_size=48, max_size=48)
  # A vertebra-only study: drop the disc outlines from the masks.
  for path in (raw / "masks").glob("*.npy"):
    m = np.load(path, allow_pickle=False)
    np.save(path, np.where(m == 1, 0, m))
  # Masks holding a class the flag says is not outlined contradict it: refused.
  with pytest.raises(writer.ConversionError, match=r"vertebra.*--annotated_labels=0,1"):
    writer.convert_dataset(str(raw / "images"), str(raw / "masks"), str(tmp_path / "x"),
                           writer.ConvertOptions(annotated_labels=[1], num_workers=1),
                           progress=False)
  out = tmp_path / "data"
  m = writer.convert_dataset(str(raw / "images"), str(raw / "masks"), str(out),
                             writer.ConvertOptions(annotated_labels=[2], image_size=32,
                                                   val_fraction=0, num_workers=1),
                             progress=False)
  assert m["annotated_labels"] == [0, 2] and m["flags"]["required_labels"] == [0, 2]
  assert m["totals"]["slices_written"] == 3  # kept: their annotated labels are present
  files = manifest_lib.load(out).files("train")
  # Inside tf.data (graph mode), as the trainer parses.
  for parsed in tf.data.TFRecordDataset(files).map(lambda r: schema.parse_example(r, 32)):
    assert parsed["annotated"].numpy().tolist() == [True, False, True]
    values = set(np.unique(parsed["mask"].numpy()).tolist())
    assert values <= {BG_OR_DISC, 2, schema.IGNORE_LABEL} and BG_OR_DISC in values


def _sample():
  """One 4x4 slice: vertebra rows 1-2 exact, the rest unlabelled in a vertebra-only set."""
  labels = np.full((1, 4, 4, 1), BG_OR_DISC, np.int32)
  labels[0, 1:3] = 2
  logits = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype(np.float32)
  return labels, logits


@pytest.mark.parametrize("name", ["dice", "dice_ce"])
def test_unknown_class_never_contributes_loss(name):
  labels, logits = _sample()
  loss_fn = losses.make_loss(name, num_classes=3)
  base = loss_fn(labels, logits).numpy()
  # Move probability between background and disc on the unlabelled pixels (vertebra
  # untouched): the loss must not change, whichever of the two the model prefers.
  swapped = logits.copy()
  unlabelled = labels[..., 0] == BG_OR_DISC
  swapped[unlabelled, 0], swapped[unlabelled, 1] = logits[unlabelled, 1], logits[unlabelled, 0]
  np.testing.assert_allclose(loss_fn(labels, swapped).numpy(), base, rtol=1e-6)
  # Predicting disc everywhere there costs no more than predicting background.
  disc, background = logits.copy(), logits.copy()
  disc[unlabelled] = [0, 20, 0]
  background[unlabelled] = [20, 0, 0]
  np.testing.assert_allclose(loss_fn(labels, disc).numpy(), loss_fn(labels, background).numpy(),
                             rtol=1e-5)
  # The same swap on a fully labelled slice (exact background) does change the loss.
  exact = np.where(labels == BG_OR_DISC, 0, labels)
  assert abs(loss_fn(exact, swapped).numpy()[0] - loss_fn(exact, logits).numpy()[0]) > 1e-3
  # And the unknown pixels still teach "not vertebra": vertebra there costs more.
  vertebra = logits.copy()
  vertebra[unlabelled] = [0, 0, 20]
  assert loss_fn(labels, vertebra).numpy()[0] > loss_fn(labels, background).numpy()[0] + 0.1


def test_metrics_do_not_count_a_class_where_it_is_unknown():
  labels, _ = _sample()
  gt = labels[0, ..., 0].astype(np.uint8)
  pred = np.where(gt == 2, 2, 1)  # disc predicted on every unlabelled pixel
  counts = metrics.counts(pred, gt)
  # disc: unknown on the unlabelled pixels, known (not disc) on the vertebra rows.
  np.testing.assert_array_equal(counts[1], [0, 0, 0])
  np.testing.assert_array_equal(counts[2], [8, 8, 8])
  assert metrics.dice(counts)["dice_disc"] == metrics.ABSENT
  assert metrics.dice(counts)["dice_vertebra"] == 1.0
  np.testing.assert_array_equal(metrics.tf_counts(gt, pred).numpy(), counts)
  # Vertebra predicted on unlabelled pixels is a false positive: they are known non-vertebra.
  pred2 = np.full_like(gt, 2)
  assert metrics.counts(pred2, gt)[2].tolist() == [8, 16, 8]
