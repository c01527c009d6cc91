"""Self-teaching: the teacher is the model being trained, re-explained every K epochs.

Epochs [0, K) train on the teacher's maps as usual; at the start of epoch K, 2K, ... the training
set is explained again with the teacher *method* applied to the current IMPACTX model (its logits),
and the explanation loss reads those maps until the next refresh. The ablation asks whether a
fixed external teacher carries information that the model's own explanations do not.

Each refresh is a :class:`~teachx.teachers.store.MapStore` in ``store_dir`` keyed by the model's
weights at that moment, so an interrupted refresh resumes from its done-mask, and a run resumed in
the middle of a refresh period reads the maps of that period's refresh (``current.json``) rather
than re-explaining a model that has moved on. Older refreshes are deleted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.models.impactx import ImpactX
from teachx.teachers.store import MapStore, fill_store, open_store
from teachx.utils import distributed as dist_utils
from teachx.training.impactx import ImpactxTask, MapSource
from teachx.utils.hashing import hash_state_dict
from teachx.utils.io import read_trusted_json, write_json_atomic

#: explain(model, dataset indices) -> post-processed maps, shape (len(indices), C, H, W)
ExplainFn = Callable[[torch.nn.Module, np.ndarray], torch.Tensor]


class SelfTeaching:
    """A ``Trainer(on_epoch_start=...)`` hook that swaps the task's map source at each refresh."""

    def __init__(
        self,
        task: ImpactxTask,
        explain: ExplainFn,
        train_idx: np.ndarray,
        n: int,
        map_shape: tuple[int, int, int],
        every: int,
        store_dir: str | Path,
        material: dict[str, Any],
        seed: int,
        batch_size: int = 128,
        log: Callable[[str], None] = print,
        progress: bool = False,
        epochs: Optional[int] = None,
    ):
        if every < 1:
            raise ValueError(f"self-teaching needs a refresh period >= 1 epoch, got {every}")
        if not isinstance(task.model, ImpactX):
            raise TypeError("self-teaching explains an ImpactX model")
        self.task, self.explain, self.train_idx = task, explain, np.asarray(train_idx)
        self.n, self.map_shape, self.every = int(n), tuple(map_shape), int(every)
        self.store_dir, self.material, self.seed = Path(store_dir), dict(material), seed
        self.batch_size, self.log, self.progress = batch_size, log, progress
        self.initial = task.source  # the teacher's maps, used before the first refresh
        self.current = 0  # the refresh epoch whose maps the task reads (0: the teacher's)
        # every refresh of the schedule (with ``epochs``), so that a resumed run records the same ones; seconds
        # only for those this process made
        self.refreshes: list[dict[str, Any]] = [{"epoch": r} for r in range(self.every, int(epochs or 0), self.every)]

    def __call__(self, epoch: int) -> None:
        r = (epoch // self.every) * self.every
        if r == self.current:
            return
        if r == 0:
            self.task.source = self.initial
        else:
            store = self._saved(r) or self._refresh(r)
            # the class each map explains is the initial source's (the label: per-class self-teaching
            # needs teacher.target=label, see RunConfig.validate)
            self.task.source = MapSource(
                store, "teacher", self.train_idx, self.seed, classes=getattr(self.initial, "classes", None)
            )
        self.current = r

    # -- internals --------------------------------------------------------------------------
    def _pointer(self) -> Path:
        return self.store_dir / "current.json"

    def _saved(self, r: int) -> Optional[MapStore]:
        """The complete store of refresh ``r`` if an earlier (interrupted) process made it."""
        if not self._pointer().exists():
            return None
        # verified: a damaged pointer must not send a resumed run to another refresh's maps
        rec = read_trusted_json(
            self._pointer(),
            f"delete '{self.store_dir.parent}' and train this IMPACTX model again",
            "self-teaching record",
        )
        if rec.get("epoch") != r or not (self.store_dir / rec.get("dir", "")).is_dir():
            return None
        store = open_store(self.store_dir, rec["material"], self.n, self.map_shape, log=self.log)
        return store if store.missing(self.train_idx).size == 0 else None

    def _refresh(self, r: int) -> MapStore:
        model = self.task.model
        material = {**self.material, "self_teaching_epoch": r, "model_hash": hash_state_dict(model.state_dict())}
        t0 = time.perf_counter()
        self.log(
            f"[self-teaching] epoch {r}: re-explaining {self.train_idx.size} training images with the model being trained"
        )
        was_training = model.training
        model.eval()
        try:
            store = open_store(self.store_dir, material, self.n, self.map_shape, log=self.log)
            fill_store(
                store,
                self.train_idx,
                lambda idx: self.explain(model, idx),
                self.batch_size,
                progress=self.progress,
                desc=f"self-teaching maps (epoch {r})",
            )
        finally:
            model.train(was_training)
        if dist_utils.is_main():
            write_json_atomic(self._pointer(), {"epoch": r, "dir": store.path.name, "material": material}, digest=True)
            for old in self.store_dir.iterdir():  # earlier refreshes are never read again
                if (
                    old.is_dir() and not old.is_symlink() and old != store.path and _is_store_name(old.name)
                ):  # only teachx's stores
                    shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        seconds = time.perf_counter() - t0
        entry = next((e for e in self.refreshes if e["epoch"] == r), None)
        if entry is None:
            self.refreshes.append({"epoch": r, "seconds": seconds})
        else:
            entry["seconds"] = seconds
        self.log(f"[self-teaching] epoch {r}: {self.train_idx.size} maps in {seconds:.1f}s")
        return store


def _is_store_name(name: str) -> bool:
    """A map store's directory name (the first 20 hex digits of its key, see teachx.teachers.store)."""
    return len(name) == 20 and all(c in "0123456789abcdef" for c in name)
