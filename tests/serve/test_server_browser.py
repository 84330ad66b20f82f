"""The web page in a real headless browser: Debian's chromium driven by Playwright, its fake camera fed
from a .y4m made from assets/example.mp4. The page streams camera frames over the WebSocket, a question
typed in the page is answered in the page, and a screenshot is taken (kept in the test's temporary folder;
FLASH_VSTREAM_SCREENSHOT=docs/serving_page.png refreshes the one docs/serving.md shows).
chromium, ffmpeg and the playwright package must be installed: the test fails without them."""

import os
import subprocess

import pytest

from serve.test_server_support import RunningServer, need_tool

KEY = "browser-key-77"


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory, example_mp4):
    ffmpeg = need_tool("ffmpeg")
    path = str(tmp_path_factory.mktemp("camera") / "camera.y4m")
    subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-ss", "4", "-t", "6", "-i", example_mp4,
                    "-vf", "scale=320:240,fps=10", "-pix_fmt", "yuv420p", path], check=True, timeout=120)
    return path


@pytest.mark.slow
def test_page_streams_the_camera_and_answers_a_question(tiny_model_dir, fake_camera, tmp_path):
    chromium = need_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is needed (pip install playwright; the browser is Debian's chromium, "
                    "so no `playwright install`)")
    server = RunningServer(tiny_model_dir, "--max-tokens", 64, key=KEY, log_dir=tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={fake_camera}"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.fill("#fps", "2")
            page.click("#start-camera")
            # frames arrive over the WebSocket at 2 fps; the status line is refreshed every second
            page.wait_for_function("Number(document.querySelector('#status').dataset.framesSeen || 0) >= 3",
                                   timeout=60000)
            page.fill("#question", "What is happening in the video?")
            page.click("#ask-button")
            answer = page.locator("#answers li.done").first
            answer.wait_for(timeout=60000)
            assert "error" not in (answer.get_attribute("class") or "")
            meta = answer.locator(".meta").inner_text()
            assert "at stream time" in meta and "frames seen" in meta
            assert answer.locator(".a").inner_text().strip()  # the tiny model's (random) answer
            page.wait_for_timeout(1500)  # one more timeline redraw
            screenshot = os.environ.get("FLASH_VSTREAM_SCREENSHOT") or str(tmp_path / "serving_page.png")
            page.screenshot(path=screenshot, full_page=True)
            assert os.path.getsize(screenshot) > 10_000
            sessions = server.get("/v1/sessions").json()["data"]
            assert len(sessions) == 1 and sessions[0]["frames_seen"] >= 3
            page.click("#stop")  # session.close: the server deletes the session
            page.wait_for_timeout(500)
            assert server.get("/v1/sessions").json()["data"] == []
            browser.close()
    finally:
        server.stop()
    assert KEY not in server.log()  # the page passed it as ?api_key= on the WebSocket
