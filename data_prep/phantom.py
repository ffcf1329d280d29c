"""Synthetic sagittal T2-like spine data with exact labels: the built-in dataset.

Each case is drawn from a seed: stacked vertebral bodies (label 2) separated by bright
intervertebral discs (label 1), a bright CSF canal with a cord in its upper part, posterior
elements, muscle, subcutaneous fat and air (all label 0), then a smooth multiplicative bias
field, Rician noise and a per-case intensity scale. Curvature, vertebra sizes, disc
brightness (degeneration), field of view and image size vary per case.

Display orientation of a slice, as in the real data: rows run superior -> inferior, columns
anterior -> posterior (the canal lies to the right of the bodies).

Two raw formats, the ones the converter reads:
  * 2D: `images/<id>.png` (8- or 16-bit grayscale) + `masks/<id>.npy` (uint8).
  * 3D: `images/<id>.nii.gz` + `masks/<id>.nii.gz` with a real affine; cases alternate
    between RAS storage and scanner order (I, P, R), so only the affine says which array
    axis is sagittal. Lateral slices miss the spine and hold background only.

  spine-phantom --output_dir=/tmp/phantom2d --format=2d --num_cases=20 --seed=0
  (or: python -m data_prep.phantom ...)
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from data_prep import fileio

LABEL_DISC = 1
LABEL_VERTEBRA = 2
ORIENTATIONS_3D = ("RAS", "IPR")


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """One patient's spine, in mm, in the display frame (y down = inferior, x = posterior)."""
  height_mm: float
  width_mm: float
  x0: float              # body centre (x) at mid-height
  curvature: float       # lordosis: d2x/dy2 / 2 in 1/mm (> 0 bows the middle anteriorly)
  tilt: float            # dx/dy of the whole column
  bodies: tuple          # ((centre_y, half_height, half_width), ...) along the column
  disc_brightness: tuple  # one per gap between consecutive bodies
  body_brightness: float
  canal_gap: float       # dark ligament between body and CSF
  canal_width: float
  cord_end_y: float      # conus level: the cord fills the canal above it
  skin_x: float          # posterior skin line
  fat_mm: float          # subcutaneous fat thickness
  front_x: float         # anterior body outline (belly)
  lr_body: float         # half-width of the bodies in the left-right direction
  lr_canal: float


def sample_anatomy(rng: np.random.Generator, height_mm: float, width_mm: float) -> Anatomy:
  """Draws the geometry and tissue contrasts of one spine that fills the field of view."""
  body_h = rng.uniform(22.0, 30.0)
  disc_h = rng.uniform(7.0, 12.0)
  half_w = rng.uniform(15.0, 21.0)
  x0 = width_mm * rng.uniform(0.38, 0.50)
  # Start above the field of view so the top is cut as in a real scan.
  y = -rng.uniform(0.0, body_h)
  bodies, discs = [], []
  while y < height_mm + body_h:
    h = body_h * rng.uniform(0.9, 1.1)
    bodies.append((y + h / 2, h / 2, half_w * rng.uniform(0.92, 1.08)))
    # Degenerated discs are darker on T2; about one in five.
    discs.append(rng.uniform(0.75, 0.95) if rng.random() > 0.2 else rng.uniform(0.3, 0.5))
    y += h + disc_h * rng.uniform(0.85, 1.15)
  canal_width = rng.uniform(11.0, 17.0)
  skin_x = min(width_mm - 3.0, x0 + half_w + canal_width + rng.uniform(55.0, 85.0))
  return Anatomy(
      height_mm=height_mm, width_mm=width_mm, x0=x0,
      curvature=rng.uniform(-0.2, 1.0) * 4e-4 * 300.0 / height_mm,
      tilt=rng.uniform(-0.12, 0.12), bodies=tuple(bodies), disc_brightness=tuple(discs[:-1]),
      body_brightness=rng.uniform(0.3, 0.5), canal_gap=rng.uniform(1.5, 3.5),
      canal_width=canal_width, cord_end_y=height_mm * rng.uniform(0.15, 0.4),
      skin_x=skin_x, fat_mm=rng.uniform(10.0, 25.0),
      front_x=rng.uniform(0.0, 0.08) * width_mm,
      lr_body=rng.uniform(18.0, 25.0), lr_canal=rng.uniform(7.0, 10.0))


def _lerp_axis(grid: np.ndarray, n: int, cell: int, axis: int) -> np.ndarray:
  """Linear interpolation of `grid` along `axis` from a coarse step `cell` to n samples."""
  pos = np.arange(n, dtype=np.float32) / cell
  lo = pos.astype(np.int32)
  frac = pos - lo
  shape = [1, 1]
  shape[axis] = n
  frac = frac.reshape(shape)
  return np.take(grid, lo, axis) * (1 - frac) + np.take(grid, lo + 1, axis) * frac


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
  """Zero-mean, unit-ish random texture with features about `cell` pixels wide."""
  grid = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
  # Bilinear upsampling is separable: rows of the small grid first, then the columns.
  return _lerp_axis(_lerp_axis(grid, height, cell, 0), width, cell, 1)


def _soft(inside: np.ndarray, edge_px: float) -> np.ndarray:
  """Partial-volume edge: 1 deep inside (inside > 0), 0 outside, ramp `edge_px` wide."""
  return np.clip(inside / edge_px + 0.5, 0.0, 1.0)


def _box(y: np.ndarray, x: np.ndarray, centre: np.ndarray, c: float, h: float, hw: float,
         max_slope: float, edge: float):
  """Row/column slices that hold an element centred at `c` along the column, or None."""
  reach = h + hw * max_slope + 2 * edge
  rows = np.flatnonzero(np.abs(y[:, 0] - c) < reach)
  if rows.size == 0:
    return None
  cs = centre[rows, 0]
  lo, hi = cs.min() - 1.5 * hw - 2 * edge, cs.max() + 1.5 * hw + 2 * edge
  cols = np.flatnonzero((x[0] > lo) & (x[0] < hi))
  if cols.size == 0:
    return None
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def render(anatomy: Anatomy, height: int, width: int, textures: tuple,
           lr_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Renders the noise-free intensity (about 0..1) and the labels of one sagittal slice.

  Args:
    anatomy: the spine to draw.
    height, width: slice size in pixels; spacing is the field of view divided by these.
    textures: three float32 [height, width] smooth noise fields (marrow, soft tissue, fat).
    lr_mm: left-right distance of the slice from the mid-sagittal plane.

  Returns:
    (image float32 [height, width], labels uint8 [height, width]).
  """
  a = anatomy
  sy, sx = a.height_mm / height, a.width_mm / width
  edge = 1.2 * max(sy, sx)  # mm over which an edge blurs: about one pixel
  y = ((np.arange(height, dtype=np.float32) + 0.5) * sy)[:, None]
  x = ((np.arange(width, dtype=np.float32) + 0.5) * sx)[None, :]
  ym = a.height_mm / 2
  centre = a.x0 + a.tilt * (y - ym) + a.curvature * (y - ym) ** 2
  slope = a.tilt + 2 * a.curvature * (y - ym)
  norm = np.sqrt(1 + slope ** 2)
  t = (x - centre) / norm            # across the column, + posterior
  s = y + (x - centre) * slope / norm  # along the column, + inferior
  marrow, tissue, fat_tex = textures

  # Soft tissue between the belly outline and the skin, then fat under the posterior skin.
  inside_body = _soft(np.minimum(x - a.front_x, a.skin_x - x), edge)
  img = inside_body * (0.24 + 0.07 * tissue)
  fat = _soft(x - (a.skin_x - a.fat_mm), edge) * inside_body
  img = img * (1 - fat) + fat * (0.7 + 0.06 * fat_tex)
  labels = np.zeros((height, width), np.uint8)

  # Left-right position shrinks the elliptic cross-sections of bodies and canal.
  k_body = np.sqrt(max(0.0, 1 - (lr_mm / a.lr_body) ** 2))
  k_canal = np.sqrt(max(0.0, 1 - (lr_mm / a.lr_canal) ** 2))
  back = max(b[2] for b in a.bodies)
  if k_canal > 0:
    lo = back + a.canal_gap
    width_c = a.canal_width * k_canal
    canal = _soft(np.minimum(t - lo, lo + width_c - t), edge)
    img = img * (1 - canal) + canal * 0.95
    cord = _soft(np.minimum(np.minimum(t - lo - 0.25 * width_c, lo + 0.75 * width_c - t),
                            a.cord_end_y - s), edge) * canal
    img = img * (1 - cord) + cord * 0.45
    # Laminae and spinous processes: darker blobs behind the canal at each level.
    post = _soft(np.minimum(t - (lo + width_c + 1.5), lo + width_c + 40.0 - t), edge)
    phase = np.cos(np.pi * s / max(1.0, 2 * a.bodies[0][1] + 10.0)) ** 2
    img = img * (1 - 0.4 * post * phase)
  if k_body < 0.25:
    return img.astype(np.float32), labels
  # Discs first, then bodies over them: a disc shows only in the gap between two bodies.
  # Each is drawn inside its bounding box only, which keeps a 256^2 slice at a few ms.
  max_slope = float(np.abs(slope).max())
  for (c0, h0, w0), (c1, h1, w1), bright in zip(a.bodies, a.bodies[1:], a.disc_brightness):
    gap_c, gap_h = (c0 + h0 + c1 - h1) / 2, (c1 - h1 - c0 - h0) / 2 + 1.5
    hw = 0.97 * min(w0, w1) * k_body
    box = _box(y, x, centre, gap_c, gap_h, hw, max_slope, edge)
    if box is None:
      continue
    f = np.abs((s[box] - gap_c) / gap_h) ** 2 + np.abs(t[box] / hw) ** 4
    soft = _soft((1 - f) * min(gap_h, hw), edge)
    nucleus = np.clip(1.6 - 1.6 * f, 0, 1)  # the annulus rim is darker than the nucleus
    img[box] = img[box] * (1 - soft) + soft * bright * (0.55 + 0.45 * nucleus)
    labels[box][f < 1] = LABEL_DISC
  for c, h, w in a.bodies:
    hw = w * k_body
    box = _box(y, x, centre, c, h, hw, max_slope, edge)
    if box is None:
      continue
    f = np.abs((s[box] - c) / h) ** 6 + np.abs(t[box] / hw) ** 6
    soft = _soft((1 - f) * min(h, hw) / 6, edge)
    cortex = np.clip((f - 0.65) * 4, 0, 1)  # dark cortical rim and endplates
    value = (a.body_brightness + 0.06 * marrow[box]) * (1 - 0.55 * cortex)
    img[box] = img[box] * (1 - soft) + soft * value
    labels[box][f < 1] = LABEL_VERTEBRA
  return img.astype(np.float32), labels


def _bias_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Smooth multiplicative field: coil falloff (posterior brighter) plus slow waves."""
  yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
  xx = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
  log = rng.uniform(0.0, 0.35) * xx + rng.uniform(-0.15, 0.15) * yy
  log = log + rng.uniform(-0.15, 0.15) * np.cos(np.pi * (xx * rng.uniform(0.3, 1) + yy))
  return np.exp(log)


def _finish(rng: np.random.Generator, clean: np.ndarray, bias: np.ndarray,
            dtype: type) -> np.ndarray:
  """Bias field, Rician noise and quantization to an integer type with a random scale."""
  sigma = rng.uniform(0.015, 0.05)
  n1 = rng.standard_normal(clean.shape, dtype=np.float32)
  n2 = rng.standard_normal(clean.shape, dtype=np.float32)
  x = np.sqrt((clean * bias + sigma * n1) ** 2 + (sigma * n2) ** 2)
  top = 255.0 if dtype == np.uint8 else 65535.0
  scale = rng.uniform(160.0, 250.0) if dtype == np.uint8 else rng.uniform(600.0, 4000.0)
  return np.clip(np.rint(x * scale), 0, top).astype(dtype)


def _textures(rng: np.random.Generator, height: int, width: int) -> tuple:
  cell = max(2, min(height, width) // 40)
  return tuple(smooth_noise(rng, height, width, c) for c in (cell, 3 * cell, 2 * cell))


def make_slice(rng: np.random.Generator, height: int = 256, width: int = 256,
               dtype: type = np.uint8) -> tuple[np.ndarray, np.ndarray]:
  """One mid-sagittal-ish slice in display orientation.

  Args:
    rng: the source of all randomness (same state -> same slice).
    height, width: size in pixels; pixels are square, the field of view 170-260 mm tall.
    dtype: np.uint8 or np.uint16 intensities.

  Returns:
    (image dtype [height, width], mask uint8 [height, width] with values in {0, 1, 2}).
  """
  fov = rng.uniform(170.0, 260.0)
  spacing = fov / height
  anatomy = sample_anatomy(rng, fov, spacing * width)
  clean, labels = render(anatomy, height, width, _textures(rng, height, width),
                         lr_mm=rng.uniform(-5.0, 5.0))
  return _finish(rng, clean, _bias_field(rng, height, width), dtype), labels


def _display_affine(spacing_lr: float, spacing_row: float, spacing_col: float,
                    shape: tuple, rng: np.random.Generator) -> np.ndarray:
  """Affine of a display-ordered stack [lr (L->R), row (S->I), col (A->P)], slightly oblique."""
  axes = np.array([[spacing_lr, 0, 0], [0, 0, -spacing_row], [0, -spacing_col, 0]]).T
  angle = np.deg2rad(rng.uniform(-6.0, 6.0))  # a few degrees about the left-right axis
  rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                  [0, np.sin(angle), np.cos(angle)]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ axes
  # Put the world origin near the middle of the volume, as scanners roughly do.
  affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2) + rng.uniform(-20, 20, 3)
  return affine


def make_volume(rng: np.random.Generator, height: int = 160, width: int = 160,
                num_slices: int = 16, orientation: str = "RAS",
                dtype: type = np.uint16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A sagittal stack whose slices look like `make_slice`, stored in `orientation`.

  Args:
    rng: the source of all randomness.
    height, width: in-plane size of each sagittal slice (rows S->I, columns A->P).
    num_slices: number of sagittal slices (left -> right), 2.5-4 mm apart.
    orientation: nibabel axis codes of the stored array, e.g. "RAS" or "IPR".
    dtype: np.uint8 or np.uint16 intensities.

  Returns:
    (volume dtype [3D], labels uint8 [same shape], affine float64 [4, 4]) with
    `nibabel.aff2axcodes(affine) == tuple(orientation)`.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  fov = rng.uniform(170.0, 260.0)
  spacing = fov / height
  thickness = rng.uniform(2.5, 4.0)
  anatomy = sample_anatomy(rng, fov, spacing * width)
  tex_a = _textures(rng, height, width)
  tex_b = _textures(rng, height, width)
  bias = _bias_field(rng, height, width)
  images, masks = [], []
  for i in range(num_slices):
    lr = (i - (num_slices - 1) / 2) * thickness
    # Texture drifts slowly across slices instead of jumping: a rotation between two fields.
    phi = 0.5 * np.pi * i / max(1, num_slices - 1)
    tex = tuple(np.cos(phi) * p + np.sin(phi) * q for p, q in zip(tex_a, tex_b))
    clean, labels = render(anatomy, height, width, tex, lr_mm=lr)
    images.append(clean)
    masks.append(labels)
  volume = _finish(rng, np.stack(images), bias[None], dtype)
  labels = np.stack(masks)
  affine = _display_affine(thickness, spacing, spacing, volume.shape, rng)
  # Reorder the display stack into the requested storage order, keeping the world frame.
  start = nib.orientations.io_orientation(affine)
  transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(
      tuple(orientation)))
  shape = volume.shape
  volume = nib.orientations.apply_orientation(volume, transform)
  labels = nib.orientations.apply_orientation(labels, transform)
  affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
  return np.ascontiguousarray(volume), np.ascontiguousarray(labels), affine


# ----------------------------------------------------------------------------- datasets

def _prepare_output(out_dir: pathlib.Path, overwrite: bool) -> None:
  """Refuses a non-empty `out_dir` unless `overwrite`; then clears only what we write."""
  if out_dir.exists() and any(out_dir.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite)")
    for sub in ("images", "masks"):
      fileio.remove_tree(out_dir / sub)
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  (out_dir / "masks").mkdir(parents=True, exist_ok=True)


def _write_info(out_dir: pathlib.Path, info: dict) -> None:
  fileio.write_text_atomic(out_dir / "phantom.json", json.dumps(info))


def case_id(index: int) -> str:
  # Not "phantom_0000": readers take a NIfTI "X_0000" as channel 0 of case X (nnU-Net).
  return f"phantom-{index:04d}"


def write_2d_dataset(out_dir: str | os.PathLike, num_cases: int, seed: int = 0, *,
                     bit_depth: int = 8, min_size: int = 192, max_size: int = 320,
                     overwrite: bool = False) -> list[str]:
  """Writes `images/<id>.png` + `masks/<id>.npy` pairs of one slice each.

  Image sizes vary per case (multiples of 16 in [min_size, max_size], not always square).
  Case i depends only on (seed, i), so a larger dataset extends a smaller one.

  Args:
    out_dir: output folder (created).
    num_cases: number of slices.
    seed: base seed.
    bit_depth: 8 or 16 (PNG sample depth).
    min_size, max_size: range of image heights and widths in pixels.
    overwrite: allow a non-empty `out_dir` (its images/ and masks/ are replaced).

  Returns:
    The case ids written.

  Raises:
    FileExistsError: `out_dir` is not empty and not `overwrite`.
    ValueError: a bad argument.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if bit_depth not in (8, 16):
    raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
  if num_cases < 1 or not 16 <= min_size <= max_size or -(-min_size // 16) * 16 > max_size:
    raise ValueError(f"need num_cases >= 1 and 16 <= min_size <= max_size with a multiple "
                     f"of 16 between them, got "
                     f"{num_cases}, {min_size}, {max_size}")
  out = fileio.path(out_dir)
  _prepare_output(out, overwrite)
  dtype = np.uint8 if bit_depth == 8 else np.uint16
  ids = []
  for i in range(num_cases):
    rng = np.random.default_rng([seed, i])
    h, w = (int(v) * 16 for v in rng.integers(-(-min_size // 16), max_size // 16 + 1, 2))
    image, mask = make_slice(rng, h, w, dtype)
    cid = case_id(i)
    fileio.atomic_write(out / "images" / f"{cid}.png",
                        lambda p, im=image: Image.fromarray(im).save(p, format="PNG"))
    fileio.atomic_write(out / "masks" / f"{cid}.npy", lambda p, m=mask: np.save(p, m))
    ids.append(cid)
  _write_info(out, {"format": "2d", "num_cases": num_cases, "seed": seed,
                    "bit_depth": bit_depth, "labels": {"0": "background", "1": "disc",
                                                       "2": "vertebra"}})
  return ids


def write_3d_dataset(out_dir: str | os.PathLike, num_cases: int, seed: int = 0, *,
                     size: int = 128, num_slices: int = 16,
                     overwrite: bool = False) -> list[str]:
  """Writes `images/<id>.nii.gz` + `masks/<id>.nii.gz` volume pairs.

  Orientation alternates RAS / IPR (scanner order) by case; the intensity type alternates
  uint16 / uint8; in-plane sizes vary around `size`.

  Args:
    out_dir: output folder (created).
    num_cases: number of volumes.
    seed: base seed.
    size: nominal in-plane size in pixels (each side varies by up to -25%..+25%).
    num_slices: sagittal slices per volume.
    overwrite: allow a non-empty `out_dir` (its images/ and masks/ are replaced).

  Returns:
    The case ids written.

  Raises:
    FileExistsError: `out_dir` is not empty and not `overwrite`.
    ValueError: a bad argument.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  if num_cases < 1 or size < 16 or num_slices < 1:
    raise ValueError(f"need num_cases >= 1, size >= 16, num_slices >= 1, got "
                     f"{num_cases}, {size}, {num_slices}")
  out = fileio.path(out_dir)
  _prepare_output(out, overwrite)
  ids = []
  for i in range(num_cases):
    rng = np.random.default_rng([seed, i, 3])
    h, w = (int(round(size * f / 8)) * 8 for f in rng.uniform(0.75, 1.25, 2))
    orientation = ORIENTATIONS_3D[i % len(ORIENTATIONS_3D)]
    dtype = np.uint16 if i % 2 == 0 else np.uint8
    volume, labels, affine = make_volume(rng, h, w, num_slices, orientation, dtype)
    cid = case_id(i)
    for sub, data in (("images", volume), ("masks", labels)):
      img = nib.Nifti1Image(data, affine)
      img.header.set_xyzt_units("mm")
      img.set_qform(affine, code=1)
      img.set_sform(affine, code=1)
      fileio.atomic_write(out / sub / f"{cid}.nii.gz", lambda p, im=img: nib.save(im, p))
    ids.append(cid)
  _write_info(out, {"format": "3d", "num_cases": num_cases, "seed": seed, "size": size,
                    "num_slices": num_slices, "orientations": list(ORIENTATIONS_3D),
                    "labels": {"0": "background", "1": "disc", "2": "vertebra"}})
  return ids


# ----------------------------------------------------------------------------- CLI
# Flags are defined only when run as a program: tests and the converter import this module
# next to binaries that define --output_dir/--seed/--overwrite too, and absl flags are global.

def _define_flags() -> dict:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return {
      "output_dir": flags.DEFINE_string("output_dir", None, required=True,
                                        help="Folder to write images/ and masks/ into."),
      "format": flags.DEFINE_enum("format", "2d", ["2d", "3d"],
                                  help="2d: PNG + .npy slices; 3d: NIfTI volume pairs."),
      "num_cases": flags.DEFINE_integer("num_cases", 20, lower_bound=1,
                                        help="Number of cases (slices or volumes)."),
      "seed": flags.DEFINE_integer("seed", 0, help="Seed; the same seed writes the same files."),
      "bit_depth": flags.DEFINE_enum("bit_depth", "8", ["8", "16"],
                                     help="2d only: PNG sample depth."),
      "min_size": flags.DEFINE_integer("min_size", 192, help="2d only: smallest image side."),
      "max_size": flags.DEFINE_integer("max_size", 320, help="2d only: largest image side."),
      "size": flags.DEFINE_integer("size", 128, help="3d only: nominal in-plane size."),
      "num_slices": flags.DEFINE_integer("num_slices", 16, lower_bound=1,
                                         help="3d only: sagittal slices per volume."),
      "overwrite": flags.DEFINE_bool("overwrite", False,
                                     help="Replace images/ and masks/ of a non-empty folder."),
  }


def main(argv, holders: dict) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from data_prep import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  v = {k: h.value for k, h in holders.items()}
  try:
    if v["format"] == "2d":
      ids = write_2d_dataset(v["output_dir"], v["num_cases"], v["seed"],
                             bit_depth=int(v["bit_depth"]), min_size=v["min_size"],
                             max_size=v["max_size"], overwrite=v["overwrite"])
    else:
      ids = write_3d_dataset(v["output_dir"], v["num_cases"], v["seed"], size=v["size"],
                             num_slices=v["num_slices"], overwrite=v["overwrite"])
  except (OSError, ValueError) as e:  # FileExistsError (not empty) is an OSError
    cli.fail(str(e))
  print(f"wrote {len(ids)} {v['format']} cases to {v['output_dir']}/images and "
        f"{v['output_dir']}/masks")


def run() -> None:
  from data_prep import cli  # pylint: disable=g-import-not-at-top
  holders = _define_flags()
  cli.run(lambda argv: main(argv, holders))  # --help lists the flags defined above


if __name__ == "__main__":
  run()
