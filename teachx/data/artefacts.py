"""R2R artefact benchmarks: a realistic artefact in a fraction of some classes' training images.

The Reveal-to-Revise life cycle (Pahde et al., MICCAI 2023; "From Hope to Safety", RR-ClArC) finds a
model's shortcut without annotations (reveal), then corrects it (revise). Its benchmarks insert an
artefact into a fraction ``p`` of the training images of one class (or a few named classes), as a
timestamp, a band-aid or a ruler appears in some medical images of one diagnosis: a model can learn
"artefact -> class" from part of the class, and nothing in the labels says which images carry it.

Kinds (``ARTEFACTS``; sizes scale with the image through ``unit = max(1, min(H, W) // 48)``, 1 for
CIFAR's 32x32 and Fashion-MNIST's 28x28, 2 for STL-10's 96x96; images must be at least 16x16):

- ``timestamp``: a clock time in bright (near-white) 3x5-pixel digits, scaled by ``unit``, in a random
  corner 1-2 units from the edges; ``HH:MM`` (17 x 5 units) where it fits in half the image width, else
  ``H:MM`` (13 x 5 units: 13x5 pixels on 28x28 and 32x32 images); random digits per image.
- ``bandaid``: a plaster, a capsule 35-50% of the image side long and 36-48% of that wide with a lighter
  central pad, at a random position (always whole inside the image) and angle; skin-tone beige on colour
  images, a bright grey blob on greyscale.
- ``frame``: a dark vignette at the border: the pixels outside a centred circle of radius 92-105% of
  half the image side (the dark corners of a dermatoscope) and a 1-unit band along the edges, set to a
  dark grey (16-47).
- ``colour_shift``: every pixel blended 30% towards a warm tint (255, 196, 128) on colour images, towards
  white (a haze) on greyscale, rounded away from the original value, so that every pixel not already of
  the tint's colour changes. It has no place: its masks are all zero and ``ds.extra["artefact"]`` says
  ``has_place: false``.

Every image's look (position, angle, digits, colour) is drawn once per split from the seed, so a test
image carries the same artefact in the ``attacked`` and ``ch`` splits. The masks are 1 exactly where the
artefact changed a pixel (a stroke over a pixel that already had its colour is not marked).

Poisoning: in each named class with ``n`` training images, exactly ``round(p * n)`` (half up, at least
one) get the artefact, a seeded choice; images of other classes are byte-equal to the source. ``p = 0``
poisons no training image: the benchmark's clean-data ceiling, with the same three test splits. The test
splits, as in the R2R evaluation:

- ``clean``: the source's test images, no artefact anywhere;
- ``attacked``: the artefact in every test image of every class;
- ``ch`` ("Clever Hans"): test images poisoned as in training (the same classes, the same ``p``).

``ds.test`` is the one chosen by ``test`` (default ``ch``); runs report test accuracy on all three
(``test_splits`` in the stage records and results.json).

Contract -- the ground truth is for evaluation only. Which training images carry the artefact, where it
is, and the other test splits (``clean`` next to ``attacked`` gives the artefact away) are kept out of
the dataset's splits and read only through :func:`ground_truth`. Methods that must reveal the artefact
without annotations (``teachx.reveal``) never call it, nor read ``ds.extra["artefact"]`` (the settings as
configured); evaluations of what they found do. ``Split.masks`` stays None unless ``oracle_masks`` puts the
true masks on the splits, for mask-based methods as an upper bound (not the R2R protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np

from teachx.data.base import ImageDataset, Split
from teachx.data.cache import Decoded, cached_decode
from teachx.data.shortcuts import source_identity
from teachx.errors import ConfigError
from teachx.registry import Registry

#: The test splits of an artefact benchmark (see the module docstring), the default first.
TEST_SPLITS = ("ch", "clean", "attacked")
#: Bumped when the recipe changes, so old cache entries are not reused.
BUILDER_VERSION = 1
#: Smallest image side the kinds are drawn for.
MIN_SIDE = 16


def unit_of(image_size: tuple[int, int]) -> int:
    """The artefacts' length unit in pixels: 1 up to 95x95 images, then one more per 48 pixels."""
    return max(1, min(image_size) // 48)


class Artefact:
    """One artefact kind: ``draw`` the look of ``n`` images at once, ``paint`` one image in place.

    ``paint`` returns where it painted (bool (H, W)), or None for an artefact without a place; the mask
    is that footprint where the pixel changed.
    """

    name: ClassVar[str] = ""
    has_place: ClassVar[bool] = True

    def __init__(self, image_size: tuple[int, int], channels: int):
        self.h, self.w = (int(s) for s in image_size)
        self.channels = int(channels)
        self.colour = min(self.channels, 3)  # a 4th channel (alpha) is left as it is
        self.unit = unit_of(image_size)

    def draw(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def paint(self, image: np.ndarray, look: dict[str, Any]) -> Optional[np.ndarray]:
        raise NotImplementedError

    def _centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, 1) and (1, W) pixel-centre coordinates."""
        return np.arange(self.h)[:, None] + 0.5, np.arange(self.w)[None, :] + 0.5


ARTEFACTS: Registry[type[Artefact]] = Registry("artefact")

#: 3x5 pixel glyphs of the timestamp ("1" rows top to bottom); the colon is one column wide.
FONT = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ":": ("0", "1", "0", "1", "0"),
}


def text_bitmap(text: str, unit: int = 1) -> np.ndarray:
    """bool (5 * unit, width * unit): ``text`` in the 3x5 font, one blank column between glyphs."""
    columns: list[np.ndarray] = []
    for i, char in enumerate(text):
        if i:
            columns.append(np.zeros((5, 1), dtype=bool))
        columns.append(np.array([[c == "1" for c in row] for row in FONT[char]], dtype=bool))
    glyphs = np.concatenate(columns, axis=1)
    return np.kron(glyphs, np.ones((unit, unit), dtype=bool)).astype(bool)


@ARTEFACTS.register("timestamp", "time", "ch_time")
class Timestamp(Artefact):
    """A clock time in bright 3x5-pixel digits in a random corner (R2R's "timestamp" artefact)."""

    name = "timestamp"

    def __init__(self, image_size: tuple[int, int], channels: int):
        super().__init__(image_size, channels)
        self.long = text_bitmap("00:00", self.unit).shape[1] <= self.w // 2  # HH:MM, else H:MM

    def draw(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        hours = rng.integers(0, 24, n) if self.long else rng.integers(1, 10, n)
        minutes = rng.integers(0, 60, n)
        corners = rng.integers(0, 4, n)
        margins = (1 + rng.integers(0, 2, (n, 2))) * self.unit
        colours = rng.integers(230, 256, (n, self.colour))
        return [
            {
                "text": f"{hours[i]:02d}:{minutes[i]:02d}" if self.long else f"{hours[i]}:{minutes[i]:02d}",
                "corner": int(corners[i]),
                "margin": margins[i].tolist(),
                "colour": colours[i],
            }
            for i in range(n)
        ]

    def paint(self, image: np.ndarray, look: dict[str, Any]) -> np.ndarray:
        bitmap = text_bitmap(look["text"], self.unit)
        th, tw = bitmap.shape
        (mr, mc), corner = look["margin"], look["corner"]
        top = mr if corner < 2 else self.h - th - mr
        left = mc if corner % 2 == 0 else self.w - tw - mc
        where = np.zeros((self.h, self.w), dtype=bool)
        where[top : top + th, left : left + tw] = bitmap
        image[where, : self.colour] = look["colour"]
        return where


@ARTEFACTS.register("bandaid", "band_aid", "band-aid", "plaster")
class BandAid(Artefact):
    """A plaster at a random position and angle (R2R's "band-aid" artefact of ISIC skin-lesion images)."""

    name = "bandaid"

    def draw(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        side = min(self.h, self.w)
        length = side * rng.uniform(0.35, 0.5, n)
        radius = length * rng.uniform(0.18, 0.24, n)  # half the width
        theta = rng.uniform(0.0, np.pi, n)
        half = length / 2 - radius  # half the straight part
        ex = np.abs(np.cos(theta)) * half + radius  # half extents of the rotated capsule
        ey = np.abs(np.sin(theta)) * half + radius
        cx = ex + rng.uniform(0.0, 1.0, n) * (self.w - 2 * ex)
        cy = ey + rng.uniform(0.0, 1.0, n) * (self.h - 2 * ey)
        if self.colour >= 3:
            body = np.array([222, 178, 140]) + rng.integers(-12, 13, (n, 3))
            pad = np.minimum(body + np.array([25, 30, 35]), 255)
        else:
            body = 200 + rng.integers(-12, 13, (n, 1))
            pad = body + 40
        return [
            {
                "centre": (float(cy[i]), float(cx[i])),
                "length": float(length[i]),
                "radius": float(radius[i]),
                "theta": float(theta[i]),
                "body": body[i],
                "pad": pad[i],
            }
            for i in range(n)
        ]

    def paint(self, image: np.ndarray, look: dict[str, Any]) -> np.ndarray:
        ys, xs = self._centres()
        cy, cx = look["centre"]
        cos, sin = np.cos(look["theta"]), np.sin(look["theta"])
        along = (xs - cx) * cos + (ys - cy) * sin
        across = -(xs - cx) * sin + (ys - cy) * cos
        half = look["length"] / 2 - look["radius"]
        nearest = np.clip(along, -half, half)
        where = (along - nearest) ** 2 + across**2 <= look["radius"] ** 2
        pad = where & (np.abs(along) <= 0.22 * look["length"]) & (np.abs(across) <= 0.6 * look["radius"])
        image[where & ~pad, : self.colour] = look["body"]
        image[pad, : self.colour] = look["pad"]
        return where


@ARTEFACTS.register("frame", "vignette", "dark_frame")
class Frame(Artefact):
    """A dark vignette at the border (the dark corners of dermatoscope images) and a thin dark edge."""

    name = "frame"

    def draw(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        radius = min(self.h, self.w) / 2 * rng.uniform(0.92, 1.05, n)
        values = rng.integers(16, 48, n)
        return [{"radius": float(radius[i]), "value": int(values[i])} for i in range(n)]

    def paint(self, image: np.ndarray, look: dict[str, Any]) -> np.ndarray:
        ys, xs = self._centres()
        outside = (ys - self.h / 2) ** 2 + (xs - self.w / 2) ** 2 > look["radius"] ** 2
        u = self.unit
        edge = (ys < u) | (ys > self.h - u) | (xs < u) | (xs > self.w - u)
        where = outside | edge
        image[where, : self.colour] = look["value"]
        return where


@ARTEFACTS.register("colour_shift", "color_shift", "tint", "white_color")
class ColourShift(Artefact):
    """A global colour cast (colour images) or haze (greyscale): no place, R2R's "white colour" artefact."""

    name = "colour_shift"
    has_place = False
    STRENGTH = 0.3
    TINT = (255, 196, 128)

    def draw(self, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        return [{} for _ in range(n)]

    def paint(self, image: np.ndarray, look: dict[str, Any]) -> None:
        tint = np.array(self.TINT[: self.colour] if self.colour >= 3 else (255,), dtype=np.float64)
        values = image[..., : self.colour].astype(np.float64)
        step = self.STRENGTH * (tint - values)
        image[..., : self.colour] = values + np.sign(step) * np.ceil(np.abs(step))  # at least one level
        return None


# ----------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """What an artefact benchmark knows and a reveal method must not: for evaluation only.

    ``train_poisoned`` / ``test_poisoned``: bool per image of the training split / the ``ch`` test split,
    True where the artefact is; ``train_masks``: uint8 (N, H, W), 1 where it changed a pixel (all zero
    for a kind without a place, ``has_place`` False); ``test_splits``: ``clean``, ``attacked`` and ``ch``
    with their masks. Indexed like ``ds.train`` and ``ds.test``: a run trains on ``plan.train_idx`` of the
    training split (``data.train_size``, the validation split), so index these arrays with it.
    """

    kind: str
    classes: list[int]
    p: float
    seed: int
    has_place: bool
    train_poisoned: np.ndarray
    train_masks: np.ndarray
    test_poisoned: np.ndarray
    test_splits: dict[str, Split] = field(default_factory=dict)

    def poisoned_per_class(self, labels: np.ndarray) -> dict[int, int]:
        """Poisoned training images per class (only the named classes have any)."""
        labels = np.asarray(labels)
        return {int(c): int(self.train_poisoned[labels == c].sum()) for c in np.unique(labels)}


def has_ground_truth(ds: ImageDataset) -> bool:
    """Whether ``ds`` is an artefact benchmark (``apply_artefact``)."""
    return isinstance(getattr(ds, "_ground_truth", None), GroundTruth)


def ground_truth(ds: ImageDataset) -> GroundTruth:
    """The evaluation-only ground truth of an artefact benchmark (see the module docstring): never to be
    read by a method that must find the artefact without annotations."""
    if not has_ground_truth(ds):
        raise ValueError(f"dataset '{ds.name}' is not an artefact benchmark; add one with data.artefact")
    return ds._ground_truth


# ----------------------------------------------------------------------------- building


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def poisoned_count(p: float, n: int) -> int:
    """Images of a class of ``n`` that get the artefact: round(p * n), half up, at least 1 (0 if n or p is 0)."""
    return min(n, max(1, round_half_up(p * n))) if n and p > 0 else 0


def choose_poisoned(labels: np.ndarray, classes: list[int], p: float, rng: np.random.Generator) -> np.ndarray:
    """bool per image: ``poisoned_count(p, n_c)`` images of each class c in ``classes``, a seeded choice
    (a larger ``p`` keeps the images a smaller one chose)."""
    labels = np.asarray(labels)
    out = np.zeros(len(labels), dtype=bool)
    for c in sorted(classes):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(len(members))
        out[members[order[: poisoned_count(p, len(members))]]] = True
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(ds: ImageDataset, kind: str, classes: Any, p: Any, seed: Any, test: str) -> str:
    """``kind`` canonical, after the checks that need the dataset; one-line ConfigErrors naming the key."""
    try:
        kind = ARTEFACTS.canonical(kind)
    except ConfigError as exc:
        raise ConfigError(f"data.artefact.kind: {exc}") from None
    k = ds.num_classes
    if not isinstance(classes, (list, tuple)) or not classes or not all(_is_int(c) for c in classes):
        raise ConfigError(
            f"data.artefact.classes must be a non-empty list of class indices (e.g. [0]), got {classes!r}"
        )
    bad = [int(c) for c in classes if not 0 <= c < k]
    if bad:
        raise ConfigError(
            f"data.artefact.classes {bad} are not classes of '{ds.name}', which has {k} (indices 0 to {k - 1}); "
            f"name classes between 0 and {k - 1}"
        )
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.artefact.classes names a class twice ({list(classes)}); name each class once")
    if len(set(classes)) == k:
        raise ConfigError(
            "data.artefact.classes names every class, so the artefact would not tell classes apart; "
            "name one class or a few"
        )
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(
            f"data.artefact.p must be a fraction in [0, 1] (e.g. 0.1; 0 for the clean-data ceiling), got {p!r}"
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"data.artefact.seed must be an integer >= 0, got {seed!r}")
    if test not in TEST_SPLITS:
        raise ConfigError(f"data.artefact.test must be one of {', '.join(TEST_SPLITS)}, got {test!r}")
    h, w = ds.image_size
    if min(h, w) < MIN_SIDE:
        raise ConfigError(
            f"data.artefact needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, and '{ds.name}' has {h}x{w}; "
            "use larger images (data.image_size for imagefolder data)"
        )
    if "shortcut" in ds.extra or "artefact" in ds.extra:
        raise ConfigError(f"'{ds.name}' already carries an artefact; add data.artefact to the plain dataset instead")
    return kind


def _paint_all(
    artefact: Artefact, images: np.ndarray, looks: list[dict[str, Any]], which: np.ndarray, bar: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``images`` with the artefact in the images ``which`` (their looks), and the masks."""
    out = np.array(images, dtype=np.uint8, copy=True)
    masks = np.zeros(out.shape[:3], dtype=np.uint8)
    for i in np.flatnonzero(which):
        before = out[i].copy()
        where = artefact.paint(out[i], looks[i])
        if where is not None:
            masks[i] = where & (out[i] != before).any(axis=-1)
        bar.update(1)
    return out, masks


def apply_artefact(
    ds: ImageDataset,
    kind: str,
    *,
    classes: list[int],
    p: float,
    seed: int = 0,
    test: str = "ch",
    oracle_masks: bool = False,
    progress: bool = True,
    cache_dir: Any = None,
) -> ImageDataset:
    """``ds`` as an R2R artefact benchmark: the artefact ``kind`` (``ARTEFACTS``) in a fraction ``p`` of
    the training images of ``classes``, the three test splits, and the evaluation-only ground truth
    (:func:`ground_truth`). ``ds.test`` is the split ``test`` names. Deterministic in ``seed``; ``ds``'s
    arrays are only read. Normalisation statistics come from the new training images. Cached under
    ``cache_dir`` (default ``$TEACHX_CACHE``), keyed by ``ds``'s content and ``kind``, ``classes``, ``p``,
    ``seed``, and verified on read like every decoded dataset.
    """
    kind = check_options(ds, kind, classes, p, seed, test)
    classes, p, seed = sorted(int(c) for c in classes), float(p), int(seed)
    artefact = ARTEFACTS.get(kind)(ds.image_size, ds.channels)
    name = f"{ds.name}+{kind}"
    options = {"kind": kind, "classes": classes, "p": p, "seed": seed}

    def build() -> Decoded:
        from tqdm.auto import tqdm

        train_labels, test_labels = np.asarray(ds.train.labels), np.asarray(ds.test.labels)
        train_poisoned = choose_poisoned(train_labels, classes, p, np.random.default_rng([seed, 0]))
        test_poisoned = choose_poisoned(test_labels, classes, p, np.random.default_rng([seed, 2]))
        train_looks = artefact.draw(np.random.default_rng([seed, 1]), len(train_labels))
        test_looks = artefact.draw(np.random.default_rng([seed, 3]), len(test_labels))
        total = int(train_poisoned.sum()) + len(test_labels)
        with tqdm(
            total=total, unit="img", desc=f"adding a {kind} to {ds.name}", disable=not progress, leave=False
        ) as bar:
            train_images, train_masks = _paint_all(artefact, ds.train.images, train_looks, train_poisoned, bar)
            every = np.ones(len(test_labels), dtype=bool)
            attacked_images, attacked_masks = _paint_all(artefact, ds.test.images, test_looks, every, bar)
        clean_images = np.asarray(ds.test.images)
        ch_images = np.where(test_poisoned[:, None, None, None], attacked_images, clean_images)
        ch_masks = attacked_masks * test_poisoned[:, None, None].astype(np.uint8)
        extra = {key: v for key, v in ds.extra.items() if key != "cache_path"}
        extra["artefact"] = {**options, "has_place": artefact.has_place, "unit": artefact.unit}
        return Decoded(
            train_images,
            train_labels,
            clean_images,
            test_labels,
            class_names=list(ds.class_names),
            extra=extra,
            train_masks=train_masks,
            more={
                "train_poisoned": train_poisoned.astype(np.uint8),
                "test_poisoned": test_poisoned.astype(np.uint8),
                "test_attacked_images": attacked_images,
                "test_attacked_masks": attacked_masks,
                "test_ch_images": ch_images,
                "test_ch_masks": ch_masks,
            },
        )

    key = {"builder": f"{__name__}:{BUILDER_VERSION}", "source": source_identity(ds), "options": options}
    decoded = cached_decode(name, key, build, cache_dir)
    more = decoded.more
    labels = decoded.test_labels
    splits = {
        "ch": Split(more["test_ch_images"], labels, more["test_ch_masks"]),
        "clean": Split(decoded.test_images, labels, np.zeros(decoded.test_images.shape[:3], dtype=np.uint8)),
        "attacked": Split(more["test_attacked_images"], labels, more["test_attacked_masks"]),
    }
    truth = GroundTruth(
        kind=kind,
        classes=classes,
        p=p,
        seed=seed,
        has_place=artefact.has_place,
        train_poisoned=np.asarray(more["train_poisoned"]).astype(bool),
        train_masks=decoded.train_masks,
        test_poisoned=np.asarray(more["test_poisoned"]).astype(bool),
        test_splits=splits,
    )
    extra = dict(decoded.extra)
    extra["artefact"] = {**extra["artefact"], "test": test}
    if decoded.cache_path:
        extra["cache_path"] = decoded.cache_path
    counts = truth.poisoned_per_class(decoded.train_labels)
    named = "; ".join(
        f"{counts[c]} of the {int((decoded.train_labels == c).sum())} training images of {ds.class_names[c]}"
        for c in classes
    )
    where = "" if artefact.has_place else " (no place: its masks are empty)"
    extra["notices"] = list(extra.get("notices", [])) + [
        f"{kind} artefact{where} in {named} (p {p:g}, seed {seed}); test accuracy is that of the {test} "
        "test split, and all three (ch, clean, attacked) are reported"
    ]
    chosen = splits[test]
    out = ImageDataset(
        name=name,
        class_names=list(decoded.class_names),
        train=Split(decoded.train_images, decoded.train_labels, decoded.train_masks if oracle_masks else None),
        test=Split(chosen.images, chosen.labels, chosen.masks if oracle_masks else None),
        mean=tuple(decoded.mean),
        std=tuple(decoded.std),
        source=ds.source,
        license=ds.license,
        extra=extra,
        hflip=ds.hflip,
    )
    out._ground_truth = truth
    return out
