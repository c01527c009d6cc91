"""Build teachx/data/bundled/: a class-balanced, seeded subset of real Fashion-MNIST.

Reads the official idx files (default: /usr/share/datasets/fashion-mnist, from Debian's
``dataset-fashion-mnist``), picks ``--train-per-class`` / ``--test-per-class`` images of every class
from the official train / test splits with a seeded generator (kept in their original order), and
writes gzip idx files (deterministic bytes), a manifest with the chosen indices and the source
hashes, and the licence/attribution. Re-running with the same inputs reproduces identical files.

    python scripts/make_bundled_dataset.py [--source DIR] [--out teachx/data/bundled]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from teachx.data.idx import FASHION_MNIST_CLASSES, find_idx_files, read_idx, write_idx
from teachx.utils.io import write_text_atomic

LICENSE_TEXT = """The MIT License (MIT)

Copyright © [2017] Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

README_TEMPLATE = """# Bundled dataset: Fashion-MNIST subset (`bundled`, alias `fashion-mnist-mini`)

A class-balanced subset of **Fashion-MNIST** (Han Xiao, Kashif Rasul, Roland Vollgraf,
"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms", 2017,
Zalando Research, https://github.com/zalandoresearch/fashion-mnist), redistributed under its MIT
licence (see `LICENSE`). It lets `teachx demo` and the tests run offline right after install.

- train: {train_per_class} images per class x 10 = {n_train}, drawn from the official 60,000 training images
- test: {test_per_class} images per class x 10 = {n_test}, drawn from the official 10,000 test images
- 28x28, 1 channel, uint8; labels 0..9 = {classes}
- selection: `numpy.random.default_rng({seed})`, per class a random choice without replacement,
  kept in original order; the chosen official indices are in `manifest.json`
- files: idx format, gzip (`train-images-idx3-ubyte.gz`, ...), readable by any MNIST loader

Results on this subset are *not* comparable with numbers on full Fashion-MNIST; label them
"Fashion-MNIST subset (teachx bundled, {n_train}/{n_test})".
Regenerate with `python scripts/make_bundled_dataset.py`.
"""


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = []
    for cls in range(len(FASHION_MNIST_CLASSES)):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise SystemExit(f"class {cls} has only {len(members)} images, fewer than {per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def sha256_of_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "teachx" / "data" / "bundled"))
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = find_idx_files(Path(args.source))
    if files is None:
        raise SystemExit(f"no Fashion-MNIST idx files in {args.source} (apt-get install dataset-fashion-mnist)")
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    manifest: dict = {"source": "Fashion-MNIST (Zalando Research, MIT)", "seed": args.seed, "splits": {}}
    counts = {}
    for split, per_class in (("train", args.train_per_class), ("t10k", args.test_per_class)):
        images = read_idx(files[f"{split}-images"])
        labels = read_idx(files[f"{split}-labels"])
        chosen = balanced_subset(labels, per_class, rng)
        write_idx(out / f"{split}-images-idx3-ubyte.gz", images[chosen])
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", labels[chosen])
        counts[split] = len(chosen)
        manifest["splits"][split] = {
            "official_indices": chosen.tolist(),
            "official_images_sha256": sha256_of_array(images),
            "official_labels_sha256": sha256_of_array(labels),
        }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, separators=(",", ":")) + "\n")
    write_text_atomic(out / "LICENSE", LICENSE_TEXT)
    write_text_atomic(
        out / "README.md",
        README_TEMPLATE.format(
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            n_train=counts["train"],
            n_test=counts["t10k"],
            classes=", ".join(FASHION_MNIST_CLASSES),
            seed=args.seed,
        ),
    )
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # package data must be world-readable (atomic writes create 0600 files)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out}: {counts['train']} train / {counts['t10k']} test images, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
