"""Training methods (teachx.training.methods): each loss against an independent reference, and one
shared contract every registered method passes (trains, resumes bitwise, refuses bad options)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_teachx

from teachx.errors import ConfigError
from teachx.training.methods import METHODS
from teachx.training.methods.reldrop import RelDropTask, drop_mask, normalised_relevance
from teachx.training.methods.rrr import RRRTask, irrelevant_mask
from teachx.training.methods.saliency_guided import SaliencyGuidedTask, input_saliency, mask_lowest


# -- RRR -------------------------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self, d: int, k: int):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(self.flat(x))


def _rrr_closed_form(model: _Linear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For logits W x + b: d/dx sum_k log p_k = sum_k w_k - K * sum_j p_j w_j (per image)."""
    w = model.fc.weight  # (K, D)
    p = F.softmax(model(x), 1)  # (B, K)
    grad = w.sum(0, keepdim=True) - w.shape[0] * p @ w  # (B, D)
    return ((mask.flatten(1) * grad) ** 2).sum(1).mean()


def test_rrr_penalty_matches_the_closed_form_of_a_linear_model():
    torch.manual_seed(0)
    model = _Linear(16, 3).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    mask = (torch.rand(5, 1, 4, 4) > 0.5).double()
    loss, logits, logs = RRRTask(model, None, lam=7.0).loss(x, y, mask)
    expected_pen = _rrr_closed_form(model, x, mask)
    assert float(logs["rrr"]) == pytest.approx(float(expected_pen), rel=1e-10)
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y) + 7.0 * expected_pen), rel=1e-10)


def test_rrr_parameter_gradient_matches_finite_differences():
    """The penalty is trained through a second backward pass: its weight gradient equals finite differences."""
    torch.manual_seed(1)
    model = _Linear(9, 3).double()
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    mask = (torch.rand(4, 1, 3, 3) > 0.4).double()
    task = RRRTask(model, None, lam=3.0)
    loss, _, _ = task.loss(x, y, mask)
    (g,) = torch.autograd.grad(loss, model.fc.weight)
    eps = 1e-6
    w = model.fc.weight.data
    for i, j in [(0, 0), (1, 4), (2, 8), (0, 5)]:
        w[i, j] += eps
        up = float(task.loss(x, y, mask)[0])
        w[i, j] -= 2 * eps
        down = float(task.loss(x, y, mask)[0])
        w[i, j] += eps
        assert float(g[i, j]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_rrr_label_target_and_zero_mask():
    torch.manual_seed(2)
    model = _Linear(16, 4).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([3, 0, 1])
    # label target: d/dx log p_y = w_y - sum_j p_j w_j
    _, _, logs = RRRTask(model, None, lam=1.0, target="label").loss(x, y, torch.ones(3, 1, 4, 4, dtype=torch.float64))
    w, p = model.fc.weight, F.softmax(model(x), 1)
    grad = w[y] - p @ w
    assert float(logs["rrr"]) == pytest.approx(float((grad**2).sum(1).mean()), rel=1e-10)
    _, _, logs = RRRTask(model, None, lam=1.0).loss(x, y, torch.zeros(3, 1, 4, 4, dtype=torch.float64))
    assert float(logs["rrr"]) == 0.0


def test_irrelevant_mask_keeps_the_most_relevant_fraction():
    maps = torch.tensor([[[[0.1, -0.9], [0.5, 0.0]]]])  # |map|: 0.1, 0.9, 0.5, 0.0
    assert irrelevant_mask(maps, 0.5).flatten().tolist() == [1.0, 0.0, 0.0, 1.0]
    assert irrelevant_mask(maps, 0.25).flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert irrelevant_mask(maps, 1.0).sum() == 0


def test_teacher_masks_are_computed_once_and_equal_the_direct_ones():
    from teachx.training.methods.rrr import _TeacherMask

    store = _Store(20, 6)
    masks = _TeacherMask(store, 0.3)
    for idx in ([3, 1, 7], [7, 3, 19, 0], [1]):
        got = masks(torch.tensor(idx))
        assert torch.equal(got, irrelevant_mask(store.read(idx).float(), 0.3)), idx
    assert masks.known.sum() == 5


# -- saliency-guided training ------------------------------------------------------------------------


def test_mask_lowest_replaces_exactly_the_lowest_saliency_elements():
    x = torch.arange(8.0).view(1, 2, 2, 2)
    sal = torch.tensor([5.0, 1.0, 7.0, 0.5, 3.0, 8.0, 2.0, 6.0]).view(1, 2, 2, 2)
    torch.manual_seed(0)
    out = mask_lowest(x, sal, 0.5)  # the 4 lowest: indices 3, 1, 6, 4
    changed = (out != x).flatten().nonzero().flatten().tolist()
    assert set(changed) <= {1, 3, 4, 6}
    kept = [0, 2, 5, 7]
    assert torch.equal(out.flatten()[kept], x.flatten()[kept])
    assert out.min() >= x.min() and out.max() <= x.max()


def test_lowest_selects_what_a_stable_sort_selects_ties_included():
    from teachx.training.methods.saliency_guided import lowest

    g = torch.Generator().manual_seed(0)
    for d, n in ((50, 25), (784, 392), (3072, 1000), (9, 9), (9, 1)):
        sal = torch.randint(0, 6, (7, d), generator=g).float()  # many ties
        expected = torch.zeros(7, d, dtype=torch.bool)
        expected.scatter_(1, sal.argsort(dim=1, stable=True)[:, :n], True)
        got = lowest(sal, n)
        assert torch.equal(got, expected) and (got.sum(1) == n).all(), (d, n)


def test_saliency_is_the_input_gradient_of_the_label_logit():
    torch.manual_seed(3)
    model = _Linear(16, 3).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 2])
    sal = input_saliency(model, x, y)
    assert torch.allclose(sal.flatten(1), model.fc.weight[y].abs())  # d(w_y x + b)/dx = w_y


def test_saliency_guided_loss_equals_ce_plus_kl():
    torch.manual_seed(4)
    model = _Linear(16, 3).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    task = SaliencyGuidedTask(model, k=0.25, lam=2.0)
    torch.manual_seed(9)
    loss, logits, logs = task.loss(x, y, None)
    torch.manual_seed(9)  # the same random values, made independently
    masked = mask_lowest(x, input_saliency(model, x, y), 0.25)
    p_log, q_log = F.log_softmax(model(x), 1), F.log_softmax(model(masked), 1)
    kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")  # KL(p || q)
    assert float(logs["kl"]) == pytest.approx(float(kl), rel=1e-9)
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y) + 2.0 * kl), rel=1e-9)


def test_saliency_pass_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)).train()
    before = [b.clone() for b in model.buffers()]
    input_saliency(model, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


# -- RelDrop -------------------------------------------------------------------------------------------


def test_reldrop_mask_follows_the_papers_rule():
    rel = torch.tensor([[[[0.0, 0.4], [0.6, 1.0]]]])
    # alpha = 0: no noise, a pixel is dropped where its relevance >= 1 - beta
    assert drop_mask(rel, 0.0, 0.5, 1.0).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert drop_mask(rel, 0.0, 0.5, 0.0).sum() == 0  # p = 0: no image is augmented
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rel = torch.rand(2, 1, 5, 5)
    got = drop_mask(rel, 0.3, 0.2, 1.0, generator=g1)
    u = torch.rand(rel.shape, generator=g2)
    assert torch.equal(got, ((0.3 * u + 0.7 * rel) >= 0.8).float())


def test_normalised_relevance_and_reldrop_with_stored_maps():
    r = torch.tensor([[[[-2.0, 1.0], [4.0, 2.0]]]])
    assert normalised_relevance(r).flatten().tolist() == [0.0, 0.25, 1.0, 0.5]

    class _Store:
        def read(self, idx):
            return r.expand(len(idx), 1, 2, 2)

    model = _Linear(4, 2).double()
    task = RelDropTask(model, alpha=0.0, beta=0.5, p=1.0, store=_Store())
    maps = task.maps_for(torch.tensor([0, 1]))
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    _, logits, logs = task.loss(x, torch.tensor([0, 1]), maps)
    expected_x = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert torch.allclose(logits, model(expected_x)) and float(logs["dropped"]) == 0.5


def test_reldrop_self_relevance_is_lrp_of_the_model_in_eval_mode():
    from teachx.models import build_model
    from teachx.teachers import build as build_teacher
    from teachx.training.methods.reldrop import _SelfRelevance

    torch.manual_seed(0)
    model = build_model("lenet5", 1, 3, 16).train()
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    got = _SelfRelevance(build_teacher("lrp"))(model, x, y)
    assert model.training
    expected = build_teacher("lrp").attribute(model.eval(), x, y)
    assert torch.allclose(got, expected)


# -- the shared contract: every registered method ----------------------------------------------------


def _masked_dataset(n: int = 96, size: int = 12, classes: int = 3, seed: int = 0):
    """Noise images plus a 3x3 corner square whose brightness codes the class (a tiny shortcut)."""
    from teachx.data.base import ImageDataset, Split

    rng = np.random.default_rng(seed)

    def split(m):
        images = rng.integers(0, 120, size=(m, size, size, 1), dtype=np.uint8)
        labels = rng.integers(0, classes, size=m)
        masks = np.zeros((m, size, size), dtype=np.uint8)
        masks[:, :3, :3] = 1
        images[:, :3, :3, 0] = (255 - 60 * labels)[:, None, None]
        return Split(images, labels, masks)

    return ImageDataset(
        "tiny-shortcut", [str(c) for c in range(classes)], split(n), split(24), (0.3,), (0.3,), hflip=False
    )


class _Store:
    """Teacher maps as a map store: fixed smooth maps, one per image."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.maps = torch.randn(n, 1, size, size, generator=g)

    def read(self, idx):
        return self.maps[torch.as_tensor(np.asarray(idx))]

    def mean_map(self, idx):
        return self.maps[torch.as_tensor(np.asarray(idx))].mean(0)


def _disk_store(fake: _Store, maps_dir: Path):
    """``fake``'s maps as a finished map store on disk (what the pipeline's teacher stage hands a method)."""
    from teachx.teachers.store import fill_store, open_store

    store = open_store(
        maps_dir, {"test": "fake teacher"}, len(fake.maps), tuple(fake.maps.shape[1:]), log=lambda s: None
    )
    fill_store(store, np.arange(len(fake.maps)), fake.read, 32, progress=False)
    return store


def _fit(method: str, options: dict, out: Path, stop_after: int | None = None, init_seed: int = 0):
    from teachx.data.transforms import Augment
    from teachx.config.schema import RunConfig, MethodConfig
    from teachx.config.train import TrainConfig
    from teachx.training.methods import MethodContext, build_method
    from teachx.training.trainer import DataPlan, Trainer

    cfg = RunConfig()
    cfg.model.backbone = "lenet5"
    cfg.method = MethodConfig(method, options)
    cfg.teacher.method = "gradient"
    ds = _masked_dataset()
    plan = DataPlan(ds, np.arange(80), np.arange(80, 96), Augment(crop_padding=1, hflip=False))
    baseline = None
    if options.get("concept") is _CONCEPT:  # a concept correction: a baseline to fine-tune and its concept file
        baseline, path = _concept_baseline(ds, out.parent)
        cfg.method = MethodConfig(method, {**options, "concept": str(path)})
    m = build_method(cfg)
    store = _Store(len(ds.train), 12)
    if m.corrects_concept and m.needs_teacher_maps():  # a correction on teacher maps: a store on disk to derive from
        store = _disk_store(store, out.parent / "maps")
    ctx = MethodContext(
        cfg,
        plan,
        torch.device("cpu"),
        store,
        None,
        lambda s: None,
        baseline_model=(lambda: baseline) if baseline is not None else None,
    )
    torch.manual_seed(init_seed)
    model = m.build_model(ctx)
    task = m.task(model, ctx)
    if stop_after is not None:
        task = _StopAfter(task, stop_after)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=2e-3, progress=False, threads=1)
    return Trainer(
        task, plan, tcfg, out, seed=3, device="cpu", meta={"kind": m.checkpoint_kind}, log=lambda s: None
    ).fit()


#: stands for the path of a concept file that ``_fit`` writes for the baseline it makes
_CONCEPT = object()


def _concept_baseline(ds, where: Path):
    """A LeNet-5 'baseline' (fixed seed, untrained) and a concept file for it at its second conv block:
    the artefact is the class-0 corner shade of the tiny shortcut data."""
    from teachx.models import build_model
    from teachx.training.clarc import Capture, pooled
    from teachx.training.concepts import concept_from_activations, concept_paths, model_digest, save_concept

    torch.manual_seed(1234)
    baseline = build_model("lenet5", ds.channels, ds.num_classes, ds.image_size).eval()
    path = concept_paths(where / "concept")[0]
    if not path.exists():
        x = (torch.from_numpy(ds.train.images[:48]).permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.3
        with torch.no_grad(), Capture(baseline.body[5]) as cap:
            baseline(x)
        flags = np.asarray(ds.train.labels[:48]) == 0
        # with the masks teachx reveal localises (what rrr_revealed reads): the shade's square, on every other image
        localised = np.arange(0, 48, 2)
        arrays = {"masks": np.asarray(ds.train.masks)[localised].astype(bool), "localised": localised}
        concept = concept_from_activations(
            "shade", "body.5", pooled(cap.out), flags, model_digest(baseline), arrays=arrays
        )
        save_concept(concept, path)
    return baseline, path


class _Interrupted(Exception):
    pass


class _StopAfter:
    def __init__(self, task, steps):
        self.task, self.steps, self.model = task, steps, task.model

    def maps_for(self, idx):
        return self.task.maps_for(idx)

    def loss(self, x, y, maps):
        if self.steps == 0:
            raise _Interrupted
        self.steps -= 1
        return self.task.loss(x, y, maps)

    def parameters(self):
        return self.task.parameters()


CONTRACT = {  # every method that trains (impactx has its own tests), with options that exercise its paths
    "rrr (annotation)": ("rrr", {"lam": 10.0}),
    "rrr (teacher)": ("rrr", {"mask": "teacher", "lam": 10.0}),
    "saliency_guided": ("saliency_guided", {}),
    "reldrop (self)": ("reldrop", {}),
    "reldrop (teacher)": ("reldrop", {"relevance": "teacher"}),
    "abn": ("abn", {}),
    "rrclarc": ("rrclarc", {"concept": _CONCEPT, "lam": 10.0}),
    "rrclarc (no freeze, label logit)": (
        "rrclarc",
        {"concept": _CONCEPT, "freeze": "none", "criterion": "target_logit"},
    ),
    "aclarc": ("aclarc", {"concept": _CONCEPT}),
    "rrr_revealed": ("rrr_revealed", {"concept": _CONCEPT, "lam": 10.0}),
    "impactx_cleaned": ("impactx_cleaned", {"concept": _CONCEPT}),
}


def test_every_trainable_method_is_in_the_contract_table():
    assert {m for m, _ in CONTRACT.values()} | {"impactx", "baseline"} == set(METHODS.names())


@pytest.mark.parametrize("case", sorted(CONTRACT))
def test_method_trains_and_resumes_bitwise(case, tmp_path):
    from teachx.training.checkpoint import load_checkpoint

    name, options = CONTRACT[case]
    ref = _fit(name, options, tmp_path / "ref")
    assert all(math.isfinite(h["train_loss"]) for h in ref.history)
    with pytest.raises(_Interrupted):
        _fit(name, options, tmp_path / "cut", stop_after=5 + 2)  # 5 steps per epoch: stops inside epoch 2
    res = _fit(name, options, tmp_path / "cut", init_seed=99)
    assert res.resumed_from == 1
    a, b = (
        load_checkpoint(p / "checkpoints" / "last.safetensors").group("model")
        for p in (tmp_path / "ref", tmp_path / "cut")
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (case, k)


def test_option_checks_are_one_line_config_errors():
    from teachx.runs.resolve import resolve_config

    cases = {
        ("method.name=rrrr",): "did you mean 'rrr'",
        ("method.name=rrr", "method.options.k=0.5"): "option of method saliency_guided, not of 'rrr'",
        ("method.name=rrr", "impactx.lam=0"): "impactx.lam is an option of method impactx, not of 'rrr'",
        (
            "method.options.lamb=3",
        ): "unknown option method.options.lamb of method impactx (did you mean 'method.options.lam'?)",
        (
            "method.options.lam=3",
            "impactx.lam=2",
        ): "impactx.lam and method.options.lam are the same option of method impactx",
        ("method.options.lam=-1",): "impactx.lam must be >= 0",
        ("method.name=rrr", "method.options.mask=foo"): "must be one of annotation, teacher",
        ("method.name=saliency_guided", "method.options.k=1.5"): "must be <= 1.0",
        ("method.name=reldrop", "method.options.alph=1"): "did you mean 'alpha'",
    }
    for overrides, text in cases.items():
        with pytest.raises(ConfigError) as err:
            resolve_config(None, list(overrides))
        assert text in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))


@pytest.mark.slow
def test_cli_rrr_with_annotation_masks_on_maskless_data_exits_2_before_writing(tmp_path):
    out = tmp_path / "run"
    p = run_teachx("run", "--out", out, "-q", "method.name=rrr", "data.train_size=100", "train.epochs=1", timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs artefact masks" in lines[0] and "method.options.mask=teacher" in lines[0]
    assert not out.exists()


def test_teachx_methods_lists_every_method_and_option():
    from teachx.cli.describe import describe_methods

    text = describe_methods()
    for name in METHODS.names():
        assert f"\n{name}" in "\n" + text
        for key, opt in METHODS.get(name).options.items():
            assert f"{key} = " in text and opt.help in text


# -- studies and runs on a shortcut benchmark ------------------------------------------------------------


@pytest.mark.slow
def test_study_with_method_arms_on_a_shortcut_benchmark(tmp_path, monkeypatch):
    """Method arms run through `teachx study`: rows name their method, every unit reports the
    wrong-reason score, each arm is compared with the lambda=0 control, and a re-run trains nothing."""
    from teachx.studies.runner import run_study
    from teachx.studies.spec import load_study

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "study.yaml"
    cfg.write_text("""
data: {name: bundled, shortcut: swatch, train_size: 200, augment: false}
train: {epochs: 1, batch_size: 50, progress: false}
teacher: {method: gradient, eval_images: 60, faith_images: 0}
study:
  seeds: [0, 1]
  control: lambda0
  arms:
    ceiling: {method.name: baseline, data.shortcut_train: clean}
    rrr: {method: {name: rrr, options: {lam: 10}}}
    rrr_teacher: {method: {name: rrr, options: {mask: teacher, lam: 10}}}
    abn: {method.name: abn}
    lambda0: {impactx.lam: 0}
""")
    spec = load_study(str(cfg))
    res = run_study(spec, tmp_path / "out", log=lambda s: None)
    rows = {r["arm"]: r for r in res.data["rows"]}
    assert rows["rrr"]["method"] == "rrr" and rows["rrr"]["kind"] == "method"
    assert rows["rrr_teacher"]["method_options"]["mask"] == "teacher"
    assert rows["lambda0"]["kind"] == "impactx" and rows["lambda0"]["lam"] == 0
    for arm in ("baseline", "ceiling", "rrr", "rrr_teacher", "abn", "lambda0"):
        sc = rows[arm]["shortcut"]
        assert {"gradient", "lrp", "area"} <= set(sc), arm
        assert sc["area"]["mean"] == pytest.approx(16 / 28**2)
    assert (
        "built_in" in rows["abn"]["shortcut"] and "built_in" in rows["lambda0"]["shortcut"]
    )  # the models' own maps too
    assert "built_in" not in rows["rrr"]["shortcut"]
    # the built-in map's honesty: each seed's built-in share over its own gradient share, for IMPACTX and ABN alike
    for arm in ("abn", "lambda0"):
        units = [res.data["units"][u]["shortcut"] for u in rows[arm]["units"]]
        assert rows[arm]["shortcut"]["honesty"]["mean"] == pytest.approx(
            np.mean([u["built_in"] / u["gradient"] for u in units])
        )
    assert "honesty" not in rows["rrr"]["shortcut"] and "honesty" not in rows["baseline"]["shortcut"]
    from teachx.studies.records import StudyRecord
    from teachx.studies.statistics import summary_lines

    record = StudyRecord.from_dict(res.data)
    assert {r.arm for r in record.rows if r.honesty} == {"abn", "lambda0"}
    assert any("honesty (built-in / gradient)" in line for line in summary_lines(record))
    from teachx.reporting.report import write_report

    _, md = write_report(tmp_path / "out")
    text = md.read_text()
    assert "honesty: built-in ÷ gradient share" in text and "well below 1 means the built-in map hides" in text
    for arm in ("ceiling", "rrr", "rrr_teacher", "abn"):
        assert rows[arm]["vs_control"]["control"] == "lambda0"
    # the ceiling is the baseline of clean training images: its own baseline, the same model
    assert rows["ceiling"]["test_acc"] == [res.data["units"][u]["test_acc"] for u in rows["ceiling"]["units"]]
    assert all(0 <= rows[a]["shortcut"][m]["mean"] <= 1 for a in rows for m in ("gradient", "lrp"))
    assert (
        res.data["timings"]["method_training"]["n"] == 6
    )  # rrr, rrr_teacher, abn x 2 seeds (ceiling: no training of its own)
    again = run_study(load_study(str(cfg)), tmp_path / "out", log=lambda s: None)
    assert again.trained == 0 and again.data["rows"] == res.data["rows"]
    # `teachx study --status` finds every unit, the ceiling in its own baseline model (not the regime's)
    from teachx.studies.status import study_status

    st = {(u.unit.arm, u.unit.seed): u for u in study_status(spec, tmp_path / "out").units}
    assert all(u.state == "done" for u in st.values())
    for arm, row in rows.items():
        assert [st[(arm, s)].test_acc for s in row["seeds"]] == row["test_acc"], arm


def test_abn_run_is_served_with_its_built_in_map(tmp_path, monkeypatch):
    """`teachx run method.name=abn`: results name the method, map quality is measured on ABN's map,
    and `teachx serve` lists the model with a built-in map equal to the model's own explain()."""
    from teachx.runs.resolve import resolve_config
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import make_plan
    from teachx.runs.recovery import prepare_run_dir
    from teachx.service.engine import Service

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        None,
        [
            "method.name=abn",
            "data.train_size=200",
            "train.epochs=1",
            "train.progress=false",
            "teacher.method=gradient",
            "teacher.eval_images=40",
            "teacher.faith_images=0",
        ],
    )
    run_dir = prepare_run_dir(tmp_path / "run", cfg, "run", log=lambda s: None)
    res = run_pipeline(
        cfg, run_dir, log=lambda s: None, progress=False, figures=False, plan=make_plan(cfg, progress=False)
    ).results
    assert res["method"] == "abn" and "impactx_test_acc" not in res and res["map_quality"]["images"] == 40
    svc = Service([run_dir], cache_dir=tmp_path / "serve")
    entry = svc.entry("run.abn")
    assert entry.kind == "abn"
    built_in, _ = svc.map("run.abn", 3, "built_in")
    lm = svc.loaded("run.abn")
    x = svc._x(lm, svc.data(lm).test.images[[3]])
    assert np.allclose(
        np.asarray(built_in, dtype=np.float32).reshape(-1),
        lm.model.explain(x).float().cpu().numpy().reshape(-1),
        atol=2e-3,
    )


@pytest.mark.slow
def test_a_shortcut_run_records_reports_and_serves_the_built_in_maps_honesty(tmp_path, monkeypatch, capsys):
    """`teachx run` on a swatch benchmark: results.json holds, per model, the post-hoc shares and, for the IMPACTX
    model, its built-in map's share and the ratio of that to its own gradient share; the report explains the
    ratio and `teachx serve` shows the stored values in the model's info. The baseline has post-hoc shares only."""
    from conftest import teachx_main

    from teachx.evaluation import wrong_reason_score
    from teachx.runs.plan import eval_indices, make_plan
    from teachx.runs.resolve import resolve_config
    from teachx.runs.teacher import as_nchw
    from teachx.data.transforms import normalize
    from teachx.runs.explain import load_impactx
    from teachx.service.engine import Service

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    args = [
        "data.shortcut=swatch",
        "data.train_size=200",
        "train.epochs=1",
        "train.progress=false",
        "teacher.method=gradient",
        "teacher.eval_images=40",
        "teacher.faith_images=0",
    ]
    code, out, err = teachx_main(capsys, "run", *args, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "honesty" in out  # the end-of-run summary names it
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    sc = res["shortcut"]
    assert "built_in" not in sc["baseline"] and "honesty" not in sc["baseline"]
    block = sc["impactx"]
    assert block["honesty"] == pytest.approx(block["built_in"] / block["gradient"])
    # the built-in share recomputed here from the model itself
    cfg = resolve_config(None, args)
    plan = make_plan(cfg, progress=False)
    idx = eval_indices(cfg, plan)
    model, _ = load_impactx(tmp_path / "run")
    x = normalize(as_nchw(plan.dataset.test.images[idx]), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(plan.dataset.test.labels[idx])).long()
    direct = wrong_reason_score(model.explain(x, target=y).float(), torch.from_numpy(plan.dataset.test.masks[idx]))
    assert block["built_in"] == pytest.approx(float(direct.mean()), rel=1e-4)
    code, out, err = teachx_main(capsys, "report", tmp_path / "run")
    assert code == 0, err
    md = next((tmp_path / "run").glob("report*.md")).read_text()
    assert "honesty: built-in ÷ gradient share" in md and "well below 1 means the built-in map hides" in md
    info = Service([tmp_path / "run"], cache_dir=tmp_path / "serve").model_info("run.impactx")
    assert (
        info["shortcut"]["honesty"] == pytest.approx(block["honesty"]) and info["shortcut"]["reference"] == "gradient"
    )
    base = Service([tmp_path / "run"], cache_dir=tmp_path / "serve").model_info("run.baseline")["shortcut"]
    assert base["built_in"] is None and base["honesty"] is None and base["gradient"] == sc["baseline"]["gradient"]


def test_fewer_evaluation_images_than_classes_still_gives_a_subset():
    """teacher.eval_images below the class count: a stratified subset rounds down to nothing, which
    made map_quality divide by zero; now it is a seeded subset of that size."""
    from teachx.runs.resolve import resolve_config
    from teachx.runs.plan import eval_indices, make_plan

    cfg = resolve_config(None, ["teacher.eval_images=5"])
    plan = make_plan(cfg, progress=False)
    idx = eval_indices(cfg, plan)
    assert len(idx) == 5 == len(set(idx.tolist())) and list(idx) == sorted(idx)
    assert list(eval_indices(cfg, plan)) == list(idx)


def test_every_method_stage_is_known_to_redo_serve_and_the_run_layout():
    """The method stages come from the registry; the CLI's --redo choices are written out (no torch
    import for `teachx --help`) and must agree with it."""
    from teachx.cli.main import RUN_STAGES
    from teachx.runs.recovery import STAGES
    from teachx.runs.rundir import RUN_LAYOUT, STAGE_LAYOUT
    from teachx.service.catalog import _stages

    assert set(STAGES) == {"baseline", "teacher", *(m for m in METHODS.names() if m != "baseline")}
    assert tuple(RUN_STAGES) == STAGES == _stages()
    assert all(RUN_LAYOUT[s] is STAGE_LAYOUT for s in STAGES)


def test_a_method_gets_the_explained_classes_from_its_context():
    """A method never imports the orchestration: the class each teacher map explains is the labels for
    teacher.target=label, else whatever the orchestration's service supplies (and an error without one)."""
    from teachx.data.transforms import Augment
    from teachx.config.schema import RunConfig
    from teachx.training.methods import MethodContext
    from teachx.training.trainer import DataPlan

    cfg = RunConfig()
    ds = _masked_dataset()
    plan = DataPlan(ds, np.arange(80), np.arange(80, 96), Augment(crop_padding=1, hflip=False))
    ctx = MethodContext(cfg, plan, torch.device("cpu"))
    assert np.array_equal(ctx.train_map_classes(), np.asarray(ds.train.labels))
    cfg.teacher.target = "predicted"
    with pytest.raises(ValueError, match="explained_classes"):
        ctx.train_map_classes()
    supplied = np.arange(len(ds.train)) % 3
    ctx2 = MethodContext(cfg, plan, torch.device("cpu"), explained_classes=lambda: supplied)
    assert ctx2.train_map_classes() is supplied


# -- the method contract: no code outside training/methods branches on a method's name ------------------

#: files outside teachx/training/methods that may compare with a name that is also a method's, and why
_NAME_CHECKS_ALLOWED = {
    # model architectures: a checkpoint's model spec names its architecture (``impactx``, ``abn``); the models
    # are a layer below the training methods (methods point at them through ``checkpoint_kind``)
    "teachx/models/__init__.py": "model spec names",
    "teachx/models/abn.py": "model spec names",
}


def _name_checks(root: Path) -> list[str]:
    """Lines of the package, outside training/methods, that compare a value with a method's literal name
    (``== "impactx"``, ``!= "baseline"``, ``in ("impactx", "abn")``) -- iterating over a tuple is no check."""
    import re

    from teachx.training.methods import METHODS

    names = sorted({n for n in METHODS.names()} | {a for n in METHODS.names() for a in METHODS.aliases(n)})
    lit = r"""["'](?:%s)["']""" % "|".join(map(re.escape, names))
    check = re.compile(rf"(?:==|!=)\s*{lit}|{lit}\s*(?:==|!=)|\b(?:not\s+)?in\s*[(\[{{]\s*{lit}")
    loop = re.compile(rf"\bfor\s+[\w, ]+\s+in\s*[(\[]\s*{lit}")
    found = []
    for path in sorted((root / "teachx").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("teachx/training/methods/") or rel in _NAME_CHECKS_ALLOWED:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if check.search(line) and not loop.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    return found


def test_no_code_outside_the_methods_branches_on_a_method_name():
    """What a method means for a run, a study, a report or `teachx serve` is asked of the method (its
    TrainingMethod hooks), so adding a method needs no change elsewhere."""
    root = Path(__file__).resolve().parents[1]
    assert _name_checks(root) == []
    assert all((root / rel).is_file() for rel in _NAME_CHECKS_ALLOWED)  # the allow-list names files that exist


def test_the_name_check_guard_finds_comparisons(tmp_path):
    (tmp_path / "teachx" / "x").mkdir(parents=True)
    (tmp_path / "teachx" / "x" / "m.py").write_text(
        'if cfg.method.name == "impactx":\n    pass\n'
        'for stage in ("baseline", "teacher"):\n    pass\n'
        'ok = kind in ("abn", "impactx")\nok = "rrr" != name\n'
    )
    assert [line.split(":")[1] for line in _name_checks(tmp_path)] == ["1", "5", "6"]


def test_impactx_options_are_its_method_options_too():
    """impactx.KEY is method.options.KEY of IMPACTX: the same config (so the same study unit key), saved as
    method.options with every option stated."""
    from teachx.runs.resolve import resolve_config
    from teachx.studies.spec import impactx_key
    from teachx.training.methods import OPTION_NAMES, impactx_options

    a = resolve_config(None, ["method.options.lam=0", "method.options.decoder=paper", "method.options.maps=shuffled"])
    b = resolve_config(None, ["impactx.lam=0", "impactx.decoder=paper", "impactx.maps=shuffled"])
    assert a.to_dict() == b.to_dict() and impactx_options(a).lam == 0 and "impactx" not in a.to_dict()
    assert tuple(a.method.options) == OPTION_NAMES and a.method.options["lam"] == 0
    assert impactx_key(a) == impactx_key(b)
    assert (
        impactx_options(a).per_class is False and impactx_options(a).map_loss == "mse"
    )  # the paper decoder's design, resolved
    same = resolve_config(None, ["method.options.lam=0.5", "impactx.lam=0.5"])  # both ways, one value: fine
    assert impactx_options(same).lam == 0.5
    rrr = resolve_config(None, ["method.name=rrr", "method.options.lam=10"])  # another method's options stay its own
    assert rrr.method.options == {"lam": 10} and impactx_options(rrr).lam == 1.0
    from teachx.runs.resolve import study_base_config

    base = study_base_config(
        {"method": {"options": {"per_class": False}}}
    )  # a study's base, as `teachx config` prints it
    assert base.method.options == {"per_class": False}  # given stays given, the rest left to the decoder and arms


def test_a_study_control_arm_may_use_method_options(tmp_path):
    from teachx.studies.spec import load_study, planned_units

    def keys(arm: str) -> tuple[str, ...]:
        path = tmp_path / f"{len(arm)}.yaml"
        path.write_text(
            "data: {name: bundled, train_size: 100}\nstudy: {seeds: [0], arms: {impactx: {}, lambda0: {%s: 0}}}\n" % arm
        )
        spec = load_study(str(path))
        assert spec.control == "lambda0"
        return tuple(u.key for u in planned_units(spec))

    assert keys("method.options.lam") == keys("impactx.lam")
