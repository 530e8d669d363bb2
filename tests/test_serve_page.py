"""The page of `hyimage serve` in headless Chromium (the system's `chromium`, driven by Playwright).

The worker is held at the second denoising step until the page shows "step 1 of 2", so the progress is seen
for certain; then the image must appear in the gallery with its settings and a PNG download carrying the
metadata. The screenshot is saved in the test's folder, and in $HYIMAGE_TEST_ARTIFACTS when set.
"""

import base64
import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.serve import (  # noqa: F401, F811 (fixtures used by name)
    VARIANT,
    InProcessServer,
    inprocess_server,
    serve_tree,
    tiny_pipe,
)

playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 120_000


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_page_generates_an_image_with_progress_into_the_gallery(
    inprocess_server: InProcessServer, tmp_path: Path
) -> None:
    worker = inprocess_server.worker
    progress_seen = threading.Event()
    worker.step_hook = lambda jobs, step: progress_seen.wait(120) if step == 1 else None
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 520})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(inprocess_server.url)
            assert page.text_content("#model") == VARIANT
            assert page.get_attribute("#steps", "placeholder") == "8"  # the distilled model's default
            page.fill("#prompt", "a red fox in the snow")
            page.fill("#width", "128")
            page.fill("#height", "96")
            page.fill("#steps", "2")
            page.fill("#seed", "11")
            page.click("#generate")
            page.wait_for_selector("#progress >> text=step 1 of 2")
            progress_seen.set()
            page.wait_for_selector("#gallery figure img")
            page.wait_for_selector("#progress >> text=done")
            assert page.eval_on_selector("#gallery figure img", "img => [img.naturalWidth, img.naturalHeight]") == [
                128, 96]
            caption = page.text_content("#gallery figcaption")
            assert "a red fox in the snow" in caption and "seed 11" in caption and "128x96" in caption
            link = page.query_selector("#gallery figure a[download]")
            assert link.get_attribute("download") == "hyimage-11.png"
            href = link.get_attribute("href")
            png = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
            settings = json.loads(png.text["hyimage"])
            assert settings["seed"] == 11 and settings["steps"] == 2 and settings["prompt"] == "a red fox in the snow"
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        worker.step_hook = None
        progress_seen.set()
    artifacts = os.environ.get("HYIMAGE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    assert Image.open(shot).size == (900, 520)
