"""search.py serve end to end in a real headless browser: `search.py serve` in its own process, Debian's Chromium
driven by Playwright. CI installs the browser (.ci/run); elsewhere the test is skipped with the package to
install, and under CI=true a missing browser is a failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

import search
from conftest import ROOT, free_port
from test_search import copy_videos, index_args, save_model

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install Debian's Chromium to run it: sudo apt-get install chromium"


def browser_path() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        message = f"no Chromium on this machine ({', '.join(BROWSERS)} not on PATH); {INSTALL_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {message} (.ci/run installs it)")
        pytest.skip(message)
    return found


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"search.py serve exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "api/info", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"search.py serve did not answer on {url} within {timeout:.0f} s")


def test_a_query_typed_in_the_page_shows_the_top_video_and_plays_it(tmp_path, synthetic_root):
    chromium = browser_path()
    from playwright.sync_api import sync_playwright

    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    copy_videos(synthetic_root, videos, 6)
    ckpt = save_model(tmp_path / "dual.pth", "simvtp_dual_tiny_patch16", 7)
    search.main(index_args(videos, ckpt, out))
    query = "a large blue ball moves up on a green background"
    expected = search.Searcher(str(out)).search(query, k=3)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, str(ROOT / "search.py"), "serve", str(out), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('6 videos')")
            page.fill("#q", query)
            page.press("#q", "Enter")
            page.wait_for_selector(".hit")
            shown = page.eval_on_selector_all(".hit", "rows => rows.map(r => r.dataset.id)")
            assert shown[:3] == [h.id for h in expected]
            assert page.inner_text(".hit .path") == expected[0].path
            page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.naturalWidth > 0)")

            page.click(".hit")
            page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=20000)
            state = page.evaluate("(() => { const v = document.getElementById('video');"
                                  " return [v.currentSrc, v.videoWidth, v.duration]; })()")
            assert state[0] == f"{url}video/{expected[0].id}" and state[1] == 64 and state[2] == pytest.approx(2.0)
            page.screenshot(path=str(tmp_path / "search_page.png"))

            refused = page.evaluate("fetch('/video/..%2F..%2Fmanifest.json').then(r => r.status)")
            assert refused == 404
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (tmp_path / "search_page.png").stat().st_size > 0
