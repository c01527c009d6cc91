"""A tiny `teachx run` directory and a tiny `teachx study` directory for the `teachx serve` tests.

Built once per pytest session (under the session's base temp dir, shared by test_serve.py and
test_serve_browser.py): a 4-class 32x32 image zip, one epoch per model, DeepSHAP with 8
background images, so the whole build takes seconds on one CPU thread.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

RUN_OVERRIDES = [
    "model.backbone=lenet5",
    "train.epochs=1",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.progress=false",
    "data.hflip=false",
    "data.val_fraction=0.2",
    "teacher.background_size=8",
    "teacher.batch_size=64",
    "teacher.eval_images=null",
    "impactx.decoder=paper",  # the paper's decoder here, per-class maps in the study
]

STUDY_YAML = """
data: {{name: "imagefolder:{zip}", hflip: false, val_fraction: 0.2}}
model: {{backbone: lenet5}}
train: {{epochs: 1, batch_size: 32, lr: 0.003, progress: false}}
teacher: {{method: gradient_x_input, batch_size: 64, eval_images: null}}
impactx: {{decoder: paper}}
study:
  n_seeds: 1
  arms:
    impactx: {{}}
    lambda0: {{impactx.lam: 0}}
    per_class: {{impactx.decoder: unet_input, impactx.per_class: true, impactx.map_loss: pearson}}
  eval: {{examples: 0}}
"""


def make_zip(path: Path) -> Path:
    """4 classes (bright quadrant = class), 32x32 RGB; 24 train and 8 test images per class."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 24), ("test", 8)):
            for c, name in enumerate(["tl", "tr", "bl", "br"]):
                for i in range(n):
                    a = rng.integers(0, 100, (32, 32, 3)).astype(np.uint8)
                    r, q = divmod(c, 2)
                    a[r * 16 : r * 16 + 16, q * 16 : q * 16 + 16] += 40
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="PNG")
                    zf.writestr(f"{split}/{name}/{i}.png", buf.getvalue())
    return path


def build(root: Path) -> dict[str, Path]:
    """Make (or reuse) root/run and root/study; returns their paths and the cache folder."""
    import torch

    from teachx.runs.resolve import resolve_config
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.recovery import prepare_run_dir
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study

    root.mkdir(parents=True, exist_ok=True)
    out = {
        "root": root,
        "run": root / "run",
        "study": root / "study",
        "cache": root / "cache",
        "zip": root / "tiny.zip",
    }
    if (root / "done").exists():
        return out
    old_cache = os.environ.get("TEACHX_CACHE")
    os.environ["TEACHX_CACHE"] = str(out["cache"])  # decoded data and teacher maps stay in the fixture folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_zip(out["zip"])
        cfg = resolve_config(None, [f"data.name=imagefolder:{out['zip']}", *RUN_OVERRIDES])
        run_dir = prepare_run_dir(out["run"], cfg, "run")
        run_pipeline(cfg, run_dir, log=lambda _m: None, progress=False)
        (root / "study.yaml").write_text(STUDY_YAML.format(zip=out["zip"]))
        run_study(load_study(str(root / "study.yaml")), out["study"], log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("TEACHX_CACHE", None)
        else:
            os.environ["TEACHX_CACHE"] = old_cache
    (root / "done").write_text("ok")
    return out


def session_fixtures(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.getbasetemp() / "serve_fixtures")
