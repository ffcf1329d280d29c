"""Library of spine-predict: segment files with a SavedModel and write masks/overlays.

Outputs for an input `NAME.ext` in the output folder:
  2D:     NAME_mask.png (uint8 labels 0/1/2) and NAME_mask.npy
  NIfTI:  NAME_mask.nii.gz (or .nii): labels with the input's shape, affine, voxel order
  overlay (optional): NAME_overlay.png, the slice (or a volume's middle sagittal slice)
          with discs in orange and vertebrae in blue.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable

import numpy as np

from data_prep import readers
from export import inference

# Overlay colors (RGB) by label; background is not tinted.
COLORS = {1: (255, 160, 0), 2: (0, 140, 255)}
_ALPHA = 0.45


def overlay_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the slice (contrast-stretched) with labels tinted."""
  image = np.asarray(image, dtype=np.float32)
  lo, hi = np.percentile(image, (0.5, 99.5))
  gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255.0
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  for label, color in COLORS.items():
    sel = mask == label
    rgb[sel] = (1 - _ALPHA) * rgb[sel] + _ALPHA * np.asarray(color, np.float32)
  return np.round(rgb).astype(np.uint8)


def _write_atomic(path: pathlib.Path, write: Callable[[str], None]) -> None:
  # Same suffix as the target: PIL and nibabel pick the format from the file name.
  tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
  try:
    write(str(tmp))
    os.replace(tmp, path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def _save_png(path: pathlib.Path, array: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _write_atomic(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  def write(p):
    with open(p, "wb") as f:
      np.save(f, array, allow_pickle=False)
  _write_atomic(path, write)


def _save_nifti_like(path: pathlib.Path, mask: np.ndarray, source: str) -> None:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  src = nib.load(source)
  header = src.header.copy()
  header.set_data_dtype(np.uint8)
  # Trailing singleton axes of the source (e.g. [X, Y, Z, 1]) are restored exactly.
  out = nib.Nifti1Image(mask.astype(np.uint8).reshape(src.shape), src.affine, header)
  out.header.set_slope_inter(1.0, 0.0)
  _write_atomic(path, lambda p: nib.save(out, p))


def output_paths(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                 overlay: bool) -> dict[str, pathlib.Path]:
  """The files `predict` writes for one input, keyed by kind."""
  stem, suffix = readers.split_name(input_path)
  out = pathlib.Path(output_dir)
  if suffix in readers.NIFTI_SUFFIXES:
    paths = {"nifti": out / f"{stem}_mask{suffix}"}
  else:
    paths = {"png": out / f"{stem}_mask.png", "npy": out / f"{stem}_mask.npy"}
  if overlay:
    paths["overlay"] = out / f"{stem}_overlay.png"
  return paths


def predict(model, input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            batch_size: int = 8, overlay: bool = False, overwrite: bool = False,
            progress: bool = True) -> tuple[list[pathlib.Path], list[tuple[str, str]]]:
  """Segments every input and writes the masks.

  Args:
    model: a SavedModel from `inference.load_saved_model`.
    input_path: a file or a folder of files.
    output_dir: folder for the outputs (created).
    batch_size: 2D slices per signature call.
    overlay: also write PNG overlays.
    overwrite: replace existing outputs (otherwise such an input is a failure).
    progress: print a progress bar on stderr.

  Returns:
    (written, failures): the files written, and (input path, message) per failed input;
    each message starts with the file it is about.

  Raises:
    InputError: `input_path` does not exist or holds no supported file.
  """
  files = inference.list_inputs(input_path)
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  written: list[pathlib.Path] = []
  failures: list[tuple[str, str]] = []
  bar = inference.Progress(len(files), "spine-predict", progress)
  targets: dict[str, dict[str, pathlib.Path]] = {}
  claimed: dict[pathlib.Path, str] = {}
  for f in files:
    paths = output_paths(f, output_dir, overlay)
    clash = [claimed[p] for p in paths.values() if p in claimed]
    existing = [str(p) for p in paths.values() if p.exists()]
    if clash:
      failures.append((str(f), f"{f}: its outputs clash with those of {clash[0]}"))
    elif existing and not overwrite:
      failures.append((str(f), f"{f}: output {existing[0]} exists; pass --overwrite"))
    else:
      targets[str(f)] = paths
      claimed.update({p: str(f) for p in paths.values()})
      continue
    bar.step()

  def cases_2d():
    for path in targets:
      try:
        case = inference.read_input(path)
      except inference.InputError as e:
        failures.append((path, str(e)))
        bar.step()
        continue
      if case.kind == "3d":
        try:
          mask = inference.segment_volume(model, case.image)
          paths = targets[path]
          _save_nifti_like(paths["nifti"], inference.orientation_back(case, mask), path)
          written.append(paths["nifti"])
          if "overlay" in paths:
            mid = case.image.shape[0] // 2
            _save_png(paths["overlay"], overlay_rgb(case.image[mid], mask[mid]))
            written.append(paths["overlay"])
        except Exception as e:  # Keep going in folder mode; report at the end.
          failures.append((path, f"{path}: {type(e).__name__}: {e}"))
        bar.step()
      else:
        yield case

  try:
    for case, mask in inference.segment_cases_2d(model, cases_2d(), batch_size):
      paths = targets[case.image_path]
      _save_png(paths["png"], mask)
      _save_npy(paths["npy"], mask)
      written += [paths["png"], paths["npy"]]
      if "overlay" in paths:
        _save_png(paths["overlay"], overlay_rgb(case.image[0], mask))
        written.append(paths["overlay"])
      bar.step()
  except Exception as e:  # A failed 2D batch: name its files, keep the rest.
    failures.append((str(input_path),
                     f"{input_path}: a 2D batch failed: {type(e).__name__}: {e}"))
  return written, failures
