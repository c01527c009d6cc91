"""The reveal view of `teachx serve` in a real browser (headless Chromium through Selenium, as
tests/test_serve_browser.py, whose browser fixture and skips it shares): on a run with a planted artefact it
opens the view, reveals a class from the page, clicks a group in the legend (with the keyboard), marks it as an
artefact, names it and sees the retrieval list and the localisation heatmaps -- and the concept saved in the run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_browser import browser, wait  # noqa: E402,F401  (skips where there is no Chromium)

pytest.importorskip("sklearn")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from _reveal_view_fixtures import session_fixtures  # noqa: E402
from conftest import TEACHX, teachx_env  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`teachx serve RUN --port 0` on a copy of the planted-artefact run; yields its URL and the run."""
    dirs = session_fixtures(tmp_path_factory)
    run = tmp_path_factory.mktemp("reveal-browser") / "run"
    shutil.copytree(dirs["run"], run)
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = teachx_env({"TEACHX_CACHE": str(dirs["cache"]), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    cmd = [*TEACHX, "serve", str(run), "--port", "0", "--cache-dir", str(tmp_path_factory.mktemp("serve-cache"))]
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
        yield {"url": url, "run": run}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def loaded(drv, css: str) -> list:
    """The images under ``css``, once all have loaded (else [])."""
    imgs = drv.find_elements(By.CSS_SELECTOR, css)
    return imgs if imgs and all(i.get_property("naturalWidth") > 0 for i in imgs) else []


@pytest.mark.slow
def test_reveal_view_end_to_end(server, browser, tmp_path):  # noqa: F811 (the fixture imported above)
    drv, url, run = browser, server["url"], server["run"]
    api = lambda p: json.loads(urllib.request.urlopen(url + "api/v1" + p, timeout=120).read())  # noqa: E731
    drv.get(url)
    wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page to start")
    toggle = drv.find_element(By.ID, "reveal-toggle")
    toggle.click()
    wait(drv, lambda d: d.find_element(By.ID, "reveal-view").is_displayed(), "the reveal view")
    assert toggle.get_attribute("aria-pressed") == "true" and not drv.find_element(By.ID, "browse").is_displayed()

    # class 0 is revealed already: its embedding, a point per training image, and a legend entry per group
    cls = api("/runs/run/reveal/spray/classes/0")
    shown = lambda d, c: d.find_element(By.ID, "rv-class-view").get_attribute("data-label") == c  # noqa: E731
    wait(drv, lambda d: shown(d, "0"), "class 0's view")
    circles = drv.find_elements(By.CSS_SELECTOR, "#rv-plot svg circle")
    assert len(circles) == cls["n_images"]
    legend = drv.find_elements(By.CSS_SELECTOR, "#rv-legend button")
    top = cls["groups"][0]
    assert [b.text for b in legend][
        0
    ] == f"group {top['group']}: rank 1, {top['size']} images, score {top['score']:.3f}"
    assert drv.find_element(By.ID, "rv-score-note").text == cls["score_meaning"]
    assert drv.find_element(By.ID, "rv-groups-title").text == "groups, most suspicious first"

    # class 1 is not: the view says so and reveals it on request
    Select(drv.find_element(By.ID, "rv-class")).select_by_value("1")
    wait(drv, lambda d: d.find_elements(By.ID, "rv-run-reveal"), "the offer to reveal class 1")
    assert "has no spray reveal yet" in drv.find_element(By.ID, "rv-status").text
    drv.find_element(By.ID, "rv-run-reveal").click()
    wait(drv, lambda d: shown(d, "1"), "class 1 revealed from the page")
    assert (run / "reveal/spray/class_1.json").is_file()
    assert (
        len(drv.find_elements(By.CSS_SELECTOR, "#rv-plot svg circle"))
        == api("/runs/run/reveal/spray/classes/1")["n_images"]
    )

    # back to class 0; open its top group with the keyboard and mark it as an artefact
    Select(drv.find_element(By.ID, "rv-class")).select_by_value("0")
    wait(drv, lambda d: shown(d, "0"), "class 0 again")
    button = drv.find_elements(By.CSS_SELECTOR, "#rv-legend button")[0]
    button.send_keys(Keys.ENTER)
    n = min(24, top["size"])
    wait(drv, lambda d: len(loaded(d, "#rv-images img")) == 2 * n, f"{n} images of the group with their maps")
    shown = [int(f.get_attribute("data-index")) for f in drv.find_elements(By.CSS_SELECTOR, "#rv-images figure")]
    rec = json.loads((run / "reveal/spray/class_0.json").read_text())
    assert shown == rec["groups"][0]["members"][:n] and button.get_attribute("aria-pressed") == "true"
    assert "lrp map" in drv.find_element(By.ID, "rv-group-note").text
    drv.find_element(By.ID, "rv-name").send_keys("checker")
    drv.find_element(By.ID, "rv-mark-group").click()
    wait(drv, lambda d: d.find_element(By.ID, "rv-concept").get_attribute("data-state") in ("done", "error"), "it")
    out = drv.find_element(By.ID, "rv-concept")
    assert out.get_attribute("data-state") == "done", out.text
    wait(drv, lambda d: len(loaded(d, "#rv-top img")) == 24, "the retrieval list")
    wait(drv, lambda d: len(loaded(d, "#rv-localised img")) == 3 * 8, "8 images with heatmap and mask")
    concept = api("/runs/run/reveal/concepts/checker")
    items = drv.find_elements(By.CSS_SELECTOR, "#rv-top li")
    assert [int(li.get_attribute("data-index")) for li in items] == [t["index"] for t in concept["top"]]
    assert f"CAV score {concept['top'][0]['score']:.3f}" in items[0].text
    assert "CAV score: the projection of the image's activations at layer body" in out.text
    assert (run / "reveal/concepts/checker.json").is_file() and (run / "reveal/concepts/checker.npz").is_file()
    assert "checker: group" in drv.find_element(By.ID, "rv-concepts").text

    # marking single images: two checked images, the same name again without replace: the one-line 409
    for box in drv.find_elements(By.CSS_SELECTOR, "#rv-images input[type=checkbox]")[:2]:
        box.send_keys(Keys.SPACE)
    assert drv.find_element(By.ID, "rv-mark-images").text == "mark the 2 checked images as an artefact"
    drv.find_element(By.ID, "rv-mark-images").click()
    wait(drv, lambda d: d.find_elements(By.ID, "rv-concept-error"), "the refusal of a used name")
    assert "'checker' is saved already" in drv.find_element(By.ID, "rv-concept-error").text
    drv.save_screenshot(str(tmp_path / "reveal.png"))
    print(tmp_path / "reveal.png")
