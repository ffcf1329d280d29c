"""Opens an HTML file from disk in headless Chromium: console errors, broken images, screenshot.

The check behind the report tests (spine-inspect; spine-predict --report), also a tool:

  .venv/bin/python tests/page_check.py /tmp/spine2d_report/index.html \
      --screenshot=/tmp/report.png

It drives Debian's `chromium` through `chromedriver` (packages chromium and
chromium-driver) with selenium, offline: the browser is told to refuse every network
request, so a page that needs the network shows up as broken. A page passes when the
browser logged no error (failed resource loads included) and every <img> decoded.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys

# Where Debian puts them; PATH is searched first.
_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_DRIVERS = ("chromedriver",)
_DEBIAN_DRIVER = "/usr/bin/chromedriver"


@dataclasses.dataclass
class PageCheck:
  """What the browser saw on one page."""
  console_errors: list[str]  # SEVERE log entries: JS errors, failed loads
  images: int  # <img> elements
  broken_images: list[str]  # src of those that did not decode
  title: str

  @property
  def ok(self) -> bool:
    return not self.console_errors and not self.broken_images


def find_browser() -> tuple[str, str] | None:
  """(chromium binary, chromedriver binary), or None when either is absent."""
  browser = next((shutil.which(b) for b in _BROWSERS if shutil.which(b)), None)
  driver = next((shutil.which(d) for d in _DRIVERS if shutil.which(d)), None)
  if driver is None and pathlib.Path(_DEBIAN_DRIVER).is_file():
    driver = _DEBIAN_DRIVER
  if browser is None or driver is None:
    return None
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  return browser, driver


def missing_reason() -> str:
  """Why `find_browser` finds nothing (for a test's skip message)."""
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return "selenium is not installed (pip install -e '.[test]')"
  return ("no chromium/chromedriver on PATH (Debian: apt-get install chromium "
          "chromium-driver)")


def check_page(html: str | pathlib.Path, *, screenshot: str | pathlib.Path | None = None,
               width: int = 1280, height: int = 900, full_page: bool = True) -> PageCheck:
  """Loads `html` (a file) in headless Chromium and reports what went wrong.

  Args:
    html: path of the page.
    screenshot: save a PNG of the page here (optional).
    width, height: window size; with `full_page` the height grows to the whole page.
    full_page: screenshot the whole page rather than the first screen.

  Raises:
    RuntimeError: no browser or driver (see `missing_reason`).
    FileNotFoundError: no such page.
  """
  found = find_browser()
  if found is None:
    raise RuntimeError(missing_reason())
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  page = pathlib.Path(html).resolve()
  if not page.is_file():
    raise FileNotFoundError(f"{page}: no such page")
  browser, driver_path = found
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars",
              # Offline: any network request fails (and is logged as an error).
              "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
  try:
    # Returns once the load event fired: every image has loaded or failed by then.
    driver.get(page.as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), "
        "i.complete && i.naturalWidth > 0]);")
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    if screenshot is not None:
      if full_page:
        total = driver.execute_script(
            "return Math.max(document.body.scrollHeight, "
            "document.documentElement.scrollHeight);")
        driver.set_window_size(width, min(int(total) + 20, 16000))
      driver.save_screenshot(str(screenshot))
    return PageCheck(errors, len(images), [src for src, ok in images if not ok],
                     driver.title)
  finally:
    driver.quit()


def main(argv: list[str]) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html")
  parser.add_argument("--screenshot", default=None)
  parser.add_argument("--width", type=int, default=1280)
  args = parser.parse_args(argv[1:])
  try:
    result = check_page(args.html, screenshot=args.screenshot, width=args.width)
  except (RuntimeError, FileNotFoundError) as e:
    print(f"page_check: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.html}: title {result.title!r}, {result.images} images, "
        f"{len(result.broken_images)} broken, {len(result.console_errors)} console errors")
  for src in result.broken_images:
    print(f"  broken image: {src}")
  for message in result.console_errors:
    print(f"  console error: {message}")
  return 0 if result.ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
