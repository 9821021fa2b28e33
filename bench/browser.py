"""Headless Chromium (Debian packages ``chromium`` and ``chromium-driver``) for the live-page benchmark and tests.

Only loopback is used: no background networking, no component updates, no sync, a fresh profile.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
MISSING = "chromium/chromium-driver missing (apt-get install chromium chromium-driver)"


def _first(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if Path(p).exists()), None) or shutil.which(name)


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when either is not installed."""
    browser = _first(CHROMIUM_CANDIDATES, "chromium")
    driver = _first(DRIVER_CANDIDATES, "chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(profile_dir: Path, width: int = 1400, height: int = 1000, *, browser_log: bool = False,
             page_load_timeout_s: float = 30) -> Iterator[Any]:
    """A headless Chromium driven by chromedriver; ``browser_log`` keeps the console for ``get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    found = find_chromium()
    if found is None:
        raise RuntimeError(MISSING)
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if browser_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        yield driver
    finally:
        driver.quit()
