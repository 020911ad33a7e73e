"""The Gradio demo (``student_model_v2/demo_v2.py``) on the tiny random-init model.

Three layers: the widget-value helpers alone; the real ``gradio_client`` against the demo served by its own
command line in a subprocess (generation, drawn positions given as files, editing, teacher mode, and every
kind of bad input coming back as a clear message); and a headless Chromium that loads the page, fills a
prompt, clicks Run, waits for the gallery, saves a screenshot and checks the console and the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from student_model_v2 import demo_v2
from student_model_v2.data.glyph_render import GlyphFont
from student_model_v2.inference.inputs import InferenceInputError
from student_model_v2.inference.pipeline import TextRequest, build_conditioning
from student_model_v2.inference.revise_position import revised_line_mask

from .conftest import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SIZE = 128
BUNDLED_FONT = "NotoSansCJKsc-Regular-subset"
NO_MIMICS = {f"mimic_{k}": None for k in range(1, 6)}


# --------------------------------------------------------------------------------------------------
# widget values -> pipeline inputs


def _rgba_layer(boxes: list[tuple[int, int, int, int]], size: int = SIZE) -> np.ndarray:
    layer = np.zeros((size, size, 4), np.uint8)
    for x0, y0, x1, y1 in boxes:
        layer[y0:y1, x0:x1] = (0, 0, 0, 255)
    return layer


def test_drawn_mask_reads_brush_alpha_and_black_on_white_drawings():
    brush = _rgba_layer([(10, 10, 50, 30)])
    mask = demo_v2.drawn_mask({"background": None, "layers": [brush], "composite": None})
    assert mask.dtype == np.uint8 and mask[20, 20] == 255 and mask[60, 60] == 0 and mask.sum() == 255 * 40 * 20
    drawing = np.full((SIZE, SIZE, 4), 255, np.uint8)
    drawing[70:90, 20:100, :3] = 0
    mask = demo_v2.drawn_mask({"background": None, "layers": [brush, drawing], "composite": None})
    assert mask[80, 50] == 255 and mask[20, 20] == 255 and mask[50, 50] == 0
    assert demo_v2.drawn_mask({"background": None, "layers": [_rgba_layer([])], "composite": None}) is None
    assert demo_v2.drawn_mask(None) is None


@pytest.mark.parametrize("value, rgb", [
    ("#000000", None), ("#ffffff", None), ("rgba(255, 255, 255, 1)", None), (None, None),
    ("#ff0000", (255, 0, 0)), ("rgba(200, 30, 30, 1)", (200, 30, 30)), ("#fefefe", (254, 254, 254)),
])
def test_picker_colours(value, rgb):
    assert demo_v2.picked_color(value, 1) == rgb


def test_line_styles_map_fonts_and_drop_trailing_defaults():
    fonts = demo_v2.bundled_fonts()
    assert list(fonts) == [BUNDLED_FONT]
    styles = demo_v2.line_styles([BUNDLED_FONT, demo_v2.NO_FONT, demo_v2.NO_FONT, None, demo_v2.NO_FONT],
                                 ["#000000", "#00ff00", "#000000", "#000000", "#ffffff"], [None] * 5, fonts)
    assert len(styles) == 2
    assert styles[0].font == fonts[BUNDLED_FONT] and styles[0].color is None
    assert styles[1].font is None and styles[1].color == (0, 255, 0)
    image = np.full((64, 64, 4), 255, np.uint8)
    mimic = {"background": image, "layers": [_rgba_layer([(8, 8, 40, 30)], 64)], "composite": None}
    styles = demo_v2.line_styles([demo_v2.MIMIC_FONT], ["#000000"], [mimic], fonts)
    assert styles[0].mimic_image.shape == (64, 64, 3) and styles[0].mimic_mask[10, 10] == 255


@pytest.mark.parametrize("font, mimic, message", [
    ("Comic Sans", None, "unknown font 'Comic Sans'"),
    (demo_v2.MIMIC_FONT, None, "needs an image"),
])
def test_bad_line_styles(font, mimic, message):
    with pytest.raises(InferenceInputError, match=message):
        demo_v2.line_styles([font], ["#000000"], [mimic], demo_v2.bundled_fonts())


def test_lcm_rules_cfg_off_and_steps_4_to_8():
    options, notes = demo_v2.sampling_options("student", 20, 9.0, 0.5, 1.2, 0.8, 2, 7)
    assert (options.sampler, options.steps, options.guidance_scale, options.eta) == ("student", 8, 1.0, 0.0)
    assert (options.strength, options.attnx_scale, options.num_images, options.seed) == (1.2, 0.8, 2, 7)
    assert notes and "using 8 instead of 20" in notes[0]
    options, notes = demo_v2.sampling_options("student", 1, 7.5, 0.0, 1.0, 1.0, 1, -1)
    assert options.steps == 4 and notes
    options, notes = demo_v2.sampling_options("teacher", 30, 5.0, 0.3, 1.0, 1.0, 1, -1)
    assert (options.steps, options.guidance_scale, options.eta, notes) == (30, 5.0, 0.3, [])


def test_a_pcm_adapter_samples_exactly_its_phase_count():
    from student_model_v2.distillation.adapter_info import AdapterInfo

    info = AdapterInfo(version="v2_5", objective="pcm", num_inference_steps=50, lora_targets="attention",
                       lora_rank=4, lora_alpha=4, num_phases=2)
    options, notes = demo_v2.sampling_options("student", 6, 7.5, 0.3, 1.0, 1.0, 1, -1, info)
    assert (options.steps, options.guidance_scale, options.eta) == (2, 1.0, 0.0)
    assert notes and "exactly 2 steps" in notes[0] and "instead of 6" in notes[0]
    options, notes = demo_v2.sampling_options("student", 2, 7.5, 0.0, 1.0, 1.0, 1, -1, info)
    assert options.steps == 2 and not notes
    options, notes = demo_v2.sampling_options("teacher", 30, 5.0, 0.3, 1.0, 1.0, 1, -1, info)
    assert (options.steps, notes) == (30, [])


def test_revise_position_fits_the_drawn_box_to_the_glyphs():
    font = GlyphFont("font/NotoSansCJKsc-Regular-subset.otf")
    request = TextRequest(prompt='"HELLO"', positions=[[8, 8, 120, 100]], width=SIZE, height=SIZE)
    cond = build_conditioning(request, font)
    request.revise_position = True
    revised_cond = build_conditioning(request, font)
    drawn, revised = cond.positions[0], revised_cond.positions[0]
    assert revised_cond.warnings == []
    ink = cond.glyphs[0][0].amax(0) > 0
    assert revised.shape == drawn.shape and 0 < revised.sum() < drawn.sum()
    assert bool((revised[0, 0] > 0)[ink].all())  # the revised area still covers every glyph pixel
    assert torch.equal(revised_cond.hint, cond.hint)  # the repaint hint stays as drawn, as upstream
    assert torch.equal(revised_cond.glyphs[0], cond.glyphs[0])
    request.edit_image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    edit = build_conditioning(request, font)
    assert torch.equal(edit.positions[0], build_conditioning(replace(request, revise_position=False), font).positions[0])
    assert any("generation only" in w for w in edit.warnings)
    two_blobs = np.zeros((SIZE, SIZE), np.float32)
    two_blobs[10:20, 10:20] = two_blobs[100:110, 100:110] = 1
    assert revised_line_mask(two_blobs) is None


def test_brush_and_canvas_follow_the_size():
    assert [demo_v2.brush_size(s, s) for s in (64, 128, 512, 1024)] == [3, 5, 21, 43]
    update = demo_v2.position_canvas_update(512.0, 256.0)
    assert update["canvas_size"] == (512, 256) and update["value"]["background"].shape == (256, 512, 3)
    assert update["brush"].default_size == demo_v2.brush_size(512, 256) == 11
    photo = {"background": np.zeros((960, 1280, 3), np.uint8), "layers": [], "composite": None}
    assert demo_v2.edit_brush_update(photo)["brush"].default_size == demo_v2.brush_size(1280, 960) == 40
    assert "brush" not in demo_v2.edit_brush_update(None) and "brush" not in demo_v2.edit_brush_update(
        {"background": None, "layers": [], "composite": None})


def test_examples_are_valid_requests():
    fonts = demo_v2.bundled_fonts()
    gen_en, gen_zh, edit = demo_v2._examples(list(fonts))
    assert len(gen_en) == 3 and len(gen_zh) == 2 and len(edit) == 3
    glyph_font = GlyphFont("font/NotoSansCJKsc-Regular-subset.otf")
    for prompt, text, positions, width, height, order, font_1, font_2, color_1, color_2, _ in gen_en + gen_zh:
        styles = demo_v2.line_styles([font_1, font_2], [color_1, color_2], [None, None], fonts)
        ui = demo_v2.UiRequest("gen", prompt, text, positions, None, None, order, width, height, False, "", "")
        cond = build_conditioning(demo_v2.text_request(ui, styles)[0], glyph_font)
        assert cond.warnings == [] and len(cond.texts) == text.count('"') // 2
    for prompt, text, image, positions, _, _ in edit:
        editor = {"background": np.asarray(Image.open(image)), "layers": [], "composite": None}
        ui = demo_v2.UiRequest("edit", prompt, text, positions, None, editor, "↕", SIZE, SIZE, False, "", "")
        cond = build_conditioning(demo_v2.text_request(ui, [])[0], glyph_font)
        assert cond.mode == "edit" and cond.warnings == [] and (cond.width, cond.height) == (512, 512)


# --------------------------------------------------------------------------------------------------
# command line errors (before any model is loaded)


@pytest.mark.parametrize("argv, message", [
    (["--student_lora_path", "{tmp}"], "--student_lora_path {tmp}: not an adapter folder"),
    (["--student_lora_path", "{tmp}/none"], "--student_lora_path {tmp}/none: no such folder"),
    (["--model_path", "{tmp}/missing.ckpt"], "no such checkpoint file"),
    (["--image_size", "100"], "--image_size must be a multiple of 64"),
    (["--font_path", "{tmp}/none.ttf"], "no such font file"),
])
def test_cli_bad_arguments_are_one_error_line(tmp_path, capsys, argv, message):
    assert demo_v2.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_lora_is_merged_for_lcm_and_kept_apart_for_ddim(student_lora_dir):
    base = ["--student_lora_path", str(student_lora_dir), "--device", "cpu"]
    lcm = demo_v2.load_pipeline(demo_v2.build_parser().parse_args(base))
    assert lcm.has_lora and lcm.lora_merged and not lcm.can_sample_teacher
    ddim = demo_v2.load_pipeline(demo_v2.build_parser().parse_args([*base, "--use_ddim_sampler"]))
    assert ddim.has_lora and not ddim.lora_merged and ddim.can_sample_teacher


# --------------------------------------------------------------------------------------------------
# the served demo, driven by the real gradio_client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``python -m student_model_v2.demo_v2`` on the tiny config (its defaults: 128x128, 1 image)."""
    tmp = tmp_path_factory.mktemp("demo")
    port = _free_port()
    log = tmp / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("GRADIO_LISTEN", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "student_model_v2.demo_v2", "--port", str(port), "--device",
                                 "cpu", "--save_dir", str(tmp / "saved")], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with direct.open(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the demo did not serve {url} within 90 s:\n{log.read_text()}")
                time.sleep(0.3)
        yield {"url": url, "tmp": tmp, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    # analytics_enabled=False: the client otherwise starts a telemetry thread whatever the environment says
    return Client(served["url"], verbose=False, download_files=str(served["tmp"] / "downloads"),
                  analytics_enabled=False, httpx_kwargs={"trust_env": False})


def _files(tmp: Path) -> dict[str, str]:
    """A 128x128 grey background, a brush layer with two strokes, dark bars on white to mimic, a broken image."""
    paths = {"bg": tmp / "bg.png", "layer": tmp / "layer.png", "bad": tmp / "bad.png", "strokes": tmp / "strokes.png"}
    Image.fromarray(np.full((SIZE, SIZE, 3), 120, np.uint8)).save(paths["bg"])
    strokes = np.full((SIZE, SIZE, 3), 255, np.uint8)
    for x in range(14, 110, 16):
        strokes[12:36, x:x + 6] = 20
    Image.fromarray(strokes).save(paths["strokes"])
    Image.fromarray(_rgba_layer([(8, 8, 120, 40), (8, 70, 120, 110)])).save(paths["layer"])
    paths["bad"].write_bytes(b"this is not an image")
    return {k: str(v) for k, v in paths.items()}


def _editor(background: str | None, layers: list[str] = ()) -> dict:
    from gradio_client import handle_file

    return {"background": handle_file(background) if background else None, "layers": [handle_file(p) for p in layers],
            "composite": None}


def test_served_on_localhost_only(served):
    log = served["log"].read_text()
    assert f"Running on local URL:  {served['url'].rstrip('/')}" in log and "0.0.0.0" not in log


def test_client_generates_an_image(served, client):
    gallery, details = client.predict(img_prompt='a shop sign that reads "Hi"', positions_json="[[8, 8, 120, 60]]",
                                      edit_img=None, seed=7, api_name="/generate", **NO_MIMICS)
    assert [item["caption"] for item in gallery] == ["1/1 · seed 7", "glyphs and positions", "font hint"]
    image = np.asarray(Image.open(gallery[0]["image"]))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    assert "**student** (4 LCM steps, CFG off)" in details and "seed 7" in details
    records = [json.loads(p.read_text()) for p in (served["tmp"] / "saved").glob("*_seed7.json")]
    assert len(records) == 1 and records[0]["seed"] == 7 and records[0]["steps"] == 4
    saved = served["tmp"] / "saved" / records[0]["images"][0]
    assert np.array_equal(np.asarray(Image.open(saved)), image)  # the gallery shows exactly what was saved


def test_client_draws_positions_as_files(served, client):
    files = _files(served["tmp"])
    gallery, details = client.predict(
        img_prompt="a poster", text_prompt='that reads "Hi", "Yo"', draw_img=_editor(files["bg"], [files["layer"]]),
        edit_img=None, revise_pos=True, font_1=BUNDLED_FONT, color_1="#c83c1e", seed=3, lcm_steps=6,
        api_name="/generate", **NO_MIMICS)
    assert len(gallery) == 3 and "6 LCM steps" in details and '"Hi"' in details and '"Yo"' in details


def test_client_mimics_a_font_from_an_image(served, client):
    files = _files(served["tmp"])
    common = dict(img_prompt='a sign that reads "Hello"', positions_json="[[8, 70, 120, 110]]", edit_img=None, seed=11,
                  show_debug=False, api_name="/generate")
    plain, _ = client.predict(**common, **NO_MIMICS)
    mimic = {**NO_MIMICS, "font_1": demo_v2.MIMIC_FONT, "mimic_1": _editor(files["strokes"], [files["layer"]])}
    mimicked, details = client.predict(**common, **mimic)
    assert "**student**" in details
    # same seed and request: only the style crop of line 1 differs, and it reaches the image
    assert not np.array_equal(np.asarray(Image.open(plain[0]["image"])), np.asarray(Image.open(mimicked[0]["image"])))


def test_client_edits_an_image_with_a_painted_mask(served, client):
    files = _files(served["tmp"])
    gallery, details = client.predict(img_prompt='a wall that reads "Hi"',
                                      edit_img=_editor(files["bg"], [files["layer"]]), show_debug=False, seed=5,
                                      api_name="/edit", **NO_MIMICS)
    assert len(gallery) == 1 and np.asarray(Image.open(gallery[0]["image"])).shape == (SIZE, SIZE, 3)
    assert "· edit ·" in details and "2 positions for 1 quoted text:" in details


def test_client_teacher_mode_uses_cfg_and_free_steps(client):
    _, details = client.predict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", sampler="teacher", ddim_steps=2,
                                cfg_scale=5, edit_img=None, api_name="/generate", **NO_MIMICS)
    assert "**teacher** (2 DDIM steps, CFG 5, eta 0)" in details


@pytest.mark.parametrize("case, message", [
    ("more texts than positions", "the prompt has 2 quoted texts but 1 position was given"),
    ("empty text", "text line 1 is empty"),
    ("position outside", "position 1 reaches outside the 128x128 image"),
    ("unsupported character", "has no glyph for '☃'"),
    ("unreadable image", "cannot read the image given for 'Image to edit'"),
    ("edit without a mask", "editing needs a mask"),
    ("edit without an image", "editing needs an image"),
    ("bad positions JSON", "positions are not valid JSON"),
    ("no image prompt", "the image prompt is empty"),
    ("mimic without an image", "line 1: 'Mimic From Image' needs an image"),
    ("mimic without a painted area", "the mimic mask of line 1 selects nothing"),
    ("width above the slider", "'Width': Value 2000 is greater than maximum value 1024"),
    ("width not a multiple of 64", "image width must be a positive multiple of 64, got 100"),
    ("LCM steps above the slider", r"'Steps \(LCM, 4-8\)': Value 50 is greater than maximum value 8"),
    ("negative eta", r"'eta \(DDIM\)': Value -1 is less than minimum value 0"),
    ("unknown sampler", "'Sampler': "),
    ("seed that is no number", "'Seed': cannot use the value 'abc'"),
])
def test_client_bad_input_is_a_clear_message(served, client, case, message):
    from gradio_client.exceptions import AppError

    files = _files(served["tmp"])
    kwargs = {
        "more texts than positions": dict(img_prompt='"A" and "B"', positions_json="[[8, 8, 120, 60]]"),
        "empty text": dict(img_prompt='a sign ""', positions_json="[[8, 8, 120, 60]]"),
        "position outside": dict(img_prompt='"Hi"', positions_json="[[8, 8, 300, 60]]"),
        "unsupported character": dict(img_prompt='"☃"', positions_json="[[8, 8, 120, 60]]"),
        "unreadable image": dict(img_prompt='"Hi"', edit_img=_editor(files["bad"]), api_name="/edit"),
        "edit without a mask": dict(img_prompt='"Hi"', edit_img=_editor(files["bg"]), api_name="/edit"),
        "edit without an image": dict(img_prompt='"Hi"', api_name="/edit"),
        "bad positions JSON": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120"),
        "no image prompt": dict(img_prompt=" ", positions_json="[[8, 8, 120, 60]]"),
        "mimic without an image": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]",
                                       font_1=demo_v2.MIMIC_FONT),
        "mimic without a painted area": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]",
                                             font_1=demo_v2.MIMIC_FONT, mimic_1=_editor(files["strokes"])),
        "width above the slider": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", width=2000),
        "width not a multiple of 64": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", width=100),
        "LCM steps above the slider": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", lcm_steps=50),
        "negative eta": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", eta=-1),
        "unknown sampler": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", sampler="fast"),
        "seed that is no number": dict(img_prompt='"Hi"', positions_json="[[8, 8, 120, 60]]", seed="abc"),
    }[case]
    kwargs = {**NO_MIMICS, "edit_img": None, "api_name": "/generate", **kwargs}
    logged = served["log"].stat().st_size
    with pytest.raises(AppError, match=message) as info:
        client.predict(**kwargs)
    assert "Traceback" not in str(info.value)
    with open(served["log"]) as log:  # handled as input errors: no traceback on the server's console either
        log.seek(logged)
        assert "Traceback" not in log.read()


# --------------------------------------------------------------------------------------------------
# the page in a headless browser


def _chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 # every host but the demo's is unresolvable, so a request leaving the machine becomes a console error
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def _zoom(driver, editor: str = "#draw_img") -> float | None:
    """An image editor's zoom (its toolbar shows e.g. "225%"), as a factor; None before it shows an image."""
    text = driver.execute_script(
        f"return [...document.querySelectorAll('{editor} *')].map(e => e.textContent.trim())"
        ".find(t => /^[0-9]+%$/.test(t))")
    return int(text[:-1]) / 100 if text else None


def _result_info(driver, wait, expected: str) -> str:
    """The details text once it shows ``expected``; an error toast instead fails with its message."""
    from selenium.webdriver.common.by import By

    def shown(_):
        toasts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                  if t.text.startswith("Error")]
        assert not toasts, f"error shown instead of a result: {toasts}"
        text = driver.find_element(By.CSS_SELECTOR, "#result_info").text
        return text if expected in text else False

    return wait.until(shown)


def _stroke(driver, canvas, x: int, y: int, steps: int, step: int) -> None:
    """Scroll the canvas to the middle of the window, press at (x, y) from its centre, drag right ``steps`` times by ``step`` pixels, release."""
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    actions = ActionChains(driver, duration=50)
    actions.move_to_element_with_offset(canvas, x, y).pause(0.1).click_and_hold().pause(0.1)
    for _ in range(steps):
        actions.move_by_offset(step, 0).pause(0.05)
    actions.release().pause(0.2).perform()


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_browser_generates_and_shows_errors(served, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome(tmp_path)
    try:
        driver.get(served["url"])
        wait = WebDriverWait(driver, 60)
        prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#img_prompt textarea")))
        assert driver.title == "AnyText2 LCM-LoRA demo"
        assert "Fresh Coffee" in driver.page_source and "Text Editing" in driver.page_source  # examples, edit tab

        prompt.send_keys('a shop sign that reads "Hi"')
        driver.find_element(By.CSS_SELECTOR, "#run_gen").click()  # no position yet: a clear message, no images
        toast = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid='toast-body']")))
        assert "1 quoted text but 0 positions were given" in toast.text
        driver.find_element(By.CSS_SELECTOR, "[data-testid='toast-close']").click()

        driver.find_element(By.CSS_SELECTOR, "#positions_json textarea").send_keys("[[8, 8, 120, 60]]")
        driver.find_element(By.CSS_SELECTOR, "#run_gen").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result_gallery img")))
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#result_info"), "4 LCM steps, CFG off"))

        # a stroke that starts in the canvas margin (Gradio's brush ignores such a press) is kept, clipped: one position
        for field in ("#positions_json textarea", "#img_prompt textarea"):
            driver.find_element(By.CSS_SELECTOR, field).send_keys(Keys.CONTROL, "a", Keys.DELETE)
        driver.find_element(By.CSS_SELECTOR, "#img_prompt textarea").send_keys('a margin sign that reads "Hi"')
        canvas = driver.find_element(By.CSS_SELECTOR, "#draw_img canvas")
        zoom = _zoom(driver)
        shown = SIZE * zoom  # the image's side on screen; the editor centres it in a wider canvas
        assert canvas.rect["width"] > shown + 80, "no margin left of the image to start a stroke in"
        _stroke(driver, canvas, int(-shown / 2 - 24), int(-0.25 * shown), steps=10, step=int(shown / 20))
        driver.find_element(By.CSS_SELECTOR, "#run_gen").click()
        assert "positions for" not in _result_info(driver, wait, "a margin sign")  # one position, not two

        # a second stroke (inside) for a second text: the brush is small enough to keep the two strokes apart
        driver.find_element(By.CSS_SELECTOR, "#img_prompt textarea").send_keys(Keys.CONTROL, "a", Keys.DELETE)
        driver.find_element(By.CSS_SELECTOR, "#img_prompt textarea").send_keys('a sign that reads "Hi", "Yo"')
        _stroke(driver, canvas, int(-0.3 * shown), int(0.2 * shown), steps=9, step=int(shown / 16))
        driver.find_element(By.CSS_SELECTOR, "#run_gen").click()
        assert "positions for" not in _result_info(driver, wait, '"Yo"')

        # an example sets 512x512: the canvas follows at once (the editor fits the 4x larger image at 1/4 the zoom)
        headers = driver.find_elements(By.CSS_SELECTOR, "#examples table thead th")
        table = driver.find_element(By.CSS_SELECTOR, "#examples table")
        assert [h.text for h in headers][-3:] == ["Colour of line 1", "Colour of line 2", "Seed"]
        assert driver.execute_script("const t = arguments[0].parentElement; return t.scrollWidth <= t.clientWidth",
                                     table), "the examples table is cut off"
        row = driver.find_element(By.CSS_SELECTOR, "#examples tbody tr")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
        row.click()
        # the editor resizes in steps (one side, then the other): wait for the final fit, then check it
        expected = zoom * SIZE / 512
        try:
            wait.until(lambda _: _zoom(driver) == pytest.approx(expected, rel=0.03))
        except TimeoutException:
            pytest.fail(f"after the 512x512 example the canvas zoom stayed {_zoom(driver)}, not {expected:.4f}")
        # typing a height into its slider's box resizes the canvas on release (512x1024: half the zoom again)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.find_element(By.XPATH, "//button[contains(., 'Parameters')]").click()
        height_box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#height input[type=number]")))
        height_box.send_keys(Keys.CONTROL, "a", Keys.DELETE)
        height_box.send_keys("1024", Keys.TAB)
        try:
            wait.until(lambda _: _zoom(driver) == pytest.approx(expected / 2, rel=0.03))
        except TimeoutException:
            pytest.fail(f"after typing height 1024 the canvas zoom stayed {_zoom(driver)}, not {expected / 2:.4f}")
        # the editing tab: uploading a photo rescales its brush (the upload handler must run without an error)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Text Editing')]").click()
        upload = driver.find_element(By.CSS_SELECTOR, "#edit_img input[type=file]")
        upload.send_keys(str(REPO_ROOT / "demodataset" / "imgs" / "0000.jpg"))
        wait.until(lambda _: _zoom(driver, "#edit_img") is not None, message="the uploaded photo never showed")
        with open(served["log"]) as log:
            assert "Traceback" not in log.read()
        screenshot = tmp_path / "demo_page.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")

        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], f"console errors: {severe}"
        requests = {json.loads(e["message"])["message"]["params"]["request"]["url"]
                    for e in driver.get_log("performance")
                    if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"}
        outside = sorted(u for u in requests if u.startswith(("http:", "https:", "ws:", "wss:"))
                         and not u.startswith(("http://127.0.0.1", "ws://127.0.0.1")))
        assert outside == [], f"the page reached outside the machine: {outside}"
    finally:
        driver.quit()
