"""The ClArC corrections (teachx.training.clarc), the concept record (teachx.training.concepts) and the
rrclarc / aclarc training methods: each against an independent reference on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from teachx.errors import ConfigError, CorruptionError
from teachx.training.clarc import (
    Capture,
    attach,
    augment,
    cav_scores,
    cav_sensitivity,
    criterion_output,
    project,
    reactive,
    rr_penalty,
)
from teachx.training.concepts import (
    Concept,
    concept_from_activations,
    concept_from_scores,
    concept_paths,
    load_concept,
    model_digest,
    save_concept,
)


def _unit(c: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    v = torch.randn(c, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return v / v.norm()


def _pool_np(a: np.ndarray, pooling: str) -> np.ndarray:
    """Pooling written out per sample and channel with numpy (the reference for the torch code)."""
    if a.ndim == 2:
        return a
    out = np.zeros(a.shape[:2])
    for n in range(a.shape[0]):
        for c in range(a.shape[1]):
            out[n, c] = a[n, c].max() if pooling == "max" else a[n, c].mean()
    return out


# -- P-, A- and R-ClArC against their closed forms ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (5, 4)])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_p_clarc_sets_the_cav_score_to_z_clean_and_keeps_the_orthogonal_part(shape, pooling):
    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64)
    v = _unit(shape[1])
    out = project(a, v, 0.7, pooling)
    # closed form: the same multiple of v is added at every position, chosen so that v . pool(a') = z_clean
    a_np, v_np = a.numpy(), v.numpy()
    scores = _pool_np(a_np, pooling) @ v_np
    expect = a_np + ((0.7 - scores)[:, None] * v_np[None, :]).reshape(shape[:2] + (1,) * (len(shape) - 2))
    assert np.allclose(out.numpy(), expect, atol=1e-12)
    assert np.allclose(_pool_np(out.numpy(), pooling) @ v_np, 0.7, atol=1e-12)
    # the component orthogonal to v is untouched at every position
    ortho = torch.eye(shape[1], dtype=torch.float64) - torch.outer(v, v)
    moved = (out - a).movedim(1, -1) @ ortho
    assert moved.abs().max() < 1e-12


@pytest.mark.parametrize("shape", [(6, 3, 2, 4), (6, 3)])
def test_a_clarc_sets_the_cav_score_to_z_artefact(shape):
    torch.manual_seed(1)
    a = torch.randn(*shape, dtype=torch.float64)
    v = _unit(shape[1], seed=1)
    out = augment(a, v, -1.3, "max")
    assert torch.allclose(cav_scores(out, v, "max"), torch.full((shape[0],), -1.3, dtype=torch.float64), atol=1e-12)
    delta = (out - a).movedim(1, -1)  # (N, ..., C): parallel to v everywhere, the same at every position
    assert torch.allclose(delta, (delta @ v)[..., None] * v, atol=1e-12)
    per_sample = (delta @ v).reshape(shape[0], -1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert torch.allclose(per_sample[:, 0], -1.3 - (a.flatten(2).amax(2) if a.dim() > 2 else a) @ v, atol=1e-12)


def test_r_clarc_is_p_clarc_where_the_artefact_is_present_and_the_identity_elsewhere():
    torch.manual_seed(2)
    a = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    v = _unit(4, seed=2)
    scores = cav_scores(a, v)
    below, above = float(scores.min()) - 1.0, float(scores.max()) + 1.0
    assert torch.equal(reactive(a, v, 0.2, below), project(a, v, 0.2))  # every score above the threshold
    assert torch.equal(reactive(a, v, 0.2, above), a)  # none: exactly the activations
    mid = float(scores.median())
    mixed = reactive(a, v, 0.2, mid)
    for n in range(8):
        expect = project(a[n : n + 1], v, 0.2)[0] if scores[n] > mid else a[n]
        assert torch.equal(mixed[n], expect)


# -- the hooks on a model ---------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """conv -> tanh (the concept layer "act") -> mean over positions -> linear: smooth, for gradchecks."""

    def __init__(self, c_in: int = 2, c: int = 4, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1)
        self.act = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(c, k)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.act(self.conv(x)))))


def _concept_for(model: nn.Module, x: torch.Tensor, layer: str = "act", **kwargs) -> Concept:
    with torch.no_grad(), Capture(dict(model.named_modules())[layer]) as cap:
        model(x)
    flags = np.arange(x.shape[0]) % 2 == 0
    pooled = cap.out.flatten(2).amax(2) if cap.out.dim() > 2 else cap.out
    return concept_from_activations("swatch", layer, pooled, flags, model_digest(model), **kwargs)


def test_hooks_are_removable_and_compose_in_order():
    torch.manual_seed(3)
    model = _Tiny().double().eval()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    concept = _concept_for(model, x)
    plain = model(x)
    layer = model.act
    with attach(model, concept, "project", example=x[:1]):
        with Capture(layer) as seen:  # added after the projection: sees its result
            projected = model(x)
    v = torch.as_tensor(concept.cav)
    assert torch.allclose(cav_scores(seen.out, v), torch.full((6,), concept.z_clean, dtype=torch.float64))
    assert torch.equal(model(x), plain)  # removed on leaving the block
    with attach(model, concept, "augment"), attach(model, concept, "project"):
        both = model(x)  # augment, then project: the projection decides
    assert torch.allclose(both, projected)
    h = attach(model, concept, "reactive", threshold=1e9)  # nothing scores above: the model as it was
    assert torch.equal(model(x), plain)
    h.remove()
    # every hook leaves the weights alone: the concept still belongs to the model
    assert model_digest(model) == concept.model_digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hooks_equal_the_written_out_projection_per_sample(dtype, pooling, channels_last):
    """The hooks (their matrices made once, the score and the shift in one product) against the corrections
    written out sample by sample with numpy in float64, in the model's dtype and either memory layout."""
    torch.manual_seed(7)
    model = _Tiny().to(dtype).eval()
    x = torch.randn(9, 2, 5, 5, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    concept = _concept_for(model, x)
    concept = Concept(**{**concept.__dict__, "pooling": pooling})
    with torch.no_grad(), Capture(model.act) as cap:
        model(x)
    a = cap.out.double().numpy()
    v = concept.cav
    scores = _pool_np(a, pooling) @ v
    ranked = np.sort(scores)
    threshold = float(ranked[4] + ranked[5]) / 2  # between two samples: rounding decides no sample's side
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for mode, z in [("project", concept.z_clean), ("augment", concept.z_artefact), ("reactive", concept.z_clean)]:
        amount = z - scores
        if mode == "reactive":  # only the samples whose score is above the threshold are moved
            amount = np.where(scores > threshold, amount, 0.0)
        expect = a + amount[:, None, None, None] * v[None, :, None, None]
        with torch.no_grad(), attach(model, concept, mode, threshold=threshold), Capture(model.act) as seen:
            model(x)
            model(x)  # a second forward reuses what the hook made at the first
        assert seen.out.dtype == dtype
        assert np.allclose(seen.out.double().numpy(), expect, rtol=tol, atol=tol), mode


def test_bad_inputs_are_one_line_config_errors():
    torch.manual_seed(4)
    model = _Tiny().eval()
    x = torch.randn(4, 2, 5, 5)
    concept = _concept_for(model, x)
    other = _Tiny().eval()
    errors = {}
    with pytest.raises(ConfigError) as e:
        attach(other, concept)
    errors["digest"] = str(e.value)
    with pytest.raises(ConfigError) as e:
        attach(model, Concept(**{**concept.__dict__, "layer": "actt"}))
    errors["layer"] = str(e.value)
    narrow = Concept(**{**concept.__dict__, "cav": np.ones(3), "mean_clean": np.zeros(3), "mean_artefact": np.ones(3)})
    with pytest.raises(ConfigError) as e:
        attach(model, narrow, example=x[:1])
    errors["width"] = str(e.value)
    with attach(model, narrow), pytest.raises(ConfigError) as e:  # no example: refused at the first forward
        model(x)
    errors["width (forward)"] = str(e.value)
    assert "computed on another model" in errors["digest"] and "compute the concept on the model" in errors["digest"]
    assert "does not have (did you mean 'act'?)" in errors["layer"]
    assert "conv, act, pool, flat, head" in errors["layer"]
    assert "CAV of 3 values but layer 'act' has 4 channels" in errors["width"]
    assert errors["width"] == errors["width (forward)"]
    assert all("\n" not in text for text in errors.values())
    for bad, text in [
        ({"pooling": "avg"}, "pooling must be one of max, mean"),
        ({"cav": np.zeros(4)}, "zero CAV"),
        ({"cav": np.array([1.0, np.nan, 0, 0])}, "NaN"),
        ({"mean_clean": np.zeros(5)}, "mean_clean has 5 values but the CAV has 4"),
        ({"arrays": {"cav": np.zeros(2)}}, "may not be named cav"),
    ]:
        with pytest.raises(ConfigError, match=text):
            Concept(**{**concept.__dict__, **bad})


# -- the concept file ---------------------------------------------------------------------------------------


def test_concept_file_round_trip_keeps_everything(tmp_path):
    torch.manual_seed(5)
    model = _Tiny().eval()
    x = torch.randn(6, 2, 5, 5)
    concept = _concept_for(
        model,
        x,
        threshold=0.25,
        arrays={"scores": np.arange(6.0), "masks": np.zeros((6, 5, 5), dtype=np.uint8)},
        info={"source": "test", "auroc": 0.9},
    )
    path = save_concept(concept, tmp_path / "swatch")
    assert path == tmp_path / "swatch.json" and (tmp_path / "swatch.npz").is_file()
    for given in ("swatch", "swatch.json", "swatch.npz"):
        back = load_concept(tmp_path / given)
        assert np.array_equal(back.cav, concept.cav) and np.array_equal(back.mean_clean, concept.mean_clean)
        assert np.array_equal(back.mean_artefact, concept.mean_artefact)
        assert (back.name, back.layer, back.model_digest, back.pooling, back.threshold) == (
            "swatch",
            "act",
            concept.model_digest,
            "max",
            0.25,
        )
        assert set(back.arrays) == {"scores", "masks"} and back.arrays["masks"].dtype == np.uint8
        assert back.info == {"source": "test", "auroc": 0.9}
        assert back.z_clean == concept.z_clean and back.score_threshold == 0.25
    # the pattern CAV of a 0/1 label is the difference of the group means, made a unit vector
    assert np.allclose(
        concept.cav,
        (concept.mean_artefact - concept.mean_clean) / np.linalg.norm(concept.mean_artefact - concept.mean_clean),
    )
    assert concept.offset == pytest.approx(concept.z_artefact - concept.z_clean)
    with pytest.raises(ConfigError, match="exists; choose another concept name"):
        save_concept(concept, tmp_path / "swatch")
    save_concept(concept, tmp_path / "swatch", overwrite=True)
    (tmp_path / "notes.json").write_text("{}")  # a file teachx did not write is never replaced
    with pytest.raises(ConfigError, match="notes.json' exists"):
        save_concept(concept, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes.json").read_text() == "{}" and not (tmp_path / "notes.npz").exists()
    with pytest.raises(ConfigError, match="info must hold JSON values"):
        Concept(**{**concept.__dict__, "info": {"when": object()}})


@pytest.mark.parametrize("which", ["json", "npz"])
def test_a_flipped_byte_in_either_concept_file_is_an_error(tmp_path, which):
    torch.manual_seed(6)
    model = _Tiny().eval()
    concept = _concept_for(model, torch.randn(6, 2, 5, 5))
    save_concept(concept, tmp_path / "c")
    json_path, npz_path = concept_paths(tmp_path / "c")
    target = json_path if which == "json" else npz_path
    data = bytearray(target.read_bytes())
    if which == "json":  # a digit of a stored number: still valid JSON, a different value
        text = data.decode()
        i = text.index('"z_clean": ') + len('"z_clean": ') + 3
        data[i] = ord("7") if data[i] != ord("7") else ord("3")
    else:
        data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as e:
        load_concept(tmp_path / "c")
    assert "is corrupted" in str(e.value) and str(target) in str(e.value) and "\n" not in str(e.value)


def test_a_concept_from_scores_has_the_groups_mean_scores():
    """A Reveal step that keeps each sample's CAV score (not its activations) gives the same z_clean and
    z_artefact as the activations would."""
    torch.manual_seed(10)
    acts = torch.randn(12, 4, dtype=torch.float64)
    flags = np.arange(12) % 3 == 0
    v = _unit(4, seed=10).numpy() * 3.0  # any length: made a unit vector
    full = concept_from_activations("a", "act", acts, flags, "sha256:x", cav=v)
    scores = acts.numpy() @ (v / np.linalg.norm(v))
    short = concept_from_scores("a", "act", v, scores, flags, "sha256:x", threshold=0.1)
    assert np.allclose(short.cav, full.cav) and short.threshold == 0.1
    assert short.z_clean == pytest.approx(full.z_clean) and short.z_artefact == pytest.approx(full.z_artefact)
    with pytest.raises(ConfigError, match="both with and without"):
        concept_from_scores("a", "act", v, scores, np.ones(12, bool), "sha256:x")


def test_missing_or_foreign_concept_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="concept file '.*nothing.json' does not exist"):
        load_concept(tmp_path / "nothing")
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a teachx concept file"):
        load_concept(tmp_path / "x")
    (tmp_path / "r.json").write_text(json.dumps({"name": "r", "cav": {"kind": "pattern"}, "arrays_sha256": "0"}))
    (tmp_path / "r.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a concept record of teachx reveal, not a ClArC concept file"):
        load_concept(tmp_path / "r")


# -- RR-ClArC: the penalty's value and gradient ------------------------------------------------------------------


def _rr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, criterion: str, seed: int = 0):
    from teachx.training.methods.rrclarc import RRClarcTask

    concept = Concept("c", "act", v.numpy(), np.zeros(v.numel()), np.ones(v.numel()), model_digest(model))
    task = RRClarcTask(model, model.act, concept, lam=1.0, criterion=criterion)
    task.cav = v
    torch.manual_seed(seed)  # the random signs of all_logits_random, the same in every call
    loss, logits, extra = task.loss(x, y, None)
    return loss, extra


@pytest.mark.parametrize("criterion", ["all_logits", "all_logits_random", "target_logit"])
def test_rr_clarc_penalty_matches_the_closed_form_of_a_linear_head(criterion):
    """act -> mean over H*W positions -> linear W: d logit_k / d a[c, h, w] = W_kc / (H W), so the
    position-averaged gradient is W_k / (H W) and the penalty is mean_n (sum_k s_nk v . W_k / (H W))^2."""
    torch.manual_seed(7)
    model = _Tiny().double()
    x = torch.randn(5, 2, 4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    v = _unit(4, seed=7)
    _, extra = _rr_loss(model, x, y, v, criterion, seed=11)
    w = model.head.weight.detach()  # (K, C)
    per_class = (w @ v) / (4 * 3)  # v . W_k / (H W)
    if criterion == "all_logits":
        coef = torch.ones(5, 3, dtype=torch.float64)
    elif criterion == "target_logit":
        coef = torch.nn.functional.one_hot(y, 3).double()
    else:  # the signs rand_like draws after the same seed
        torch.manual_seed(11)
        coef = torch.sign(0.5 - torch.rand(5, 3, dtype=torch.float64))
    expect = ((coef * per_class).sum(1) ** 2).mean()
    assert torch.allclose(extra["rrclarc"], expect, atol=1e-14)


@pytest.mark.parametrize("criterion", ["all_logits_random", "max_logit", "logprobs"])
def test_rr_clarc_penalty_gradient_matches_finite_differences(criterion):
    """The second-order gradient the training step follows (create_graph), against gradcheck's finite
    differences, with respect to the weights before and after the concept layer."""
    torch.manual_seed(8)
    model = _Tiny().double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    v = _unit(4, seed=8)
    names = ["conv.weight", "head.weight", "head.bias"]
    start = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names}

    assert torch.autograd.gradcheck(
        lambda *p: _rr_loss_functional(model, dict(zip(names, p)), x, y, v, criterion), tuple(start[n] for n in names)
    )


def _rr_loss_functional(model, state, x, y, v, criterion):
    """RR-ClArC's loss with some parameters replaced by ``state`` (so gradcheck can vary them)."""
    from teachx.training.methods.rrclarc import RRClarcTask

    class _Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = model.act

        def forward(self, inp):
            params = {**dict(model.named_parameters()), **state}
            return torch.func.functional_call(model, params, (inp,))

    wrapped = _Swapped()
    concept = Concept("c", "act", v.numpy(), np.zeros(4), np.ones(4), model_digest(model))
    task = RRClarcTask(wrapped, model.act, concept, lam=3.0, criterion=criterion)
    task.cav = v
    torch.manual_seed(0)
    return task.loss(x, y, None)[0]


def test_criterion_outputs():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    y = torch.tensor([2, 0])
    assert torch.equal(criterion_output(logits, y, "all_logits"), torch.tensor([-0.5, 2.0]))
    assert torch.equal(criterion_output(logits, y, "max_logit"), torch.tensor([1.0, 3.0]))
    assert torch.equal(criterion_output(logits, y, "target_logit"), torch.tensor([0.5, 0.0]))
    torch.manual_seed(0)
    signs = torch.sign(0.5 - torch.rand(2, 3))
    torch.manual_seed(0)
    assert torch.equal(criterion_output(logits, y, "all_logits_random"), (logits * signs).sum(1))
    with pytest.raises(ConfigError, match="criterion must be one of"):
        criterion_output(logits, y, "random")


def test_rr_penalty_on_linear_activations_is_the_mean_squared_projection():
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    v = torch.tensor([0.6, 0.8])
    assert rr_penalty(g, v).item() == pytest.approx(((0.6 * 3 + 0.8 * 4) ** 2 + 0.6**2) / 2)


# -- the methods through the Trainer -----------------------------------------------------------------------------


def _planted(seed: int = 0):
    """Noise images, a weak real signal for class 1 (a brighter centre) and a planted artefact: a white
    corner swatch on 90% of class 0 and 10% of class 1. Returns (dataset, has_artefact of the train split)."""
    from teachx.data.base import ImageDataset, Split

    rng = np.random.default_rng(seed)

    def split(m):
        labels = rng.integers(0, 2, size=m)
        images = rng.integers(0, 120, size=(m, 16, 16, 1), dtype=np.uint8)
        images[labels == 1, 6:10, 6:10, 0] += 60
        art = rng.random(m) < np.where(labels == 0, 0.9, 0.1)
        images[art, :3, :3, 0] = 255
        return Split(images, labels, None), art

    train, art = split(160)
    test, _ = split(16)
    return ImageDataset("planted", ["0", "1"], train, test, (0.3,), (0.3,), hflip=False), art


def _method_cfg(method: str, options: dict):
    from teachx.config.schema import MethodConfig, RunConfig

    cfg = RunConfig()
    cfg.model.backbone = "lenet5"
    cfg.method = MethodConfig(method, options)
    return cfg


@pytest.fixture(scope="module")
def planted_baseline(tmp_path_factory):
    """A LeNet-5 trained on the planted task, its concept at the second conv block, and the data."""
    from teachx.config.train import TrainConfig
    from teachx.models import build_model
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer, prepare_batch

    out = tmp_path_factory.mktemp("planted")
    ds, art = _planted()
    plan = DataPlan(ds, np.arange(128), np.arange(128, 160))
    torch.manual_seed(0)
    base = build_model("lenet5", 1, 2, 16)
    tcfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, progress=False, threads=1)
    Trainer(ClassifierTask(base), plan, tcfg, out / "base", seed=0, device="cpu", log=lambda s: None).fit()
    base.eval()
    x, _ = prepare_batch(torch.from_numpy(ds.train.images[:128]).permute(0, 3, 1, 2), plan, torch.device("cpu"))
    with torch.no_grad(), Capture(base.body[5]) as cap:
        base(x)
    concept = concept_from_activations("swatch", "body.5", cap.out.flatten(2).amax(2), art[:128], model_digest(base))
    path = save_concept(concept, out / "swatch")
    return base, concept, path, plan, x


def _fine_tune(planted_baseline, tmp_path, method: str, options: dict):
    from teachx.config.train import TrainConfig
    from teachx.training.methods import MethodContext, build_method
    from teachx.training.trainer import Trainer

    base, concept, path, plan, _ = planted_baseline
    cfg = _method_cfg(method, {"concept": str(path), **options})
    m = build_method(cfg)
    m.check_data(plan)
    ctx = MethodContext(cfg, plan, torch.device("cpu"), log=lambda s: None, baseline_model=lambda: base)
    model = m.build_model(ctx)
    task = m.task(model, ctx)
    tcfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, progress=False, threads=1)
    Trainer(task, plan, tcfg, tmp_path / method, seed=0, device="cpu", log=lambda s: None).fit()
    return model.eval()


def test_rr_clarc_fine_tuning_makes_the_model_insensitive_along_the_cav(planted_baseline, tmp_path):
    base, concept, _, _, x = planted_baseline
    v = torch.as_tensor(concept.cav, dtype=torch.float32)
    before = cav_sensitivity(base, base.body[5], v, x)
    corrected = _fine_tune(planted_baseline, tmp_path / "a", "rrclarc", {"lam": 100.0})
    control = _fine_tune(planted_baseline, tmp_path / "b", "rrclarc", {"lam": 0.0})  # the same fine-tuning, no penalty
    after = cav_sensitivity(corrected, corrected.body[5], v, x)
    after_control = cav_sensitivity(control, control.body[5], v, x)
    assert after < 0.25 * before and after < 0.25 * after_control, (before, after, after_control)
    # the recipe's frozen feature extractor: the convolutions are the baseline's, only dense layers moved
    assert torch.equal(corrected.body[3].weight, base.body[3].weight)
    assert not torch.equal(corrected.classifier.weight, base.classifier.weight)


def test_a_clarc_fine_tuning_trains_with_the_shift_and_leaves_no_hook(planted_baseline, tmp_path):
    base, concept, _, _, x = planted_baseline
    corrected = _fine_tune(planted_baseline, tmp_path, "aclarc", {"freeze": "none"})
    assert not corrected.body[5]._forward_hooks  # the shift is on only while the training loss is computed
    assert not torch.equal(corrected.body[0].weight, base.body[0].weight)  # freeze=none trains the convolutions
    # the model saw every image with the artefact's score: its outputs now depend less on that score
    v = torch.as_tensor(concept.cav, dtype=torch.float32)
    assert cav_sensitivity(corrected, corrected.body[5], v, x) < cav_sensitivity(base, base.body[5], v, x)


def test_method_inputs_are_checked_in_one_line(planted_baseline, tmp_path):
    from teachx.models import build_model
    from teachx.runs.resolve import resolve_config
    from teachx.training.methods import MethodContext, build_method

    base, concept, path, plan, _ = planted_baseline
    cases = {
        ("method.name=rrclarc",): "method rrclarc needs method.options.concept=PATH",
        (
            "method.name=aclarc",
            "method.options.concept=x",
            "method.options.freeze=all",
        ): "must be one of features, none",
        (
            "method.name=rrclarc",
            "method.options.concept=x",
            "method.options.criterion=rand",
        ): "must be one of all_logits_random",
        ("method.name=rrclarc", "method.options.concept=x", "method.options.lam=-1"): "must be >= 0",
    }
    for overrides, text in cases.items():
        with pytest.raises(ConfigError) as err:
            resolve_config(None, list(overrides))
        assert text in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))

    def build(options, baseline=base, init_teacher=None):
        m = build_method(_method_cfg("rrclarc", {"concept": str(path), **options}))
        ctx = MethodContext(
            m.cfg,
            plan,
            torch.device("cpu"),
            teacher_model=init_teacher,
            log=lambda s: None,
            baseline_model=(lambda: baseline) if baseline is not None else None,
        )
        return m.build_model(ctx)

    torch.manual_seed(9)
    stranger = build_model("lenet5", 1, 2, 16)
    for options, kwargs, text in [
        ({}, {"baseline": stranger}, "computed on another model"),
        ({"layer": "body.3"}, {}, "is at layer 'body.5', not 'body.3'"),
        ({}, {"baseline": None}, "fine-tunes the run's baseline, and none was given"),
        ({"init": "teacher"}, {}, "init=teacher needs the run's teacher model"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(options, **kwargs)
        assert text in str(err.value) and "\n" not in str(err.value), (options, str(err.value))
    assert isinstance(build({"init": "teacher"}, baseline=None, init_teacher=base), nn.Module)
    shutil.copy(path, tmp_path / "moved.json")  # a JSON without its npz
    with pytest.raises(ConfigError, match="moved.npz' does not exist"):
        build_method(_method_cfg("rrclarc", {"concept": str(tmp_path / "moved.json")})).check_data(plan)
    assert isinstance(concept, Concept) and Path(path).is_file()


# -- through `teachx run` ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_teachx_run_fine_tunes_the_baseline_a_concept_was_computed_on(tmp_path):
    """A concept computed on one run's baseline fits the next run's (the same config trains the same weights
    on CPU): rrclarc starts from it; a run with another seed (other baseline weights) is refused in one line."""
    from conftest import run_teachx

    from teachx.runs.plan import make_plan
    from teachx.runs.resolve import resolve_config
    from teachx.runs.stages import load_classifier
    from teachx.training.trainer import prepare_batch

    common = ["data.train_size=120", "train.epochs=1", "teacher.method=gradient", "teacher.eval_images=20"]
    first = run_teachx("run", "--out", tmp_path / "plain", "-q", "method.name=baseline", *common, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    cfg = resolve_config(None, common)
    plan = make_plan(cfg, progress=False)
    ds = plan.dataset
    base = load_classifier(tmp_path / "plain" / "baseline" / "checkpoints" / "best.safetensors", ds)
    idx = plan.train_idx[:60]
    x, _ = prepare_batch(torch.from_numpy(ds.train.images[idx]).permute(0, 3, 1, 2), plan, torch.device("cpu"))
    with torch.no_grad(), Capture(base.body[5]) as cap:
        base(x)
    flags = np.asarray(ds.train.labels)[idx] == 0
    concept = concept_from_activations("class0", "body.5", cap.out.flatten(2).amax(2), flags, model_digest(base))
    path = save_concept(concept, tmp_path / "class0")

    ok = run_teachx(
        "run", "--out", tmp_path / "fixed", "-q", "method.name=rrclarc", f"method.options.concept={path}", *common
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    results = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert results["method"] == "rrclarc" and results["method_options"]["concept"] == str(path)
    assert results["concept"]["model_digest"] == concept.model_digest and results["concept"]["layer"] == "body.5"
    assert (tmp_path / "fixed" / "rrclarc" / "checkpoints" / "best.safetensors").is_file()

    other = run_teachx(
        "run",
        "--out",
        tmp_path / "other",
        "-q",
        "method.name=rrclarc",
        f"method.options.concept={path}",
        "seed=1",
        *common,
    )
    lines = [ln for ln in other.stderr.splitlines() if ln.strip()]
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
    assert "was computed on another model" in lines[0]


# -- rrr_revealed: RRR's penalty inside the masks Reveal localised ----------------------------------------------


def _masked_concept(planted_baseline, tmp_path, localised: np.ndarray, masks: np.ndarray) -> Path:
    """The planted baseline's concept with Reveal's arrays: masks (M, H, W) of the training images ``localised``."""
    _, concept, _, _, _ = planted_baseline
    with_masks = Concept(**{**concept.__dict__, "arrays": {"masks": masks, "localised": localised}})
    return save_concept(with_masks, tmp_path / "masked")


def test_rrr_revealed_penalty_is_the_squared_input_gradient_inside_the_revealed_masks(planted_baseline, tmp_path):
    """The loss against a hand computation, image by image: CE + lam * mean over the batch of the sum over the
    masked pixels (every channel) of (d sum_k log p_k(x_n) / d x)^2; an image Reveal did not localise adds 0."""
    from teachx.training.methods import MethodContext, build_method

    base, _, _, plan, x = planted_baseline
    rng = np.random.default_rng(0)
    localised = np.array([2, 0, 5])  # in no particular order, as Reveal stores them (members first)
    masks = rng.random((3, 16, 16)) < 0.3
    path = _masked_concept(planted_baseline, tmp_path, localised, masks)
    m = build_method(_method_cfg("rrr_revealed", {"concept": str(path), "lam": 7.0}))
    m.check_data(plan)
    ctx = MethodContext(m.cfg, plan, torch.device("cpu"), log=lambda s: None, baseline_model=lambda: base)
    model = m.build_model(ctx)
    task = m.task(model, ctx)
    idx = torch.arange(8)
    mask = task.maps_for(idx)
    assert mask.shape == (8, 1, 16, 16)
    for n in range(8):  # each localised image gets its own mask, every other image none
        expect = masks[list(localised).index(n)] if n in localised else np.zeros((16, 16), bool)
        assert np.array_equal(mask[n, 0].numpy(), expect.astype(np.float32))
    xb, y = x[:8], torch.from_numpy(np.asarray(plan.dataset.train.labels)[:8]).long()
    loss, logits, extra = task.loss(xb, y, mask)
    per_image = []
    for n in range(8):  # one image at a time (LeNet-5 has no BatchNorm: the batch's gradient is per image)
        xn = xb[n : n + 1].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(model(xn), 1).sum(), xn)
        g2 = g[0].double().numpy() ** 2  # (C, H, W)
        inside = mask[n, 0].numpy().astype(bool)
        per_image.append(sum(g2[c][inside].sum() for c in range(g2.shape[0])))
    assert all(per_image[n] == 0 for n in range(8) if n not in localised)
    assert all(per_image[n] > 0 for n in localised)
    expect = float(np.mean(per_image))
    assert float(extra["rrr"]) == pytest.approx(expect, rel=1e-4)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) + 7.0 * expect, rel=1e-4)
    # the defaults: every layer trains (the input gradient is the convolutions' to shape)
    assert m.opts["freeze"] == "none" and all(p.requires_grad for p in model.parameters())


def test_rrr_revealed_refuses_a_concept_without_masks_in_one_line(planted_baseline, tmp_path, capsys):
    from conftest import teachx_main

    from teachx.training.methods import build_method

    _, _, path, plan, _ = planted_baseline  # a concept file without Reveal's masks
    with pytest.raises(ConfigError) as err:
        build_method(_method_cfg("rrr_revealed", {"concept": str(path)})).check_data(plan)
    text = str(err.value)
    assert "carries no artefact masks" in text and "teachx reveal" in text and "--concept" in text
    assert "teachx revise RUN_DIR --concept NAME --method rrr_revealed" in text and "\n" not in text
    bad = _masked_concept(planted_baseline, tmp_path, np.array([0, 999]), np.zeros((2, 16, 16), bool))
    with pytest.raises(ConfigError, match="up to index 999, but the training split has 160"):
        build_method(_method_cfg("rrr_revealed", {"concept": str(bad)})).check_data(plan)
    small = _masked_concept(planted_baseline, tmp_path / "s", np.array([0]), np.zeros((1, 8, 8), bool))
    with pytest.raises(ConfigError, match="masks of 8x8 pixels but the images are 16x16"):
        build_method(_method_cfg("rrr_revealed", {"concept": str(small)})).check_data(plan)
    # through the CLI: exit 2, one line, before anything is written
    out = tmp_path / "run"
    code, _, err_text = teachx_main(
        capsys, "run", "--out", out, "-q", "method.name=rrr_revealed", f"method.options.concept={path}"
    )
    lines = [line for line in err_text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("teachx: error: "), err_text
    assert "carries no artefact masks" in lines[0] and "teachx reveal" in lines[0]
    assert not out.exists()
