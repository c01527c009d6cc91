"""Downloads against local files (file:// URLs and a fake opener): checksums, atomicity, wiring."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error

import numpy as np
import pytest

import teachx.data.download as dl
from teachx.data import load_dataset
from teachx.data.download import Resource, download_file, verify_file
from teachx.data.idx import MNIST
from teachx.errors import DataError


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("TEACHX_DATA", str(tmp_path / "data_home"))
    monkeypatch.setenv("TEACHX_CACHE", str(tmp_path / "cache_home"))
    real = dl.urlopen

    def guard(url, *args, **kwargs):
        if not str(url).startswith("file://"):
            raise AssertionError(f"test tried to reach the network: {url}")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(dl, "urlopen", guard)


def test_download_file_url_with_md5_and_sha256(tmp_path):
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 5000
    src.write_bytes(payload)
    for algo in ("md5", "sha256"):
        dest = tmp_path / "out" / f"{algo}.bin"
        digest = hashlib.new(algo, payload).hexdigest()
        download_file(src.as_uri(), dest, f"{algo}:{digest}", progress=False)
        assert dest.read_bytes() == payload
        verify_file(dest, f"{algo}:{digest}")
    assert [p.name for p in (tmp_path / "out").iterdir()] != []
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_checksum_mismatch_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    dest = tmp_path / "out" / "file.bin"
    wrong = "md5:" + hashlib.md5(b"other").hexdigest()
    with pytest.raises(DataError, match="checksum mismatch") as info:
        download_file(src.as_uri(), dest, wrong, progress=False)
    assert "\n" not in str(info.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    dest.write_bytes(b"hello")
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_file(dest, wrong)


def test_interrupted_download_and_network_error(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": "100"}

        def read(self, n=-1):
            raise ConnectionResetError("peer reset")

    monkeypatch.setattr(dl, "urlopen", lambda url: Broken())
    dest = tmp_path / "x.bin"
    with pytest.raises(DataError, match="interrupted"):
        download_file("https://example.invalid/x.bin", dest, "md5:" + "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []

    def refuse(url):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(dl, "urlopen", refuse)
    with pytest.raises(DataError, match=r"could not download .*no route to host.*put it at"):
        download_file("https://example.invalid/x.bin", dest, "md5:" + "0" * 32, progress=False)


def _idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_load_dataset_download_true_fetches_verifies_and_loads(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(6) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.array([3, 4]),
    }
    resources = []
    for name, arr in arrays.items():
        blob = _idx_gz(arr)
        (mirror / name).write_bytes(blob)
        # First mirror is dead; the second one serves the file.
        urls = ((tmp_path / "dead" / name).as_uri(), (mirror / name).as_uri())
        resources.append(Resource(name, urls, "sha256:" + hashlib.sha256(blob).hexdigest()))
    monkeypatch.setattr(MNIST, "resources", tuple(resources))

    with pytest.raises(DataError, match="not found.*data.download=true"):
        load_dataset("mnist", progress=False)
    ds = load_dataset("mnist", download=True, progress=False)
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(ds.test.labels, [3, 4])
    assert (tmp_path / "data_home" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()

    # A corrupted mirror file: checksum mismatch, nothing saved.
    bad = list(resources)
    bad[0] = Resource(bad[0].filename, bad[0].urls, "md5:" + "1" * 32)
    monkeypatch.setattr(MNIST, "resources", tuple(bad))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", root=tmp_path / "fresh", download=True, progress=False)
    assert not (tmp_path / "fresh" / "train-images-idx3-ubyte.gz").exists()


def test_official_resources_have_published_checksums():
    from teachx.data import DATASETS

    for name in DATASETS.names():
        for resource in DATASETS.get(name).resources:
            algorithm, _, digest = resource.checksum.partition(":")
            assert algorithm in ("md5", "sha256") and len(digest) == {"md5": 32, "sha256": 64}[algorithm]
            assert all(u.startswith(("http://", "https://")) for u in resource.urls)
    assert DATASETS.get("cifar10").resources[0].checksum == "md5:c58f30108f718f92721af3b95e74349a"
