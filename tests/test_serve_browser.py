"""`teachx serve` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`
packages, driven by Selenium through /usr/bin/chromedriver -- nothing downloads a browser) opens the
page of a live server on 127.0.0.1, filters the grid, opens an image, steps with the keyboard,
switches model, uploads an image and reads back what the canvases show. Screenshots go to the
test's tmp dir (their paths are printed; `pytest -s` shows them).

Skipped, with the reason, only where Chromium, its driver or Selenium is absent
(`apt-get install chromium chromium-driver`; `pip install -e '.[dev]'`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("TEACHX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TEACHX_CHROMEDRIVER", "/usr/bin/chromedriver")


def _absent(reason: str) -> None:
    """Skip -- or, where CI installed the browser (.ci/run sets TEACHX_REQUIRE_BROWSER=1), fail."""
    if os.environ.get("TEACHX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TEACHX_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    _absent(f"Chromium is not installed ({CHROMIUM}): apt-get install chromium chromium-driver")
if not (Path(CHROMEDRIVER).exists() or shutil.which("chromedriver")):
    _absent(f"chromedriver is not installed ({CHROMEDRIVER}): apt-get install chromium-driver")
try:
    import selenium  # noqa: F401
except ImportError:
    _absent("selenium is not installed: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="teachx serve needs the 'serve' extra: pip install 'teachx[serve]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TEACHX, teachx_env  # noqa: E402

from _serve_fixtures import session_fixtures  # noqa: E402

WAIT = 60


def _median_trust(dirs, cache) -> float:
    """The run's IMPACTX model's median trust value, as the served threshold: some images are flagged, some not."""
    from teachx.service import Service

    old = os.environ.get("TEACHX_CACHE")
    os.environ["TEACHX_CACHE"] = str(dirs["cache"])
    try:
        rows = Service([dirs["run"]], cache_dir=cache).list_images("run.impactx", limit=1000)["items"]
    finally:
        if old is None:
            os.environ.pop("TEACHX_CACHE", None)
        else:
            os.environ["TEACHX_CACHE"] = old
    return round(float(np.median([r["trust"] for r in rows])), 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`teachx serve RUN STUDY --port 0` as a user starts it; yields its URL."""
    dirs = session_fixtures(tmp_path_factory)
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    threshold = _median_trust(dirs, tmp_path_factory.mktemp("trust-cache"))
    env = teachx_env({"TEACHX_CACHE": str(dirs["cache"]), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    cmd = [
        *TEACHX,
        "serve",
        str(dirs["run"]),
        str(dirs["study"]),
        "--port",
        "0",
        "--cache-dir",
        str(tmp_path_factory.mktemp("serve-cache")),
        "--trust-threshold",
        repr(threshold),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"teachx serve: (http://127\.0\.0\.1:\d+/)", log.read_text())
            if m:
                url = m.group(1)
                break
            time.sleep(0.2)
        assert url, f"server did not start: {log.read_text()[-2000:]}"
        yield {"url": url, "dirs": dirs, "threshold": threshold}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        opts.add_argument(a)
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    drv = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=opts)
    drv.set_script_timeout(WAIT)
    yield drv
    drv.quit()


def wait(drv, cond, what: str):
    try:
        return WebDriverWait(drv, WAIT, poll_frequency=0.1).until(lambda d: cond(d))
    except Exception as exc:
        errors = drv.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {what}; page error: {errors!r}") from exc


def canvas_colours(drv, canvas_id: str) -> tuple[int, int, int]:
    """(width, height, number of coloured -- not grey -- pixels) of a canvas."""
    return tuple(
        drv.execute_script(
            "const c = document.getElementById(arguments[0]); if (!c || c.dataset.drawn !== '1') return [0, 0, -1];"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i+1]) > 24 || Math.abs(d[i+1] - d[i+2]) > 24) n++;"
            "return [c.width, c.height, n];",
            canvas_id,
        )
    )


def maps_of(drv) -> str:
    """'model/index' of the image whose maps the detail view has finished drawing ('' while it draws)."""
    return drv.find_element(By.ID, "maps").get_attribute("data-state") or ""


def thumbs(drv) -> list:
    return drv.find_elements(By.CSS_SELECTOR, "#grid .thumb")


@pytest.mark.slow
def test_the_page_end_to_end(server, browser, tmp_path):
    import json
    import urllib.request

    drv, url = browser, server["url"]
    api = lambda p: json.loads(urllib.request.urlopen(url + "api/v1" + p, timeout=60).read())  # noqa: E731
    shots = []

    def shot(name):
        p = tmp_path / f"{name}.png"
        drv.save_screenshot(str(p))
        shots.append(p)

    drv.get(url)
    wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page to start")
    options = [o.get_attribute("value") for o in Select(drv.find_element(By.ID, "model")).options]
    assert options[:2] == ["run.baseline", "run.impactx"] and len(options) == 6
    # the page opens on the first model with built-in maps, not on the baseline listed first
    assert Select(drv.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "run.impactx"

    def grid(d):
        return d.find_element(By.ID, "grid").get_attribute("data-model"), d.find_element(By.ID, "grid").get_attribute(
            "data-loaded"
        )

    wait(drv, lambda d: grid(d) == ("run.impactx", "32"), "32 thumbnails of run.impactx")
    assert "IMPACTX" in drv.find_element(By.ID, "model-info").text
    wait(
        drv,
        lambda d: all(t.find_element(By.TAG_NAME, "img").get_property("naturalWidth") == 32 for t in thumbs(d)),
        "thumbnails to load",
    )
    shot("grid")
    # the export links cover what the grid shows: the PNG grid of its first 16 images, built-in and teacher maps
    href = drv.find_element(By.ID, "export-png").get_attribute("href")
    first16 = ",".join(t.get_attribute("data-index") for t in thumbs(drv)[:16])
    assert f"indices={first16}".replace(",", "%2C") in href.replace(
        ",", "%2C"
    ) and "maps=built_in,teacher" in href.replace("%2C", ",")
    assert urllib.request.urlopen(href, timeout=120).read().startswith(b"\x89PNG")

    # the trust signal: images whose built-in map disagrees with the model's gradient are flagged in the grid,
    # and the filter shows exactly them; their detail view says so next to the maps, with the value
    flagged = api("/models/run.impactx/images?disagrees=true&limit=1000")
    assert 0 < flagged["total"] < 32 and flagged["trust_threshold"] == server["threshold"]
    marked = {int(t.get_attribute("data-index")) for t in thumbs(drv) if "disagrees" in t.get_attribute("class")}
    assert marked == {i["index"] for i in flagged["items"]}
    assert all(
        t.find_elements(By.CSS_SELECTOR, ".flag") for t in thumbs(drv) if "disagrees" in t.get_attribute("class")
    )
    Select(drv.find_element(By.ID, "f-trust")).select_by_value("true")
    wait(
        drv,
        lambda d: (
            len(thumbs(d)) == flagged["total"]
            and d.find_element(By.ID, "count").text.startswith(f"{flagged['total']} of 32")
        ),
        "the images whose built-in map disagrees",
    )
    assert all("disagrees" in t.get_attribute("class") for t in thumbs(drv)) and "trust=true" in drv.current_url
    odd = int(thumbs(drv)[0].get_attribute("data-index"))
    thumbs(drv)[0].click()
    wait(drv, lambda d: d.find_element(By.ID, "detail").get_attribute("data-trust") == "disagrees", "the trust line")
    want = api(f"/models/run.impactx/images/{odd}/metrics")["trust"]
    line = drv.find_element(By.ID, "trust").text
    assert (
        "disagrees with the model's gradient" in line and f"{want['value']:.3f}" in line and "gradient × input" in line
    )
    shot("disagrees")
    drv.find_element(By.ID, "close").click()
    Select(drv.find_element(By.ID, "f-trust")).select_by_value("false")
    wait(drv, lambda d: len(thumbs(d)) == 32 - flagged["total"], "the images whose built-in map agrees")
    assert not any("disagrees" in t.get_attribute("class") for t in thumbs(drv))
    thumbs(drv)[0].click()
    wait(drv, lambda d: d.find_element(By.ID, "detail").get_attribute("data-trust") == "agrees", "an agreeing image")
    assert drv.find_element(By.ID, "trust").text.startswith("Trust: built-in map of class")
    drv.find_element(By.ID, "close").click()
    Select(drv.find_element(By.ID, "f-trust")).select_by_value("")
    wait(drv, lambda d: len(thumbs(d)) == 32, "every image again")

    # filter: the wrong predictions only
    n_wrong = api("/models/run.impactx/images?correct=false")["total"]
    assert n_wrong > 0
    Select(drv.find_element(By.ID, "f-correct")).select_by_value("false")
    wait(
        drv,
        lambda d: len(thumbs(d)) == n_wrong and d.find_element(By.ID, "count").text.startswith(f"{n_wrong} of 32"),
        "the filtered grid",
    )
    assert all("wrong" in t.get_attribute("class") for t in thumbs(drv))

    # a wrong prediction: everything on the page explains one class, the predicted one; the switch to the
    # true class changes the stated class, the maps' captions, the agreement and the curve together
    wrong = int(thumbs(drv)[0].get_attribute("data-index"))
    item = api(f"/models/run.impactx/images/{wrong}")
    names = api("/models/run.impactx")["class_names"]
    pred, true = item["predicted"], item["label"]
    detail_attr = lambda d, a: d.find_element(By.ID, "detail").get_attribute(a)  # noqa: E731
    text = lambda d, i: d.find_element(By.ID, i).text  # noqa: E731
    points = lambda d: d.find_element(By.CSS_SELECTOR, "#curve svg polyline").get_attribute("points")  # noqa: E731
    captions = lambda d: [f.text for f in d.find_elements(By.CSS_SELECTOR, "#maps figcaption")]  # noqa: E731

    def explained_view(cls: int, how: str, query: str):
        want = api(f"/models/run.impactx/images/{wrong}/metrics{query}")
        wait(
            drv,
            lambda d: (
                detail_attr(d, "data-metrics") == f"run.impactx/{wrong}"
                and detail_attr(d, "data-metrics-class") == str(cls)
                and f"class {names[cls]} ({how})" in text(d, "explained")
            ),
            f"the view of class {cls}",
        )
        assert f"class {names[cls]} ({how})" in text(
            drv, "curve-note"
        ) and f"both of class {names[cls]} ({how})" in text(drv, "agreement")
        assert f"Pearson {want['agreement']['pearson']:.3f}" in text(drv, "agreement")
        caps = [c for c in captions(drv) if c.startswith(("teacher", "difference"))]
        assert len(caps) == 2 and all(f"class {names[cls]}" in c for c in caps), caps
        return text(drv, "agreement"), points(drv)

    thumbs(drv)[0].click()
    agreement_pred, curve_pred = explained_view(pred, "the predicted class", "")
    Select(drv.find_element(By.ID, "map-class")).select_by_value("label")
    agreement_true, curve_true = explained_view(true, "the true class", "?class=label")
    assert agreement_true != agreement_pred and curve_true != curve_pred
    assert "class=label" in drv.current_url
    shot("true-class")
    Select(drv.find_element(By.ID, "map-class")).select_by_value("")
    explained_view(pred, "the predicted class", "")
    assert "class=" not in drv.current_url
    drv.find_element(By.ID, "close").click()

    Select(drv.find_element(By.ID, "f-correct")).select_by_value("")
    Select(drv.find_element(By.ID, "f-label")).select_by_value("1")
    wait(drv, lambda d: len(thumbs(d)) == 8, "the class filter")

    # open an image: input, built-in, teacher and difference maps are drawn in colour
    first = thumbs(drv)[0]
    index = int(first.get_attribute("data-index"))
    first.click()
    wait(drv, lambda d: maps_of(d) == f"run.impactx/{index}", "the opened image's maps")
    for name in ("built_in", "teacher", "difference"):
        wait(drv, lambda d, n=name: canvas_colours(d, f"map-{n}")[2] > 0, f"the {name} map")
        w, h, coloured = canvas_colours(drv, f"map-{name}")
        assert (w, h) == (32, 32) and coloured > 20, (name, w, h, coloured)
    assert canvas_colours(drv, "map-input")[:2] == (32, 32)
    title = drv.find_element(By.ID, "detail-title").text
    assert title.startswith(f"#{index}:") and "true br" in title
    assert len(drv.find_elements(By.CSS_SELECTOR, "#maps .cbar")) == 3
    wait(
        drv,
        lambda d: d.find_element(By.ID, "detail").get_attribute("data-metrics") == f"run.impactx/{index}",
        "the metrics",
    )
    assert drv.find_element(By.CSS_SELECTOR, "#curve svg").get_attribute("data-points") == "17"
    assert "Spearman" in drv.find_element(By.ID, "agreement").text
    sha = api(f"/models/run.impactx/images/{index}")["provenance"]["checkpoint_sha256"]
    assert sha in drv.execute_script("return document.getElementById('provenance').textContent")
    shot("detail")
    # opacity 0: the overlay is the grey input alone
    drv.execute_script(
        "const o = document.getElementById('opacity'); o.value = '0'; o.dispatchEvent(new Event('input'));"
    )
    assert canvas_colours(drv, "map-built_in")[2] == 0
    drv.execute_script(
        "const o = document.getElementById('opacity'); o.value = '0.8'; o.dispatchEvent(new Event('input'));"
    )
    # another method on demand
    Select(drv.find_element(By.ID, "method")).select_by_value("saliency")
    wait(
        drv,
        lambda d: maps_of(d) == f"run.impactx/{index}" and canvas_colours(d, "map-saliency")[2] > 0,
        "the saliency map",
    )
    # compare with another model on the same image: the run's baseline classifier (its teacher map and saliency)
    Select(drv.find_element(By.ID, "compare")).select_by_value("run.baseline")
    cmp_state = lambda d: d.find_element(By.ID, "compare-box").get_attribute("data-state")  # noqa: E731
    wait(drv, lambda d: cmp_state(d) == f"run.baseline/{index}", "the compared model's row")
    other = api(f"/models/run.baseline/images/{index}")
    assert drv.find_element(By.ID, "compare-title").text.startswith(
        f"run: {api('/models/run.baseline')['label']} · predicted {other['predicted_name']}"
    )
    for name in ("teacher", "saliency"):
        w, h, coloured = canvas_colours(drv, f"cmp-{name}")
        assert (w, h) == (32, 32) and coloured > 20, (name, w, h, coloured)
    assert not drv.find_elements(By.ID, "cmp-built_in")  # a plain classifier has none
    shot("compare")
    # keyboard: next image of the filtered list
    second = int(thumbs(drv)[1].get_attribute("data-index"))
    drv.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait(
        drv,
        lambda d: d.find_element(By.ID, "detail").get_attribute("data-index") == str(second),
        "the next image (arrow key)",
    )
    wait(
        drv,
        lambda d: maps_of(d) == f"run.impactx/{second}" and canvas_colours(d, "map-built_in")[2] > 0,
        "the next image's map",
    )
    # the URL reopens the same view
    link = drv.current_url
    assert (
        "model=run.impactx" in link
        and f"index={second}" in link
        and "label=1" in link
        and "compare=run.baseline" in link
    )
    drv.get("about:blank")
    drv.get(link)
    wait(
        drv, lambda d: d.find_element(By.ID, "detail").get_attribute("data-index") == str(second), "the bookmarked view"
    )
    assert Select(drv.find_element(By.ID, "f-label")).first_selected_option.get_attribute("value") == "1"
    wait(drv, lambda d: cmp_state(d) == f"run.baseline/{second}", "the bookmarked compare row")
    Select(drv.find_element(By.ID, "compare")).select_by_value("")
    wait(drv, lambda d: not d.find_element(By.ID, "compare-box").is_displayed(), "no compare row")
    wait(
        drv,
        lambda d: maps_of(d) == f"run.impactx/{second}" and canvas_colours(d, "map-built_in")[2] > 0,
        "the bookmarked image's map",
    )
    drv.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait(drv, lambda d: not d.find_element(By.ID, "detail").is_displayed(), "Esc to close the detail view")

    # switch model: a study's baseline classifier has a teacher map but no built-in map
    base = next(m["id"] for m in api("/models")["models"] if m["run_id"] == "study" and m["role"] == "baseline")
    Select(drv.find_element(By.ID, "model")).select_by_value(base)
    wait(
        drv,
        lambda d: grid(d)[0] == base and "classifier" in d.find_element(By.ID, "model-info").text,
        "the study baseline",
    )
    base_index = thumbs(drv)[0].get_attribute("data-index")
    thumbs(drv)[0].click()
    wait(
        drv,
        lambda d: maps_of(d) == f"{base}/{base_index}" and canvas_colours(d, "map-teacher")[2] > 0,
        "the baseline's teacher map",
    )
    wait(
        drv,
        lambda d: d.find_element(By.ID, "detail").get_attribute("data-metrics").startswith(base + "/"),
        "the baseline's metrics",
    )
    assert not drv.find_elements(By.ID, "map-built_in")
    assert "no built-in map" in drv.find_element(By.ID, "agreement").text
    # no built-in map: no trust value, the page says so, and the filter is off
    assert drv.find_element(By.ID, "detail").get_attribute("data-trust") == "none"
    assert "no built-in map" in drv.find_element(By.ID, "trust").text
    assert not drv.find_element(By.ID, "f-trust").is_enabled()
    assert (
        drv.find_element(By.ID, "detail").is_displayed() and drv.find_element(By.ID, "class-pick").is_displayed()
    )  # any class
    shot("study-baseline")

    # a model with one built-in map per class: pick the class whose map is drawn; the URL keeps it
    pc = next(m["id"] for m in api("/models")["models"] if m["run_id"] == "study" and m["role"] == "per_class")
    Select(drv.find_element(By.ID, "model")).select_by_value(pc)
    wait(
        drv, lambda d: grid(d)[0] == pc and "IMPACTX" in d.find_element(By.ID, "model-info").text, "the per-class model"
    )
    thumbs(drv)[0].click()
    wait(drv, lambda d: d.find_element(By.ID, "class-pick").is_displayed(), "the per-class model's class picker")
    caption = lambda d: d.execute_script(  # noqa: E731
        "const c = document.getElementById('map-built_in'); return c ? c.closest('figure').querySelector('figcaption').textContent : '';"
    )
    names = api(f"/models/{pc}")["class_names"]
    first_pc = api(f"/models/{pc}/images/{thumbs(drv)[0].get_attribute('data-index')}")
    wait(
        drv,
        lambda d: canvas_colours(d, "map-built_in")[2] > 0 and f"of class {first_pc['predicted_name']}" in caption(d),
        "the predicted class's map",
    )
    Select(drv.find_element(By.ID, "map-class")).select_by_value("2")
    wait(
        drv,
        lambda d: f"of class {names[2]}" in caption(d) and canvas_colours(d, "map-built_in")[2] > 0,
        "class 2's built-in map",
    )
    assert "class=2" in drv.current_url
    shot("per-class")

    # upload an image to the IMPACTX model, with a teacher map
    Select(drv.find_element(By.ID, "model")).select_by_value("run.impactx")
    wait(
        drv,
        lambda d: grid(d)[0] == "run.impactx" and "IMPACTX" in d.find_element(By.ID, "model-info").text,
        "IMPACTX again",
    )
    rng = np.random.default_rng(0)
    a = rng.integers(0, 90, (48, 48, 3), dtype=np.uint8)
    a[:24, 24:] += 120
    up = tmp_path / "mine.png"
    Image.fromarray(a).save(up)
    drv.find_element(By.ID, "upload-file").send_keys(str(up))
    Select(drv.find_element(By.ID, "upload-method")).select_by_value("gradient_x_input")
    drv.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait(
        drv, lambda d: d.find_element(By.ID, "upload-result").get_attribute("data-state") == "done", "the upload result"
    )
    pred = drv.find_element(By.ID, "upload-prediction").text
    expected = api("/models/run.impactx")["class_names"]
    assert pred.startswith("predicted ") and any(c in pred for c in expected) and "resized from 48x48" in pred
    for name in ("upload-built_in", "upload-gradient_x_input"):
        w, h, coloured = canvas_colours(drv, f"map-{name}")
        assert (w, h) == (32, 32) and coloured > 20, (name, w, h, coloured)
    drv.execute_script("document.getElementById('upload').scrollIntoView()")
    shot("upload")
    # a file that is not an image: a message, no crash
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    drv.find_element(By.ID, "upload-file").clear()
    drv.find_element(By.ID, "upload-file").send_keys(str(bad))
    drv.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait(
        drv, lambda d: d.find_element(By.ID, "upload-result").get_attribute("data-state") == "error", "the upload error"
    )
    assert (
        "415" in drv.find_element(By.ID, "upload-error").text
        and "not an image" in drv.find_element(By.ID, "upload-error").text
    )

    severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE" and "415" not in e.get("message", "")]
    assert not severe, severe
    for p in shots:
        assert p.stat().st_size > 5000
        print(f"screenshot: {p}")
