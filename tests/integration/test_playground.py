"""The playground page in a real headless Chromium, against the real service.

The browser is Debian's `chromium` (or the one `CHROMIUM` names), driven by Playwright; no
browser is downloaded. Without one this module is skipped, except in CI (`CI` set), where a
missing browser is a failure. `UPDATE_SCREENSHOT=1` rewrites the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ray import serve

from serve_app import build_app

pytestmark = pytest.mark.integration

ARGS = {
    "models": [{"id": "tiny-sd3", "device": "cpu", "default_size": "64x64", "default_steps": 4}],
    "limits": {"max_steps": 50},
}
SCREENSHOT = Path(__file__).parents[2] / "deployments" / "ingress" / "playground" / "screenshot.png"
# As the environment notes say: no sandbox as root, and no background traffic on a closed net.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if path is None:
        message = "no Chromium: install Debian's `chromium` or set CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def page_url(serve_url):
    serve.run(build_app(ARGS), name="playground", route_prefix="/playground-test")
    yield f"{serve_url}/playground-test/"
    serve.delete("playground")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, page_url):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(page_url)
    yield page
    page.close()


# Records what the page shows over time: each image's classes (preview, then final) and
# each status line, so the test sees the progress it could not catch by polling.
RECORD_CHANGES = """() => {
  window.seen = { classes: [], status: [] };
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.target.tagName === 'IMG' && change.attributeName === 'class')
        window.seen.classes.push(change.target.className);
    }
    window.seen.status.push(document.getElementById('status').textContent);
  }).observe(document.body,
             { subtree: true, attributes: true, childList: true, characterData: true });
}"""


def test_type_a_prompt_generate_and_see_the_images(page):
    page.wait_for_selector("#model option[value='tiny-sd3']", state="attached")
    page.fill("#prompt", "A lighthouse on a cliff at dusk, oil painting")
    page.fill("#size", "128x128")
    page.fill("#n", "2")
    page.fill("#num_inference_steps", "40")
    page.fill("#seed", "7")
    page.fill("#partial_images", "3")
    page.evaluate(RECORD_CHANGES)
    page.click("#generate")

    page.wait_for_function(
        "document.querySelectorAll('#gallery img.final').length === 2 && [...document"
        ".querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)",
        timeout=60_000,
    )
    sizes = page.eval_on_selector_all(
        "#gallery img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[128, 128], [128, 128]]
    assert "Done: 2 image(s)" in page.inner_text("#status")
    assert page.is_hidden("#videos")  # this service serves no video
    assert page.is_hidden("#error")
    captions = page.eval_on_selector_all("figcaption", "c => c.map(e => e.textContent)")
    assert "seed 7" in captions[0] and "seed 8" in captions[1]
    seen = page.evaluate("window.seen")
    assert "preview" in seen["classes"], "previews were shown before the final images"
    assert any(s.startswith("Denoising: step") for s in seen["status"]), "progress was shown"

    if os.environ.get("UPDATE_SCREENSHOT"):
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_errors_are_shown_in_words(page):
    page.wait_for_selector("#model option[value='tiny-sd3']", state="attached")
    page.fill("#prompt", "a fox")
    page.fill("#size", "33x33")
    page.click("#generate")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "Invalid value for 'size'" in error.inner_text()
    assert page.locator("#gallery img").count() == 0

    page.fill("#size", "auto")
    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('prompt')")
