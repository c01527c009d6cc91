"""The R2R artefact kinds on test images (the artefact figure of the documentation): one column per kind, the
source image first, on the bundled Fashion-MNIST subset and, given a CIFAR-10 image folder zip, on CIFAR-10.

    python scripts/artefacts_figure.py [--cifar ../shared/data/cifar10-jpg.zip] --out docs/r2r-artefacts.png
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from teachx.data import ImageDataset, Split, apply_artefact, load_dataset
from teachx.data.artefacts import ARTEFACTS, ground_truth
from teachx.utils.io import write_bytes_atomic

KINDS = ("timestamp", "bandaid", "frame", "colour_shift")


def cifar_sample(path: Path, n: int) -> ImageDataset:
    """The first ``n`` test images (sorted names) of a CIFAR-10 image-folder zip, as a tiny dataset."""
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith("test/") and m.endswith(".jpg"))[::1000][:n]
        images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(m))).convert("RGB")) for m in names])
    labels = np.arange(len(images), dtype=np.int64) % 2
    return ImageDataset(
        "cifar10 sample", ["a", "b"], Split(images, labels), Split(images, labels), (0.5,) * 3, (0.25,) * 3
    )


def attacked(ds: ImageDataset, kind: str) -> np.ndarray:
    """``ds``'s test images with the artefact (the ``attacked`` split)."""
    out = apply_artefact(ds, kind, classes=[0], p=1.0, seed=0, progress=False, cache_dir=None)
    return np.asarray(ground_truth(out).test_splits["attacked"].images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, default=None, help="a CIFAR-10 image-folder zip (test/CLASS/*.jpg)")
    ap.add_argument("--images", type=int, default=3, help="images per dataset")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = []
    fm = load_dataset("bundled", progress=False)
    pick = np.arange(args.images) * 7
    fm = ImageDataset(
        fm.name, fm.class_names, fm.train, Split(fm.test.images[pick], fm.test.labels[pick]), fm.mean, fm.std
    )
    sets.append(fm)
    if args.cifar is not None:
        sets.append(cifar_sample(args.cifar, args.images))
    rows = [(ds, i) for ds in sets for i in range(len(ds.test))]
    fig, axes = plt.subplots(len(rows), len(KINDS) + 1, figsize=(1.6 * (len(KINDS) + 1), 1.6 * len(rows)))
    painted = {(id(ds), kind): attacked(ds, kind) for ds in sets for kind in KINDS}
    for r, (ds, i) in enumerate(rows):
        images = [np.asarray(ds.test.images[i])] + [painted[(id(ds), kind)][i] for kind in KINDS]
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("source" if c == 0 else ARTEFACTS.canonical(KINDS[c - 1]), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(args.out, buf.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
