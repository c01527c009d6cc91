"""`teachx serve`: the API contracts (OpenAPI, typed responses), provenance, values checked against
the library (built-in maps, teachers, pixel flipping, agreement), the offline cache, and every
bad input (unknown names, out-of-range indices, non-images, oversized uploads, path traversal,
a damaged study unit) -- answered with a 4xx and a message, never a 500."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="teachx serve needs the 'serve' extra: pip install 'teachx[serve]'")
pytest.importorskip("multipart", reason="teachx serve needs python-multipart: pip install 'teachx[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _serve_fixtures import session_fixtures  # noqa: E402

from conftest import teachx_main  # noqa: E402

from teachx.service import Service  # noqa: E402
from teachx.service import schemas  # noqa: E402
from teachx.service.app import create_app  # noqa: E402

UPLOAD_LIMIT = 200_000


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.set_num_threads(1)
    out = session_fixtures(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(out["cache"]))  # the served runs' decoded data lives there
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def service(dirs, tmp_path_factory):
    return Service([dirs["run"], dirs["study"]], cache_dir=tmp_path_factory.mktemp("serve-cache"))


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service, max_upload_bytes=UPLOAD_LIMIT))


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def detail(r) -> str:
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


def load_impactx(path: Path):
    from teachx.models.impactx import impactx_from_spec
    from teachx.training.checkpoint import load_checkpoint, load_state_into

    ck = load_checkpoint(path)
    model = impactx_from_spec(ck.meta["model_spec"])
    load_state_into(model, ck.group("model"), "test")
    return model.eval(), ck.meta


def image_tensor(service, index: int):
    from teachx.data.transforms import normalize

    lm = service.loaded("run.impactx")
    d = service.data(lm)
    x_u8 = torch.from_numpy(np.array(d.test.images[[index]])).permute(0, 3, 1, 2)
    return normalize(x_u8, lm.mean, lm.std), int(d.test.labels[index])


# -- contracts -----------------------------------------------------------------------------------


def test_openapi_lists_the_v1_api(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/api/v1/runs",
        "/api/v1/models",
        "/api/v1/models/{model_id}",
        "/api/v1/models/{model_id}/images",
        "/api/v1/models/{model_id}/images/{index}",
        "/api/v1/models/{model_id}/images/{index}/maps/{name}",
        "/api/v1/models/{model_id}/images/{index}/maps/{name}.png",
        "/api/v1/models/{model_id}/images/{index}/maps/{name}.npy",
        "/api/v1/models/{model_id}/images/{index}/metrics",
        "/api/v1/models/{model_id}/predict",
        "/api/v1/teachers",
        "/api/v1/models/{model_id}/images.csv",
        "/api/v1/models/{model_id}/export.npz",
        "/api/v1/models/{model_id}/export.png",
    ):
        assert p in paths, p
    names = set(spec["components"]["schemas"])
    assert {
        "Provenance",
        "ImageDetail",
        "ImageList",
        "MapData",
        "MetricsResponse",
        "UploadResponse",
        "RunsResponse",
    } <= names
    assert "multipart/form-data" in paths["/api/v1/models/{model_id}/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_runs_and_models(client, dirs):
    res = schemas.RunsResponse.model_validate(client.get("/api/v1/runs").json())
    kinds = {r.id: r.kind for r in res.runs}
    assert kinds == {"run": "run", "study": "study"}
    run = next(r for r in res.runs if r.id == "run")
    assert [m.name for m in run.models] == ["baseline", "impactx"]
    assert Path(run.path) == dirs["run"].resolve()
    results = json.loads((dirs["run"] / "results.json").read_text())
    by = {m.name: m for m in run.models}
    assert by["impactx"].test_acc == pytest.approx(results["impactx_test_acc"])
    assert by["baseline"].test_acc == pytest.approx(results["baseline_test_acc"])
    assert by["impactx"].has_built_in and not by["baseline"].has_built_in
    assert by["impactx"].config["teacher"]["method"] == "deepshap"
    study = next(r for r in res.runs if r.id == "study")
    assert sorted(m.role for m in study.models) == ["baseline", "impactx", "lambda0", "per_class"]
    assert all(m.test_acc is not None and m.error is None for m in study.models)
    models = schemas.ModelsResponse.model_validate(client.get("/api/v1/models").json()).models
    assert len(models) == 6
    one = schemas.ModelInfo.model_validate(client.get("/api/v1/models/run.impactx").json())
    assert one.class_names == ["bl", "br", "tl", "tr"] and one.image_size == [32, 32] and one.loaded


def test_image_list_filters_and_sorting(client):
    base = "/api/v1/models/run.impactx/images"
    full = schemas.ImageList.model_validate(client.get(base, params={"limit": 1000}).json())
    assert full.total == full.n_images == 32 and [i.index for i in full.items] == list(range(32))
    wrong = client.get(base, params={"correct": "false"}).json()
    right = client.get(base, params={"correct": "true"}).json()
    assert wrong["total"] + right["total"] == 32 and wrong["total"] > 0
    assert all(not i["correct"] and i["predicted"] != i["label"] for i in wrong["items"])
    lab = client.get(base, params={"label": 2}).json()
    assert lab["total"] == 8 and all(i["label"] == 2 for i in lab["items"])
    pred = client.get(base, params={"predicted": 1}).json()
    assert all(i["predicted"] == 1 for i in pred["items"])
    conf = [i["confidence"] for i in client.get(base, params={"sort": "confidence", "order": "desc"}).json()["items"]]
    assert conf == sorted(conf, reverse=True)
    page = client.get(base, params={"offset": 30, "limit": 5}).json()
    assert [i["index"] for i in page["items"]] == [30, 31]
    both = client.get(base, params={"label": 0, "correct": "true", "sort": "true_prob"}).json()
    assert all(i["label"] == 0 and i["correct"] for i in both["items"])
    r = client.get(base, params={"sort": "bogus"})
    assert r.status_code == 400 and "valid" in detail(r)
    assert client.get(base, params={"limit": 5000}).status_code == 422
    csv = client.get(base.replace("/images", "/images.csv"), params={"correct": "false"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert len(csv.text.strip().splitlines()) == wrong["total"] + 1
    assert json.loads(csv.headers["x-teachx-provenance"])["model_id"] == "run.impactx"


def test_provenance(client, dirs):
    from teachx.config.loader import load_yaml
    from teachx.utils.hashing import hash_json

    d = schemas.ImageDetail.model_validate(client.get("/api/v1/models/run.impactx/images/5").json())
    p = d.provenance
    ck = dirs["run"] / "impactx" / "checkpoints" / "best.safetensors"
    assert p.run_dir == str(dirs["run"].resolve()) and Path(p.checkpoint).resolve() == ck.resolve()
    assert p.checkpoint_sha256 == hashlib.sha256(ck.read_bytes()).hexdigest()
    cfg = load_yaml(str(dirs["run"] / "config.yaml"))
    cfg.pop("command")
    assert p.config_hash == hash_json(cfg)
    import teachx

    assert p.teachx_version == teachx.__version__
    assert p.dataset == f"imagefolder:{dirs['zip']}" and p.split == "test" and p.index == 5
    assert len(d.probabilities) == 4 and sum(c.p for c in d.probabilities) == pytest.approx(1, abs=1e-5)
    m = schemas.MapData.model_validate(client.get("/api/v1/models/run.impactx/images/5/maps/teacher").json())
    assert m.provenance.method == "deepshap" and m.provenance.method_options["target"] == "predicted"
    assert (
        (m.provenance.explained_class, m.provenance.explained_class_name, m.provenance.explained_choice)
        == (d.predicted, d.predicted_name, "predicted")
        == (d.provenance.explained_class, d.provenance.explained_class_name, "predicted")
    )
    lab = client.get("/api/v1/models/run.impactx/images/5/maps/teacher", params={"class": "label"}).json()["provenance"]
    assert (lab["method_options"]["target"], lab["explained_class"], lab["explained_choice"]) == (
        "label",
        d.label,
        "label",
    )
    assert m.provenance.method_options["options"]["background_size"] == 8
    hdr = json.loads(client.get("/api/v1/models/run.impactx/images/5/maps/built_in.png").headers["x-teachx-provenance"])
    assert hdr["method"] == "built_in" and hdr["index"] == 5 and hdr["checkpoint_sha256"] == p.checkpoint_sha256
    study = client.get(f"/api/v1/models/{_study_model(client, 'impactx')}/images/0").json()["provenance"]
    assert study["run_dir"] == str(dirs["study"].resolve()) and "/units/" in study["checkpoint"]


def _study_model(client, role: str) -> str:
    return next(
        m["id"] for m in client.get("/api/v1/models").json()["models"] if m["run_id"] == "study" and m["role"] == role
    )


def test_built_in_map_as_json_npy_png_matches_the_model(client, service, dirs):
    model, _ = load_impactx(dirs["run"] / "impactx" / "checkpoints" / "best.safetensors")
    x, _ = image_tensor(service, 7)
    expected = model.explain(x)[0].numpy()
    base = "/api/v1/models/run.impactx/images/7/maps/built_in"
    js = schemas.MapData.model_validate(client.get(base).json())
    values = np.array(js.values, dtype=np.float32).reshape(js.shape)
    npy = np.load(io.BytesIO(client.get(base + ".npy").content), allow_pickle=False)
    assert npy.dtype == np.float32 and npy.shape == expected.shape == tuple(js.shape)
    tol = 2e-3 * np.abs(expected).max()  # the cache keeps float16, like the teacher-map store
    np.testing.assert_allclose(npy, expected, atol=tol)
    np.testing.assert_array_equal(values, npy)
    assert js.vmax == pytest.approx(np.abs(npy).max())
    img = np.asarray(Image.open(io.BytesIO(client.get(base + ".png", params={"scale": 2}).content)))
    assert img.shape == (64, 64, 3)
    from teachx.service.render import bwr

    np.testing.assert_array_equal(img[::2, ::2], bwr(npy.sum(0)))
    inp = np.asarray(Image.open(io.BytesIO(client.get("/api/v1/models/run.impactx/images/7/input.png").content)))
    np.testing.assert_array_equal(inp, service.input_image("run.impactx", 7))


def test_per_class_built_in_maps_by_class(client, service):
    """A model with one built-in map per class (the study's per_class arm): ?class=K gives the decoder's map
    of class K (checked against the model's own explain(x, K)), the default is the predicted class's, and
    models or maps without per-class maps, or a class out of range, answer 409 / 404 with a message."""
    mid = _study_model(client, "per_class")
    info = client.get(f"/api/v1/models/{mid}").json()
    assert info["per_class"] is True and client.get("/api/v1/models/run.impactx").json()["per_class"] is False
    model, _ = load_impactx(Path(info["checkpoint"]))
    assert model.per_class
    x, _ = image_tensor(service, 3)
    with torch.no_grad():
        by_class = [model.explain(x, torch.tensor([k]))[0].numpy() for k in range(4)]
        predicted = int(model(x).argmax(1))
    assert not np.allclose(by_class[0], by_class[1])  # the classes' maps differ: a wrong class would be caught
    base = f"/api/v1/models/{mid}/images/3/maps/built_in"
    for k in range(4):
        npy = np.load(io.BytesIO(client.get(base + ".npy", params={"class": k}).content), allow_pickle=False)
        # the predicted class's map comes from the float16 cache, the others from a decoder pass
        np.testing.assert_allclose(
            npy, by_class[k], rtol=1e-5, atol=2e-3 * np.abs(by_class[k]).max() if k == predicted else 1e-6
        )
        js = client.get(base, params={"class": k}).json()
        assert (
            js["provenance"]["explained_class"] == k
            and js["provenance"]["explained_class_name"] == info["class_names"][k]
        )
        assert (
            js["provenance"]["explained_choice"] == "index"
            and js["provenance"]["method_options"]["classes"] == "one built-in map per class"
        )
    default = np.load(io.BytesIO(client.get(base + ".npy").content), allow_pickle=False)
    np.testing.assert_allclose(
        default, by_class[predicted], atol=2e-3 * np.abs(by_class[predicted]).max()
    )  # float16 cache
    r = client.get(base, params={"class": 4})
    assert r.status_code == 404 and "4 classes" in detail(r)
    assert client.get(base, params={"class": -1}).status_code == 422
    assert client.get(base, params={"class": "true"}).status_code == 422
    # a one-map model's built-in map is the same for every class, and says so
    one = "/api/v1/models/run.impactx/images/3/maps/built_in"
    r = client.get(one, params={"class": 1})
    assert r.status_code == 200 and r.json()["values"] == client.get(one).json()["values"]
    assert (
        r.json()["provenance"]["explained_class"] == 1
        and "shared by all classes" in r.json()["provenance"]["method_options"]["classes"]
    )


def test_export_png_grid_draws_the_selection(client, service, monkeypatch):
    """export.png: one row per selected image (labelled with its index and true class, and the prediction
    when wrong), the input and the requested maps -- the same arrays the map endpoints serve; a real PNG;
    more than GRID_MAX images or a bad list is a 422 with a message."""
    from teachx.runs import figures
    from teachx.service.app import GRID_MAX

    base = "/api/v1/models/run.impactx"
    r = client.get(base + "/export.png", params={"indices": "3,9", "maps": "built_in,teacher"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.width > img.height > 100  # 2 rows x 3 columns
    drawn = {}

    def capture(images, columns, labels, dpi=110):
        drawn.update(images=images, columns=columns, labels=labels)
        return png(np.zeros((4, 4, 3), np.uint8))

    monkeypatch.setattr(figures, "example_grid_png", capture)
    assert client.get(base + "/export.png", params={"indices": "3,9,4", "maps": "teacher,built_in"}).status_code == 200
    assert list(drawn["columns"]) == ["teacher", "built_in"] and drawn["images"].shape[0] == 3
    for row, i in enumerate((3, 9, 4)):
        d = client.get(f"{base}/images/{i}").json()
        assert drawn["labels"][row] == f"#{i} {d['label_name']}" + (
            "" if d["correct"] else f" -> {d['predicted_name']}"
        )
        for name in ("teacher", "built_in"):
            npy = np.load(io.BytesIO(client.get(f"{base}/images/{i}/maps/{name}.npy").content), allow_pickle=False)
            np.testing.assert_array_equal(drawn["columns"][name][row].numpy(), npy)
        np.testing.assert_array_equal(
            drawn["images"][row].permute(1, 2, 0).numpy(), service.input_image("run.impactx", i)
        )
    too_many = ",".join(str(i % 32) for i in range(GRID_MAX + 1))
    r = client.get(base + "/export.png", params={"indices": too_many})
    assert r.status_code == 422 and f"1 to {GRID_MAX} indices" in detail(r)
    assert client.get(base + "/export.png", params={"indices": "1,x"}).status_code == 422
    assert client.get(base + "/export.png", params={"indices": "99999"}).status_code == 404


def test_teacher_maps_on_demand_are_cached_and_match_the_teacher(client, service):
    from teachx.teachers.postprocess import postprocess

    base = "/api/v1/models/run.impactx/images/9/maps"
    first = client.get(f"{base}/gradient_x_input").json()
    again = client.get(f"{base}/gradient_x_input").json()
    assert first["provenance"]["source"] == "computed" and again["provenance"]["source"] == "cache"
    assert first["values"] == again["values"]
    teacher, tcfg = service._teacher(service.loaded("run.impactx"), "gradient_x_input")
    x, _ = image_tensor(service, 9)
    lm = service.loaded("run.impactx")
    for k in range(4):  # the predicted class by default; any class with class=K, the true one with class=label
        got = (
            first
            if k == first["provenance"]["explained_class"]
            else client.get(f"{base}/gradient_x_input", params={"class": k}).json()
        )
        assert got["provenance"]["explained_class"] == k
        want = postprocess(teacher.attribute(lm.model, x, torch.tensor([k])), reduce="sum", normalize="maxabs")[
            0
        ].numpy()
        np.testing.assert_allclose(np.array(got["values"]).reshape(want.shape), want, atol=2e-3)
    built = np.array(client.get(f"{base}/built_in").json()["values"])
    teach = np.array(client.get(f"{base}/teacher").json()["values"])
    diff = client.get(f"{base}/difference").json()
    # compared on the built-in map's own terms: this model's loss is MSE (values), so as they are; the
    # study's per-class model was trained with 1 - Pearson, which leaves scale and offset free: z-scores
    np.testing.assert_allclose(np.array(diff["values"]), built - teach, atol=1e-6)
    assert "as they are" in diff["provenance"]["method_options"]["difference"]
    pc = f"/api/v1/models/{_study_model(client, 'per_class')}/images/9/maps"
    built, teach = (
        np.array(client.get(f"{pc}/{n}").json()["values"], dtype=np.float64) for n in ("built_in", "teacher")
    )
    z = lambda m: (m - m.mean()) / m.std()  # noqa: E731
    pc_diff = client.get(f"{pc}/difference").json()
    np.testing.assert_allclose(np.array(pc_diff["values"]), z(built) - z(teach), atol=1e-4)
    assert "z-scored" in pc_diff["provenance"]["method_options"]["difference"]
    assert diff["provenance"]["method"] == "built_in - deepshap"
    methods = client.get("/api/v1/teachers").json()["methods"]
    assert {"deepshap", "lrp", "gradcam", "integrated_gradients"} <= {m["name"] for m in methods}


def test_pixel_flipping_and_agreement_come_from_teachx_evaluation(client, service, dirs):
    from teachx.evaluation import PixelFlippingMoRF, map_agreement

    m = schemas.MetricsResponse.model_validate(client.get("/api/v1/models/run.impactx/images/11/metrics").json())
    assert m.map == "built_in" and len(m.pixel_flipping.curve) == 17 and m.pixel_flipping.x[-1] == 1.0
    model, _ = load_impactx(dirs["run"] / "impactx" / "checkpoints" / "best.safetensors")
    x, _ = image_tensor(service, 11)
    k = int(model(x).argmax(1))  # the curve tracks the explained class: the predicted one by default
    assert m.provenance.explained_class == k and m.provenance.explained_choice == "predicted"
    built = torch.from_numpy(
        np.load(io.BytesIO(client.get("/api/v1/models/run.impactx/images/11/maps/built_in.npy").content))
    )
    curve = PixelFlippingMoRF(steps=16).curves(model, x, torch.tensor([k]), built[None])[0]
    np.testing.assert_allclose(m.pixel_flipping.curve, curve.numpy(), atol=1e-5)
    teacher = torch.from_numpy(
        np.load(io.BytesIO(client.get("/api/v1/models/run.impactx/images/11/maps/teacher.npy").content))
    )
    agr = map_agreement(built[None], teacher[None])
    assert m.agreement.spearman == pytest.approx(float(agr["spearman"][0]), abs=1e-4)
    assert m.agreement_between == ["built_in", "deepshap"]
    other = client.get("/api/v1/models/run.impactx/images/11/metrics", params={"map": "saliency"}).json()
    assert other["map"] == "saliency" and other["provenance"]["source"] == "computed"
    # the cached metric now shows in the list and its sort
    item = next(
        i
        for i in client.get("/api/v1/models/run.impactx/images", params={"sort": "morf_auc"}).json()["items"]
        if i["index"] == 11
    )
    assert item["morf_auc"] == pytest.approx(m.pixel_flipping.auc, abs=1e-6) and item["agreement"] is not None
    base = client.get("/api/v1/models/run.baseline/images/11/metrics").json()
    assert base["map"] == "teacher" and base["agreement"] is None


def test_precompute_fills_a_pickle_free_cache_that_a_new_server_reads(dirs, tmp_path):
    cache = tmp_path / "cache"
    svc = Service([dirs["run"]], cache_dir=cache)
    lines: list[str] = []
    assert svc.precompute(progress=False, log=lines.append) == {"run.baseline": "ok", "run.impactx": "ok"}
    files = sorted(cache.rglob("*.npy"))
    assert files and all(np.load(f, allow_pickle=False).shape[0] == 32 for f in files)
    assert all(json.loads(m.read_text())["material"]["checkpoint_sha256"] for m in cache.rglob("meta.json"))
    fresh = Service([dirs["run"]], cache_dir=cache)
    c = TestClient(create_app(fresh))
    lst = c.get("/api/v1/models/run.impactx/images", params={"sort": "agreement", "order": "desc"}).json()
    assert lst["coverage"] == {"predictions": 32, "morf": 32, "agreement": 32}
    ag = [i["agreement"] for i in lst["items"]]
    assert None not in ag and ag == sorted(ag, reverse=True)
    assert c.get("/api/v1/models/run.impactx/images/3").json()["provenance"]["source"] == "cache"
    assert c.get("/api/v1/models/run.baseline/images/3/maps/teacher").json()["provenance"]["source"] == "cache"
    sel = c.get(
        "/api/v1/models/run.impactx/images", params={"min_agreement": ag[3], "sort": "agreement", "order": "desc"}
    ).json()
    assert sel["total"] == 4


def test_upload(client, service):
    rng = np.random.default_rng(3)
    data = png(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8))
    r = client.post(
        "/api/v1/models/run.impactx/predict",
        files={"file": ("x.png", data, "image/png")},
        data={"method": "gradient_x_input"},
    )
    assert r.status_code == 200, r.text
    u = schemas.UploadResponse.model_validate(r.json())
    assert "resized from 40x50 to 32x32" in u.notice and set(u.maps) == {"built_in", "gradient_x_input"}
    assert u.provenance.upload_sha256 == hashlib.sha256(data).hexdigest() and u.provenance.split is None
    assert u.provenance.dataset == "upload" and u.maps["built_in"].png.startswith("data:image/png;base64,")
    assert u.maps["gradient_x_input"].provenance.method_options["target"] == "predicted"
    # the prediction is the model's on the resized image
    lm = service.loaded("run.impactx")
    arr, _ = service.decode_upload(lm, data)
    with torch.no_grad():
        logits, built = lm.model.forward_all(service._x(lm, arr[None]))
    assert u.predicted == int(logits.argmax())
    np.testing.assert_allclose(np.array(u.maps["built_in"].values), built[0].numpy().ravel(), atol=1e-6)
    jpg = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(jpg, format="JPEG")
    r2 = client.post("/api/v1/models/run.baseline/predict", files={"file": ("g.jpg", jpg.getvalue(), "image/jpeg")})
    assert r2.status_code == 200 and r2.json()["maps"] == {}
    assert r2.json()["notice"] == "converted from greyscale to RGB (the model takes three-channel colour images)"
    same = png(np.zeros((32, 32, 3), np.uint8))
    assert (
        client.post("/api/v1/models/run.baseline/predict", files={"file": ("c.png", same, "image/png")}).json()[
            "notice"
        ]
        == ""
    )


@pytest.mark.parametrize(
    "payload, status, fragment",
    [
        (b"hello, not an image", 415, "not an image"),
        (b"", 400, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "not an image"),
        (b"GIF89a" + b"\xff" * 20, 415, "not an image"),
    ],
)
def test_upload_rejects_non_images(client, payload, status, fragment):
    r = client.post("/api/v1/models/run.impactx/predict", files={"file": ("f.png", payload, "image/png")})
    assert r.status_code == status and fragment in detail(r)


def test_upload_size_limits(client):
    big = b"\x00" * (UPLOAD_LIMIT + 10)
    r = client.post("/api/v1/models/run.impactx/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit" in detail(r)

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(30):
            yield b"y" * 10_000

    r = client.post(
        "/api/v1/models/run.impactx/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 413 and "limit" in detail(r)
    huge = png(np.zeros((7000, 7000), np.uint8))  # 49 megapixels, compresses to a small file
    assert len(huge) < UPLOAD_LIMIT
    r = client.post("/api/v1/models/run.impactx/predict", files={"file": ("huge.png", huge, "image/png")})
    assert r.status_code == 413 and "pixels" in detail(r)
    r = client.post("/api/v1/models/run.impactx/predict", data={"method": "lrp"})
    assert r.status_code == 422


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("/api/v1/models/nope/images", "unknown model 'nope'"),
        ("/api/v1/models/nope", "unknown model"),
        ("/api/v1/models/run.impactx/images/32", "out of range"),
        ("/api/v1/models/run.impactx/images/-1", "out of range"),
        ("/api/v1/models/run.impactx/images/99999/maps/built_in.png", "out of range"),
        ("/api/v1/models/run.impactx/images/0/maps/shapp", "unknown teacher 'shapp'"),
        ("/api/v1/models/run.impactx/images/0/maps/shapp.npy", "unknown teacher"),
        ("/api/v1/models/run.baseline/images/0/maps/built_in", "no built-in map"),
        ("/api/v1/models/run.baseline/images/0/maps/difference", "no built-in map"),
        ("/api/v1/models/run.impactx/images/0/metrics?map=nomethod", "unknown teacher"),
        ("/api/v1/models/..%2f..%2fetc%2fpasswd/images", "nothing at"),
        ("/api/v2/models", "nothing at"),
    ],
)
def test_unknown_names_are_404_with_a_message(client, path, fragment):
    r = client.get(path)
    assert r.status_code == 404 and fragment in detail(r), (r.status_code, r.text)


def test_unknown_upload_model_and_bad_method(client):
    data = png(np.zeros((32, 32, 3), np.uint8))
    r = client.post("/api/v1/models/ghost/predict", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 404 and "unknown model" in detail(r)
    r = client.post(
        "/api/v1/models/run.impactx/predict", files={"file": ("a.png", data, "image/png")}, data={"method": "nope"}
    )
    assert r.status_code == 404 and "unknown teacher" in detail(r)
    assert client.get("/api/v1/models/run.impactx/images/abc").status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2fcatalog.py",
        "/static/..%5capp.py",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/../app.py",
        "/../../pyproject.toml",
        "/static/%252e%252e/app.py",
    ],
)
def test_no_file_outside_the_static_folder(client, path):
    r = client.get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "create_app" not in r.text and "root:" not in r.text and "[project]" not in r.text


def test_page_and_its_files(client):
    page = client.get("/")
    assert (
        page.status_code == 200
        and "/static/app.js" in page.text
        and "script-src 'self'" in page.headers["content-security-policy"]
    )
    for f in ("app.js", "style.css", "index.html"):
        assert client.get(f"/static/{f}").status_code == 200
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/api/v1/health").json()["status"] == "ok"


def test_host_guard(service):
    c = TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1:8765")
    assert c.get("/api/v1/health").status_code == 200
    r = c.get("/api/v1/health", headers={"host": "evil.example:8765"})
    assert r.status_code == 400 and "not served here" in detail(r)


def test_a_damaged_unit_reports_an_error_and_the_others_keep_working(dirs, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(dirs["study"], study)
    svc = Service([study], cache_dir=tmp_path / "cache")
    c = TestClient(create_app(svc))
    ids = {m["role"]: m["id"] for m in c.get("/api/v1/models").json()["models"]}
    ck = study / "units" / ids["lambda0"].split(".", 1)[1] / "checkpoints" / "best.safetensors"
    ck.write_bytes(ck.read_bytes()[:200])  # truncated
    (study / "units" / ids["baseline"].split(".", 1)[1] / "stage.json").write_text("{not json")
    svc = Service([study], cache_dir=tmp_path / "cache")
    c = TestClient(create_app(svc))
    listed = {m["role"]: m for m in c.get("/api/v1/models").json()["models"]}
    assert listed["baseline"]["error"] and "stage" in listed["baseline"]["error"]
    bad = c.get(f"/api/v1/models/{ids['lambda0']}").json()
    assert bad["error"] and "corrupt" in bad["error"]
    r = c.get(f"/api/v1/models/{ids['lambda0']}/images")
    assert r.status_code == 409 and "not available" in detail(r)
    assert c.get(f"/api/v1/models/{ids['baseline']}/images/0").status_code == 409
    assert c.get(f"/api/v1/models/{ids['impactx']}/images/0").status_code == 200
    assert c.get(f"/api/v1/models/{ids['impactx']}/images/0/maps/built_in.png").status_code == 200
    assert c.get("/api/v1/runs").status_code == 200


def test_concurrent_requests_agree_with_sequential_ones(dirs, tmp_path):
    svc = Service([dirs["run"]], cache_dir=tmp_path / "c1")
    jobs = [(i, name) for i in range(6) for name in ("built_in", "teacher", "gradient_x_input", "difference")]
    with ThreadPoolExecutor(8) as pool:
        par = list(pool.map(lambda j: svc.map("run.impactx", *j)[0], jobs))
    seq_svc = Service([dirs["run"]], cache_dir=tmp_path / "c2")
    for (i, name), got in zip(jobs, par):  # concurrent requests share batches: float16 rounding may differ by one step
        want = seq_svc.map("run.impactx", i, name)[0]
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * np.abs(want).max())


# -- the command line ----------------------------------------------------------------------------


def test_cli_without_the_web_stack_says_what_to_install(dirs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    code, _, err = teachx_main(capsys, "serve", str(dirs["run"]))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("teachx: error:") and "pip install 'teachx[serve]'" in err and "uvicorn" in err


def test_cli_bad_directory_and_port(dirs, tmp_path, capsys):
    code, _, err = teachx_main(capsys, "serve", str(tmp_path / "nowhere"))
    assert code == 2 and "not a directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = teachx_main(capsys, "serve", str(tmp_path / "empty"))
    assert code == 2 and "neither a run directory" in err
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        code, _, err = teachx_main(capsys, "serve", str(dirs["run"]), "--port", str(s.getsockname()[1]))
    finally:
        s.close()
    assert code == 2 and "--port" in err and len(err.strip().splitlines()) == 1


def test_cli_precompute_only(dirs, tmp_path, capsys):
    code, out, _ = teachx_main(
        capsys, "serve", str(dirs["run"]), "--precompute", "--no-serve", "-q", "--cache-dir", str(tmp_path / "pc")
    )
    assert code == 0 and "run.impactx: 32 test images cached" in out
    assert len(list((tmp_path / "pc").glob("*/meta.json"))) >= 3  # two view caches + the deepshap maps of each model


def test_bench_serve_helpers_and_its_upload_request(client):
    """bench/bench_serve.py's statistics and the multipart upload it sends (the bench itself is not run here)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("_teachx_bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = bench.summary([0.001 * v for v in range(1, 101)], errors=2, wall_s=2.0)
    assert (
        s["p50_ms"] == pytest.approx(50.5)
        and s["p95_ms"] == pytest.approx(95.05)
        and s["requests"] == 102
        and s["errors"] == 2
    )
    body, headers = bench.multipart(bench.upload_png([32, 32], 3))
    r = client.post("/api/v1/models/run.impactx/predict", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["notice"] == ""
    info = client.get("/api/v1/models/run.impactx").json()
    assert info["n_images"] == 32 and info["error"] is None


def test_cached_answers_take_the_event_loop_path_and_match(dirs, tmp_path):
    """``Service.ready``: true only for rows answered from memory (no loading, no model call); those answers
    come from the event loop and equal what the worker-thread path gave the first time."""
    svc = Service([dirs["run"]], cache_dir=tmp_path / "ready")
    c = TestClient(create_app(svc))
    assert not svc.ready("run.impactx", 3) and not svc.ready("run.impactx", 3, "built_in")  # not even loaded
    first = c.get("/api/v1/models/run.impactx/images/3").json()
    first_map = c.get("/api/v1/models/run.impactx/images/3/maps/built_in").json()
    assert first["provenance"]["source"] == "computed"
    assert svc.ready("run.impactx", 3) and svc.ready("run.impactx", 3, "built_in")
    assert (
        not svc.ready("run.impactx", 4)
        and not svc.ready("run.impactx", 3, "teacher")
        and not svc.ready("run.impactx", 10**6)
    )
    calls = []
    lm = svc.loaded("run.impactx")
    forward_all = lm.model.forward_all
    lm.model.forward_all = lambda x: (calls.append(1), forward_all(x))[1]
    again = c.get("/api/v1/models/run.impactx/images/3").json()
    again_map = c.get("/api/v1/models/run.impactx/images/3/maps/built_in").json()
    assert not calls
    assert again["provenance"]["source"] == again_map["provenance"]["source"] == "cache"
    first["provenance"]["source"] = first_map["provenance"]["source"] = "cache"
    assert again == first and again_map == first_map
    assert (
        c.get("/api/v1/models/run.impactx/images/99999").status_code == 404
    )  # errors keep their status on either path


def test_models_on_the_same_test_split_share_test_data(client, service):
    """``test_data`` (the page's guard before comparing two models on "the same" image) is the loaded split's
    fingerprint: the run's two models share it; it is unknown (null) until a model is loaded."""
    a, b = client.get("/api/v1/models/run.impactx").json(), client.get("/api/v1/models/run.baseline").json()
    assert (
        a["test_data"] and a["test_data"] == b["test_data"] == service.data(service.loaded("run.impactx")).fingerprint
    )
    listed = {m["id"]: m for m in client.get("/api/v1/models").json()["models"]}
    assert all((m["test_data"] is None) == (not m["loaded"]) for m in listed.values())


def test_an_unfinished_study_names_its_units_from_its_study_yaml(dirs, tmp_path):
    """Without study.json (a study still running, or stopped) the units are named from the recorded spec:
    ``unit_names`` computes the runner's own keys, so the names equal the finished study's."""
    from teachx.studies.spec import load_study_dir, unit_names

    finished = {
        m.name: (m.label, m.role, m.info.get("seed"))
        for m in Service([dirs["study"]], cache_dir=tmp_path / "a").runs[0].models
    }
    study = tmp_path / "study"
    shutil.copytree(dirs["study"], study)
    (study / "study.json").unlink()
    running = {
        m.name: (m.label, m.role, m.info.get("seed")) for m in Service([study], cache_dir=tmp_path / "b").runs[0].models
    }
    assert running == finished and {r for _, r, _ in finished.values()} >= {"baseline", "lambda0", "impactx"}
    names = unit_names(load_study_dir(study))
    assert set(names) == {p.name for p in (study / "units").iterdir() if p.is_dir()}  # every unit, no unknown key

    # a unit a worker is still training: named as before, with how far it got instead of a model
    unit = next(m for m in Service([study], cache_dir=tmp_path / "c").runs[0].models if m.role == "lambda0")
    d = study / "units" / unit.name
    hist = json.loads((d / "stage.json").read_text())["history"]
    (d / "stage.json").unlink()
    (d / "history.json").write_text(json.dumps(hist[:1]))
    training = next(m for m in Service([study], cache_dir=tmp_path / "d").runs[0].models if m.name == unit.name)
    assert training.label == unit.label and training.checkpoint is None
    assert "not trained yet (1 epoch trained so far)" in training.error


def test_map_json_values_keep_order_and_turn_non_finite_into_null(client):
    from teachx.service.app import _map_data

    prov = client.get("/api/v1/models/run.impactx/images/0").json()["provenance"]
    m = np.arange(12, dtype=np.float32).reshape(1, 3, 4) - 5.5
    m[0, 1, 2], m[0, 2, 3] = np.nan, np.inf
    d = _map_data("built_in", m, prov)
    want = [None if not np.isfinite(v) else float(v) for v in m.ravel()]
    assert d.values == want and d.shape == [1, 3, 4] and d.min == -5.5 and d.max == 4.5


# -- one explained class per answer --------------------------------------------------------------


def _npy(client, path: str, **params) -> np.ndarray:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_a_wrong_prediction_explains_one_class_in_every_map_and_metric(client, service):
    """On a wrongly predicted image every map, the difference, the agreement and the pixel-flipping curve explain
    one class -- the predicted one by default, the true one with class=label, any with class=K (here on the
    per-class model, whose built-in maps differ by class) -- checked against the maps and metrics computed
    directly for that class; each answer's provenance names it."""
    from teachx.evaluation import PixelFlippingMoRF, map_agreement
    from teachx.service.rows import AGREEMENT

    def check(mid: str, index: int, cls, want: int):
        base = f"/api/v1/models/{mid}/images/{index}"
        params = {} if cls is None else {"class": cls}
        provs = [
            client.get(f"{base}/maps/{n}", params=params).json()["provenance"]
            for n in ("built_in", "teacher", "difference")
        ]
        met = client.get(f"{base}/metrics", params=params).json()
        provs.append(met["provenance"])
        provs += [
            json.loads(client.get(f"{base}/maps/{n}.png", params=params).headers["x-teachx-provenance"])
            for n in ("built_in", "teacher")
        ]
        assert {p["explained_class"] for p in provs} == {want}, provs
        lm = service.loaded(mid)
        assert {p["explained_class_name"] for p in provs} == {lm.class_names[want]}
        built, teacher = (
            _npy(client, f"{base}/maps/built_in.npy", **params),
            _npy(client, f"{base}/maps/teacher.npy", **params),
        )
        x = service._x(lm, service.data(lm).test.images[[index]])
        with torch.no_grad():
            own = lm.model.forward_all(x, torch.tensor([want]))[1][0].numpy()
        np.testing.assert_allclose(built, own, atol=2e-3 * np.abs(own).max())  # the explained class's built-in map
        tmaps, tcfg = service._teacher(lm, lm.cfg.teacher.method)
        direct = service._attribute(lm, tmaps, tcfg, x, torch.tensor([want]))[0].numpy()
        np.testing.assert_allclose(teacher, direct, atol=2e-3 * np.abs(direct).max())  # the teacher method, same class
        agr = map_agreement(torch.from_numpy(built)[None], torch.from_numpy(teacher)[None])
        for k in AGREEMENT:
            assert met["agreement"][k] == pytest.approx(float(agr[k][0]), abs=2e-3), k
        curve = PixelFlippingMoRF(steps=16).curves(lm.model, x, torch.tensor([want]), torch.from_numpy(built)[None])[0]
        np.testing.assert_allclose(met["pixel_flipping"]["curve"], curve.numpy(), atol=2e-3)  # tracks that class
        return met

    wrong = client.get("/api/v1/models/run.impactx/images", params={"correct": "false"}).json()["items"]
    assert wrong
    i = wrong[0]
    default = check("run.impactx", i["index"], None, i["predicted"])
    true = check("run.impactx", i["index"], "label", i["label"])
    assert (
        default["provenance"]["explained_choice"] == "predicted" and true["provenance"]["explained_choice"] == "label"
    )
    assert default["pixel_flipping"]["curve"] != true["pixel_flipping"]["curve"]
    # class=K on the metrics is honoured, and on a per-class model the built-in map of K is the one compared
    pc = _study_model(client, "per_class")
    pred = client.get(f"/api/v1/models/{pc}/images/6").json()["predicted"]
    other = (pred + 1) % 4
    met = check(pc, 6, str(other), other)
    assert met["provenance"]["explained_choice"] == "index" and met != check(pc, 6, None, pred)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/models/run.impactx/images/3/metrics?clas=1",
        "/api/v1/models/run.impactx/images/3/maps/built_in?class=1&explain=label",
        "/api/v1/models/run.impactx/images/3/maps/teacher.png?scale=2&colour=red",
        "/api/v1/models/run.impactx/images?label=1&labl=2",
        "/api/v1/models/run.impactx/images/3?class=1",
        "/api/v1/runs?verbose=1",
        "/api/v1/models/run.impactx/export.npz?indices=1,2&map=teacher",
    ],
)
def test_unknown_query_parameters_are_a_422_naming_the_known_ones(client, path):
    r = client.get(path)
    assert r.status_code == 422, (path, r.status_code, r.text)
    msg = detail(r)
    assert "unknown query parameter" in msg and "/docs" in msg
    unknown = {k for k, _ in [kv.split("=") for kv in path.split("?")[1].split("&")]} - {
        "class",
        "label",
        "scale",
        "indices",
    }
    assert all(u in msg for u in unknown), msg


def test_known_query_parameters_and_the_upload_route_still_work(client):
    assert (
        client.get(
            "/api/v1/models/run.impactx/images/3/metrics", params={"class": "label", "map": "built_in"}
        ).status_code
        == 200
    )
    assert (
        client.get(
            "/api/v1/models/run.impactx/images/3/maps/teacher.png", params={"scale": 2, "vmax": 1, "class": 0}
        ).status_code
        == 200
    )
    data = png(np.zeros((32, 32, 3), np.uint8))
    r = client.post("/api/v1/models/run.impactx/predict?debug=1", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 422 and "debug" in detail(r)
    r = client.post("/api/v1/models/run.impactx/predict", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200 and r.json()["provenance"]["explained_class"] == r.json()["predicted"]
    spec = client.get("/openapi.json").json()["paths"]
    assert "class" in {p["name"] for p in spec["/api/v1/models/{model_id}/images/{index}/metrics"]["get"]["parameters"]}


# -- the model the page opens on -----------------------------------------------------------------


def test_the_default_model_is_the_first_with_built_in_maps(client, dirs, tmp_path):
    from teachx.service.catalog import ModelEntry, RunEntry, default_model

    assert client.get("/api/v1/runs").json()["default_model"] == "run.impactx"  # not run.baseline, listed first
    study_only = Service([dirs["study"]], cache_dir=tmp_path / "c")
    pick = default_model(study_only.runs)
    assert study_only.entries[pick].kind == "impactx"
    entry = lambda i, kind, error=None: ModelEntry(i, "r", i, i, kind, kind, {}, error=error)  # noqa: E731
    assert default_model([RunEntry("r", tmp_path, "run", [entry("a", "classifier"), entry("b", "abn")])]) == "b"
    assert (
        default_model([RunEntry("r", tmp_path, "run", [entry("a", "impactx", "damaged"), entry("b", "classifier")])])
        == "b"
    )
    assert default_model([RunEntry("r", tmp_path, "run", [entry("a", "classifier", "damaged")])]) == "a"
    assert default_model([]) is None


# -- uploads: colour conversion and the size limit's unit ------------------------------------------


def test_upload_notice_names_the_colour_conversion(service, tmp_path):
    """An RGB image given to a greyscale model (and a greyscale one to an RGB model) is converted, and the
    notice says so next to the resizing -- in `teachx serve` and in `teachx explain`."""
    from types import SimpleNamespace

    from teachx.runs.explain import read_image

    grey_model = SimpleNamespace(channels=1, image_size=(32, 32))
    rgb = png(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    arr, notice = service.decode_upload(grey_model, rgb)
    assert arr.shape == (32, 32, 1)
    assert notice == (
        "converted from colour (RGB) to greyscale (the model takes one-channel images); "
        "resized from 40x40 to 32x32 (the model's input size)"
    )
    arr, notice = service.decode_upload(grey_model, png(np.zeros((32, 32), np.uint8)))
    assert notice == ""
    (tmp_path / "c.png").write_bytes(rgb)
    arr, notice = read_image(tmp_path / "c.png", 1, (32, 32))
    assert (
        arr.shape == (32, 32, 1)
        and notice.startswith("c.png: converted from colour (RGB) to greyscale")
        and "resized" in notice
    )


def test_the_upload_limit_is_stated_in_mib_everywhere(service, capsys):
    from teachx.service.app import DEFAULT_MAX_UPLOAD

    c = TestClient(create_app(service))
    r = c.post(
        "/api/v1/models/run.impactx/predict", files={"file": ("big.png", b"\0" * (DEFAULT_MAX_UPLOAD + 1), "image/png")}
    )
    assert r.status_code == 413
    assert "the limit is 10 MiB (10,485,760 bytes)" in detail(r) and " MB" not in detail(r)
    code, out, _ = teachx_main(capsys, "serve", "--help")
    flag = " ".join(out.split())
    assert code == 0 and "upload in MiB (1 MiB = 1,048,576 bytes)" in flag and " MB" not in flag


# -- a one-map model, described the same way by `teachx explain` and `teachx serve` ----------------


def test_one_shared_map_is_described_the_same_in_explain_and_serve(client, dirs, tmp_path):
    from teachx.errors import CheckpointError
    from teachx.runs.explain import explain_images
    from teachx.models import shared_map_text

    text = shared_map_text("impactx")
    assert text == "one built-in map shared by all classes (it was trained without impactx.per_class)"
    img = tmp_path / "x.png"
    img.write_bytes(png(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(CheckpointError) as err:
        list(explain_images(str(dirs["run"]), [str(img)], str(tmp_path / "out"), cls=1))
    assert str(err.value) == f"--class: this IMPACTX model has {text}; drop --class"
    assert not (tmp_path / "out").exists()
    prov = client.get("/api/v1/models/run.impactx/images/0/maps/built_in").json()["provenance"]
    assert prov["method_options"]["classes"] == text
    assert "one built-in map shared by all classes" in shared_map_text("abn")


# -- the per-image trust signal ------------------------------------------------------------------


def _gxi_corr(model, x: torch.Tensor, k: int) -> float:
    """Pearson correlation of the channel-summed built-in map of class k with the channel-summed gradient x input
    of the model's logit k, computed here with autograd and numpy alone."""
    with torch.no_grad():
        built = model.explain(x, torch.tensor([k]))[0].sum(0).numpy().ravel()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[0, k], xg)
    gxi = (grad * x)[0].sum(0).numpy().ravel()
    return float(np.corrcoef(built.astype(np.float64), gxi.astype(np.float64))[0, 1])


def test_trust_is_the_built_in_maps_correlation_with_the_models_own_gradient(client, service):
    """Every image's trust value (list rows, image detail, metrics of another class, uploads) is the Pearson
    correlation of the built-in map with the model's gradient x input, both channel-summed: checked against
    a direct computation; images below the threshold are flagged and the disagrees filter keeps exactly them."""
    model, _ = load_impactx(Path(client.get("/api/v1/models/run.impactx").json()["checkpoint"]))
    rows = schemas.ImageList.model_validate(
        client.get("/api/v1/models/run.impactx/images", params={"limit": 1000}).json()
    )
    assert rows.trust_threshold == 0.0
    for index in (0, 5, 17):
        x, _ = image_tensor(service, index)
        k = int(model(x).argmax(1))
        direct = _gxi_corr(model, x, k)
        item = rows.items[index]
        assert item.trust == pytest.approx(direct, abs=1e-4) and item.disagrees == (direct < 0.0)
        d = schemas.ImageDetail.model_validate(client.get(f"/api/v1/models/run.impactx/images/{index}").json())
        assert d.trust.value == pytest.approx(direct, abs=1e-4) and d.trust.method == "gradient_x_input"
        assert d.trust.explained_class == k and d.trust.disagrees == (direct < 0.0)
    # the filter and the sort
    values = [i.trust for i in rows.items]
    flagged = client.get("/api/v1/models/run.impactx/images", params={"disagrees": "true", "limit": 1000}).json()
    agreeing = client.get("/api/v1/models/run.impactx/images", params={"disagrees": "false", "limit": 1000}).json()
    assert {i["index"] for i in flagged["items"]} == {i for i, v in enumerate(values) if v < 0.0}
    assert flagged["total"] + agreeing["total"] == 32 and all(i["disagrees"] for i in flagged["items"])
    ranked = client.get("/api/v1/models/run.impactx/images", params={"sort": "trust", "limit": 1000}).json()
    assert [i["trust"] for i in ranked["items"]] == sorted(values)
    # a per-class model: the trust of a class other than the predicted one is that class's map vs its gradient
    mid = _study_model(client, "per_class")
    per_class, _ = load_impactx(Path(client.get(f"/api/v1/models/{mid}").json()["checkpoint"]))
    x, _ = image_tensor(service, 3)
    other = (int(per_class(x).argmax(1)) + 1) % 4
    m = schemas.MetricsResponse.model_validate(
        client.get(f"/api/v1/models/{mid}/images/3/metrics", params={"class": other}).json()
    )
    assert m.trust.explained_class == other and m.trust.value == pytest.approx(_gxi_corr(per_class, x, other), abs=1e-4)
    # an upload: the predicted class's built-in map vs its gradient
    img = np.array(service.data(service.loaded("run.impactx")).test.images[5])
    up = schemas.UploadResponse.model_validate(
        client.post("/api/v1/models/run.impactx/predict", files={"file": ("a.png", png(img), "image/png")}).json()
    )
    assert up.trust.value == pytest.approx(rows.items[5].trust, abs=1e-4)
    # in the OpenAPI schema
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert "Trust" in spec and {"trust", "disagrees"} <= set(spec["ImageItem"]["properties"])


def test_trust_threshold_is_configurable_and_models_without_built_in_maps_have_none(dirs, client, tmp_path):
    values = sorted(
        i["trust"] for i in client.get("/api/v1/models/run.impactx/images", params={"limit": 100}).json()["items"]
    )
    threshold = float(np.median(values))
    svc = Service([dirs["run"]], cache_dir=tmp_path / "cache", trust_threshold=threshold)
    flagged = TestClient(create_app(svc)).get("/api/v1/models/run.impactx/images", params={"disagrees": "true"}).json()
    assert flagged["trust_threshold"] == threshold and flagged["total"] == sum(v < threshold for v in values) > 0
    # a plain classifier: no trust value, no flag, and the filter says why it does not apply
    rows = client.get("/api/v1/models/run.baseline/images").json()
    assert rows["trust_threshold"] is None and all(i["trust"] is None and i["disagrees"] is None for i in rows["items"])
    assert client.get("/api/v1/models/run.baseline/images/3").json()["trust"] is None
    assert client.get("/api/v1/models/run.baseline/images/3/metrics").json()["trust"] is None
    r = client.get("/api/v1/models/run.baseline/images", params={"disagrees": "true"})
    assert r.status_code == 400 and "no built-in map" in detail(r)
