"""Workloads for tests/test_distributed.py, run either in-process (1 process, the reference) or by
torchrun workers (``python -m _ddp_script OUT [--crash-epoch E] [--only train]``, tests/ on PYTHONPATH).

Everything is small (16x16 synthetic images, LeNet-5) and seeded, so the two ways of running can
be compared number by number.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _train_script import synthetic_dataset  # noqa: E402

from teachx.data.transforms import normalize  # noqa: E402
from teachx.models import build_model  # noqa: E402
from teachx.models.impactx import build_impactx  # noqa: E402
from teachx.teachers import build as build_teacher  # noqa: E402
from teachx.teachers.store import fill_store, open_store  # noqa: E402
from teachx.config.train import TrainConfig  # noqa: E402
from teachx.training.impactx import ImpactxTask, MapSource  # noqa: E402
from teachx.training.trainer import ClassifierTask, DataPlan, Trainer  # noqa: E402

MAP_BATCH = 7  # does not divide the 192 images: the last batch and the rank shares are uneven
PREFILLED = np.arange(0, 192, 5)  # rows already done before the (sharded) fill: a resumed store
EPOCHS = 3


def dataset():
    return synthetic_dataset()


def plan(ds, augment=None) -> DataPlan:
    return DataPlan(ds, np.arange(160), np.arange(160, 192), augment)


def teacher_model(ds):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return build_model("lenet5", 1, 4, (16, 16)).eval()


def ig_compute(ds):
    """Integrated-gradients maps of a seeded LeNet-5 for dataset indices (the real workload)."""
    model = teacher_model(ds)
    teacher = build_teacher("integrated_gradients", steps=8)

    def compute(idx: np.ndarray) -> torch.Tensor:
        x = normalize(torch.from_numpy(np.ascontiguousarray(ds.train.images[idx])).permute(0, 3, 1, 2), ds.mean, ds.std)
        y = torch.from_numpy(np.asarray(ds.train.labels[idx])).long()
        return teacher.attribute(model, x, y).detach()

    return compute


def batch_dependent_compute(idx: np.ndarray) -> torch.Tensor:
    """A map that depends on which images share the batch (as seeded sampling teachers do)."""
    g = torch.Generator().manual_seed(int(np.sum(idx)) * 31 + len(idx))
    return torch.randn(len(idx), 1, 4, 4, generator=g) + torch.as_tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1)


def make_maps(out: Path, ds, distributed=None) -> None:
    """Two stores under ``out/maps``: IG maps and batch-dependent maps; some rows pre-filled alone."""
    quiet = lambda msg: None  # noqa: E731
    for name, compute, shape in (("ig", ig_compute(ds), (1, 16, 16)), ("batchdep", batch_dependent_compute, (1, 4, 4))):
        store = open_store(out / "maps", {"teacher": name}, len(ds.train), shape, log=quiet, distributed=distributed)
        if distributed is False or int(os.environ.get("RANK", "0")) == 0:
            if not store.done[PREFILLED].all():
                fill_store(store, PREFILLED, compute, MAP_BATCH, progress=False, distributed=False)
        from teachx.utils import distributed as dist_utils

        if distributed is not False:
            dist_utils.barrier()
        fill_store(store, np.arange(len(ds.train)), compute, MAP_BATCH, progress=False, distributed=distributed)
        assert store.complete


def train_classifier(out: Path, ds, epochs: int = EPOCHS, crash_epoch: int = -1, distributed=None, augment=None):
    torch.manual_seed(0)
    model = build_model("lenet5", 1, 4, (16, 16))
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=32,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        schedule="cosine",
        progress=False,
        eval_batch_size=10,
    )
    task = CrashingTask(model, crash_epoch)
    trainer = Trainer(
        task,
        plan(ds, augment),
        cfg,
        out / "classifier",
        seed=1,
        device="cpu",
        meta={"kind": "classifier"},
        log=lambda s: None,
        distributed=distributed,
        on_epoch_start=task.set_epoch,
    )
    return trainer.fit()


def train_impactx(out: Path, ds, lam: float, distributed=None):
    torch.manual_seed(0)
    model = build_impactx("lenet5", 1, 4, (16, 16), decoder_width=8, decoder="paper")
    store = open_store(
        out / "maps", {"teacher": "ig"}, len(ds.train), (1, 16, 16), log=lambda m: None, distributed=distributed
    )
    source = MapSource(store, "teacher", np.arange(160), 0) if lam > 0 else None
    cfg = TrainConfig(
        epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", progress=False
    )
    trainer = Trainer(
        ImpactxTask(model, source, lam),
        plan(ds),
        cfg,
        out / f"impactx_lam{lam}",
        seed=2,
        device="cpu",
        meta={"kind": "impactx"},
        log=lambda s: None,
        distributed=distributed,
    )
    return trainer.fit()


#: training methods run under DDP: name -> method.options (rrr is deterministic: compared with 1 process number by number)
METHOD_RUNS = {"rrr": {"lam": 5.0}, "saliency_guided": {}, "reldrop": {"relevance": "teacher"}, "abn": {}}


def masked(ds):
    """The synthetic dataset with a 4x4 corner square as every image's annotation mask."""
    from teachx.data.base import ImageDataset, Split

    def split(sp):
        masks = np.zeros(sp.images.shape[:3], dtype=np.uint8)
        masks[:, :4, :4] = 1
        return Split(sp.images, sp.labels, masks)

    return ImageDataset(ds.name, ds.class_names, split(ds.train), split(ds.test), ds.mean, ds.std, hflip=False)


def train_method(out: Path, ds, name: str, distributed=None):
    """One training method through the registry, as `teachx run` builds it (teacher maps: the IG store)."""
    from teachx.config.schema import MethodConfig, RunConfig
    from teachx.training.methods import MethodContext, build_method

    cfg = RunConfig()
    cfg.method = MethodConfig(name, dict(METHOD_RUNS[name]))
    p = plan(masked(ds))
    store = open_store(
        out / "maps", {"teacher": "ig"}, len(ds.train), (1, 16, 16), log=lambda m: None, distributed=distributed
    )
    method = build_method(cfg)
    ctx = MethodContext(cfg, p, torch.device("cpu"), store, None, lambda m: None)
    torch.manual_seed(0)
    model = method.build_model(ctx)
    tcfg = TrainConfig(
        epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", progress=False
    )
    trainer = Trainer(
        method.task(model, ctx),
        p,
        tcfg,
        out / f"method_{name}",
        seed=2,
        device="cpu",
        meta={"kind": method.checkpoint_kind},
        log=lambda s: None,
        distributed=distributed,
    )
    return trainer.fit()


class CrashingTask(ClassifierTask):
    """Rank 1 dies abruptly (os._exit) in the third step of ``crash_epoch``: a mid-epoch interruption."""

    def __init__(self, model, crash_epoch: int):
        super().__init__(model)
        self.crash_epoch, self.epoch, self.steps = crash_epoch, -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.steps = epoch, 0

    def loss(self, x, y, maps):
        self.steps += 1
        if self.epoch == self.crash_epoch and self.steps == 3 and int(os.environ.get("RANK", "0")) == 1:
            os._exit(17)
        return super().loss(x, y, maps)


def check_helpers(out: Path, rank: int) -> None:
    """Exercise the collective helpers; each rank reports what it saw in ``out/rank<r>.json``."""
    import json

    from teachx.errors import ConfigError
    from teachx.utils import distributed as du

    def fail():
        raise ConfigError("rank 0 failed")

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world": du.world_size(),
        "is_main": du.is_main(),
        "on_main_pid": du.on_main(os.getpid),
        "own_pid": os.getpid(),
        "sum": du.all_reduce_sum(torch.tensor([float(rank + 1)])).item(),
        "broadcast": du.broadcast_object({"from": rank}),
        "main_first": du.main_first(
            lambda: (out / "first.txt").exists() or (out / "first.txt").write_text(str(rank)) and False
        ),
    }
    try:
        du.on_main(fail)
        record["error"] = None
    except ConfigError as exc:
        record["error"] = str(exc)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", default="helpers,maps,train,impactx,methods")
    ap.add_argument("--crash-epoch", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from teachx.utils.distributed import init_distributed, shutdown

    info = init_distributed()
    assert info.world_size == int(os.environ["WORLD_SIZE"]) and info.backend == "gloo", info
    out, ds = Path(args.out), dataset()
    only = args.only.split(",")
    if "helpers" in only:
        check_helpers(out, info.rank)
    if "maps" in only:
        make_maps(out, ds)
    if "train" in only:
        train_classifier(out, ds, crash_epoch=args.crash_epoch)
    if "impactx" in only:
        train_impactx(out, ds, lam=1.0)
        train_impactx(out, ds, lam=0.0)  # the decoder is unused: DDP needs find_unused_parameters
    if "methods" in only:
        for name in METHOD_RUNS:
            train_method(out, ds, name)
    shutdown()


if __name__ == "__main__":
    main()
