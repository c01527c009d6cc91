"""Screenshot of the `teachx serve` page for the documentation: starts the server on a run directory
(127.0.0.1, a free port), opens the page in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium: nothing downloads a browser), selects the run's IMPACTX model,
opens one test image (the first misclassified one unless --index is given), waits until its maps,
pixel-flipping curve and agreement are drawn, and saves a PNG.

With --reveal CLASS it shows the reveal view instead: the class's embedding and groups (the run needs
`teachx reveal RUN --class CLASS` first), the images of its top-ranked group with their maps, and with
--concept NAME that group marked as the artefact concept NAME (fitted and saved in the run unless it is
there already) with its retrieval list and heatmaps.

    python scripts/serve_screenshot.py teachx-demo --out docs/serve-viewer.png [--index 17] [--width 1400 --height 1000]
    python scripts/serve_screenshot.py RUN --reveal 0 --concept checker --out docs/serve-reveal.png --height 2000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="docs/serve-viewer.png")
    ap.add_argument("--index", type=int, default=None, help="test image to open (default: the first misclassified one)")
    ap.add_argument("--model", default=None, help="model id (default: the run's IMPACTX model)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--reveal", type=int, default=None, metavar="CLASS", help="show the reveal view of this class")
    ap.add_argument("--concept", default=None, help="with --reveal: mark the top group as this concept")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with tempfile.TemporaryDirectory(prefix="teachx-shot-") as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "teachx", "serve", args.run_dir, "--port", "0", "-q"],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            url = None
            for _ in range(600):
                m = re.search(r"teachx serve: (http://127\.0\.0\.1:\d+/)", log.read_text())
                if m or proc.poll() is not None:
                    url = m.group(1) if m else None
                    break
                time.sleep(0.2)
            if not url:
                raise SystemExit(f"teachx serve did not start: {log.read_text()[-2000:]}")
            api = lambda p: json.loads(urllib.request.urlopen(url + "api/v1" + p, timeout=600).read())  # noqa: E731
            models = api("/models")["models"]
            mid = args.model or next(
                (m["id"] for m in models if m["kind"] == "impactx" and not m["error"]), models[0]["id"]
            )
            index = args.index
            if index is None and args.reveal is None:
                wrong = api(f"/models/{mid}/images?correct=false&limit=1")["items"]
                index = wrong[0]["index"] if wrong else 0
            opts = webdriver.ChromeOptions()
            opts.binary_location = args.chromium
            for a in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--window-size={args.width},{args.height}",
            ):
                opts.add_argument(a)
            drv = webdriver.Chrome(service=ChromeService(executable_path=args.chromedriver), options=opts)
            try:
                if args.reveal is not None:
                    _reveal(drv, url, args.reveal, args.concept, Path(args.out))
                    return
                drv.get(f"{url}#model={mid}&index={index}")
                wait = WebDriverWait(drv, 600, poll_frequency=0.2)
                wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-metrics") == f"{mid}/{index}")
                wait.until(
                    lambda d: all(
                        c.get_attribute("data-drawn") == "1" for c in d.find_elements(By.CSS_SELECTOR, "#maps canvas")
                    )
                )
                wait.until(
                    lambda d: all(
                        i.get_property("complete") for i in d.find_elements(By.CSS_SELECTOR, "#grid img")[:40]
                    )
                )
                assert Select(drv.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == mid
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                drv.save_screenshot(str(out))
                print(f"{out}: model {mid}, test image {index}")
            finally:
                drv.quit()
        finally:
            proc.terminate()
            proc.wait(20)


def _reveal(drv, url: str, label: int, concept: str | None, out: Path) -> None:
    """The reveal view of class ``label``: its top group opened and, with ``concept``, marked and named."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(drv, 600, poll_frequency=0.2)

    def loaded(css: str) -> bool:
        imgs = drv.find_elements(By.CSS_SELECTOR, css)
        return bool(imgs) and all(i.get_property("naturalWidth") > 0 for i in imgs)

    drv.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    drv.find_element(By.ID, "reveal-toggle").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rv-class option"))
    Select(drv.find_element(By.ID, "rv-class")).select_by_value(str(label))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rv-legend button"))
    drv.find_elements(By.CSS_SELECTOR, "#rv-legend button")[0].click()
    wait.until(lambda d: loaded("#rv-images img"))
    if concept:
        saved = [
            b
            for b in drv.find_elements(By.CSS_SELECTOR, "#rv-concepts button")
            if b.get_attribute("data-concept") == concept
        ]
        if saved:
            saved[0].click()
        else:
            drv.find_element(By.ID, "rv-name").send_keys(concept)
            drv.find_element(By.ID, "rv-mark-group").click()
        wait.until(lambda d: d.find_element(By.ID, "rv-concept").get_attribute("data-state") in ("done", "error"))
        wait.until(lambda d: loaded("#rv-localised img") and loaded("#rv-top img"))
    out.parent.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(out))
    print(f"{out}: reveal view of class {label}" + (f", concept {concept}" if concept else ""))


if __name__ == "__main__":
    main()
