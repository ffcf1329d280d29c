"""THE overlay renderer: a slice with its labels tinted, for predict, TensorBoard and QC.

One colour per class (background untinted), one contrast stretch (P0.5..P99.5 of the
slice), one blend; `spine-predict --overlay` and the trainer's TensorBoard images use it.
Pixels labelled `schema.IGNORE_LABEL` (padding, unknown) are drawn darkened.
"""
from __future__ import annotations

import numpy as np

from data_prep import schema

# RGB per class id: disc orange, vertebra blue (distinguishable with red-green blindness).
COLORS = {1: (255, 160, 0), 2: (0, 140, 255)}
ALPHA = 0.45


def grayscale(image: np.ndarray) -> np.ndarray:
  """float [H, W] -> float32 [H, W] in 0..255, stretched between P0.5 and P99.5."""
  image = np.asarray(image, dtype=np.float32)
  lo, hi = np.percentile(image, (0.5, 99.5))
  return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255.0


def overlay_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the slice (contrast-stretched) with labels tinted.

  Args:
    image: [H, W] intensities (raw or normalized).
    mask: [H, W] class ids of the same shape.
  """
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.shape != mask.shape:
    raise ValueError(f"overlay: image {image.shape} and mask {mask.shape} differ in shape")
  rgb = np.repeat(grayscale(image)[..., None], 3, axis=-1)
  for label, color in COLORS.items():
    sel = mask == label
    rgb[sel] = (1 - ALPHA) * rgb[sel] + ALPHA * np.asarray(color, np.float32)
  rgb[mask == schema.IGNORE_LABEL] *= 0.5
  return np.round(rgb).astype(np.uint8)


def side_by_side(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """uint8 [H, 3W, 3]: the slice | truth overlay | prediction overlay."""
  gray = np.round(np.repeat(grayscale(image)[..., None], 3, axis=-1)).astype(np.uint8)
  return np.concatenate([gray, overlay_rgb(image, truth), overlay_rgb(image, prediction)],
                        axis=1)


# Padding / IGNORE_LABEL in outline views: darkened like `overlay_rgb`, plus grey diagonal
# stripes, so that it shows even where the slice itself is black.
PADDING_STRIPE = (90, 90, 90)


def outline_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the slice (contrast-stretched) with each class's OUTLINE.

  The boundary pixels of each class in `COLORS` (pixels of the class with a 4-neighbour
  of another value) are drawn in its colour; the anatomy inside stays visible, which a
  tint hides. Pixels labelled `schema.IGNORE_LABEL` (the padding around a fitted slice)
  are darkened and striped. Set labels (unknown classes) are drawn as plain image.

  Args:
    image: [H, W] intensities (raw or normalized).
    mask: [H, W] class ids of the same shape.
  """
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.shape != mask.shape or image.ndim != 2:
    raise ValueError(f"outline: expected a 2D image and mask of one shape, found image "
                     f"{image.shape} and mask {mask.shape}")
  rgb = np.repeat(grayscale(image)[..., None], 3, axis=-1)
  pad = mask == schema.IGNORE_LABEL
  rows, cols = np.indices(mask.shape)
  stripes = pad & ((rows + cols) // 4 % 2 == 0)
  rgb[pad] *= 0.5
  rgb[stripes] = np.maximum(rgb[stripes], np.asarray(PADDING_STRIPE, np.float32))
  # A pixel differs from a neighbour: compare with the four shifted copies (edge-padded,
  # so the image border itself is no boundary).
  padded = np.pad(mask, 1, mode="edge")
  h, w = mask.shape
  differs = np.zeros(mask.shape, bool)
  for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
    differs |= padded[dr:dr + h, dc:dc + w] != mask
  for label, color in COLORS.items():
    rgb[(mask == label) & differs] = color
  return np.round(rgb).astype(np.uint8)


def tile_mosaic(tiles: list[np.ndarray], columns: int, *, gap: int = 4,
                captions: list[str] | None = None, caption_height: int = 14,
                background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """uint8 RGB: tiles of one shape in a grid, row by row, with a gap (and captions).

  Args:
    tiles: uint8 [H, W, 3] arrays of one shape.
    columns: tiles per row (fewer if there are fewer tiles).
    gap: pixels between tiles and around the grid.
    captions: one text per tile, written under it (cut to the tile's width).
    caption_height: pixels of the band under each tile that holds its caption.
    background: colour of the gaps.

  Raises:
    ValueError: no tiles, tiles of different shapes, or a caption count that differs.
  """
  if not tiles:
    raise ValueError("mosaic: no tiles")
  shape = tiles[0].shape
  if any(t.shape != shape for t in tiles) or len(shape) != 3 or shape[2] != 3:
    raise ValueError(f"mosaic: tiles must be RGB of one shape, found "
                     f"{sorted({t.shape for t in tiles})}")
  if captions is not None and len(captions) != len(tiles):
    raise ValueError(f"mosaic: {len(captions)} captions for {len(tiles)} tiles")
  h, w = shape[:2]
  band = caption_height if captions is not None else 0
  columns = max(1, min(columns, len(tiles)))
  rows = -(-len(tiles) // columns)
  out = np.empty((gap + rows * (h + band + gap), gap + columns * (w + gap), 3), np.uint8)
  out[:] = background
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    y, x = gap + r * (h + band + gap), gap + c * (w + gap)
    out[y:y + h, x:x + w] = tile
  if captions is not None:
    from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(caption_height - 3, 6))
    for i, text in enumerate(captions):
      r, c = divmod(i, columns)
      y, x = gap + r * (h + band + gap) + h, gap + c * (w + gap)
      while text and draw.textlength(text, font=font) > w:
        text = text[:-1]
      draw.text((x + 1, y + 1), text, fill=(0, 0, 0), font=font)
    out = np.asarray(canvas)
  return out
