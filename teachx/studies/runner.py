"""Running a study: every (regime, arm, seed) unit trained once (or read back), evaluated, then the study record.

Work is shared wherever the result is the same: a classifier unit (a baseline, or a teacher model) is keyed
by what changes it and trained once for every arm that needs it; units write their records atomically and
under a lock, so a re-run, or another worker process on the same directory, skips what is complete. The
statistics over the finished units are :mod:`teachx.studies.statistics`'.

Why one module of over 500 lines: the unit kinds (classifiers, method units, their evaluations and the
baselines' reveal) share the runner's caches, locks and keys; split, each part would reach into the others.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from teachx.config.loader import dump_yaml
from teachx.config.schema import RunConfig
from teachx.errors import ConfigError
from teachx.data.artefacts import ground_truth
from teachx.data.transforms import normalize
from teachx.evaluation import build_metric, evaluate_maps
from teachx.runs import rundir
from teachx.runs.evaluation import map_quality, shortcut_evaluation
from teachx.runs.pipeline import train_method_stage
from teachx.runs.plan import eval_indices, make_plan, teacher_training
from teachx.runs.recovery import stage_checkpoint, stage_done
from teachx.runs.stages import load_classifier, load_stage_model, train_classifier
from teachx.runs.teacher import as_nchw, make_teacher, teacher_maps
from teachx.studies.records import UnitFile, UnitRecord
from teachx.runs.records import ArtefactShares
from teachx.runs.reveal_benchmark import reveal_benchmark
from teachx.runs.revise import (
    POST_HOC,
    Measures,
    Revision,
    apply_correction,
    attacked_share,
    fit_correction_concept,
    measure,
    read_revision,
    recipe_config,
)
from teachx.studies.spec import (
    BASELINE,
    EvalSpec,
    StudySpec,
    _source_name,
    classifier_key,
    eval_key,
    reveal_key,
    revision_key,
    unit_key,
)
from teachx.studies.statistics import summarize_study, summary_lines
from teachx.teachers.postprocess import postprocess
from teachx.training.concepts import concept_paths, load_concept, save_concept
from teachx.training.methods import build_method, legacy_layout
from teachx.utils.hashing import hash_json
from teachx.utils.io import atomic_path, read_trusted_json, write_json_atomic
from teachx.utils.numbers import number
from teachx.utils.locking import Busy, file_lock
from teachx.utils.seeding import choose_device


@dataclass
class StudyResult:
    path: Path  # study.json
    data: dict[str, Any]
    trained: int  # models trained by this invocation (0 when everything was complete)


class _Runner:
    def __init__(self, spec: StudySpec, out: Path, log: Callable[[str], None], progress: bool, verbose: bool):
        self.spec, self.out, self.log, self.progress, self.verbose = spec, out, log, progress, verbose
        self.plans: dict[str, Any] = {}
        self.trained = 0
        self.units: dict[str, UnitRecord] = {}

    def stage_log(self, msg: str) -> None:
        if self.verbose:
            self.log("    " + msg)

    def plan(self, cfg: RunConfig):
        key = hash_json(cfg.to_dict()["data"])
        if key not in self.plans:
            self.plans[key] = make_plan(cfg, progress=self.progress)
        return self.plans[key]

    def unit_dir(self, key: str, cfg: RunConfig, kind: str) -> Path:
        d = self.out / "units" / key
        if not (d / "unit.json").exists():
            write_json_atomic(d / "unit.json", UnitFile(key, kind, cfg.to_dict()).to_dict())
        return d

    def checkpoint(self, key: str) -> Path:
        """A classifier unit's best checkpoint: always the unit's own file, even if the study folder
        was moved or copied (never the one its record names elsewhere)."""
        return stage_checkpoint(self.out / "units" / key, stage_done(self.out / "units" / key) or {})

    def classifier(self, cfg: RunConfig, backbone: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Train one classifier unit (or read it back); raises Busy while another process trains it."""
        key = classifier_key(cfg, backbone, options)
        d = self.unit_dir(key, cfg, "classifier")
        done = stage_done(d)
        if done is None:
            with file_lock(d / ".lock", wait=False):
                done = stage_done(d)  # another process may have finished it since we looked
                if done is None:
                    self.trained += 1
                    done = train_classifier(cfg, self.plan(cfg), d, backbone, options, self.stage_log)
        self.units[key] = UnitRecord(
            kind="classifier",
            backbone=backbone,
            seed=cfg.seed,
            test_acc=done["test_acc"],
            val_acc=done.get("val_acc"),
            seconds=done.get("seconds"),
            seconds_per_epoch=done.get("seconds_per_epoch"),
            history=done.get("history", []),
            shortcut=self._shortcut(cfg, d, lambda: {"model": self._load_classifier(cfg, key)}),
            test_splits=done.get("test_splits"),
            reveal=self._reveal(cfg, d, key),
        )
        return key, done

    def _reveal(self, cfg: RunConfig, d: Path, key: str) -> Optional[dict[str, Any]]:
        """With study.eval.reveal on an artefact benchmark: the classifier's unannotated reveal, scored against the
        ground truth (``reveal-<key>.json``, made once; Busy while another worker makes it)."""
        settings = self.spec.eval.reveal
        if settings is None or cfg.data.artefact is None:
            return None
        path = d / f"reveal-{reveal_key(settings)}.json"
        fix = f"delete '{path}' and re-run the same `teachx study` command"
        if path.exists():
            return read_trusted_json(path, fix, "reveal evaluation")
        with file_lock(d / ".reveal.lock", wait=False):
            if path.exists():
                return read_trusted_json(path, fix, "reveal evaluation")
            plan = self.plan(cfg)
            found = reveal_benchmark(cfg, plan, self._load_classifier(cfg, key), choose_device(cfg.device), settings)
            if found is None:
                return None
            record = {**found.to_dict(), "headline": found.headline()}
            write_json_atomic(path, record, digest=True)
            return record

    def _load_classifier(self, cfg: RunConfig, key: str):
        return load_classifier(self.checkpoint(key), self.plan(cfg).dataset)

    def _shortcut(self, cfg: RunConfig, d: Path, models) -> Optional[dict[str, Any]]:
        """On a shortcut dataset: the unit's attribution share on the artefact (``shortcut.json``, made once)."""
        path = d / "shortcut.json"
        if path.exists():
            return read_trusted_json(
                path, f"delete '{path}' and re-run the same `teachx study` command", "shortcut evaluation"
            )
        if cfg.data.artefact is not None:  # an R2R benchmark: the gradient's share on the attacked images' artefact
            plan = self.plan(cfg)
            share = attacked_share(models()["model"], plan, choose_device(cfg.device), cfg.seed)
            if share is None:  # an artefact without a place (a colour shift)
                return None
            block = ArtefactShares.measured(share).to_dict()
            write_json_atomic(path, block, digest=True)
            return block
        if cfg.data.shortcut is None and not _source_name(cfg.data.name).startswith("decoy"):
            return None
        plan = self.plan(cfg)
        if getattr(plan.dataset.test, "masks", None) is None:
            return None
        out = shortcut_evaluation(cfg, plan, models(), choose_device(cfg.device))
        block = out["model"]
        block["images"] = out["images"]
        write_json_atomic(path, block, digest=True)
        return block

    def _revealed_concept(
        self, cfg: RunConfig, base_key: str, source: str = "revealed"
    ) -> tuple[Optional[Path], Optional[Measures], str]:
        """The correction concept of a baseline (``study.revise``): the top group its unannotated reveal found in
        the poisoned class (``source="annotated"``: the images that truly carry the artefact, a reference that
        reads the annotations), as a CAV at the correction layer
        (:func:`teachx.runs.revise.fit_correction_concept`). Made once per baseline and concept key in the
        baseline's unit folder, with the baseline's measures along it: (concept file, measures before, note). No
        usable group gives (None, None, why): the pipeline leaves that baseline as it is."""
        revise, settings = self.spec.revise, self.spec.eval.reveal
        assert revise is not None and settings is not None
        d = self.out / "units" / base_key
        stem = d / f"concept-{revise.concept_key(source, settings)}"
        before_path, none_path = stem.with_name(stem.name + "-before.json"), stem.with_name(stem.name + "-none.json")
        fix = f"delete the files '{stem.name}*' in '{d}' and re-run the same `teachx study` command"

        def read() -> Optional[tuple[Optional[Path], Optional[Measures], str]]:
            if none_path.exists():
                return None, None, str(read_trusted_json(none_path, fix, "revealed concept")["why"])
            if before_path.exists():
                load_concept(stem)  # verified: a damaged concept is one clear error
                before = Measures(**read_trusted_json(before_path, fix, "measures before correction"))
                return concept_paths(stem)[0], before, ""
            return None

        found = read()
        if found is not None:
            return found
        with file_lock(d / ".reveal.lock", wait=False):
            found = read()
            if found is not None:
                return found
            plan, device = self.plan(cfg), choose_device(cfg.device)
            model = self._load_classifier(cfg, base_key)
            if source == "annotated":  # the reference: the images that carry the artefact, read from the truth
                groups = _annotated_groups(plan)
                why = "no class has training images with and without the artefact"
            else:
                result = reveal_benchmark(cfg, plan, model, device, settings)
                groups = dict(result.grown_groups if revise.group == "grown" else result.top_groups) if result else {}
                why = "the reveal found no group in the poisoned class"
            if groups:
                label = min(groups, key=int)  # the first poisoned class's
                try:
                    concept = fit_correction_concept(
                        f"{source}-class{label}",
                        model,
                        plan,
                        device,
                        int(label),
                        groups[label],
                        revise.layer,
                        revise.cav,
                        info={"source": source, **({"reveal": reveal_key(settings)} if source == "revealed" else {})},
                        localise=revise.masks(),
                    )
                except ConfigError as exc:
                    why = str(exc)
                else:
                    file = save_concept(concept, stem, overwrite=True)
                    before = measure(model, plan, concept.layer, concept.cav, device, seed=cfg.seed)
                    write_json_atomic(before_path, asdict(before), digest=True)
                    return file, before, ""
            write_json_atomic(none_path, {"why": why}, digest=True)
            return None, None, why

    def revision(self, cfg: RunConfig, base_key: str, method: str, source: str = "revealed") -> tuple[str, UnitRecord]:
        """Correct the baseline ``base_key`` with ``method`` along its revealed concept (``study.revise``), or
        read the correction back; raises Busy while another process makes it."""
        revise, settings = self.spec.revise, self.spec.eval.reveal
        assert revise is not None and settings is not None
        items = revise.items(method)
        key = revision_key(base_key, revise.concept_key(source, settings), method, items)
        d = self.out / "units" / key
        path = d / "revision.json"
        if not path.exists():
            concept_file, before, why = self._revealed_concept(cfg, base_key, source)
            tuned = None
            if concept_file is not None and method not in POST_HOC:
                tuned, _ = recipe_config(cfg, method, concept_file, items)
            self.unit_dir(key, tuned or cfg, "revision")
            with file_lock(d / ".lock", wait=False):
                if not path.exists():
                    self._revise(cfg, base_key, method, tuned, concept_file, before, why, d)
        rec = read_revision(path)
        self.units[key] = UnitRecord(
            kind="revision",
            method_fields={"method": method},
            seed=cfg.seed,
            baseline_unit=base_key,
            test_acc=rec.after.test_acc,
            seconds=(rec.train or {}).get("seconds"),
            seconds_per_epoch=(rec.train or {}).get("seconds_per_epoch"),
            shortcut=ArtefactShares.measured(rec.after.artefact_share).to_dict() if rec.after.artefact_share else None,
            test_splits=rec.after.test_splits,
            revision={k: v for k, v in rec.to_dict().items() if k not in ("method", "options")},
        )
        return key, self.units[key]

    def _revise(
        self,
        cfg: RunConfig,
        base_key: str,
        method: str,
        tuned: Optional[RunConfig],
        concept_file: Optional[Path],
        before: Optional[Measures],
        why: str,
        d: Path,
    ) -> None:
        plan, device = self.plan(cfg), choose_device(cfg.device)
        baseline = self._load_classifier(cfg, base_key)
        if concept_file is None:  # nothing to correct along: the baseline as it is, measured as one
            unchanged = measure(baseline, plan, None, None, device, seed=cfg.seed)
            rec = Revision(method, {"class": None}, {}, unchanged, unchanged, None, [f"no concept: {why}"])
        else:
            concept = load_concept(concept_file)
            if tuned is not None and stage_done(d / "model") is None:
                self.trained += 1
            fixed = apply_correction(
                method,
                tuned,
                cfg,
                plan,
                baseline,
                concept,
                d / "model",
                self.stage_log,
                self.progress,
                device,
                before,
                wait=False,
            )
            rec = Revision(
                method,
                {
                    "name": concept.name,
                    "class": concept.info.get("class"),
                    "layer": concept.layer,
                    "file": concept_file.relative_to(self.out).as_posix(),
                    "model_digest": concept.model_digest,
                    "n_carrying": concept.info.get("carrying"),
                },
                {  # the method's own options (a typed method's as recorded before they moved to method.options)
                    k: v
                    for k, v in (legacy_layout(tuned.to_dict())["method"]["options"].items() if tuned else [])
                    if k != "concept"
                },
                fixed.before,
                fixed.after,
                fixed.train,
            )
        write_json_atomic(d / "revision.json", rec.to_dict(), digest=True)

    def method(self, cfg: RunConfig, base_key: str, teacher_key: str) -> tuple[str, UnitRecord, bool]:
        """Train one unit of the arm's training method, and evaluate it where the method asks for it
        (``study_evaluates``: also an arm that reuses a baseline that explains itself), or read it back; returns
        (key, record, was_cached)."""

        method = build_method(cfg)
        key = unit_key(cfg)
        d = self.unit_dir(key, cfg, method.unit_kind)
        eval_path = d / f"eval-{eval_key(cfg, self.spec.eval)}.json" if method.study_evaluates() else None
        if method.reuses_baseline:  # the arm's own baseline is this model: nothing more to train
            stage, ev, cached = dict(stage_done(self.out / "units" / base_key) or {}), {}, True
            if eval_path is not None:  # a model that explains itself (a B-cos baseline): its own evaluation file
                if not eval_path.exists():
                    with file_lock(d / ".lock", wait=False):
                        if not eval_path.exists():
                            cached = False
                            self._evaluate_baseline(cfg, method, d, eval_path, base_key, teacher_key)
                ev = read_unit_evaluation(eval_path)
        else:
            found = self._cached(d, eval_path)
            cached = found is not None
            if found is None:
                with file_lock(d / ".lock", wait=False):
                    found = self._cached(d, eval_path)  # another process may have finished it since we looked
                    cached = found is not None
                    if found is None:
                        found = self._train(cfg, method, d, eval_path, base_key, teacher_key)
            stage, ev = found
        if method.reuses_baseline:  # the classifier unit's own evaluation (made by `classifier`)
            shortcut = self.units[base_key].shortcut
        else:
            shortcut = self._shortcut(cfg, d, lambda: {"model": self._method_model(d)})
        self.units[key] = UnitRecord(
            kind=method.unit_kind,
            method_fields=method.unit_record(stage),
            seed=cfg.seed,
            teacher=cfg.teacher.method,
            baseline_unit=base_key,
            teacher_unit=teacher_key,
            test_acc=stage["test_acc"],
            val_acc=stage.get("val_acc"),
            seconds=stage.get("seconds"),
            seconds_per_epoch=stage.get("seconds_per_epoch"),
            history=stage.get("history", []),
            evaluation=ev,
            shortcut=shortcut,
            test_splits=stage.get("test_splits"),
        )
        return key, self.units[key], cached

    @staticmethod
    def _method_model(d: Path):
        return load_stage_model(d)

    @staticmethod
    def _cached(d: Path, eval_path: Optional[Path]) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """(stage record, evaluation) of a complete unit: trained, and evaluated where ``eval_path`` is given."""
        stage = stage_done(d)  # verified against its digest, like the evaluation below
        if stage is None:
            return None
        if eval_path is None:
            return stage, {}
        return (stage, read_unit_evaluation(eval_path)) if eval_path.exists() else None

    def _train(
        self, cfg: RunConfig, method, d: Path, eval_path: Optional[Path], base_key: str, teacher_key: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Train the unit with the pipeline's stage code (:func:`train_method_stage`) on the teacher maps the
        method asks for, then evaluate it into ``eval_path`` (when given)."""
        plan = self.plan(cfg)
        ds = plan.dataset
        timings: dict[str, float] = {}
        teacher_model = load_classifier(self.checkpoint(teacher_key), ds)
        stores = self._stores(cfg, method, teacher_model, timings)
        if stage_done(d) is None:
            self.trained += 1
        t0 = time.perf_counter()
        record, model = train_method_stage(
            cfg,
            plan,
            stores.get("train"),
            teacher_model,
            d,
            self.stage_log,
            baseline=lambda: load_classifier(self.checkpoint(base_key), ds),
        )
        timings[method.name] = time.perf_counter() - t0
        if eval_path is None:
            return record, {}
        return record, self._evaluate(cfg, model, teacher_model, stores, base_key, d, eval_path, timings)

    def _evaluate_baseline(
        self, cfg: RunConfig, method, d: Path, eval_path: Path, base_key: str, teacher_key: str
    ) -> dict[str, Any]:
        """Evaluate the baseline model of an arm that reuses it, where that model explains itself (a B-cos
        network), into ``eval_path`` in the arm's own unit folder, as a trained method unit is evaluated."""
        ds = self.plan(cfg).dataset
        timings: dict[str, float] = {}
        teacher_model = load_classifier(self.checkpoint(teacher_key), ds)
        stores = self._stores(cfg, method, teacher_model, timings)
        model = self._load_classifier(cfg, base_key)
        return self._evaluate(cfg, model, teacher_model, stores, base_key, d, eval_path, timings)

    def _stores(self, cfg: RunConfig, method, teacher_model, timings: dict[str, float]) -> dict[str, Any]:
        """The teacher's map stores of the splits the method's unit needs (:meth:`study_maps`), made or read."""
        plan = self.plan(cfg)
        t0 = time.perf_counter()
        stores = {
            split: teacher_maps(
                cfg,
                plan,
                teacher_model,
                split,
                plan.train_idx if split == "train" else eval_indices(cfg, plan),
                choose_device(cfg.device),
                self.stage_log,
                self.progress,
                wait=False,
            )
            for split in method.study_maps()
        }
        timings["maps"] = time.perf_counter() - t0
        return stores

    def _evaluate(
        self,
        cfg: RunConfig,
        model,
        teacher_model,
        stores: dict[str, Any],
        base_key: str,
        d: Path,
        eval_path: Path,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """The unit's evaluation (its own map's quality and faithfulness, example arrays), written to ``eval_path``."""
        plan, device = self.plan(cfg), choose_device(cfg.device)
        t0 = time.perf_counter()
        train_store, test_store = stores["train"], stores["test"]
        ev: dict[str, Any] = {
            "map_quality": map_quality(
                model, plan, test_store, train_store, device, cfg=cfg, teacher_model=teacher_model
            )
        }
        baseline = load_classifier(self.checkpoint(base_key), plan.dataset)
        ev.update(_evaluate_unit(cfg, self.spec.eval, plan, model, baseline, test_store, device, d))
        timings["evaluation"] = time.perf_counter() - t0
        ev["timings"] = timings
        ev["map_store"] = {"train": str(train_store.path), "test": str(test_store.path)}
        write_json_atomic(eval_path, ev, digest=True)
        return ev


def _annotated_groups(plan) -> dict[str, np.ndarray]:
    """Class -> its training images that carry the artefact, from the benchmark's ground truth: what an annotated
    reference (``study.revise.concepts: [annotated]``) corrects along; never what a reveal reads."""
    truth = ground_truth(plan.dataset).train_poisoned
    train_idx = np.sort(np.asarray(plan.train_idx))
    labels = np.asarray(plan.dataset.train.labels)[train_idx]
    return {str(c): train_idx[(labels == c) & truth[train_idx]] for c in np.unique(labels[truth[train_idx]])}


def read_unit_evaluation(eval_path: Path) -> dict[str, Any]:
    """An IMPACTX unit's ``eval-<key>.json``, verified against its digest (a damaged one names the fix)."""
    fix = f"delete '{eval_path}' and re-run the same `teachx study` command (it evaluates that unit again)"
    return read_trusted_json(eval_path, fix, "study unit evaluation")


def _eval_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed, class-balanced (round-robin) subset of the test set: the same for every unit."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < min(n, labels.size):
        for pool in per_class:
            if pool and len(out) < n:
                out.append(pool.pop())
    return np.sort(np.array(out, dtype=np.int64))


def _evaluate_unit(
    cfg: RunConfig, ev: EvalSpec, plan, model, baseline, test_store, device, unit_dir: Path
) -> dict[str, Any]:
    """Post-hoc teacher maps on the IMPACTX model, example arrays, optional MoRF/LeRF AUCs."""
    ds = plan.dataset
    out: dict[str, Any] = {}
    n_eval = ev.n_images if ev.faithfulness else ev.examples
    if n_eval == 0:
        return out

    pool = eval_indices(cfg, plan)  # test images whose teacher maps are stored
    idx = pool[_eval_indices(np.asarray(ds.test.labels)[pool], min(n_eval, len(pool)), 2024)]
    x_u8 = as_nchw(ds.test.images[idx])
    x = normalize(x_u8.to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(ds.test.labels[idx])).long().to(device)
    model = model.to(device).eval()
    baseline = baseline.to(device).eval()
    built_in = model.explain(x).float()
    teacher_maps = test_store.read(idx).to(device)
    teacher = make_teacher(cfg, plan, device)

    def explain(m: torch.nn.Module) -> Optional[torch.Tensor]:
        try:
            maps = []
            for s in range(0, len(idx), 64):
                raw = teacher.attribute(m, x[s : s + 64], y[s : s + 64])
                maps.append(
                    postprocess(
                        raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=cfg.teacher.smooth
                    ).detach()
                )
            return torch.cat(maps)
        except Exception as exc:  # an optional diagnostic must not lose hours of training
            out.setdefault("errors", []).append(
                f"{cfg.teacher.method} on {type(m).__name__}: {type(exc).__name__}: {exc}"
            )
            return None

    post_hoc = explain(model)
    if ev.examples:
        k = min(ev.examples, len(idx))
        pick = np.linspace(0, len(idx) - 1, k).round().astype(int)
        arrays = {
            "index": idx[pick],
            "images": x_u8[pick].numpy(),
            "labels": y[pick].cpu().numpy(),
            "teacher": teacher_maps[pick].cpu().numpy(),
            "built_in": built_in[pick].cpu().numpy(),
        }
        if post_hoc is not None:
            arrays["post_hoc"] = post_hoc[pick].cpu().numpy()
        with atomic_path(unit_dir / "examples.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        out["examples"] = {"file": "examples.npz", "class_names": list(ds.class_names)}
    if ev.faithfulness:
        metrics = [_metric("pixel_flipping_morf", ev), _metric("pixel_flipping_lerf", ev)]
        on_impactx = {"built_in": built_in}
        if post_hoc is not None:
            on_impactx["teacher_post_hoc"] = post_hoc
        rep1 = evaluate_maps(model, x, y, on_impactx, metrics, seed=cfg.seed)
        on_base = {"teacher_on_baseline": explain(baseline)}
        on_base = {k: v for k, v in on_base.items() if v is not None}
        faith: dict[str, Any] = {"n_images": int(len(idx)), "sets": {}}
        for name, res in rep1["maps"].items():
            faith["sets"][name if name != "random" else "random"] = _auc_summary(res)
        if on_base:
            rep2 = evaluate_maps(baseline, x, y, on_base, metrics, seed=cfg.seed)
            for name, res in rep2["maps"].items():
                faith["sets"][name if name != "random" else "random_on_baseline"] = _auc_summary(res)
        out["faithfulness"] = faith
    return out


def _metric(name: str, ev: EvalSpec):
    return build_metric(name, steps=ev.steps, patch_size=ev.patch_size)


def _auc_summary(res: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for metric, r in res.items():
        out[metric] = {
            "auc": r.get("mean"),
            "std": r.get("std"),
            "curve": r.get("mean_curve"),
            "curve_x": r.get("curve_x"),
        }
    return out


def prepare_study_dir(out: Path, spec: StudySpec) -> Path:
    """Create OUT, or reuse a study directory.

    Units are keyed by content, so a changed study (more seeds, a new arm) reuses every unit that
    is identical and trains only the rest. A non-empty directory that teachx did not make as a
    study (no ``.teachx-study`` marker; a study of an older teachx is known by its study.yaml) is
    refused: its files -- a study.yaml of the user's own, say -- are never replaced. Another
    process starting on the same directory at the same moment (its marker or study.yaml still a
    temp file) is not a reason to refuse.
    """
    return rundir.prepare_study_dir(Path(out).resolve(), dump_yaml({"study": spec.to_dict(), **spec.base}))


_POLL_SECONDS = 5.0


def _run_job(
    spec: StudySpec,
    r: "_Runner",
    cells: dict[tuple[str, str], dict[int, str]],
    regime: str,
    seed: int,
    arm: Optional[str],
    progress: bool,
) -> str:
    """One unit of work (a baseline when ``arm`` is None); returns its log line."""
    cfg = spec.config(regime, arm, seed)
    cfg.train.progress = progress
    before = r.trained
    t0 = time.perf_counter()
    own_base, brec = r.classifier(cfg, cfg.model.backbone, dict(cfg.model.options))
    if arm is None or spec.is_ceiling(arm):  # the regime's baseline, or its reference baseline (study.ceiling)
        cells.setdefault((regime, arm or BASELINE), {})[seed] = own_base
        how = f"trained {time.perf_counter() - t0:.1f}s" if r.trained > before else "cached"
        return f"regime={regime} arm={arm or BASELINE} seed={seed} test_acc={number(brec['test_acc'])} ({how})"
    if arm in spec.revise_rows:  # a correction of the baseline along its revealed concept
        key, rec = r.revision(cfg, own_base, spec.revise_rows[arm], spec.revise.source(arm) if spec.revise else "")
        cells.setdefault((regime, arm), {})[seed] = key
        how = f"made {time.perf_counter() - t0:.1f}s" if r.trained > before else "done"
        splits = " ".join(f"{k}={number(v['acc'])}" for k, v in (rec.test_splits or {}).items())
        notes = "; ".join((rec.revision or {}).get("notes") or [])
        return f"regime={regime} arm={arm} seed={seed} test_acc={number(rec.test_acc)} {splits}{' (' + notes + ')' if notes else ''} ({how})"
    tcfg, tb, topts = teacher_training(cfg)
    tkey, trec = r.classifier(tcfg, tb, topts)
    key, rec, cached = r.method(cfg, own_base, tkey)
    cells.setdefault((regime, arm), {})[seed] = key
    took = f"{time.perf_counter() - t0:.1f}s"  # evaluated: trained before, or nothing to train (a reused baseline)
    how = f"trained {took}" if r.trained > before else "cached" if cached else f"evaluated {took}"
    extra = ""
    q = rec.map_quality
    if q:
        extra = f" map_corr={number(q['corr'], 3)}"
    if tkey != own_base:
        extra += f" teacher_acc={number(trec['test_acc'])}"
    sc = rec.shortcut
    if sc:
        extra += " artefact_share=" + "/".join(
            f"{m}:{number(sc[m], 3)}" for m in ("gradient", "lrp", "built_in") if sc.get(m) is not None
        )
        if sc.get("honesty") is not None:
            extra += f" honesty={number(sc['honesty'], 2)}"
    return f"regime={regime} arm={arm} seed={seed} test_acc={number(rec.test_acc)}{extra} ({how})"


def run_study(
    spec: StudySpec,
    out: str | Path,
    log: Callable[[str], None] = print,
    progress: bool = False,
    verbose: bool = False,
    worker: bool = False,
) -> Optional[StudyResult]:
    """Run (or resume) every (regime, arm, seed) unit, then write OUT/study.json with the statistics.

    ``worker``: one of several processes submitted for this study (``--launcher submitit``): when every
    unit left is in progress in another worker, this one stops (None) instead of waiting for them; the
    worker that finishes the last unit writes study.json.
    """
    out = prepare_study_dir(Path(out), spec)
    t_start = time.perf_counter()
    r = _Runner(spec, out, log, progress, verbose)
    cells: dict[tuple[str, str], dict[int, str]] = {}  # (regime, arm) -> seed -> unit key
    # every (regime, seed, arm) in order; arm None is the regime's baseline
    pending: list[tuple[str, int, Optional[str]]] = [
        (regime, seed, arm)
        for regime in spec.regimes
        for seed in spec.seeds
        for arm in [None, *spec.arms, *spec.extra_rows]
        if spec.runs(regime, arm)
    ]
    total, done = len(pending), 0
    waiting_for = -1
    while pending:
        deferred = []
        for regime, seed, arm in pending:
            try:
                line = _run_job(spec, r, cells, regime, seed, arm, progress)
            except Busy:  # another process (study worker) holds a unit or a map store this job needs
                deferred.append((regime, seed, arm))
                continue
            done += 1
            log(f"[{done}/{total}] {line}")
            for err in r.units[cells[(regime, arm or BASELINE)][seed]].errors:
                log(f"    warning: {err}")
        if deferred and len(deferred) == len(pending):
            if worker:
                log(f"{len(deferred)} unit(s) left, all in progress in other workers; this worker stops")
                return None
            if waiting_for != len(deferred):
                log(
                    f"waiting for other processes working on this study: {len(deferred)} unit(s) left, all in progress elsewhere"
                )
                waiting_for = len(deferred)
            time.sleep(_POLL_SECONDS)
        pending = deferred
    record = summarize_study(spec, cells, r.units)
    record.trained_this_invocation = r.trained
    record.wall_seconds_this_invocation = time.perf_counter() - t_start
    record.elapsed = _elapsed(out, [k for by_seed in cells.values() for k in by_seed.values()])
    path = out / "study.json"
    data = record.to_dict()
    write_json_atomic(path, data, digest=True)
    for line in summary_lines(record):
        log(line)
    return StudyResult(path, data, r.trained)


def _elapsed(out: Path, keys: list[str]) -> dict[str, Any]:
    """Wall time of the whole study, over all invocations and processes: from the first unit's
    creation to the last record written (file times, so it includes any pauses between invocations)."""
    from datetime import datetime, timezone

    starts, ends = [], []
    for key in set(keys):
        d = out / "units" / key
        starts.append((d / "unit.json").stat().st_mtime)
        ends.extend(
            p.stat().st_mtime for p in [d / "stage.json", d / "revision.json", *d.glob("eval-*.json")] if p.exists()
        )
    if not starts or not ends:
        return {}
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    return {
        "first_unit_created": iso(min(starts)),
        "last_record_written": iso(max(ends)),
        "seconds": max(ends) - min(starts),
    }
