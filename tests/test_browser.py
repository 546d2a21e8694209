"""The studio in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright.

It draws a box on the trajectory canvas, moves the γ slider and sees the preview change, renders on the embedded
toy-world model, finds the <video> element playing and the trajectory preview redrawn over the render. A
screenshot of the page is kept as a test artifact (pytest's tmp dir, and out/studio-browser.png);
SHOT_STUDIO_SCREENSHOT=path also copies it there (the README's docs/studio.png is made that way).
`.ci/browser-deps.sh` installs Chromium; without it this test is skipped.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from studio import ui

CHROMIUM = os.environ.get("SHOT_STUDIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run .ci/browser-deps.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage",
                                                               "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def studio_url(manager, free_port):
    demo = ui.build_app(manager)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ui.output_dir())])
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _set_number(page, label: str, value):
    box = page.locator(f"input[type=number][aria-label='number input for {label}']")
    box.fill(str(value))
    box.press("Enter")


def _open_studio(browser, studio_url):
    """A new page on the studio, its canvas drawn; the page's JavaScript errors collect in the list returned."""
    page = browser.new_page(viewport={"width": 1500, "height": 1150})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(studio_url)
    page.wait_for_selector("#canvas canvas", timeout=60_000)
    return page, errors


def _render_video(page, status: str):
    """Click Render, wait for the video, check the status line names `status`; the <video> locator and its first
    loaded state {t: currentTime, d: duration}."""
    page.locator("#render").click()
    video = page.locator("#video video")
    _wait(lambda: video.count() and video.get_attribute("src"), 240, "the rendered video")
    assert status in page.locator("#status").inner_text()
    state = _wait(lambda: video.evaluate("v => v.readyState >= 2 && v.duration > 0 && "
                                         "{t: v.currentTime, d: v.duration}"), 30, "the video to load")
    return video, state


def test_draw_a_box_move_gamma_render_and_play(browser, studio_url, tmp_path):
    page, errors = _open_studio(browser, studio_url)
    keyframes = page.get_by_text("1: yellow star:", exact=False)
    _wait(lambda: "keyframes 0, 7" in keyframes.inner_text(), 30, "the opening shot's keyframes")

    # 1. a box dragged on keyframe 3 of the trajectory canvas becomes the subject's keyframe 3
    _set_number(page, "keyframe", 3)
    time.sleep(1.0)  # the canvas reloads for frame 3
    page.get_by_title("Create box (C)").click()
    c = page.locator("#canvas canvas").bounding_box()
    x0, y0 = c["x"] + 0.45 * c["width"], c["y"] + 0.3 * c["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 13):
        page.mouse.move(x0 + k * 0.025 * c["width"], y0 + k * 0.03 * c["height"])
    page.mouse.up()
    _wait(lambda: "keyframes 0, 3, 7" in keyframes.inner_text(), 30, "keyframe 3 from the drawn box")

    # 2. the γ slider moves and the covariance heat map changes
    page.get_by_role("tab", name="Noise").click()
    heat = page.locator("#gamma-heat img")
    _wait(lambda: heat.count() and heat.get_attribute("src"), 30, "the γ heat map")
    before = heat.get_attribute("src")
    track = page.locator("#gamma input[type=range]")
    r = track.bounding_box()
    page.mouse.click(r["x"] + 0.85 * r["width"], r["y"] + r["height"] / 2)
    _wait(lambda: heat.get_attribute("src") != before, 30, "the heat map to follow the slider")
    gamma = float(page.locator("input[type=number][aria-label='number input for noise correlation γ']")
                  .input_value())
    assert gamma > 0.6

    # 3. render on the embedded model (few steps) and find the video playing
    page.get_by_role("tab", name="Trajectory").click()
    _set_number(page, "steps", 4)
    track_gif = page.locator("#track-gif img")
    before_render = track_gif.get_attribute("src")
    video, state = _render_video(page, "frames 32×32 on toyworld")
    _wait(lambda: video.evaluate("v => v.currentTime") != state["t"], 30, "the video to play")
    assert state["d"] == pytest.approx(1.0, abs=0.15)  # 8 frames at 8 fps
    # the previews follow the render (once): the interpolated boxes now over the rendered first frame
    _wait(lambda: track_gif.get_attribute("src") != before_render, 30, "the trajectory preview after the render")
    time.sleep(0.5)

    shot = tmp_path / "studio.png"
    page.screenshot(path=str(shot), full_page=True)
    (ROOT / "out").mkdir(exist_ok=True)
    shutil.copyfile(shot, ROOT / "out" / "studio-browser.png")
    if os.environ.get("SHOT_STUDIO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SHOT_STUDIO_SCREENSHOT"])

    # 4. the render is in this session's history, and loads back into the form
    _set_number(page, "steps", 9)
    page.get_by_role("tab", name="History").click()
    _wait(lambda: "a yellow star moving right on sky" in page.locator("#history-table").inner_text(), 30,
          "the render in the history")
    page.get_by_role("button", name="Load this render's shot").click()
    _wait(lambda: page.locator("input[type=number][aria-label='number input for steps']").input_value() == "4", 30,
          "the history's steps back in the form")
    assert not errors, errors
    page.close()


def _slider_value(page, label: str) -> float:
    return float(page.locator(f"input[type=number][aria-label='number input for {label}']").input_value())


def test_frames_and_size_sliders_snap_to_a_wan_models_values(browser, studio_url):
    """Picking a Wan preset gives the frames slider the model's grid (4k+1) and the size sliders its multiple;
    values typed into their boxes move to the nearest valid one, and dragging lands on valid values only. The γ
    preview's caption follows the model's latent frames. No weights load: nothing renders."""
    page, errors = _open_studio(browser, studio_url)
    model = page.get_by_label("model preset")
    model.click()
    page.get_by_role("option", name="wan2.1-t2v-1.3b", exact=True).click()
    _wait(lambda: _slider_value(page, "frames") == 81 and _slider_value(page, "width") == 832, 30,
          "the Wan preset's defaults in the form")
    step = page.locator("#frames input[type=range]")
    _wait(lambda: step.get_attribute("step") == "4", 30, "the frames slider's step of 4")
    assert page.locator("#width input[type=range]").get_attribute("step") == "16"
    for typed, snapped in ((80, 81), (78, 77), (2, 1), (200, 161)):  # 200: under the slider, over the model
        _set_number(page, "frames", typed)
        _wait(lambda: _slider_value(page, "frames") == snapped, 30, f"frames {typed} to snap to {snapped}")
    _set_number(page, "width", 840)
    _wait(lambda: _slider_value(page, "width") == 848, 30, "width 840 to snap to 848 (a tie goes up)")
    _set_number(page, "height", 470)
    _wait(lambda: _slider_value(page, "height") == 464, 30, "height 470 to snap to 464")
    r = step.bounding_box()  # drag the slider: wherever it stops, the value is 4k+1
    for x in (0.23, 0.61):
        page.mouse.click(r["x"] + x * r["width"], r["y"] + r["height"] / 2)
        time.sleep(0.5)
        assert (_slider_value(page, "frames") - 1) % 4 == 0, _slider_value(page, "frames")
    page.get_by_role("tab", name="Noise").click()
    _set_number(page, "frames", 17)
    caption = page.locator("#gamma-caption")
    _wait(lambda: "17 frames = 5 latent frames" in caption.inner_text(), 30, "the γ caption for 5 latent frames")
    # back on a UNet model every frame count is valid again
    model.click()
    page.get_by_role("option", name="toyworld", exact=True).click()
    _wait(lambda: step.get_attribute("step") == "1" and _slider_value(page, "frames") == 8, 30,
          "the toy model's frames slider")
    _set_number(page, "frames", 10)
    time.sleep(1.0)
    assert _slider_value(page, "frames") == 10
    assert not errors, errors
    page.close()


def test_render_on_the_toy_wan(browser, studio_url):
    """The toy Wan is a model of the page: picked in the model menu, its defaults (9 frames of 32×32) fill the form,
    and a render on it, the opening shot's box track included (boxes go through Wan's attn2), plays 9 frames at
    8 fps."""
    page, errors = _open_studio(browser, studio_url)
    keyframes = page.get_by_text("1: yellow star:", exact=False)
    _wait(lambda: "keyframes 0, 7" in keyframes.inner_text(), 30, "the opening shot's keyframes")
    page.get_by_label("model preset").click()
    page.get_by_role("option", name="toyworld-wan", exact=True).click()
    _wait(lambda: _slider_value(page, "frames") == 9 and _slider_value(page, "width") == 32, 30,
          "the toy Wan's defaults in the form")
    _set_number(page, "steps", 4)
    video, state = _render_video(page, "9 frames 32×32 on toyworld-wan")
    assert state["d"] == pytest.approx(9 / 8, abs=0.15)  # 9 frames at 8 fps
    assert not errors, errors
    page.close()
