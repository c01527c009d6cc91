"""B-cos networks: the layer against the papers' equation, the exact contributions, explanation mode,
the input encoding, the teacher, and training end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from teachx.errors import ConfigError
from teachx.models import build_from_spec, build_model, model_spec
from teachx.models.base import tell_input_normalization
from teachx.models.bcos import BcosConv2d, BcosLinear, BcosNetwork, explanation_mode
from teachx.teachers import build as build_teacher

torch.set_num_threads(1)

BACKBONES = {
    "bcos_lenet5": {},
    "bcos_resnet": {"depth": 8, "width": 4},
}


def seeded(name: str, dtype: torch.dtype = torch.float64, channels: int = 3, **options) -> BcosNetwork:
    torch.manual_seed(0)
    model = build_model(name, channels, 5, 32, **{**BACKBONES[name], **options}).to(dtype).eval()
    assert isinstance(model, BcosNetwork)
    return model


def images(dtype: torch.dtype = torch.float64, channels: int = 3, n: int = 4) -> torch.Tensor:
    return torch.randn(n, channels, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


# -- the layer is the papers' equation ---------------------------------------------------------------------


def paper_conv(x: torch.Tensor, weight: torch.Tensor, b: float, stride: int, padding: int) -> torch.Tensor:
    """|cos(x, w)|^(B-1) * (w_hat^T x) for every patch, from unfolded patches (no code shared with the layer)."""
    out_channels, _, k, _ = weight.shape
    patches = F.unfold(x, k, padding=padding, stride=stride)  # (N, C*k*k, L)
    w = weight.reshape(out_channels, -1)
    w_hat = w / w.norm(dim=1, keepdim=True)
    linear = torch.einsum("oc,ncl->nol", w_hat, patches)
    cos = linear / patches.norm(dim=1, keepdim=True)
    side = (x.shape[-1] + 2 * padding - k) // stride + 1
    return (cos.abs() ** (b - 1) * linear).reshape(x.shape[0], out_channels, side, side)


@pytest.mark.parametrize("b", [2.0, 2.5, 1.0])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_conv_is_the_papers_equation(b, stride, padding):
    torch.manual_seed(0)
    layer = BcosConv2d(4, 7, 3, stride=stride, padding=padding, b=b).double()
    x = torch.rand(2, 4, 12, 12, dtype=torch.float64) + 0.1  # every patch non-zero: the eps does not matter
    expected = paper_conv(x, layer.weight.detach(), b, stride, padding)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-8)


def test_linear_and_max_out_are_the_papers_equation():
    torch.manual_seed(0)
    layer = BcosLinear(6, 3, b=2.0, max_out=2, temperature=0.5).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    w = layer.weight.detach()
    w_hat = w / w.norm(dim=1, keepdim=True)
    units = (x @ w_hat.T) * (x @ w_hat.T).abs() / x.norm(dim=1, keepdim=True)  # (5, 6): 3 channels x 2 units
    expected = units.reshape(5, 3, 2).amax(dim=2) / 0.5
    assert torch.allclose(layer(x), expected, rtol=1e-6)


def test_explanation_mode_detaches_the_scale_and_restores_it():
    torch.manual_seed(0)
    layer = BcosLinear(4, 1).double()
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    w_hat = (layer.weight / layer.weight.norm()).detach()[0]
    cos = (x.detach()[0] @ w_hat) / x.detach()[0].norm()
    with explanation_mode(layer):
        assert layer.detach
        (grad_explained,) = torch.autograd.grad(layer(x).sum(), x)
    assert not layer.detach
    # explanation mode: d/dx of |cos| * w_hat^T x with |cos| constant is |cos| * w_hat, i.e. W(x)
    assert torch.allclose(grad_explained[0], cos.abs() * w_hat)
    assert not torch.allclose(grad, grad_explained)  # the ordinary gradient differs


# -- the exact contributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("options", [{}, {"max_out": 2}])
def test_contributions_add_up_to_the_logit_float64(name, options):
    model = seeded(name, **options)
    x, target = images(), torch.tensor([0, 1, 2, 4])
    tell_input_normalization(model, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))  # a real normalisation to undo
    logits = model(x)
    maps = model.contributions(x, target)
    assert maps.shape == x.shape and not maps.requires_grad
    chosen = logits.gather(1, target[:, None])[:, 0]
    assert (maps.sum(dim=(1, 2, 3)) - chosen).abs().max() <= 1e-10 * chosen.abs().max().clamp_min(1)
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), chosen, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_contributions_add_up_to_the_logit_float32(name):
    """float32: the sum matches the logit to 1e-4 of the largest |logit| (rounding over ~3,000 terms)."""
    model = seeded(name, torch.float32)
    x, target = images(torch.float32), torch.tensor([3, 0, 1, 2])
    logits = model(x)
    chosen = logits.gather(1, target[:, None])[:, 0]
    total = model.contributions(x, target).sum(dim=(1, 2, 3))
    assert (total - chosen).abs().max() <= 1e-4 * logits.abs().max()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_gradient_in_explanation_mode_is_the_dynamic_linear_map(name):
    """W(x) from the gradient is the network: W(x) x_enc is the logit, and the network's own gradient
    outside explanation mode is a different vector (the scales depend on x)."""
    model = seeded(name)
    x, target = images(n=2), torch.tensor([1, 3])
    weights, encoded = model.dynamic_weights(x, target)
    assert encoded.shape == (2, 6, 32, 32)
    assert torch.allclose(encoded[:, 3:], 1 - encoded[:, :3])
    logits = model(x).gather(1, target[:, None])[:, 0]
    assert torch.allclose((weights * encoded).sum(dim=(1, 2, 3)), logits, rtol=1e-9)
    # the map is linear in x_enc for a fixed W: a second input through the same W is just W x_enc'
    plain = encoded.clone().requires_grad_(True)
    stem = model.body[0]
    h = stem.forward_encoded(plain)
    for layer in list(model.body)[1:]:
        h = layer(h)
    (ordinary,) = torch.autograd.grad(model.classifier(model.neck(h)).gather(1, target[:, None]).sum(), plain)
    assert not torch.allclose(ordinary, weights)


def test_train_mode_normalisation_is_detached_and_left_alone():
    model = seeded("bcos_resnet").train()
    x, target = images(), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = model.contributions(x, target)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by an explanation"
    with torch.no_grad():
        logits = model(x)  # the same batch statistics (this call updates running_var, after the comparison)
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), logits.gather(1, target[:, None])[:, 0], rtol=1e-9)


def test_grayscale_encoding_has_two_channels():
    model = seeded("bcos_lenet5", channels=1)
    assert model.body[0].conv.in_channels == 2
    x = images(channels=1)
    assert model.contributions(x, torch.zeros(4, dtype=torch.long)).shape == x.shape


def test_encoding_reads_the_unnormalised_image():
    """The stem undoes teachx's normalisation: normalised inputs give the same logits as the raw image
    does to a model that was told no normalisation happened."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    raw = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    column = {"dtype": torch.float64}
    normalised = (raw - torch.tensor(mean, **column)[:, None, None]) / torch.tensor(std, **column)[:, None, None]
    plain = seeded("bcos_lenet5")
    told = seeded("bcos_lenet5")
    tell_input_normalization(told, mean, std)
    assert torch.allclose(told(normalised), plain(raw), rtol=1e-10)
    encoded = told.body[0].encode(normalised)
    assert torch.allclose(encoded, torch.cat([raw, 1 - raw], dim=1))
    # the buffers travel with the weights (a checkpoint carries them)
    rebuilt = build_from_spec(model_spec(told)).double().eval()
    rebuilt.load_state_dict(told.state_dict())
    assert torch.allclose(rebuilt(normalised), told(normalised))


def test_spec_round_trip_and_bad_options():
    for name, options in BACKBONES.items():
        model = build_model(name, 3, 10, 32, **options, b=2.5, max_out=2, temperature=0.5)
        assert model_spec(build_from_spec(model.spec)) == model.spec
        json.dumps(model.spec)
    assert build_model("bcos_lenet5", 1, 10, 28).spec["options"]["padding"] == 2
    for bad, message in [
        ({"b": 0.5}, "b (the B-cos exponent)"),
        ({"temperature": 0}, "temperature"),
        ({"max_out": 0}, "max_out"),
        ({"pool": "sum"}, "pool must be one of avg, max"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_model("bcos_lenet5", 3, 10, 32, **bad)
    with pytest.raises(ConfigError, match="norm must be one of bnu, none"):
        build_model("bcos_resnet", 3, 10, 32, norm="layer")
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model("bcos_resnet", 3, 10, 32, depth=9)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_contract(name):
    """body -> neck -> classifier composes to forward, the pyramid matches its declared shapes, and every
    parameter learns."""
    model = seeded(name, torch.float32).train()
    x = images(torch.float32)
    feats = model.features(x)
    assert feats.shape == (4, model.feature_dim)
    assert torch.allclose(model(x), model.classifier(model.neck(model.body(x))))
    m, levels = model.features_with_pyramid(x)
    assert [tuple(t.shape[1:]) for t in levels] == [tuple(s) for s in model.pyramid_shapes((32, 32))]
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- the model's own map: the contract of the built-in-map models ------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
def test_own_map_is_the_contributions_summed_over_channels(name):
    """``explain`` / ``forward_all`` give the contributions of the explained class summed over the colour channels
    (one map per image, as the default channel reduction of teacher maps): still the logit in total."""
    model = seeded(name)
    tell_input_normalization(model, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    x, target = images(), torch.tensor([0, 1, 2, 4])
    own = model.explain(x, target)
    assert own.shape == (4, 1, 32, 32) and not own.requires_grad
    assert torch.allclose(own, model.contributions(x, target).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
    logits = model(x)
    assert torch.allclose(own.sum(dim=(1, 2, 3)), logits.gather(1, target[:, None])[:, 0], rtol=1e-9)
    # default: the predicted class, with the logits of the same pass; one class: the same for every image
    out, predicted_map = model.forward_all(x)
    assert torch.allclose(out, logits) and not out.requires_grad
    assert torch.allclose(predicted_map, model.contributions(x, logits.argmax(1)).sum(1, keepdim=True))
    assert torch.allclose(model.explain(x, torch.tensor(2)), model.contributions(x, torch.full((4,), 2)).sum(1, True))
    assert all(p.grad is None for p in model.parameters())


def test_bcos_models_explain_themselves_and_plain_ones_do_not():
    """The capability the evaluations ask for (no name): a B-cos network, and the methods that train one as it is."""
    from teachx.models import backbone_explains_itself, explains_itself
    from teachx.runs.resolve import resolve_config
    from teachx.training.methods import build_method

    assert explains_itself(seeded("bcos_lenet5")) and not explains_itself(build_model("lenet5", 3, 5, 32))
    assert backbone_explains_itself("bcos_resnet") and backbone_explains_itself("bcos-lenet5")
    assert not any(backbone_explains_itself(n) for n in ("lenet5", "resnet_cifar", "torchvision:resnet18", "nope"))
    bcos = build_method(resolve_config(None, ["method.name=baseline", "model.backbone=bcos_lenet5"]))
    plain = build_method(resolve_config(None, ["method.name=baseline"]))
    assert bcos.explains_itself() and bcos.study_evaluates() and bcos.study_maps() == ("train", "test")
    assert not plain.explains_itself() and not plain.study_evaluates() and plain.study_maps() == ()


# -- the teacher ---------------------------------------------------------------------------------------------


def test_teacher_returns_the_contributions_and_refuses_other_models(small_cnn):
    model = seeded("bcos_lenet5", torch.float32)
    x, target = images(torch.float32), torch.tensor([0, 1, 2, 3])
    teacher = build_teacher("bcos")
    assert torch.equal(teacher.attribute(model, x, target), model.contributions(x, target))
    with pytest.raises(ConfigError, match="the bcos teacher explains B-cos networks only") as info:
        teacher.attribute(small_cnn, torch.randn(2, 3, 16, 16), 0)
    assert "\n" not in str(info.value) and "teacher.backbone=bcos_lenet5" in str(info.value)


def test_run_refuses_the_bcos_teacher_on_another_backbone_before_training(tmp_path, capsys):
    from conftest import teachx_main

    out = tmp_path / "run"
    code, _, err = teachx_main(capsys, "run", "teacher.method=bcos", "model.backbone=lenet5", "--out", out)
    assert code == 2 and not out.exists()
    assert err.strip().count("\n") == 0 and "set teacher.backbone=bcos_lenet5" in err
    # a B-cos teacher model passes the check (here only the config is resolved)
    from teachx.runs.resolve import resolve_config

    cfg = resolve_config(overrides=["teacher.method=bcos", "teacher.backbone=bcos_lenet5"])
    assert cfg.teacher.backbone == "bcos_lenet5"
    assert resolve_config(overrides=["teacher.method=bcos", "model.backbone=bcos_resnet"]).teacher.method == "bcos"


def test_models_accept_bcos_backbones_in_impactx_and_abn():
    from teachx.models.abn import build_abn
    from teachx.models.impactx import build_impactx

    x = torch.randn(2, 3, 32, 32)
    abn = build_abn("bcos_resnet", 3, 10, (32, 32), backbone_options={"depth": 8, "width": 4})
    assert abn(x).shape == (2, 10)
    impactx = build_impactx("bcos_lenet5", 3, 10, (32, 32))
    assert impactx(x).shape == (2, 10)


# -- training end to end -------------------------------------------------------------------------------------


def test_train_bcos_lenet5_records_the_input_normalisation(tmp_path, monkeypatch, capsys):
    from conftest import teachx_main

    from teachx.training.checkpoint import load_checkpoint

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["model.backbone=bcos_lenet5", "data.train_size=200", "train.epochs=1", "train.batch_size=50"]
    code, text, err = teachx_main(capsys, "train", *args, "--out", out, "-q")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 1
    state = load_checkpoint(out / "checkpoints" / "best.safetensors").group("model")
    std = state["body.0.input_std"]  # fashion-mnist, grayscale: one channel
    assert std.shape == (1,) and 0.1 < float(std) < 0.6, "the trainer did not tell the model the data's std"


@pytest.mark.slow
def test_bcos_model_as_the_impactx_teacher(tmp_path):
    """`teachx run` with a B-cos LeNet-5 teacher explained by its contributions, a LeNet-5 student."""
    from conftest import run_teachx

    out = tmp_path / "run"
    proc = run_teachx(
        "run",
        "teacher.method=bcos",
        "teacher.backbone=bcos_lenet5",
        "data.train_size=200",
        "train.epochs=1",
        "train.batch_size=50",
        "teacher.eval_images=40",
        "teacher.faith_images=0",
        "--out",
        out,
        "-q",
        env={"TEACHX_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert "impactx" in json.dumps(results)


def test_bcos_baseline_run_reports_its_contributions_map_quality(tmp_path, monkeypatch):
    """`teachx run model.backbone=bcos_lenet5 method.name=baseline`: results.json's map quality scores the model's
    own map, its contributions, as an ABN run's scores the attention map: against the teacher's maps, and on the
    model itself next to the most faithful unsmoothed post-hoc map of the same model."""
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import make_plan
    from teachx.runs.recovery import prepare_run_dir
    from teachx.runs.resolve import resolve_config

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        None,
        [
            "model.backbone=bcos_lenet5",
            "method.name=baseline",
            "data.train_size=200",
            "train.epochs=1",
            "train.progress=false",
            "teacher.method=gradient",
            "teacher.eval_images=40",
            "teacher.faith_images=8",
        ],
    )
    run_dir = prepare_run_dir(tmp_path / "run", cfg, "run", log=lambda s: None)
    res = run_pipeline(
        cfg, run_dir, log=lambda s: None, progress=False, figures=False, plan=make_plan(cfg, progress=False)
    ).results
    quality = res["map_quality"]
    assert res["method"] == "baseline" and quality["images"] == 40 and -1 <= quality["corr"] <= 1
    block = quality["faithfulness"]
    best = block["best_post_hoc"]
    morf = block["auc"]["pixel_flipping_morf"]
    assert block["images"] == 8 and best["morf_ratio"] == pytest.approx(
        morf["built_in"] / morf[f"post_hoc_{best['method']}"]
    )
    assert best["pixel_flipping_morf"] == min(best["morf_by_method"].values())


@pytest.mark.slow
def test_bcos_baseline_on_a_shortcut_benchmark_gets_its_own_maps_share(tmp_path, monkeypatch):
    """On a swatch benchmark the B-cos model's own map is scored as a built-in map is: its share on the artefact
    (recomputed here from the contributions of the true class) and the ratio of that to its gradient share."""
    import numpy as np

    from teachx.data.transforms import normalize
    from teachx.evaluation import wrong_reason_score
    from teachx.runs.pipeline import run_pipeline
    from teachx.runs.plan import eval_indices, make_plan
    from teachx.runs.recovery import prepare_run_dir
    from teachx.runs.resolve import resolve_config
    from teachx.runs.stages import load_classifier
    from teachx.runs.teacher import as_nchw

    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache"))
    args = ["model.backbone=bcos_lenet5", "method.name=baseline", "data.shortcut=swatch", "data.train_size=200"]
    args += ["train.epochs=1", "train.progress=false", "teacher.method=gradient", "teacher.eval_images=40"]
    cfg = resolve_config(None, args + ["teacher.faith_images=0"])
    plan = make_plan(cfg, progress=False)
    run_dir = prepare_run_dir(tmp_path / "run", cfg, "run", log=lambda s: None)
    res = run_pipeline(cfg, run_dir, log=lambda s: None, progress=False, figures=False, plan=plan).results
    block = res["shortcut"]["baseline"]
    assert block["honesty"] == pytest.approx(block["built_in"] / block["gradient"])
    model = load_classifier(next((run_dir / "baseline").rglob("best.safetensors")), plan.dataset).eval()
    idx = eval_indices(cfg, plan)
    x = normalize(as_nchw(plan.dataset.test.images[idx]), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(plan.dataset.test.labels[idx])).long()
    own = model.contributions(x, y).sum(1, keepdim=True)
    direct = wrong_reason_score(own, torch.from_numpy(plan.dataset.test.masks[idx]).float())
    assert block["built_in"] == pytest.approx(float(direct.mean()), rel=1e-4)
