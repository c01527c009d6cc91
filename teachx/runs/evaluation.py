"""The evaluation of a run's models: map quality (did the model learn per-image maps), the built-in maps'
faithfulness and which class a teacher map explains (see ``teachx.evaluation.builtin_maps``), where the
models look on a shortcut dataset, and the example images of the run's figure."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from teachx.config.schema import RunConfig
from teachx.data.transforms import normalize
from teachx.evaluation.builtin_maps import map_corr
from teachx.evaluation.shortcut import artefact_share, wrong_reason_score
from teachx.models import explains_itself
from teachx.models.impactx import ImpactX
from teachx.registry import declare_measure
from teachx.teachers import build as build_teacher
from teachx.teachers.postprocess import postprocess
from teachx.teachers.store import MapStore
from teachx.training.trainer import DataPlan
from teachx.evaluation.builtin_maps import builtin_map_faithfulness
from teachx.runs.plan import eval_indices
from teachx.runs.records import ArtefactShares
from teachx.runs.teacher import as_nchw, make_teacher


declare_measure(
    "corr_self",
    "The mean per-image Pearson correlation between the built-in map and the teacher method applied post "
    "hoc to the same model: does the built-in map agree with an explanation of the model itself?",
    True,
)
declare_measure(
    "corr_self_mean_map",
    "The same correlation for the mean training map: the level a map that ignores the image reaches.",
    None,
)


def explained_classes(
    cfg: RunConfig,
    plan: DataPlan,
    teacher_model: Optional[torch.nn.Module],
    split: str,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """For every image of ``split`` (an array as long as the split), the class its teacher map
    explains: the label (``teacher.target=label``) or, for ``predicted``, the teacher model's
    prediction on the unaugmented image -- computed for ``indices`` only (others keep the label),
    exactly as the map was made."""
    data = plan.dataset.train if split == "train" else plan.dataset.test
    classes = np.asarray(data.labels, dtype=np.int64).copy()
    if cfg.teacher.target != "predicted":
        return classes
    if teacher_model is None:
        raise ValueError("teacher.target=predicted needs the teacher model to know which class each map explains")
    indices = np.asarray(indices)
    teacher_model = teacher_model.to(device).eval()
    with torch.no_grad():
        for s in range(0, len(indices), batch_size):
            idx = indices[s : s + batch_size]
            x = normalize(as_nchw(data.images[idx]).to(device), plan.mean, plan.std)
            classes[idx] = teacher_model(x).argmax(1).cpu().numpy()
    return classes


def faith_indices(cfg: RunConfig, plan: DataPlan, pool: np.ndarray) -> np.ndarray:
    """``teacher.faith_images`` test indices from ``pool``, class-balanced (classes taken in turn,
    each in a seeded order), the same for every seed and arm of a data split."""
    pool = np.asarray(pool)
    k = int(cfg.teacher.faith_images)
    if k >= len(pool):
        return pool
    labels = np.asarray(plan.dataset.test.labels)[pool]
    rng = np.random.default_rng(cfg.data.split_seed + 4242)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < k:
        for members in per_class:
            if members and len(chosen) < k:
                chosen.append(int(members.pop()))
    return pool[np.sort(np.array(chosen, dtype=np.int64))]


def post_hoc_maps(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
    teacher=None,
    smooth: Optional[float] = None,
) -> torch.Tensor:
    """The configured teacher method (or ``teacher``) applied to ``model`` (any classifier, e.g. the IMPACTX
    model), post-processed like the teacher maps (``smooth``: another smoothing sigma)."""

    teacher = make_teacher(cfg, plan, device) if teacher is None else teacher
    smooth = cfg.teacher.smooth if smooth is None else smooth
    maps = []
    for s in range(0, x.shape[0], batch_size):
        raw = teacher.attribute(model, x[s : s + batch_size], target[s : s + batch_size])
        maps.append(
            postprocess(raw, reduce=cfg.teacher.reduce, normalize=cfg.teacher.normalize, smooth=smooth).detach()
        )
    return torch.cat(maps).float()


#: the cheap, unsmoothed post-hoc methods the built-in maps are measured against (``best_post_hoc``): name ->
#: (teacher method, its options). LRP with the epsilon rule on every layer (teachx's own implementation).
REFERENCE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient_x_input": ("gradient_x_input", {}),
    "lrp_epsilon": ("lrp", {"composite": "epsilon"}),
    "integrated_gradients": ("integrated_gradients", {}),
}


def reference_maps(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    device: torch.device,
    errors: list[str],
) -> dict[str, torch.Tensor]:
    """Every method of :data:`REFERENCE_METHODS` applied to ``model``, unsmoothed (a failing one is left out,
    its error appended to ``errors``)."""
    out = {}
    for name, (method, options) in REFERENCE_METHODS.items():
        try:
            out[name] = post_hoc_maps(
                cfg, plan, model, x, target, device, teacher=build_teacher(method, **options), smooth=0.0
            )
        except Exception as exc:  # an optional diagnostic must not lose the training before it
            errors.append(f"{name} on the model with the built-in map: {type(exc).__name__}: {exc}")
    return out


def faithfulness_block(
    cfg: RunConfig,
    plan: DataPlan,
    model: torch.nn.Module,
    test_store,
    train_store,
    device: torch.device,
    pool: np.ndarray,
    teacher_classes: Optional[np.ndarray] = None,
    steps: int = 16,
) -> dict[str, Any]:
    """Faithfulness of the built-in maps to the model that makes them (``map_quality["faithfulness"]``): IMPACTX,
    ABN, or a B-cos model, whose own map is its contributions (``teachx.models.explains_itself``).

    Every map set explains the model's *predicted* class. Besides the AUCs and the
    self-agreement (``corr_self``, with the teacher method, which may be smoothed), ``best_post_hoc`` names
    the most faithful unsmoothed post-hoc map of the same model (:data:`REFERENCE_METHODS`, scored as
    ``post_hoc_<name>``) with the built-in maps' MoRF ratio to it and their correlation with it; ``corr_post_hoc_teacher`` is the agreement of the post-hoc map
    with the baseline teacher's stored map, on the images whose predicted class is the class the
    teacher explained (``images_same_class``): how far two networks' explanations agree at all.
    """
    ds = plan.dataset
    idx = faith_indices(cfg, plan, pool)
    x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
    model = model.to(device).eval()
    with torch.no_grad():
        logits, built_in = model.forward_all(x)
    target = logits.argmax(1)
    errors = []
    try:
        post_hoc = post_hoc_maps(cfg, plan, model, x, target, device)
    except Exception as exc:  # an optional diagnostic must not lose the training before it
        errors.append(f"{cfg.teacher.method} on the model with the built-in map: {type(exc).__name__}: {exc}")
        post_hoc = None
    references = reference_maps(cfg, plan, model, x, target, device, errors)
    out = builtin_map_faithfulness(
        model,
        x,
        target,
        built_in.float(),
        train_store.mean_map(plan.train_idx),
        post_hoc,
        steps=steps,
        seed=cfg.seed,
        references=references,
    )
    out["target"] = "predicted"
    if post_hoc is not None:
        explained = np.asarray(ds.test.labels)[idx] if teacher_classes is None else np.asarray(teacher_classes)[idx]
        same = torch.from_numpy(explained).to(device) == target
        out["images_same_class"] = int(same.sum())
        if same.any():
            teacher_maps = test_store.read(idx[same.cpu().numpy()]).to(device).float()
            out["corr_post_hoc_teacher"] = float(map_corr(post_hoc[same], teacher_maps).mean())
    if errors:
        out["errors"] = errors
    return out


declare_measure(
    "corr",
    "The mean per-image Pearson correlation between the built-in map and the teacher's map of a test image.",
    True,
)
declare_measure(
    "corr_mean_map",
    "The same correlation for the mean training map used for every image: the level a map "
    "that ignores the image reaches.",
    None,
)
declare_measure(
    "corr_mean_map_augmented",
    "The same for the mean map averaged over the training crops and flips: the best "
    "a map that is the same for every image can reach when trained on augmented maps.",
    None,
)
declare_measure(
    "r2_vs_mean_map",
    "How much closer (squared error) the built-in maps are to the teacher's maps than the mean "
    "training map is; above 0, the model learned per-image maps.",
    True,
)
declare_measure(
    "r2_vs_mean_map_affine",
    "The same after each map gets its best per-image scale and offset: the one to read "
    "for maps trained with a scale-free loss such as 1 - Pearson.",
    True,
)


@torch.no_grad()
def map_quality(
    model: ImpactX,
    plan: DataPlan,
    test_store: MapStore,
    train_store: MapStore,
    device: torch.device,
    batch_size: int = 256,
    indices: Optional[np.ndarray] = None,
    *,
    cfg: Optional[RunConfig] = None,
    teacher_model: Optional[torch.nn.Module] = None,
) -> dict[str, float]:
    """Did IMPACTX learn per-image maps? R^2 against the mean training map, and correlations.

    Computed on the test images ``indices`` (default: those the test store holds maps for). A
    per-class model is compared through the map of the class each teacher map explains. With
    ``cfg`` and ``teacher.faith_images > 0``, ``faithfulness`` holds the built-in maps' MoRF /
    LeRF / insertion AUCs on the IMPACTX model itself next to the teacher method applied post hoc
    to it, the mean map and random maps, and their agreement (:func:`faithfulness_block`).
    R^2 and MSE compare values, so they mean little for maps trained with a scale-free
    ``impactx.map_loss`` (pearson, rank, the default decoder's); ``r2_vs_mean_map_affine`` is the
    scale-free R^2: each map, built-in and mean, first gets its least-squares scale and offset per
    image (residual ``var(t) (1 - r^2)``), so it compares what the maps can say about the teacher's.
    ``corr_mean_map_augmented`` (training with crop / flip augmentation): the correlation of the mean map
    averaged over the augmentation's draws -- what a decoder that learned one map for every image reaches
    at best, since it is trained on shifted and flipped targets; built-in maps near it learned no
    per-image content, even when the unaugmented mean map (fixed patterns such as stride artefacts) scores higher.
    """
    ds = plan.dataset
    if indices is None:
        indices = np.flatnonzero(np.asarray(test_store.done))
    indices = np.asarray(indices)
    n = len(indices)
    classes = None  # the class each teacher map explains (per-class models, and the faithfulness block)
    if getattr(model, "per_class", False) or (cfg is not None and cfg.teacher.faith_images > 0):
        classes = (
            np.asarray(ds.test.labels)
            if cfg is None
            else explained_classes(cfg, plan, teacher_model, "test", indices, device)
        )
    mean_map = train_store.mean_map(plan.train_idx)
    sums = {"mse": 0.0, "mse_mean_map": 0.0, "mse_zero": 0.0, "corr": 0.0, "corr_mean_map": 0.0}
    # the mean map as the training augmentation blurs it: the target a constant map is trained towards
    augmented_mean = None
    if plan.augment is not None and not plan.augment.is_identity:
        augmented_mean = plan.augment.expectation(mean_map.unsqueeze(0))
        sums["corr_mean_map_augmented"] = 0.0
    affine = {"built_in": 0.0, "mean_map": 0.0}  # sums of per-image residuals after the best scale + offset
    model = model.to(device).eval()
    for s in range(0, n, batch_size):
        idx = indices[s : s + batch_size]
        x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
        which = None if classes is None else torch.from_numpy(np.asarray(classes)[idx]).to(device)
        pred = model.explain(x, target=which).float().cpu()
        target = test_store.read(idx)
        mm = mean_map.unsqueeze(0).expand_as(target)
        sums["mse"] += ((pred - target) ** 2).flatten(1).mean(1).sum().item()
        sums["mse_mean_map"] += ((mm - target) ** 2).flatten(1).mean(1).sum().item()
        sums["mse_zero"] += (target**2).flatten(1).mean(1).sum().item()
        r, r_mm = map_corr(pred, target), map_corr(mm, target)
        sums["corr"] += r.sum().item()
        sums["corr_mean_map"] += r_mm.sum().item()
        if augmented_mean is not None:
            sums["corr_mean_map_augmented"] += map_corr(augmented_mean.expand_as(target), target).sum().item()
        var_t = target.flatten(1).var(1, unbiased=False)
        affine["built_in"] += (var_t * (1 - r**2)).sum().item()
        affine["mean_map"] += (var_t * (1 - r_mm**2)).sum().item()
    out = {k: v / n for k, v in sums.items()}
    out["images"] = int(n)
    out["r2_vs_mean_map"] = 1.0 - out["mse"] / max(out["mse_mean_map"], 1e-12)
    out["r2_vs_mean_map_affine"] = 1.0 - affine["built_in"] / max(affine["mean_map"], 1e-12)
    if cfg is not None and cfg.teacher.faith_images > 0:
        out["faithfulness"] = faithfulness_block(cfg, plan, model, test_store, train_store, device, indices, classes)
    return out


def shortcut_evaluation(
    cfg: RunConfig, plan: DataPlan, models: dict[str, torch.nn.Module], device: torch.device
) -> dict[str, Any]:
    """On a shortcut dataset: how much of each model's post-hoc attribution (input gradient, LRP)
    falls on the artefact of the de-correlated test images, next to the artefact's share of the
    image (what a map blind to it would put there). A model with a built-in map (IMPACTX, ABN, a B-cos model's
    contributions: ``teachx.models.explains_itself``) also
    gets its map's share (``built_in``) and the ratio of that to its own gradient share (``honesty``,
    :class:`teachx.runs.records.ArtefactShares`). Test accuracies are in the stage records."""
    ds = plan.dataset
    idx = eval_indices(cfg, plan)
    x = normalize(as_nchw(ds.test.images[idx]).to(device), plan.mean, plan.std)
    y = torch.from_numpy(np.asarray(ds.test.labels[idx])).long().to(device)
    masks = torch.from_numpy(np.ascontiguousarray(ds.test.masks[idx])).float().to(device)
    out: dict[str, Any] = {"images": int(len(idx)), "shortcut": ds.extra.get("shortcut")}
    for name, model in models.items():
        model = model.to(device).eval()
        built_in = None
        if explains_itself(model):  # a built-in map (IMPACTX, ABN) or a B-cos model's contributions
            with torch.no_grad():
                maps = torch.cat([model.explain(x[s : s + 256], target=y[s : s + 256]) for s in range(0, len(y), 256)])
            built_in = float(wrong_reason_score(maps.float(), masks).mean())
        out[name] = ArtefactShares.measured(artefact_share(model, x, y, masks), built_in).to_dict()
    return out


#: the example figure shows one image of each class up to this many classes, plus wrong predictions
MAX_EXAMPLE_CLASSES = 20
#: at least this many of the example images are wrong predictions, where the model made that many
MIN_WRONG_EXAMPLES = 3


def example_indices(labels: np.ndarray, k: int, seed: int, predicted: Optional[np.ndarray] = None) -> np.ndarray:
    """One image of each of the first k classes (seeded), for figures; with ``predicted``, images the model
    got wrong are added (other classes first) until MIN_WRONG_EXAMPLES of them are shown, where there are
    that many, so the figure shows what the model confuses and not only what it gets right."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels)[:k]:
        out.append(int(rng.choice(np.flatnonzero(labels == c))))
    if predicted is not None:
        wrong = np.flatnonzero(np.asarray(predicted) != labels)
        need = MIN_WRONG_EXAMPLES - int(np.sum(np.asarray(predicted)[out] != labels[out]))
        extra = [int(i) for i in rng.permutation(wrong) if int(i) not in out]
        extra.sort(
            key=lambda i: labels[i] in {labels[j] for j in out if predicted[j] != labels[j]}
        )  # stable: new classes first
        out += extra[: max(need, 0)]
    return np.array(out)


def example_label(true: str, predicted: str) -> str:
    """A row label of the example figure: the true and the predicted class."""
    return f"true: {true}\npredicted: {predicted}" + ("" if true == predicted else " (wrong)")


@torch.no_grad()
def predict_classes(
    model: torch.nn.Module, plan: DataPlan, indices: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """The model's predicted class of the test images ``indices``."""
    model = model.to(device).eval()
    out = []
    for s in range(0, len(indices), batch_size):
        x = normalize(as_nchw(plan.dataset.test.images[indices[s : s + batch_size]]).to(device), plan.mean, plan.std)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
