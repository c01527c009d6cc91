"""Nothing silently wrong: every artefact teachx writes and later trusts carries a content digest.

Fault injection on the files themselves (one flipped byte, a truncated file, a digest removed):
checkpoints, map stores, stage records, study unit records, self-teaching pointers, results, the
data cache. Each must end in one clear line naming the file and the fix -- or, for the decoded-data
cache (a derived copy whose source is still there), in a warning and a fresh decode -- never in a
wrong answer. Files written by an older teachx (no digest) must still load.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_teachx, teachx_main

from teachx.errors import CheckpointError, TeachxError
from teachx.training.checkpoint import load_checkpoint, save_checkpoint

# -- fault injection helpers ----------------------------------------------------------------------


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip bits of one byte in place (the file keeps its size and name, as with bit rot)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def safetensors_offset(path: Path, name: str) -> int:
    """File offset of the first byte of tensor ``name``'s data in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def flip_in_text(path: Path, needle: str) -> None:
    """Change one character inside the first occurrence of ``needle`` (e.g. a digit of a number)."""
    raw = path.read_bytes()
    at = raw.index(needle.encode())
    flip_byte(path, at + len(needle) - 1)


def _corruption_error():
    from teachx.errors import CorruptionError

    return CorruptionError


# -- checkpoints ------------------------------------------------------------------------------------


def _save(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.w": torch.randn(64, 32, generator=g),
        "model.b": torch.randn(32, generator=g).to(torch.bfloat16),
        "optim.0.step": torch.tensor(3.0),
    }
    save_checkpoint(path, tensors, {"kind": "classifier", "epoch": 2})
    return tensors


def test_checkpoint_round_trip_with_bf16(tmp_path):
    p = tmp_path / "c.safetensors"
    tensors = _save(p)
    ck = load_checkpoint(p)
    for k, v in tensors.items():
        assert torch.equal(ck.tensors[k], v) and ck.tensors[k].dtype == v.dtype


@pytest.mark.parametrize("tensor", ["model.w", "model.b"])
def test_checkpoint_flipped_weight_byte_is_refused(tmp_path, tensor):
    p = tmp_path / "c.safetensors"
    _save(p)
    flip_byte(p, safetensors_offset(p, tensor) + 37, 0x10)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    msg = str(err.value)
    assert f"'{p}'" in msg and "content digest mismatch" in msg and "\n" not in msg
    assert isinstance(err.value, _corruption_error())


def test_checkpoint_flipped_metadata_and_truncation_are_refused(tmp_path):
    p = tmp_path / "c.safetensors"
    _save(p)
    flip_in_text(p, '\\"epoch\\": 2')  # the epoch inside the header metadata: 2 -> 3
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)
    _save(p)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)


def test_checkpoint_without_its_digest_is_refused_but_legacy_format_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    p = tmp_path / "c.safetensors"
    tensors = _save(p)
    with safe_open(str(p), framework="pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["teachx"])
    # a current-format file whose digest entry is gone: corrupted, not legacy
    save_file(tensors, str(p), metadata={"teachx": header["teachx"]})
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)
    # written by teachx before digests existed (format 1, no digest): still loads
    legacy = tmp_path / "legacy.safetensors"
    save_file(tensors, str(legacy), metadata={"teachx": json.dumps({**meta, "format": "teachx-checkpoint-1"})})
    ck = load_checkpoint(legacy)
    assert torch.equal(ck.tensors["model.w"], tensors["model.w"]) and ck.meta["epoch"] == 2


def test_resume_from_a_corrupt_last_checkpoint_is_refused(tmp_path):
    """Neither trained on from damaged weights, nor silently restarted, nor a 'diverged' hint."""
    from _train_script import synthetic_dataset
    from teachx.models import build_model
    from teachx.config.train import TrainConfig
    from teachx.training.trainer import ClassifierTask, DataPlan, Trainer

    ds = synthetic_dataset(64, 16)
    plan = DataPlan(ds, np.arange(48), np.arange(48, 64))

    def trainer(epochs):
        torch.manual_seed(0)
        model = build_model("lenet5", 1, 4, (16, 16))
        cfg = TrainConfig(epochs=epochs, batch_size=16, progress=False)
        return Trainer(
            ClassifierTask(model),
            plan,
            cfg,
            tmp_path / "r",
            seed=0,
            device="cpu",
            meta={"kind": "classifier"},
            log=lambda s: None,
        )

    trainer(1).fit()
    last = tmp_path / "r" / "checkpoints" / "last.safetensors"
    name = next(
        k
        for k in json.loads(last.read_bytes()[8 : 8 + struct.unpack("<Q", last.read_bytes()[:8])[0]])
        if k.startswith("model.")
    )
    flip_byte(last, safetensors_offset(last, name) + 2, 0x7F)  # a weight becomes huge or NaN
    before = last.read_bytes()
    with pytest.raises(CheckpointError) as err:
        trainer(2).fit()
    msg = str(err.value)
    assert str(last) in msg and "corrupted" in msg and "diverged" not in msg
    assert last.read_bytes() == before  # nothing was trained on or over it


# -- trusted JSON ------------------------------------------------------------------------------------


def test_trusted_json_round_trip_flip_and_legacy(tmp_path):
    from teachx.utils.io import read_trusted_json, write_json_atomic

    p = tmp_path / "r.json"
    obj = {"test_acc": 0.8125, "history": [{"epoch": 1, "val_loss": float("nan")}], "path": Path("x"), "n": np.int64(3)}
    write_json_atomic(p, obj, digest=True)
    got = read_trusted_json(p, fix="re-run it")
    assert got["test_acc"] == 0.8125 and got["path"] == "x" and got["n"] == 3 and "digest" not in got
    flip_in_text(p, "0.812")  # 0.8125 -> 0.8135
    with pytest.raises(_corruption_error(), match="re-run it") as err:
        read_trusted_json(p, fix="re-run it")
    assert str(p) in str(err.value) and "digest" in str(err.value)
    # a flipped byte in the key of the digest itself does not make the file 'legacy'
    write_json_atomic(p, obj, digest=True)
    flip_in_text(p, '"diges')
    with pytest.raises(_corruption_error()):
        read_trusted_json(p, fix="re-run it")
    # not JSON any more (truncated)
    write_json_atomic(p, obj, digest=True)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(_corruption_error()):
        read_trusted_json(p, fix="re-run it")
    # written by an older teachx, without a digest: accepted
    p.write_text(json.dumps({"test_acc": 0.5}))
    assert read_trusted_json(p, fix="re-run it") == {"test_acc": 0.5}


def test_stage_record_flip_is_an_error_and_legacy_record_loads(tmp_path):
    from teachx.runs.recovery import stage_done
    from teachx.utils.io import write_json_atomic

    d = tmp_path / "baseline"
    write_json_atomic(d / "stage.json", {"checkpoint": "x.safetensors", "test_acc": 0.8125}, digest=True)
    assert stage_done(d)["test_acc"] == 0.8125
    flip_in_text(d / "stage.json", "0.812")
    with pytest.raises(TeachxError, match="stage.json"):
        stage_done(d)
    (d / "stage.json").write_text(json.dumps({"checkpoint": "x.safetensors", "test_acc": 0.5}))  # older teachx
    assert stage_done(d)["test_acc"] == 0.5


def test_study_unit_records_flip_is_an_error(tmp_path):
    from teachx.studies.runner import _Runner
    from teachx.utils.io import write_json_atomic

    d = tmp_path / "units" / "x-0123"
    write_json_atomic(d / "stage.json", {"checkpoint": "c.safetensors", "test_acc": 0.75}, digest=True)
    ev = d / "eval-abc.json"
    write_json_atomic(ev, {"map_quality": {"corr": 0.4321}}, digest=True)
    assert _Runner._cached(d, ev)[1]["map_quality"]["corr"] == 0.4321
    flip_in_text(ev, "0.432")
    with pytest.raises(TeachxError, match="eval-abc.json") as err:
        _Runner._cached(d, ev)
    assert "re-run" in str(err.value)
    write_json_atomic(ev, {"map_quality": {"corr": 0.4321}}, digest=True)
    flip_in_text(d / "stage.json", "0.7")
    with pytest.raises(TeachxError, match="stage.json") as err:
        _Runner._cached(d, ev)
    assert str(d) in str(err.value)


def test_report_refuses_corrupt_results(tmp_path):
    from teachx.reporting.report import write_report
    from teachx.utils.io import write_json_atomic

    write_json_atomic(tmp_path / "results.json", {"dataset": "x", "baseline_test_acc": 0.8125}, digest=True)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    flip_in_text(tmp_path / "results.json", "0.812")
    with pytest.raises(TeachxError, match="results.json"):
        write_report(tmp_path)


# -- map stores ----------------------------------------------------------------------------------------


def _filled_store(tmp_path, n=12, batch=5):
    from teachx.teachers.store import fill_store, open_store

    s = open_store(tmp_path, {"teacher": "t"}, n, (1, 4, 4), log=lambda m: None)
    fill_store(
        s,
        np.arange(n),
        lambda idx: torch.as_tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 16 + 0.01,
        batch,
        progress=False,
    )
    return s


def _reopen(tmp_path, n=12, log=None):
    from teachx.teachers.store import open_store

    return open_store(tmp_path, {"teacher": "t"}, n, (1, 4, 4), log=log or (lambda m: None))


def test_map_store_flipped_row_is_refused(tmp_path):
    s = _filled_store(tmp_path)
    path = s.path
    del s
    maps = np.load(path / "maps.npy", mmap_mode="r")
    offset = maps.offset + 7 * 16 * 2 + 3  # row 7, a byte of its fourth value
    del maps
    flip_byte(path / "maps.npy", offset, 0x04)
    with pytest.raises(_corruption_error()) as err:
        _reopen(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "row 7" in msg and "remove" in msg and "\n" not in msg


def test_map_store_flipped_done_flag_is_refused(tmp_path):
    from teachx.teachers.store import open_store

    s = open_store(tmp_path, {"teacher": "t"}, 12, (1, 4, 4), log=lambda m: None)
    from teachx.teachers.store import fill_store

    fill_store(s, np.arange(6), lambda idx: torch.ones(len(idx), 1, 4, 4), 6, progress=False)  # rows 6.. not done
    path = s.path
    del s
    done = np.load(path / "done.npy", mmap_mode="r")
    offset = done.offset + 9
    del done
    flip_byte(path / "done.npy", offset, 0x01)  # row 9 claims to be done: its maps are zeros, never computed
    with pytest.raises(_corruption_error(), match="row 9"):
        _reopen(tmp_path)


def test_map_store_interrupted_fill_leaves_no_done_row_without_digest(tmp_path):
    from teachx.teachers import store as store_mod

    s = store_mod.open_store(tmp_path, {"teacher": "t"}, 12, (1, 4, 4), log=lambda m: None)
    calls = {"k": 0}

    def flaky(idx):
        calls["k"] += 1
        if calls["k"] == 2:
            raise KeyboardInterrupt
        return torch.full((len(idx), 1, 4, 4), 0.5)

    with pytest.raises(KeyboardInterrupt):
        store_mod.fill_store(s, np.arange(12), flaky, 4, progress=False)
    s2 = _reopen(tmp_path)
    assert int(s2.done.sum()) == 4
    assert store_mod.fill_store(s2, np.arange(12), lambda i: torch.full((len(i), 1, 4, 4), 0.5), 4, progress=False) == 8
    assert _reopen(tmp_path).complete


def test_map_store_corrupt_meta_is_refused(tmp_path):
    s = _filled_store(tmp_path)
    flip_in_text(s.path / "meta.json", '"dtype": "float1')
    with pytest.raises(_corruption_error(), match="meta.json"):
        _reopen(tmp_path)


def test_legacy_map_store_without_digests_is_kept_and_sealed(tmp_path):
    """A store written before digests existed keeps its maps (no recomputation) and is verified from then on."""
    from teachx.teachers import store as store_mod

    s = _filled_store(tmp_path)
    path, values = s.path, np.array(s.maps)
    del s
    # make it look like a store written by an older teachx: no digests.npy, meta without a digest/layout
    (path / "digests.npy").unlink(missing_ok=True)
    meta = json.loads((path / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("digest", "layout")}
    (path / "meta.json").write_text(json.dumps(meta))
    msgs: list[str] = []
    s2 = _reopen(tmp_path, log=msgs.append)
    assert s2.complete and np.array_equal(np.array(s2.maps), values)
    assert (path / "digests.npy").exists()
    computed = []
    store_mod.fill_store(
        s2, np.arange(12), lambda i: computed.append(i) or torch.zeros(len(i), 1, 4, 4), 4, progress=False
    )
    assert computed == []
    del s2
    maps = np.load(path / "maps.npy", mmap_mode="r")
    offset = maps.offset + 2 * 16 * 2
    del maps
    flip_byte(path / "maps.npy", offset, 0x02)
    with pytest.raises(_corruption_error(), match="row 2"):
        _reopen(tmp_path)


def test_self_teaching_pointer_flip_is_refused(tmp_path):
    from teachx.training.self_teaching import SelfTeaching
    from teachx.utils.io import write_json_atomic

    st = SelfTeaching.__new__(SelfTeaching)
    st.store_dir, st.n, st.map_shape, st.log, st.train_idx = (
        tmp_path / "self_maps",
        4,
        (1, 2, 2),
        (lambda m: None),
        np.arange(4),
    )
    (tmp_path / "self_maps" / "abc").mkdir(parents=True)
    write_json_atomic(st._pointer(), {"epoch": 2, "dir": "abc", "material": {"m": 1}}, digest=True)
    flip_in_text(st._pointer(), '"epoch": 2')  # 2 -> 3
    with pytest.raises(_corruption_error(), match="current.json"):
        st._saved(3)


# -- decoded-data cache ----------------------------------------------------------------------------------


def test_data_cache_corruption_is_never_used(tmp_path):
    from teachx.data.cache import Decoded, cached_decode

    rng = np.random.default_rng(0)
    arrays = dict(
        train_images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
        train_labels=np.arange(20) % 2,
        test_images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        test_labels=np.arange(6) % 2,
    )
    decodes = []

    def decode():
        decodes.append(1)
        return Decoded(**{k: v.copy() for k, v in arrays.items()}, class_names=["a", "b"])

    first = cached_decode("toy", {"v": 1}, decode, tmp_path)
    entry = Path(first.cache_path)
    assert len(decodes) == 1 and np.array_equal(first.train_images, arrays["train_images"])
    del first
    again = cached_decode("toy", {"v": 1}, decode, tmp_path)
    assert len(decodes) == 1  # a verified hit
    del again
    npy = entry / "train_images.npy"
    arr = np.load(npy, mmap_mode="r")
    offset = arr.offset + 100
    del arr
    flip_byte(npy, offset, 0x20)
    with pytest.warns(UserWarning, match="train_images"):
        fixed = cached_decode("toy", {"v": 1}, decode, tmp_path)
    assert len(decodes) == 2 and np.array_equal(fixed.train_images, arrays["train_images"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_decode("toy", {"v": 1}, decode, tmp_path)  # the rewritten entry is intact
    assert len(decodes) == 2


# -- a run with a corrupt checkpoint: one line, the exact way forward, and that way works ----------------


def _cli(*args, env=None):
    return run_teachx(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


def _cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """`teachx ARGS` in this process (``teachx_main``: no start-up of torch), shaped as ``_cli`` returns it."""
    return subprocess.CompletedProcess(list(args), *teachx_main(capsys, *args))


def _one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("teachx: error:"), err
    for f in fragments:
        assert f in err, (f, err)
    assert "diverged" not in err


@pytest.mark.slow
def test_run_with_a_corrupt_checkpoint_says_and_does_redo(tmp_path, capsys, monkeypatch):
    """The runs in real processes; the refusals and explain calls in this one (the same command line)."""
    env = {"TEACHX_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("TEACHX_CACHE", env["TEACHX_CACHE"])
    out = tmp_path / "run"
    common = [
        "--out",
        out,
        "-q",
        "train.epochs=1",
        "data.train_size=200",
        "teacher.method=gradient_x_input",
        "teacher.eval_images=50",
        "teacher.faith_images=8",  # the evaluation's faithfulness block on 8 of them (on all 50 it takes most of a run)
        "teacher.batch_size=100",
    ]
    first = _cli("demo", *common, env=env)
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    ck = out / "baseline" / "checkpoints" / "best.safetensors"
    name = next(
        k
        for k in json.loads(ck.read_bytes()[8 : 8 + struct.unpack("<Q", ck.read_bytes()[:8])[0]])
        if k.startswith("model.")
    )
    flip_byte(ck, safetensors_offset(ck, name) + 5, 0x40)
    bad = _cli_here(capsys, "demo", *common)
    _one_line_error(bad, str(ck), "corrupted", "--redo baseline")
    # explain refuses a corrupt IMPACTX checkpoint and names the stage to redo
    ick = out / "impactx" / "checkpoints" / "best.safetensors"
    iname = next(
        k
        for k in json.loads(ick.read_bytes()[8 : 8 + struct.unpack("<Q", ick.read_bytes()[:8])[0]])
        if k.startswith("model.")
    )
    flip_byte(ick, safetensors_offset(ick, iname) + 9, 0x08)
    from PIL import Image

    Image.fromarray(np.full((28, 28), 120, np.uint8)).save(tmp_path / "x.png")
    ex = _cli_here(capsys, "explain", ick, tmp_path / "x.png", "--out", tmp_path / "maps")
    _one_line_error(ex, str(ick), "corrupted", "--redo impactx")
    assert not (tmp_path / "maps").exists()
    # the way forward: redo the baseline (and the IMPACTX stage trained on its maps)
    redo = _cli("demo", *common, "--redo", "baseline", env=env)
    assert redo.returncode == 0, redo.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["baseline_test_acc"] == results["baseline_test_acc"]  # CPU training is deterministic
    assert _cli_here(capsys, "explain", ick, tmp_path / "x.png", "--out", tmp_path / "maps").returncode == 0
    # a stage name that does not exist is a usage error
    _one_line_error(_cli_here(capsys, "demo", *common, "--redo", "basline"), "basline")


# -- the `teachx serve` precompute cache --------------------------------------------------------------------


def test_serve_cache_never_serves_a_damaged_row(tmp_path):
    pytest.importorskip("teachx.service.cache")
    from teachx.service.cache import ArrayCache

    fields = {"map": ((1, 4, 4), "float32"), "probs": ((3,), "float32")}
    c = ArrayCache(tmp_path, {"m": 1}, 8, fields)
    values = np.arange(8 * 16, dtype=np.float32).reshape(8, 1, 4, 4) / 7
    c.put("map", np.arange(8), values)
    c.put("probs", np.arange(8), np.full((8, 3), 1 / 3, np.float32))
    c.flush()
    path = c.path
    del c
    arr = np.load(path / "map.npy", mmap_mode="r")
    offset = arr.offset + 5 * 16 * 4 + 6  # row 5
    del arr
    flip_byte(path / "map.npy", offset, 0x01)
    msgs: list[str] = []
    again = ArrayCache(tmp_path, {"m": 1}, 8, fields, log=msgs.append)
    assert list(again.missing("map")) == [5] and list(again.missing("probs")) == []
    assert any("row 5" in m and "digest" in m for m in msgs)
    assert np.array_equal(again.get("map", [0, 7]), values[[0, 7]])


def test_serve_cache_open_waits_for_another_process_opening_it(tmp_path):
    """Another server process holding a folder's check/rebuild/open lock: a second one waits for it (and
    says so) instead of checking -- and perhaps deleting -- that folder half-way, then opens it."""
    pytest.importorskip("teachx.service.cache")
    import time

    from teachx.service.cache import ArrayCache

    fields = {"probs": ((3,), "float32")}
    c = ArrayCache(tmp_path, {"m": 2}, 6, fields)
    path, lock = c.path, c.lock_path(c.path)
    c.put("probs", np.arange(3), np.full((3, 3), 0.25, np.float32))
    c.flush()
    del c
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom teachx.utils.locking import file_lock\n"
                f"with file_lock({str(lock)!r}):\n    print('held', flush=True)\n    time.sleep(1.5)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    msgs: list[str] = []
    again = ArrayCache(tmp_path, {"m": 2}, 6, fields, log=msgs.append)
    waited = time.monotonic() - t0
    assert holder.wait(30) == 0
    assert waited > 1.0 and any("waiting for pid" in m for m in msgs), (waited, msgs)
    assert again.path == path and list(again.missing("probs")) == [3, 4, 5]  # the folder as it was, opened
    assert not lock.exists()  # released after opening


@pytest.mark.slow
def test_train_with_a_corrupt_stage_record_says_and_does_redo_train(tmp_path, capsys):
    out = tmp_path / "base"
    common = ["--out", out, "-q", "train.epochs=1", "data.train_size=200"]
    assert _cli("train", *common).returncode == 0
    record = out / "stage.json"
    at = record.read_bytes().index(b'"test_acc": 0.') + len('"test_acc": 0.')
    flip_byte(record, at, 0x01)  # a digit of the recorded accuracy: still valid JSON, another number
    bad = _cli_here(capsys, "train", *common)  # the refusal in this process; the runs in real ones
    _one_line_error(bad, str(record), "corrupted", "--redo train")
    redo = _cli("train", *common, "--redo", "train")
    assert redo.returncode == 0, redo.stderr
    from teachx.runs.recovery import stage_done

    assert stage_done(out)["test_acc"] == json.loads((out / "results.json").read_text())["test_acc"]
