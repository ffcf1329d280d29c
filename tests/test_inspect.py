"""spine-inspect: the QC report of a converted dataset, its page builder and browser check.

References are independent of the report code: the converter's dataset.json (its own
pixel counts, kept and pruned slices), hand-made masks for the outlines, and a real
headless Chromium for the page (skipped only when chromium/chromedriver are absent).
"""
import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

import page_check
from data_prep import html_report, inspect_lib, manifest, overlay, phantom, schema, writer

SIZE = 32
REPO = pathlib.Path(__file__).resolve().parents[1]


def _convert(src, out, **kwargs):
  options = writer.ConvertOptions(image_size=SIZE, num_workers=1, val_fraction=0.3,
                                  **kwargs)
  return writer.convert_dataset(str(src / "images"), str(src / "masks"), str(out), options,
                                progress=False)


@pytest.fixture(scope="module")
def data_2d(tmp_path_factory):
  """6 phantom slices of 32..80 px (non-square: padded), one blank slice (pruned), one
  image without a mask (skipped file)."""
  root = tmp_path_factory.mktemp("inspect2d")
  src = root / "src"
  phantom.write_2d_dataset(src, 6, min_size=32, max_size=80)
  Image.fromarray(np.full((40, 24), 90, np.uint8)).save(src / "images" / "blank.png")
  np.save(src / "masks" / "blank.npy", np.zeros((40, 24), np.int64))
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "images" / "orphan.png")
  _convert(src, root / "tfr")
  return root / "tfr"


@pytest.fixture(scope="module")
def data_3d(tmp_path_factory):
  root = tmp_path_factory.mktemp("inspect3d")
  phantom.write_3d_dataset(root / "src", 2, size=32, num_slices=6)
  _convert(root / "src", root / "tfr")
  return root / "tfr"


def _summary(report):
  return json.loads((report / inspect_lib.SUMMARY).read_text())


def _grid_shape(n, tile=SIZE, columns=inspect_lib.MOSAIC_COLUMNS, gap=4, band=14):
  cols = min(columns, n)
  rows = -(-n // cols)
  return gap + rows * (tile + band + gap), gap + cols * (tile + gap)


# ------------------------------------------------------------------------ the report

def test_report_tables_and_mosaics_match_the_manifest(data_2d, tmp_path):
  m = manifest.load(data_2d)
  report = tmp_path / "report"
  result = inspect_lib.write_report(data_2d, report)
  assert sorted(p.name for p in report.iterdir()) == sorted(result["files"])
  summary = _summary(report)
  page = (report / "index.html").read_text()

  kept = {c["id"]: len(c["slices_kept"]) for c in m.cases}
  assert sum(kept.values()) == m.totals["slices_written"] == 6
  rows = {r["case"]: r for r in summary["cases"]}
  assert {k: r["slices kept"] for k, r in rows.items()} == kept
  pruned = m.skipped_slices
  assert [(p["case_id"], p["reason"]) for p in pruned] == [
      ("blank", "missing label(s) [1, 2] (disc, vertebra); present [0]")]
  assert rows["blank"]["pruned"] == 1 and rows["blank"]["stored mean"] is None
  assert any("orphan.png" in f["path"] for f in m.skipped_files)
  for text in [c["id"] for c in m.cases] + [p["reason"] for p in pruned] + [
      html_report.escape(f["reason"]) for f in m.skipped_files]:
    assert text in page

  # The shards' pixels against the converter's own counts (which call padding background).
  for split in ("train", "val"):
    ids = [c["id"] for c in m.cases if c["split"] == split and c["slices_kept"]]
    px = [summary["pixels"][i] for i in ids]
    counts = m.raw["class_pixel_counts"][split]
    assert sum(p["classes"][1] for p in px) == counts[1] > 0
    assert sum(p["classes"][2] for p in px) == counts[2] > 0
    assert sum(p["classes"][0] + p["padding"] for p in px) == counts[0]
  assert sum(p["padding"] for p in summary["pixels"].values()) > 0  # non-square inputs

  # One tile per case with kept slices, on one PNG per split, in a grid of that size.
  for split in ("train", "val"):
    n = m.num_cases(split)
    (entry,) = summary["mosaics"][split]
    assert len(entry["tiles"]) == n
    png = np.asarray(Image.open(report / entry["file"]))
    assert png.shape == _grid_shape(n) + (3,)
    assert f'src="{entry["file"]}"' in page
  assert result["tiles"] == m.totals["cases_converted"]


def test_all_slices_and_split_mosaics(data_3d, tmp_path):
  m = manifest.load(data_3d)
  total = m.totals["slices_written"]
  assert total == 12
  report = tmp_path / "all"
  result = inspect_lib.write_report(data_3d, report, all_slices=True, max_tiles_per_mosaic=4)
  assert result["tiles"] == total
  mosaics = _summary(report)["mosaics"]
  for split in ("train", "val"):
    n = m.num_slices(split)
    assert [len(e["tiles"]) for e in mosaics[split]] == [4] * (n // 4) + (
        [n % 4] if n % 4 else [])
    assert all((report / e["file"]).is_file() for e in mosaics[split])
  # Default: the middle kept slice of each case.
  report = tmp_path / "one"
  inspect_lib.write_report(data_3d, report)
  for c in m.cases:
    kept = sorted(c["slices_kept"])
    assert [c["id"], kept[len(kept) // 2]] in _summary(report)["mosaics"][c["split"]][0][
        "tiles"]


def test_existing_output_refused_then_replaced(data_2d, tmp_path):
  report = tmp_path / "report"
  inspect_lib.write_report(data_2d, report)
  (report / "marker").write_text("old")
  with pytest.raises(FileExistsError, match="--overwrite"):
    inspect_lib.write_report(data_2d, report)
  assert (report / "marker").is_file()
  inspect_lib.write_report(data_2d, report, overwrite=True)
  assert not (report / "marker").exists() and (report / "index.html").is_file()
  # A folder that is not a report is never replaced, not even with overwrite.
  other = tmp_path / "home"
  other.mkdir()
  (other / "thesis.tex").write_text("precious")
  with pytest.raises(FileExistsError, match="not a spineseg report"):
    inspect_lib.write_report(data_2d, other, overwrite=True)
  assert (other / "thesis.tex").read_text() == "precious"
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _run_binary(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "data_prep.inspect_data", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


def _error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("spine-inspect: error:")]
  assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, \
      proc.stderr
  return lines[0]


def test_binary_writes_the_report_and_refuses_bad_input(data_2d, tmp_path):
  report = tmp_path / "report"
  proc = _run_binary(f"--data_dir={data_2d}", f"--output={report}")
  assert proc.returncode == 0, proc.stderr
  assert f"{report}/index.html" in proc.stdout
  assert "--overwrite" in _error_line(_run_binary(f"--data_dir={data_2d}",
                                                  f"--output={report}"))
  assert "dataset.json" in _error_line(_run_binary(f"--data_dir={tmp_path}",
                                                   f"--output={tmp_path / 'r2'}"))
  # A truncated shard: the error names it.
  broken = tmp_path / "broken"
  broken.mkdir()
  for p in data_2d.iterdir():
    (broken / p.name).write_bytes(p.read_bytes())
  shard = broken / pathlib.Path(manifest.load(data_2d).files("train")[0]).name
  shard.write_bytes(shard.read_bytes()[:-100])
  line = _error_line(_run_binary(f"--data_dir={broken}", f"--output={tmp_path / 'r3'}"))
  assert str(shard) in line and "corrupt or truncated" in line
  assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


# ------------------------------------------------------------------------ the browser

def _browser_or_skip():
  if page_check.find_browser() is None:
    pytest.skip(page_check.missing_reason())


def test_report_renders_in_headless_chromium(data_2d, tmp_path):
  _browser_or_skip()
  report = tmp_path / "report"
  inspect_lib.write_report(data_2d, report)
  shot = tmp_path / "shot.png"
  result = page_check.check_page(report / "index.html", screenshot=shot)
  assert result.console_errors == [] and result.broken_images == []
  assert result.images == 2  # mosaic_train.png and mosaic_val.png
  assert result.title.startswith("spine-inspect")
  assert Image.open(shot).size[1] > 900  # the whole page, not only the first screen


@pytest.mark.parametrize("body, what", [
    ('<img src="missing.png" alt="x">', "broken"),
    ('<img src="https://example.com/x.png" alt="x">', "broken"),  # offline: no network
    ("<script>console.error('boom')</script>", "console"),
    ("<script>notDefined()</script>", "console"),
])
def test_page_check_fails_on_a_bad_page(tmp_path, body, what):
  _browser_or_skip()
  page = tmp_path / "bad.html"
  page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{body}"
                  "</body></html>")
  result = page_check.check_page(page)
  assert not result.ok
  if what == "broken":
    assert len(result.broken_images) == 1
  assert result.console_errors


# ------------------------------------------------------------------------ the pieces

def test_outline_rgb_draws_boundaries_and_stripes_padding():
  image = np.tile(np.linspace(0, 1, 12, dtype=np.float32), (12, 1))
  mask = np.zeros((12, 12), np.uint8)
  mask[2:7, 2:7] = 1           # a 5x5 disc: its 16 border pixels are the outline
  mask[:, 10:] = schema.IGNORE_LABEL
  image[:, 10:] = 0            # padding is black: darkening alone would not show it
  out = overlay.outline_rgb(image, mask)
  gray = np.round(overlay.grayscale(image)).astype(np.uint8)
  is_disc = (out == overlay.COLORS[1]).all(-1)
  ring = np.zeros_like(is_disc)
  ring[2:7, 2:7] = True
  ring[3:6, 3:6] = False
  np.testing.assert_array_equal(is_disc, ring)
  inside = (slice(0, 12), slice(0, 10))
  untouched = ~ring[inside]
  np.testing.assert_array_equal(out[inside][untouched][:, 0], gray[inside][untouched])
  pad = out[:, 10:]
  stripe = (pad == overlay.PADDING_STRIPE).all(-1)
  assert set(np.unique(pad[~stripe])) == {0} and 0.3 < stripe.mean() < 0.7


def test_tile_mosaic_places_tiles_row_by_row():
  tiles = [np.full((3, 2, 3), i, np.uint8) for i in range(1, 6)]
  grid = overlay.tile_mosaic(tiles, 2, gap=1, background=(255, 255, 255))
  assert grid.shape == (1 + 3 * 4, 1 + 2 * 3, 3)
  assert (grid[1:4, 1:3] == 1).all() and (grid[1:4, 4:6] == 2).all()
  assert (grid[9:12, 1:3] == 5).all() and (grid[9:12, 4:6] == 255).all()


def test_html_report_escapes_plots_and_refuses_outside_names(tmp_path):
  page = html_report.Page("a <b> & c")
  page.table(["k", "v"], [["<script>alert(1)</script>", 0.123456789]])
  page.image("mosaic.png", 'say "hi"')
  page.svg(html_report.line_plot({"a<": ([0, 1, 2], [0, 1, 0]), "b": ([0, 2], [1, 1])},
                                 "x", "y"))
  text = page.html()
  assert "<script>" not in text and "&lt;script&gt;" in text and "0.1235" in text
  assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
  svg = text[text.index("<svg"):text.index("</svg>") + 6]
  root = ET.fromstring(svg)  # well-formed XML
  assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
  for bad in ("../x.png", "/tmp/x.png", "https://x/y.png", "data:image/png;base64,AA"):
    with pytest.raises(ValueError, match="relative name"):
      page.image(bad, "x")
  with pytest.raises(ValueError, match="cells"):
    page.table(["a"], [[1, 2]])


def test_write_report_folder_is_all_or_nothing(tmp_path):
  out = tmp_path / "r"

  def fail(path):
    pathlib.Path(path).write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    html_report.write_report_folder(out, {"index.html": "<p>x</p>", "a.png": fail})
  assert list(tmp_path.iterdir()) == []  # no report, no hidden build left
  page = html_report.Page("t").html()
  html_report.write_report_folder(out, {"index.html": page, "a.txt": "1"})
  with pytest.raises(OSError, match="disk full"):
    html_report.write_report_folder(out, {"index.html": page, "b.png": fail},
                                    overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["a.txt", "index.html"]  # old kept
  assert (out / "a.txt").stat().st_mode & 0o777 == 0o644
  # The leftover of a killed run (a dead pid) is removed by the next run.
  dead = tmp_path / f"{html_report.fileio.TMP_PREFIX}999999999-new-r"
  dead.mkdir()
  html_report.write_report_folder(out, {"index.html": page}, overwrite=True)
  assert not dead.exists() and sorted(p.name for p in out.iterdir()) == ["index.html"]
  assert len(list(tmp_path.iterdir())) == 1
