"""Format loaders against files written by independent writers in this file (no network, no /work/shared)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teachx.data import DATASETS, dataset_status, load_dataset
from teachx.data.cifar import Cifar10
from teachx.errors import ConfigError, DataError


pytestmark = pytest.mark.usefixtures("isolated_dirs")  # TEACHX_DATA and TEACHX_CACHE under tmp_path


def rng_images(seed, n, h, w, c):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------------------------- writers
def cifar_pickle(images_nhwc, labels, label_key):
    # Official layout: one row per image, R plane then G then B, each 32x32 row-major.
    rows = np.stack([np.concatenate([img[:, :, ch].reshape(-1) for ch in range(3)]) for img in images_nhwc])
    return pickle.dumps({b"batch_label": b"x", b"data": rows, label_key: [int(v) for v in labels]}, protocol=2)


def write_cifar10(folder: Path, seed=0, per_batch=3):
    folder.mkdir(parents=True)
    train_imgs, train_lbls = [], []
    for i in range(1, 6):
        imgs = rng_images(seed + i, per_batch, 32, 32, 3)
        lbls = np.random.default_rng(seed + 10 + i).integers(0, 10, per_batch)
        (folder / f"data_batch_{i}").write_bytes(cifar_pickle(imgs, lbls, b"labels"))
        train_imgs.append(imgs)
        train_lbls.append(lbls)
    test_imgs = rng_images(seed + 99, 4, 32, 32, 3)
    test_lbls = np.array([9, 0, 3, 5])
    (folder / "test_batch").write_bytes(cifar_pickle(test_imgs, test_lbls, b"labels"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return np.concatenate(train_imgs), np.concatenate(train_lbls), test_imgs, test_lbls


def write_idx_file(path: Path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_mnist(folder: Path, gz: bool, n_train=7, n_test=5):
    sfx = ".gz" if gz else ""
    tr, te = rng_images(1, n_train, 28, 28, 1)[..., 0], rng_images(2, n_test, 28, 28, 1)[..., 0]
    trl, tel = np.arange(n_train) % 10, (np.arange(n_test) * 3) % 10
    write_idx_file(folder / f"train-images-idx3-ubyte{sfx}", tr)
    write_idx_file(folder / f"train-labels-idx1-ubyte{sfx}", trl)
    write_idx_file(folder / f"t10k-images-idx3-ubyte{sfx}", te)
    write_idx_file(folder / f"t10k-labels-idx1-ubyte{sfx}", tel)
    return tr, trl, te, tel


def write_stl(folder: Path, n_train=3, n_test=2):
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng_images(7 if split == "train" else 8, n, 96, 96, 3)
        lbls = np.arange(n) % 10
        # Each channel stored column-major (Fortran order), channels one after another.
        blob = b"".join(img[:, :, ch].flatten(order="F").tobytes() for img in imgs for ch in range(3))
        (folder / f"{split}_X.bin").write_bytes(blob)
        (folder / f"{split}_y.bin").write_bytes(bytes(int(v) + 1 for v in lbls))
        out[split] = (imgs, lbls)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    (folder / "unlabeled_X.bin").write_bytes(b"\x00" * 10)  # ignored (and here deliberately bogus)
    return out, names


def tar_folder(folder: Path, archive: Path):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


# ---------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_folder_and_targz_exact(tmp_path, packed):
    root = tmp_path / "c10"
    tr, trl, te, tel = write_cifar10(root / "cifar-10-batches-py")
    if packed:
        tar_folder(root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
        for f in (root / "cifar-10-batches-py").iterdir():
            f.unlink()
        (root / "cifar-10-batches-py").rmdir()
    ds = load_dataset("cifar10", root=root, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.images, tr)
    np.testing.assert_array_equal(ds.train.labels, trl)
    np.testing.assert_array_equal(ds.test.images, te)
    np.testing.assert_array_equal(ds.test.labels, tel)
    assert ds.train.labels.dtype == np.int64 and ds.train.images.dtype == np.uint8
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    assert ds.channels == 3 and ds.image_size == (32, 32) and ds.hflip is True and ds.extra["hflip"] is True
    # Normalisation statistics: per channel, over the training split, in [0, 1] units.
    flat = tr.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, flat.mean(0), atol=1e-12)
    np.testing.assert_allclose(ds.std, flat.std(0), atol=1e-12)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    tr, te = rng_images(3, 5, 32, 32, 3), rng_images(4, 2, 32, 32, 3)
    fine_tr, fine_te = np.array([0, 99, 50, 7, 7]), np.array([42, 1])

    def blob(imgs, fine):
        rows = np.stack([np.concatenate([im[:, :, ch].ravel() for ch in range(3)]) for im in imgs])
        return pickle.dumps(
            {b"data": rows, b"fine_labels": list(map(int, fine)), b"coarse_labels": [0] * len(fine)}, protocol=2
        )

    (folder / "train").write_bytes(blob(tr, fine_tr))
    (folder / "test").write_bytes(blob(te, fine_te))
    fine_names = [f"f{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20}, protocol=2)
    )
    ds = load_dataset("cifar-100", root=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.labels, fine_tr)
    np.testing.assert_array_equal(ds.test.images, te)
    assert ds.class_names[99] == "f99" and ds.num_classes == 100


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_restricted_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _Boom(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="posix.system|os.system|not allowed"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache", progress=False)


def test_cifar_truncated_batch_and_archive(tmp_path):
    folder = tmp_path / "a" / "cifar-10-batches-py"
    write_cifar10(folder)
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="data_batch_3.*(truncated|corrupted)"):
        load_dataset("cifar10", root=folder.parent, cache_dir=tmp_path / "cache", progress=False)

    folder_b = tmp_path / "b" / "cifar-10-batches-py"
    write_cifar10(folder_b)
    archive = tmp_path / "c" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    tar_folder(folder_b, archive)
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupted|lacks"):
        load_dataset("cifar10", root=archive.parent, cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------------- STL-10
@pytest.mark.parametrize("packed", [False, True])
def test_stl10_column_major_exact(tmp_path, packed):
    root = tmp_path / "stl"
    expected, names = write_stl(root / "stl10_binary")
    if packed:
        tar_folder(root / "stl10_binary", root / "stl10_binary.tar.gz")
        for f in (root / "stl10_binary").iterdir():
            f.unlink()
        (root / "stl10_binary").rmdir()
    ds = load_dataset("stl10", root=root, cache_dir=tmp_path / "cache", progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, split).images, expected[split][0])
        np.testing.assert_array_equal(getattr(ds, split).labels, expected[split][1])
    assert ds.class_names == names and ds.image_size == (96, 96)


def test_stl10_truncated_and_bad_labels(tmp_path):
    folder = tmp_path / "stl10_binary"
    write_stl(folder)
    blob = (folder / "train_X.bin").read_bytes()
    (folder / "train_X.bin").write_bytes(blob[:-5])
    with pytest.raises(DataError, match="train_X.bin.*not a multiple"):
        load_dataset("stl10", root=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    (folder / "train_X.bin").write_bytes(blob)
    (folder / "train_y.bin").write_bytes(bytes([1, 11, 2]))
    with pytest.raises(DataError, match="outside 1..10"):
        load_dataset("stl10", root=tmp_path, cache_dir=tmp_path / "cache2", progress=False)


# ---------------------------------------------------------------------------------- idx
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_exact(tmp_path, gz):
    tr, trl, te, tel = write_mnist(tmp_path / "MNIST" / "raw", gz)  # torchvision's layout is found too
    ds = load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.images[..., 0], tr)
    np.testing.assert_array_equal(ds.train.labels, trl)
    np.testing.assert_array_equal(ds.test.images[..., 0], te)
    np.testing.assert_array_equal(ds.test.labels, tel)
    assert ds.channels == 1 and ds.hflip is False and ds.class_names == [str(i) for i in range(10)]


def test_fashion_mnist_default_root_from_env(tmp_path):
    tr, trl, _, _ = write_mnist(tmp_path / "data_home" / "fashion-mnist", gz=True)
    ds = load_dataset("fashion_mnist", cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.images[..., 0], tr)
    assert ds.class_names[0] == "T-shirt/top" and ds.hflip is True
    assert "MIT" in ds.license


def test_idx_corruption(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    blob = p.read_bytes()
    p.write_bytes(blob[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*header promises"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c1", progress=False)
    p.write_bytes(b"\x01\x02" + blob[2:])
    with pytest.raises(DataError, match="bad magic"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c2", progress=False)
    p.unlink()
    gzp = tmp_path / "train-images-idx3-ubyte.gz"
    gzp.write_bytes(gzip.compress(blob)[:40])
    with pytest.raises(DataError, match="truncated or corrupted"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c3", progress=False)


def test_bundled_dataset_is_real_and_balanced():
    ds = load_dataset("fashion-mnist-mini", progress=False)
    assert ds.name == "bundled"
    assert ds.train.images.shape == (4000, 28, 28, 1) and ds.test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [100] * 10)
    assert "Zalando" in ds.license and ds.hflip
    files = list((Path(__import__("teachx").__file__).parent / "data" / "bundled").iterdir())
    assert sum(f.stat().st_size for f in files) < 3_000_000
    assert {"LICENSE", "README.md"} <= {f.name for f in files}
    # Real clothing images, not noise: mean intensity of Fashion-MNIST is ~0.286.
    assert 0.25 < ds.mean[0] < 0.32


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_bundled_matches_official_files():
    import json

    from teachx.data.idx import read_idx

    bundled = Path(__import__("teachx").__file__).parent / "data" / "bundled"
    manifest = json.loads((bundled / "manifest.json").read_text())
    official = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    idx = np.array(manifest["splits"]["t10k"]["official_indices"])
    ds = load_dataset("bundled", progress=False)
    np.testing.assert_array_equal(ds.test.images[..., 0], official[idx])


# ---------------------------------------------------------------------------------- imagefolder
def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr if arr.shape[2] != 1 else arr[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(n_per_class=3, classes=("cat", "dog"), splits=("train", "test"), size=(6, 5), channels=3, seed=0):
    """{relative path: array} for a class-per-folder tree."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        for cls in classes:
            for i in range(n_per_class):
                rel = f"{split}/{cls}/{i:03d}.png" if split else f"{cls}/{i:03d}.png"
                out[rel] = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
    return out


def write_tree(tree, dest: Path, as_zip: bool, prefix=""):
    if as_zip:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for rel, arr in tree.items():
                z.writestr(prefix + rel, _png_bytes(arr))
            z.writestr(prefix + "README.txt", "not an image")
    else:
        for rel, arr in tree.items():
            p = dest / prefix / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_png_bytes(arr))
    return dest


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_train_test_exact(tmp_path, as_zip):
    tree = make_tree()
    src = write_tree(tree, tmp_path / ("d.zip" if as_zip else "d"), as_zip, prefix="wrapper/")
    ds = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False)
    assert ds.class_names == ["cat", "dog"] and ds.name == f"imagefolder:{src}"
    for split in ("train", "test"):
        keys = sorted(k for k in tree if k.startswith(split + "/"))
        np.testing.assert_array_equal(getattr(ds, split).images, np.stack([tree[k] for k in keys]))
        np.testing.assert_array_equal(getattr(ds, split).labels, [0 if "/cat/" in k else 1 for k in keys])
    assert ds.extra["test_split"].startswith("from")


def test_imagefolder_jpeg_matches_pil(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "j"
    ref = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            p = src / split / cls / "x.jpg"
            p.parent.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p, quality=90)
            ref[f"{split}/{cls}"] = np.asarray(Image.open(p).convert("RGB"))
    ds = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train.images[1], ref["train/b"])
    np.testing.assert_array_equal(ds.test.images[0], ref["test/a"])


def test_imagefolder_carves_stratified_split_and_warns(tmp_path):
    tree = make_tree(n_per_class=10, classes=("a", "b", "c"), splits=(None,))
    src = write_tree(tree, tmp_path / "flat", as_zip=False)
    with pytest.warns(UserWarning, match="carved a stratified 20% test split"):
        ds = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False)
    assert len(ds.train) == 24 and len(ds.test) == 6
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [2, 2, 2])
    # Every image is in exactly one split, unchanged.
    all_imgs = {arr.tobytes() for arr in tree.values()}
    got = [im.tobytes() for im in np.concatenate([ds.train.images, ds.test.images])]
    assert set(got) == all_imgs and len(got) == len(all_imgs)
    with pytest.warns(UserWarning):
        ds2 = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False, seed=1)
    assert not np.array_equal(ds2.test.images, ds.test.images)


def test_imagefolder_inconsistent_size_and_channels(tmp_path):
    tree = make_tree()
    tree["train/dog/001.png"] = np.zeros((7, 5, 3), np.uint8)
    src = write_tree(tree, tmp_path / "s.zip", as_zip=True)
    with pytest.raises(
        DataError, match=r"train/dog/001\.png.*7x5.*data\.image_size=6,5 \(size=\(6, 5\) in load_dataset\)"
    ):
        load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False)
    ds = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False, size=(6, 5))
    assert ds.image_size == (6, 5)
    expected = np.asarray(Image.fromarray(tree["train/dog/001.png"]).resize((5, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.train.images[4], expected)

    tree = make_tree()
    tree["test/cat/002.png"] = np.zeros((6, 5, 1), np.uint8)
    src = write_tree(tree, tmp_path / "c", as_zip=False)
    with pytest.raises(
        DataError, match=r"test/cat/002\.png.*1 channel.*data\.channels=3 \(channels=3 in load_dataset\)"
    ):
        load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False)
    ds = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "cache", progress=False, channels=1)
    assert ds.channels == 1
    gray = np.asarray(Image.fromarray(tree["train/dog/000.png"]).convert("L"))
    np.testing.assert_array_equal(ds.train.images[3, :, :, 0], gray)


def test_imagefolder_parallel_decode_matches_serial(tmp_path, monkeypatch):
    import teachx.data.imagefolder as imf

    tree = make_tree(n_per_class=40, size=(4, 4))
    src = write_tree(tree, tmp_path / "p.zip", as_zip=True)
    serial = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "c1", progress=False, workers=1)
    monkeypatch.setattr(imf, "PARALLEL_MIN_IMAGES", 1)
    parallel = load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "c2", progress=False, workers=2)
    np.testing.assert_array_equal(serial.train.images, parallel.train.images)
    np.testing.assert_array_equal(serial.test.images, parallel.test.images)
    # The offending files are reported in listing order even when chunks finish out of order.
    tree["train/cat/005.png"] = np.zeros((5, 4, 3), np.uint8)
    tree["train/dog/030.png"] = np.zeros((5, 4, 3), np.uint8)
    src = write_tree(tree, tmp_path / "q.zip", as_zip=True)
    with pytest.raises(DataError, match=r"2 of 160 images.*train/cat/005\.png.*train/dog/030\.png"):
        load_dataset(f"imagefolder:{src}", cache_dir=tmp_path / "c3", progress=False, workers=2)


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="imagefolder:PATH"):
        load_dataset("imagefolder", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", progress=False)
    bad = tmp_path / "broken"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "test" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.png").write_bytes(b"not a png")
    (bad / "test" / "a" / "y.png").write_bytes(_png_bytes(np.zeros((2, 2, 3), np.uint8)))
    with pytest.raises(DataError, match=r"cannot decode image .*x\.png"):
        load_dataset(f"imagefolder:{bad}", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match="no option colour; valid options: channels"):
        load_dataset(f"imagefolder:{bad}", progress=False, colour=3)


# ---------------------------------------------------------------------------------- registry, errors, cache
def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar-11")
    message = str(info.value)
    assert "did you mean" in message and "cifar10" in message and "stl10" in message and "\n" not in message
    with pytest.raises(ConfigError, match="takes no ':' argument"):
        load_dataset("cifar10:/tmp")


def test_missing_dataset_one_line_message(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=tmp_path / "empty", progress=False)
    message = str(info.value)
    assert "\n" not in message and "cifar-10-python.tar.gz" in message and "data.download=true" in message
    assert str(tmp_path / "empty") in message


def test_dataset_status_rows(tmp_path):
    write_mnist(tmp_path / "data_home" / "mnist", gz=True)
    rows = {r["name"]: r for r in dataset_status()}
    assert set(rows) == set(DATASETS.names())
    assert rows["mnist"]["present"] is True and rows["cifar10"]["present"] is False
    assert rows["bundled"]["present"] is True and "fashion-mnist-mini" in rows["bundled"]["aliases"]
    assert rows["cifar10"]["locations"] == [str(tmp_path / "data_home" / "cifar10")]
    for row in rows.values():
        assert {"name", "description", "locations", "present", "license", "url"} <= set(row)


def test_cache_hit_does_not_decode_and_is_memory_mapped(tmp_path, monkeypatch):
    root = tmp_path / "c10"
    tr, *_ = write_cifar10(root / "cifar-10-batches-py")
    first = load_dataset("cifar10", root=root, cache_dir=tmp_path / "cache", progress=False)
    calls = []
    original = Cifar10.decode

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Cifar10, "decode", counting)
    second = load_dataset("cifar10", root=root, cache_dir=tmp_path / "cache", progress=False)
    assert calls == []
    assert isinstance(second.train.images, np.memmap) and not second.train.images.flags.writeable
    np.testing.assert_array_equal(second.train.images, tr)
    assert second.mean == first.mean and second.class_names == first.class_names
    # A changed source file (new content, new mtime) is decoded again.
    write_cifar10_batch = root / "cifar-10-batches-py" / "data_batch_1"
    new_imgs = rng_images(1234, 3, 32, 32, 3)
    write_cifar10_batch.write_bytes(cifar_pickle(new_imgs, [1, 2, 3], b"labels"))
    third = load_dataset("cifar10", root=root, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [1]
    np.testing.assert_array_equal(third.train.images[:3], new_imgs)
    # A damaged cache entry is rebuilt instead of crashing.
    entry = Path(third.extra["cache_path"])
    (entry / "train_images.npy").write_bytes(b"garbage")
    fourth = load_dataset("cifar10", root=root, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [1, 1]
    np.testing.assert_array_equal(fourth.train.images[:3], new_imgs)
