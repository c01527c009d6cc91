"""The report of a single run (``teachx run``/``teachx demo``): accuracies, per-class results, map quality,
curves, examples, timings and the resolved config, from the run's results.json and stage records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teachx.errors import RunDirError
from teachx.reporting.page import Page, read_record
from teachx.reporting.plots import confusion_figure, curves_figure
from teachx.runs.records import shortcut_shares
from teachx.runs.rundir import run_config_hash, saved_run_config
from teachx.utils.numbers import number


#: what the honesty column of the shortcut tables means, for readers of the run and study reports
HONESTY_TEXT = (
    "Honesty is the built-in map's share on the artefact divided by the share of the same model's input gradient "
    "(|gradient| of the true class, summed over channels). 1 means the built-in map shows the artefact as much as the "
    "model's own gradient does; well below 1 means the built-in map hides an artefact the model's gradient points at, "
    "so the built-in map alone would not reveal the shortcut. Models without a built-in map show their post-hoc shares only."
)


def _method_row(res: dict[str, Any]) -> list[Any]:
    """The accuracy row of the run's training method, as the method names it and its settings."""
    from teachx.training.methods import recorded_method

    method = recorded_method(res)
    if method is None:  # a method this teachx does not know: its name and accuracies
        return [
            f"{res.get('method')}",
            res.get("backbone"),
            number(res.get("method_test_acc")),
            number(res.get("method_val_acc")),
        ]
    label, details = method.result_text(res)
    return [
        label + (f" ({details})" if details else ""),
        res.get("backbone"),
        number(method.result_acc(res, "test")),
        number(method.result_acc(res, "val")),
    ]


def _method_stage(res: dict[str, Any]) -> tuple[str, str]:
    """(how the report names the run's method model, the directory of its stage) from results.json."""
    from teachx.training.methods import LEGACY_METHOD, recorded_method

    known = recorded_method(res)
    stage = known.name if known is not None else str(res.get("method", LEGACY_METHOD))
    return (known.display_name() if known is not None else stage), stage


def _per_class(doc: Page, d: Path, res: dict[str, Any]) -> None:
    """Per-class test accuracy: the method model's confusion matrix (figure, and a table up to 20 classes) and
    each class's accuracy for the baseline and the method, from the stage records."""
    label, method = _method_stage(res)
    conf = {}
    for name, sub in (("baseline", "baseline"), (label, method)):
        st = d / sub / "stage.json"
        if st.exists() and read_record(st).get("test_confusion"):
            conf[name] = np.asarray(read_record(st)["test_confusion"], dtype=np.int64)
    doc.h("Per-class accuracy (test set)")
    if not conf:
        doc.p(
            "This run did not record its test predictions per class: it was made by an earlier teachx. "
            "A new run (another --out) records them.",
            "note",
        )
        return
    names = list(res.get("class_names") or [])
    k = next(iter(conf.values())).shape[0]
    names = names[:k] + [str(i) for i in range(len(names), k)]
    main = label if label in conf else "baseline"
    m = conf[main]
    doc.figure(
        "confusion.png",
        confusion_figure(m, names, f"{main} model, {int(m.sum())} test images"),
        f"confusion matrix of the {main} model on the test set: rows the true class, columns the predicted one",
    )
    rows = []
    for i, n in enumerate(names):
        off = m[i].copy()
        off[i] = -1
        j = int(off.argmax())
        rows.append(
            [n, int(m[i].sum())]
            + [f"{c[i, i] / max(c[i].sum(), 1):.3f}" for c in conf.values()]
            + [f"{names[j]} ({int(m[i, j])})" if m[i, j] > 0 else "—"]
        )
    doc.table(
        ["class", "test images"] + [f"{name} accuracy" for name in conf] + [f"{main}: most often mistaken for"], rows
    )
    if k <= 20:
        doc.p(f"Confusion matrix of the {main} model (counts; rows: true class, columns: predicted class):", "note")
        doc.table(["true ↓ predicted →", *names], [[n, *map(int, m[i])] for i, n in enumerate(names)])
    doc.measures(["class_accuracy"])


def _revisions(doc: Page, d: Path) -> None:
    """`teachx revise` corrections saved in the run: each one's measures before and after."""
    from teachx.runs.revise import revisions

    found = revisions(d)
    if not found:
        return
    doc.h("Corrections along revealed concepts (teachx revise): before → after")
    splits = sorted({k for r in found.values() for m in (r.before, r.after) for k in (m.test_splits or {})})

    def pair(a, b, digits: int = 4) -> str:
        return f"{number(a, digits)} → {number(b, digits)}"

    rows = []
    for name, r in found.items():
        acc = {k: pair(r.before.test_splits[k]["acc"], r.after.test_splits[k]["acc"]) for k in splits} if splits else {}
        share = (
            pair(r.before.artefact_share["gradient"], r.after.artefact_share["gradient"], 3)
            if r.before.artefact_share and r.after.artefact_share
            else "—"
        )
        rows.append(
            [
                r.method,
                f"{r.concept['name']} (class {r.concept['class']}, layer {r.concept['layer']})",
                pair(r.before.test_acc, r.after.test_acc),
                *[acc.get(k, "—") for k in splits],
                share,
                pair(r.before.tcav, r.after.tcav, 3),
                pair(r.before.sensitivity, r.after.sensitivity, 4),
            ]
        )
    doc.table(
        [
            "correction",
            "concept",
            "test accuracy",
            *[f"{k} accuracy" for k in splits],
            "input gradient share on the artefact",
            "TCAV score",
            "sensitivity along the concept",
        ],
        rows,
    )
    doc.p(
        "Each correction's measures on the run's classifier before it and on the corrected model after it. On an artefact "
        "benchmark a correction that works raises the attacked accuracy without lowering the clean one, and lowers the "
        "gradient's share on the artefact. TCAV score: the share of test images whose true-class logit grows when the "
        "layer's activations move along the concept; sensitivity: the mean of |v · ∂logit/∂a| over images and classes.",
        "note",
    )


def _reveals(doc: Page, d: Path) -> None:
    """What `teachx reveal` saved in the run: per method and class its top group and what its score is, and the
    concepts named from them. The records are read as saved (a damaged one is named, not shown)."""
    from teachx.errors import TeachxError
    from teachx.reveal import REVEAL_METHODS
    from teachx.runs.reveal import CONCEPTS, REVEAL_DIR, read_concept
    from teachx.utils.io import read_trusted_json

    root = d / REVEAL_DIR
    rows, damaged, ranks = [], [], set()
    for method in REVEAL_METHODS.names():
        paths = sorted((root / method).glob("class_*.json"), key=lambda p: int(p.stem.split("_")[-1]))
        for path in paths:
            try:
                rec = read_trusted_json(path, "run `teachx reveal` again", "reveal record")
            except TeachxError:
                damaged.append(path.relative_to(d).as_posix())
                continue
            settings, top = rec.get("settings") or {}, (rec.get("groups") or [None])[0]
            specific = (rec.get("options") or {}).get("rank") == "specificity"
            ranks.add(specific)
            if settings.get("teacher"):  # a method on maps (its ranking may still read the layers)
                read = f"{settings['teacher']} maps"
            elif settings.get("features") == "stack":
                read = f"pooled {settings.get('latent') or 'activations'} of every nonlinearity "
                read += f"({', '.join(settings.get('layers') or [])})"
            else:
                read = f"pooled {settings.get('latent') or 'activations'} of {settings.get('layer')}"
            merged = int((top or {}).get("parts", {}).get("merged", 0))
            rows.append(
                [
                    method,
                    f"{rec['class']} ({rec['class_name']})",
                    rec["n_samples"],
                    read,
                    "specificity" if specific else "suspicion score",
                    len(rec.get("groups") or []),
                    "—"
                    if top is None
                    else f"group {top['group']}: {top['size']} images"
                    + (f" (merged with {merged} as specific groups)" if merged else ""),
                    "—" if top is None else number(top["score"], 3),
                ]
            )
    concepts = []
    for path in sorted((root / CONCEPTS).glob("*.json")):
        try:
            c = read_concept(path).record
        except TeachxError:
            damaged.append(path.relative_to(d).as_posix())
            continue
        concepts.append(
            [
                c["name"],
                f"{c['class']} ({c['class_name']})",
                c["source"],
                c["layer"],
                c["cav"]["kind"],
                number(c.get("auroc_in_class"), 3),
                c.get("n_retrieved"),
            ]
        )
    if not rows and not concepts and not damaged:
        return
    doc.h("Shortcut candidates found without annotations (teachx reveal)")
    if rows:
        doc.table(
            ["method", "class", "images", "grouped on", "ranked by", "groups", "top group", "top group's score"], rows
        )
        notes = []
        if True in ranks:
            notes.append(
                "Specificity: how well the direction that sets a group apart from the rest of its class also sets it "
                "apart from the other classes' images (AUROC, 0.5 to 1); high means the group shares a feature the "
                "rest of the data lacks, as a shortcut does."
            )
        if False in ranks:
            notes.append(
                "Suspicion score: the reveal method's own ranking score (SpRAy: the group's mean silhouette times one "
                "minus its share of the class; higher is more suspicious)."
            )
        doc.p(" ".join(notes), "note")
    if concepts:
        doc.table(
            ["concept", "class", "from", "layer", "CAV", "in-class AUROC", "training images above its threshold"],
            concepts,
        )
    if damaged:
        doc.p(
            f"Not shown, damaged: {', '.join(damaged)}; run the same `teachx reveal` command again to write them anew.",
            "note",
        )


def run_report(d: Path) -> Page:
    """The page of the run in ``d``; a results.json made with another config than config.yaml is refused."""
    res = read_record(d / "results.json")
    bound = run_config_hash(d)
    if bound is not None and res.get("config_hash", bound) != bound:  # results.json without a hash: an older teachx's
        command = saved_run_config(d)[0] or "run"
        raise RunDirError(
            f"'{d / 'results.json'}' was made with another config than '{d / 'config.yaml'}'; re-run the "
            f"`teachx {command}` command that made the run directory (it evaluates the run again), then the report"
        )
    doc = Page(
        f"teachx run: {res.get('dataset', '?')} / {res.get('backbone', '?')} / teacher {res.get('teacher', '?')}"
    )
    doc.p(
        "A single run (one seed): no statistics. Use `teachx study` for several seeds, confidence intervals and p-values.",
        "note",
    )
    doc.h("Accuracy")
    rows = [
        ["baseline", res.get("backbone"), number(res.get("baseline_test_acc")), number(res.get("baseline_val_acc"))],
        _method_row(res),
    ]
    if res.get("teacher_test_acc") is not None and res.get("teacher_backbone") != res.get("backbone"):
        rows.append(["teacher", res.get("teacher_backbone"), number(res.get("teacher_test_acc")), "n/a"])
    doc.table(["model", "backbone", "test acc", "best val acc"], rows)
    doc.measures(["test_accuracy"])
    _per_class(doc, d, res)
    shares = shortcut_shares(res.get("shortcut"))
    if shares:
        doc.h("Right for the right reasons? Attribution on the artefact (de-correlated test images)")
        built = any(b.built_in is not None for b in shares.values())
        doc.table(
            ["model", "input gradient share (↓)", "LRP share (↓)"]
            + (["built-in map share", "honesty: built-in ÷ gradient share"] if built else [])
            + ["artefact area (chance)"],
            [
                [name, number(b.gradient, 3), number(b.lrp, 3)]
                + (
                    [number(b.built_in, 3) if b.built_in is not None else "— (no built-in map)", number(b.honesty, 2)]
                    if built
                    else []
                )
                + [number(b.area, 3)]
                for name, b in shares.items()
            ],
        )
        if built:
            doc.p(HONESTY_TEXT, "note")
        doc.measures(
            ["gradient_share", "lrp_share"] + (["built_in_share", "honesty"] if built else []) + ["artefact_area"]
        )
    _reveals(doc, d)
    _revisions(doc, d)
    q = res.get("map_quality")
    if q:
        doc.h("Built-in maps vs teacher maps (test set)")
        doc.table(
            ["measure", "value"],
            [
                ["Pearson correlation", number(q.get("corr"), 3)],
                ["correlation of the mean training map", number(q.get("corr_mean_map"), 3)],
                [
                    "correlation of the mean map under the training augmentation (a constant map's best)",
                    number(q.get("corr_mean_map_augmented"), 3),
                ],
                ["R² vs mean map (> 0: per-image maps were learned)", number(q.get("r2_vs_mean_map"), 3)],
                [
                    "R² vs mean map, scale-free (each map's best per-image scale and offset; for 1 − Pearson / rank losses)",
                    number(q.get("r2_vs_mean_map_affine"), 3),
                ],
            ],
        )
        doc.measures(["corr", "corr_mean_map", "corr_mean_map_augmented", "r2_vs_mean_map", "r2_vs_mean_map_affine"])
        fq = q.get("faithfulness")
        if fq:
            doc.h(
                f"Do the built-in maps explain the model that makes them? ({fq.get('images')} test images, predicted class)"
            )
            auc = fq.get("auc", {})
            names = [
                k
                for k in ("built_in", "teacher_post_hoc", "mean_map", "random")
                if k in auc.get("pixel_flipping_morf", {})
            ] + sorted(k for k in auc.get("pixel_flipping_morf", {}) if k.startswith("post_hoc_"))
            doc.table(
                ["map set", "MoRF AUC (↓)", "LeRF AUC (↑)", "insertion AUC (↑)"],
                [
                    [
                        k,
                        number(auc.get("pixel_flipping_morf", {}).get(k), 3),
                        number(auc.get("pixel_flipping_lerf", {}).get(k), 3),
                        number(auc.get("insertion", {}).get(k), 3),
                    ]
                    for k in names
                ],
            )
            doc.p(
                f"Correlation of the built-in map with the teacher method applied post hoc to the same model: {number(fq.get('corr_self'), 3)} "
                f"(mean map: {number(fq.get('corr_self_mean_map'), 3)}).",
                "note",
            )
            best = fq.get("best_post_hoc")
            if best:
                doc.p(
                    f"The most faithful unsmoothed post-hoc map of the same model is {best['method']} (MoRF "
                    f"{number(best.get('pixel_flipping_morf'), 3)}): the built-in maps' MoRF is "
                    f"{number(best.get('morf_ratio'), 2)} times its, and they correlate {number(best.get('corr_self'), 3)} with it.",
                    "note",
                )
            doc.measures(["pixel_flipping_morf", "pixel_flipping_lerf", "insertion", "corr_self", "corr_self_mean_map"])
    doc.h("Training curves")
    hist = {}
    for name, sub in (("baseline", "baseline"), ("teacher", "teacher"), _method_stage(res)):
        st = d / sub / "stage.json"
        if st.exists():
            hist[name] = [read_record(st).get("history", [])]
    if hist:
        doc.figure("curves.png", curves_figure(hist))
    doc.h("Examples")
    ex = d / "figures" / "examples.png"
    if ex.exists():
        doc.figure(
            "examples.png",
            ex.read_bytes(),
            "one test image per class and wrong predictions, each row labelled with its true and "
            "predicted class: input | teacher map | built-in map (colour scale symmetric around 0 per map)",
        )
        shown = (res.get("examples") or {}).get("images") or []
        names = res.get("class_names") or []
        name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        wrong = [
            f"#{e['index']} true: {name(e['label'])}, predicted: {name(e['predicted'])}"
            for e in shown
            if e["label"] != e["predicted"]
        ]
        if shown:
            doc.p(
                f"Classes shown: {len({e['label'] for e in shown})} of {res.get('classes', len(names))}. "
                + (
                    f"Wrong predictions of the {res['examples']['model']} model shown: {'; '.join(wrong)}."
                    if wrong
                    else "The model got every image shown right."
                ),
                "note",
            )
    else:
        doc.p("no example figure in this run (figures/examples.png)", "note")
    doc.h("Stage timings")
    doc.table(
        ["stage", "seconds"],
        [[k, f"{v:.1f}"] for k, v in (res.get("stage_seconds") or {}).items()]
        + [["wall", f"{res.get('wall_seconds', 0.0):.1f}"]],
    )
    doc.p(
        f"device {res.get('device')}, torch threads {res.get('torch_threads')}; "
        f"seconds/epoch: baseline {number(res.get('baseline_seconds_per_epoch'), 2)}, IMPACTX {number(res.get('impactx_seconds_per_epoch'), 2)}",
        "note",
    )
    doc.h("Resolved config")
    doc.pre((d / "config.yaml").read_text())
    return doc
