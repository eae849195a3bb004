"""The page at ``/`` in a real headless Chromium (Debian's, driven by Playwright) against
``hiseg serve`` started as a user would: upload a photo, see the overlay, switch levels."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from live_server import free_port

CHROMIUM = Path("/usr/bin/chromium")
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    port = free_port()
    command = [sys.executable, "-m", "hiseg", "serve", "--port", str(port), "--long-side", "256"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    json.loads(r.read())
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"hiseg serve did not start:\n{output}")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def canvas_png(page) -> str:
    return page.eval_on_selector("#canvas", "c => c.toDataURL('image/png')")


def share_of_color(page, color: list[int]) -> float:
    """The share of canvas pixels of exactly ``color``."""
    return page.eval_on_selector(
        "#canvas",
        """(c, rgb) => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4)
                if (d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2]) n++;
            return n / (c.width * c.height);
        }""",
        color,
    )


def test_upload_overlay_levels_and_opacity_in_chromium(server, browser, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    page.wait_for_selector("#model option[value='pascal-person-part']", state="attached")
    page.set_input_files("#file", str(PHOTO))
    page.wait_for_selector("body[data-ready='true']", timeout=60_000)
    page.screenshot(path=str(tmp_path / "parts.png"), full_page=True)
    assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [512, 512]
    assert page.eval_on_selector("#canvas", "c => c.dataset.level") == "2"  # the parts first
    legend = page.inner_text("#legend")
    assert "head" in legend and "torso" in legend
    parts = canvas_png(page)

    page.check("#levels input[data-level='0']")
    assert page.eval_on_selector("#canvas", "c => c.dataset.level") == "0"
    assert canvas_png(page) != parts, "switching to level 0 did not change the picture"
    assert "body" in page.inner_text("#legend") and "head" not in page.inner_text("#legend")
    page.screenshot(path=str(tmp_path / "body.png"), full_page=True)

    # Fully opaque, the body's pixels take the body's colour: their share is the API's share.
    page.fill("#opacity", "100")
    page.dispatch_event("#opacity", "input")
    answer = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"{server}/v1/segment?levels=0", data=PHOTO.read_bytes()),
            timeout=60,
        ).read()
    )
    level = answer["levels"][0]
    body = next(node for node in level["nodes"] if node["name"] == "body")
    assert level["share"]["body"] > 0.1
    assert share_of_color(page, body["color"]) == pytest.approx(level["share"]["body"], abs=0.01)

    page.fill("#opacity", "0")
    page.dispatch_event("#opacity", "input")
    assert share_of_color(page, body["color"]) < 0.01  # the photo alone

    links = page.eval_on_selector_all("#downloads a", "as => as.map(a => a.download)")
    assert {"level0.png", "level2.png", "level2_colour.png"} <= set(links)
    assert (tmp_path / "parts.png").stat().st_size > 10_000
    assert errors == []
