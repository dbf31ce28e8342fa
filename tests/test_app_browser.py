"""`melfusion app` driven in a real browser: headless Chromium from Debian's packages through Playwright.

The test starts the app on a free local port (the `melfusion app` command itself), uploads a picture, types a
prompt, presses Generate, waits for the audio, downloads it through the page's download button and checks the
WAV (and that it is the library's own output for the same inputs and seed); then uploads a text file renamed
.png and checks the page shows the error. `make test` installs Debian's chromium when it can; without it (or
without playwright or gradio) the test is skipped with the reason, which `-rs` prints.

Screenshots: with MELFUSION_SCREENSHOTS=docs/images the app's picture in docs/app.md is rewritten:
``MELFUSION_SCREENSHOTS=docs/images .venv/bin/python -m pytest -q tests/test_app_browser.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
BLUE = ROOT / "examples" / "images" / "blue-bright.png"
MELFUSION = Path(sys.executable).with_name("melfusion")
# the flags this machine's closed network needs (no background connections, no sandbox as root)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = os.environ.get("MELFUSION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("browser test: no Chromium (Debian package 'chromium'; `make test` installs it where apt-get "
                    "works, or set MELFUSION_CHROMIUM)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    pytest.importorskip("gradio", reason="browser test: melfusion[app] (gradio) is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(MELFUSION), "app", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"melfusion app exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"melfusion app did not answer within 180 s: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(app_url):
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test: playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(120_000)
        page.goto(app_url)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def _screenshot(page, name: str, tmp_path: Path, full_page: bool = True) -> Path:
    folder = Path(os.environ.get("MELFUSION_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def test_generate_in_the_browser(page, tmp_path):
    page.locator("#image input[type=file]").set_input_files(str(BLUE))
    page.locator("#text textarea").fill("a calm flute melody")
    page.locator("#generate").click()
    link = page.locator("#audio a[download]")
    link.wait_for(state="attached")
    assert link.get_attribute("href").endswith(".wav")
    page.wait_for_function("document.querySelector('#info textarea')?.value.includes('16000 Hz')")
    with page.expect_download() as info:
        link.click()
    wav = tmp_path / "downloaded.wav"
    info.value.save_as(wav)
    with sf.SoundFile(wav) as f:  # a valid WAV: the header parses and the length is the model's clip
        assert f.format == "WAV" and f.samplerate == 16000 and f.channels == 1
        assert abs(f.frames / f.samplerate - 2.56) < 0.02
        samples = f.read(dtype="int16")
    assert np.abs(samples).max() > 100  # music, not silence
    shot = _screenshot(page, "app.png", tmp_path)
    assert shot.stat().st_size > 10_000

    # what the page played is the library's own output for the same inputs and the app's default settings
    from melfusion import MelFusion

    ref = MelFusion.from_pretrained("mini").generate(image=str(BLUE), text="a calm flute melody", seed=0,
                                                     progress=False)
    ref_path = ref.save(tmp_path / "library.wav")[0]
    np.testing.assert_array_equal(samples, sf.read(ref_path, dtype="int16")[0])


def test_a_text_file_named_png_shows_an_error(page, tmp_path):
    fake = tmp_path / "not-a-picture.png"
    fake.write_text("this is a text file, not a picture\n")
    page.locator("#image button[aria-label='Clear']").click() if page.locator(
        "#image button[aria-label='Clear']").count() else None
    page.locator("#image input[type=file]").set_input_files(str(fake))
    page.locator("#text textarea").fill("a calm flute melody")
    page.locator("#generate").click()
    toast = page.get_by_text("cannot read", exact=False).first
    toast.wait_for(state="visible")
    assert "not-a-picture.png" in toast.inner_text() or "not-a-picture.png" in page.content()
    assert "Traceback" not in page.content()
    page.wait_for_timeout(1500)  # the toast fades in
    _screenshot(page, "app-error.png", tmp_path, full_page=False)  # the message is a toast over the page
