"""THE small HTML page builder of spineseg's reports (spine-inspect; spine-predict next).

A report is a folder: `index.html` plus the files it shows (PNGs referenced by relative
name). The page needs no server, no network and no JavaScript: one inline style sheet,
tables, images beside it, plots as inline SVG. Everything put on the page is escaped here.

  page = html_report.Page("QC of /tmp/spine2d_tfr")
  page.heading("Splits")
  page.table(["split", "cases"], [["train", 7], ["val", 3]])
  page.image("mosaic_train.png", "train slices")
  page.svg(html_report.line_plot({"case 0": ([0, 1], [2, 3])}, "x", "y"))
  html_report.write_report_folder("/tmp/report", {"index.html": page.html()},
                                  overwrite=False)

`write_report_folder` builds the folder under a hidden sibling name and renames it into
place at the end: a killed run never leaves a half report that looks complete.
"""
from __future__ import annotations

import html
import math
import os
import pathlib
import re
from typing import Callable, Mapping, Sequence

from data_prep import fileio

# Marks a page written here: `--overwrite` replaces only a folder whose index.html has it.
GENERATOR = "spineseg html_report"
INDEX = "index.html"

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.6em;
  border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
div.scroll { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 2px 0; }
img.figure { max-width: 100%; height: auto; border: 1px solid #ccc; }
figure { margin: 0.5em 0 1.2em; } figcaption { color: #555; font-size: 0.9em; }
.note { color: #555; } .warn { color: #a40000; font-weight: 600; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888;
          vertical-align: middle; margin: 0 0.3em 0 0.8em; }
svg text { font: 11px system-ui, sans-serif; fill: #222; }
"""

# Line colours of `line_plot` (Tableau 10), cycled.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")


def escape(value) -> str:
  """Text (any value, via str) safe inside HTML elements and quoted attributes."""
  return html.escape(str(value), quote=True)


def format_value(value, digits: int = 4) -> str:
  """A table cell's text: floats to `digits` significant digits, None as an empty cell."""
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value) or math.isinf(value):
      return str(value)
    return f"{value:.{digits}g}"
  return str(value)


def check_relative_name(name: str) -> str:
  """Returns `name` if it is a plain relative path inside the report folder.

  Raises:
    ValueError: an absolute path, a URL, `..`, or a backslash (the page must open from
      disk wherever the folder is moved, and never reach the network).
  """
  if (not name or name.startswith("/") or "\\" in name or re.match(r"^[a-zA-Z][\w+.-]*:", name)
      or ".." in pathlib.PurePosixPath(name).parts):
    raise ValueError(f"report file name {name!r}: expected a relative name inside the "
                     "report folder (no /, .., or URL scheme at its start)")
  return name


class Page:
  """An HTML page built in order: headings, paragraphs, tables, images, inline SVG."""

  def __init__(self, title: str):
    self.title = title
    self._parts: list[str] = [f"<h1>{escape(title)}</h1>"]

  def heading(self, text: str, level: int = 2, anchor: str | None = None) -> None:
    """An <h2> (or `level`) heading, with an id for links when `anchor` is given."""
    if not 1 <= level <= 6:
      raise ValueError(f"heading level {level}: expected 1..6")
    ident = f' id="{escape(anchor)}"' if anchor else ""
    self._parts.append(f"<h{level}{ident}>{escape(text)}</h{level}>")

  def paragraph(self, text: str, css_class: str | None = None) -> None:
    """A paragraph of plain (escaped) text; css_class "note" (grey) or "warn" (red)."""
    cls = f' class="{escape(css_class)}"' if css_class else ""
    self._parts.append(f"<p{cls}>{escape(text)}</p>")

  def legend(self, items: Sequence[tuple[str, str]]) -> None:
    """A row of colour swatches: (CSS colour, label) pairs."""
    spans = "".join(f'<span class="swatch" style="background:{escape(c)}"></span>'
                    f"{escape(label)}" for c, label in items)
    self._parts.append(f"<p>{spans}</p>")

  def table(self, header: Sequence[str], rows: Sequence[Sequence], *,
            caption: str | None = None, digits: int = 4) -> None:
    """A table; numbers are right-aligned and floats shown with `digits` digits.

    Raises:
      ValueError: a row whose length differs from the header's.
    """
    out = ['<div class="scroll"><table>']
    if caption:
      out.append(f"<caption>{escape(caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
      if len(row) != len(header):
        raise ValueError(f"table row {list(row)!r} has {len(row)} cells, the header "
                         f"{len(header)}")
      cells = []
      for v in row:
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        cls = ' class="num"' if numeric else ""
        cells.append(f"<td{cls}>{escape(format_value(v, digits))}</td>")
      out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    self._parts.append("\n".join(out))

  def image(self, name: str, alt: str, caption: str | None = None) -> None:
    """An image file of the report folder, referenced by its relative `name`."""
    check_relative_name(name)
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    self._parts.append(f'<figure><a href="{escape(name)}"><img class="figure" '
                       f'src="{escape(name)}" alt="{escape(alt)}"></a>{cap}</figure>')

  def svg(self, markup: str, caption: str | None = None) -> None:
    """Inline SVG markup (from `line_plot`; trusted, not escaped)."""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    self._parts.append(f"<figure>{markup}{cap}</figure>")

  def html(self) -> str:
    """The whole document: UTF-8, one inline style sheet, no script, no external URL."""
    body = "\n".join(self._parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta name="generator" content="{GENERATOR}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi]."""
  if not hi > lo:
    return [lo]
  raw = (hi - lo) / count
  step = 10 ** math.floor(math.log10(raw))
  for m in (1, 2, 5, 10):
    if m * step >= raw:
      step *= m
      break
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], x_label: str,
              y_label: str, *, width: int = 900, height: int = 360,
              legend_columns: int = 4) -> str:
  """Inline SVG of one polyline per series, with axes, ticks and a legend below.

  Args:
    series: {name: (xs, ys)}, drawn in order, colours cycling through PALETTE.
    x_label, y_label: axis titles.
    width, height: size of the plot area's frame in pixels (the legend adds rows).
    legend_columns: legend entries per row.

  Returns:
    An `<svg>` element (no script, no external reference).
  """
  left, right, top, bottom = 60, 15, 10, 45
  xs_all = [float(x) for xs, _ in series.values() for x in xs]
  ys_all = [float(y) for _, ys in series.values() for y in ys]
  x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
  y1 = max(ys_all) if ys_all else 1.0
  y0 = min(0.0, min(ys_all)) if ys_all else 0.0
  x1 = x1 if x1 > x0 else x0 + 1.0
  y1 = y1 if y1 > y0 else y0 + 1.0
  pw, ph = width - left - right, height - top - bottom

  def px(x):
    return left + (x - x0) / (x1 - x0) * pw

  def py(y):
    return top + ph - (y - y0) / (y1 - y0) * ph

  rows = -(-len(series) // legend_columns)
  total_h = height + 18 * rows + 6
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
         f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{escape(y_label)} '
         f'against {escape(x_label)}">',
         f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
         'stroke="#888"/>']
  for t in _ticks(x0, x1):
    out.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" '
               f'y2="{top + ph + 4}" stroke="#888"/><text x="{px(t):.1f}" '
               f'y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
  for t in _ticks(y0, y1):
    out.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" '
               f'stroke="#eee"/><text x="{left - 6}" y="{py(t) + 4:.1f}" '
               f'text-anchor="end">{t:g}</text>')
  out.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 34}" '
             f'text-anchor="middle">{escape(x_label)}</text>')
  out.append(f'<text transform="translate(14 {top + ph / 2:.0f}) rotate(-90)" '
             f'text-anchor="middle">{escape(y_label)}</text>')
  col_w = width / legend_columns
  for i, (name, (xs, ys)) in enumerate(series.items()):
    color = PALETTE[i % len(PALETTE)]
    points = " ".join(f"{px(float(x)):.1f},{py(float(y)):.1f}" for x, y in zip(xs, ys))
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
               f'points="{points}"><title>{escape(name)}</title></polyline>')
    lx = 10 + (i % legend_columns) * col_w
    ly = height + 18 * (i // legend_columns) + 10
    out.append(f'<line x1="{lx:.0f}" y1="{ly}" x2="{lx + 18:.0f}" y2="{ly}" '
               f'stroke="{color}" stroke-width="3"/><text x="{lx + 24:.0f}" '
               f'y="{ly + 4}">{escape(name)}</text>')
  out.append("</svg>")
  return "\n".join(out)


def _is_report(folder: pathlib.Path) -> bool:
  index = folder / INDEX
  try:
    return index.is_file() and GENERATOR in index.read_text(errors="replace")[:2000]
  except OSError:
    return False


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_dead_builds(output: pathlib.Path) -> None:
  """Removes hidden siblings `TMP_PREFIX<pid>-<kind>-<name>` of runs that were killed."""
  pattern = re.compile(re.escape(fileio.TMP_PREFIX) + r"(\d+)-(new|old)-" +
                       re.escape(output.name) + "$")
  for p in output.parent.glob(f"{fileio.TMP_PREFIX}*-{output.name}"):
    m = pattern.match(p.name)
    if m and not _pid_alive(int(m.group(1))):
      fileio.remove_tree(p)


def check_output_folder(output: str | os.PathLike, overwrite: bool) -> bool:
  """Checks that a report may be written to `output` (call it early, before slow work).

  Returns:
    Whether an earlier report is there to be replaced.

  Raises:
    FileExistsError: `output` is a file, a non-empty folder without `overwrite`, or a
      non-empty folder that does not hold a report (refused even with `overwrite`).
  """
  out = fileio.path(output)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out}: is an existing file; expected a report folder (or a "
                          "path that does not exist yet)")
  replace = out.is_dir() and any(out.iterdir())
  if replace and not overwrite:
    raise FileExistsError(f"{out}: output folder exists and is not empty; pass --overwrite "
                          "to replace the report in it, or choose another folder")
  if replace and not _is_report(out):
    raise FileExistsError(f"{out}: holds files that are not a spineseg report (no "
                          f"{INDEX} written by one); refusing to replace it even with "
                          "--overwrite: choose another folder")
  return replace


def write_report_folder(output: str | os.PathLike,
                        files: Mapping[str, str | bytes | Callable[[str], None]], *,
                        overwrite: bool = False) -> pathlib.Path:
  """Writes a report folder all at once: built under a hidden sibling, then renamed.

  Args:
    output: the report folder; absent or empty, or (with `overwrite`) an earlier report.
    files: relative name -> content: text, bytes, or a function writing the file at the
      path it receives. One of them must be `index.html`.
    overwrite: replace an existing report (a folder whose index.html this module wrote;
      any other non-empty folder is refused even then, so a mistyped path loses nothing).

  Returns:
    `output` as a path.

  Raises:
    FileExistsError: `output` is a file, a non-empty folder without `overwrite`, or a
      folder that does not hold a report.
    ValueError: no index.html, or a file name outside the folder.
    OSError: the file system refuses (the sibling build is removed first).
  """
  # "." or "x/" have no usable name; a URL is absolute already.
  out = (fileio.path(output) if fileio.is_remote(output)
         else pathlib.Path(os.path.abspath(output)))
  if INDEX not in files:
    raise ValueError(f"{out}: a report needs {INDEX}; got {sorted(files)}")
  for name in files:
    check_relative_name(name)
  replace = check_output_folder(out, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  _remove_dead_builds(out)
  tmp = out.parent / f"{fileio.TMP_PREFIX}{os.getpid()}-new-{out.name}"
  old = out.parent / f"{fileio.TMP_PREFIX}{os.getpid()}-old-{out.name}"
  try:
    tmp.mkdir()
    # index.html last: even the hidden build has its page only when all else is there.
    for name in sorted(files, key=lambda n: n == INDEX):
      content = files[name]
      path = tmp / name
      path.parent.mkdir(parents=True, exist_ok=True)
      if callable(content):
        fileio.write_file(path, content)
      elif isinstance(content, bytes):
        path.write_bytes(content)
      else:
        path.write_text(content, encoding="utf-8")
    fileio.make_readable(tmp)
    if replace:
      fileio.rename(out, old)
    try:
      fileio.rename(tmp, out)  # also replaces an empty folder
    except OSError:
      if replace:
        fileio.rename(old, out)  # put the old report back
      raise
  finally:
    fileio.remove_tree(tmp)
    fileio.remove_tree(old)
  return out
