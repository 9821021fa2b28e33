"""Headless Chromium for the live-page tests: the benchmark's launcher (bench/browser.py), loopback only."""

from __future__ import annotations

from bench.browser import chromium, find_chromium

__all__ = ["chromium", "find_chromium"]
