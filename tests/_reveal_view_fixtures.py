"""A tiny `teachx run` directory on the planted-artefact data (tests/_reveal_fixtures.py) for the tests of the
reveal view of `teachx serve`: the baseline classifier only (method baseline), LRP teacher maps, and the reveal
of class 0 (the class with the artefact) already saved. Built once per pytest session, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

from _reveal_fixtures import make_artefact_zip

OVERRIDES = [
    "model.backbone=lenet5",
    "train.epochs=4",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.progress=false",
    "data.hflip=false",
    "teacher.method=lrp",
    "teacher.eval_images=null",
    "method.name=baseline",
]


def build(root: Path) -> dict[str, Path]:
    """Make (or reuse) root/run with reveal/spray/class_0.*; returns its paths and the cache folder."""
    import torch

    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.recovery import prepare_run_dir
    from teachx.runs.resolve import resolve_config
    from teachx.runs.reveal import reveal_run

    root.mkdir(parents=True, exist_ok=True)
    out = {"root": root, "run": root / "run", "cache": root / "cache", "zip": root / "artefact.zip"}
    if (root / "done").exists():
        return out
    old_cache = os.environ.get("TEACHX_CACHE")
    os.environ["TEACHX_CACHE"] = str(out["cache"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_artefact_zip(out["zip"])
        cfg = resolve_config(None, [f"data.name=imagefolder:{out['zip']}", *OVERRIDES])
        run_dir = prepare_run_dir(out["run"], cfg, "run")
        run_pipeline(cfg, run_dir, log=lambda _m: None, progress=False)
        # the former default (SpRAy on the LRP maps, its own ranking): the view of a reveal with one layer
        former = {"method": "spray", "features": "layer", "rank": "method"}
        for _ in reveal_run(run_dir, classes=[0], progress=False, log=lambda _m: None, **former):
            pass
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("TEACHX_CACHE", None)
        else:
            os.environ["TEACHX_CACHE"] = old_cache
    (root / "done").write_text("ok")
    return out


def session_fixtures(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.getbasetemp() / "reveal_view_fixtures")
