"""The reveal view's API in `teachx serve` (teachx/service/reveal.py) on a tiny run with a planted artefact
(tests/_reveal_view_fixtures.py): values checked against the records `teachx reveal` wrote (read here with json
and numpy, independently of the service) and against `teachx reveal --concept` itself; every bad input is a 4xx
with one line and writes nothing; a run directory another command holds is a 409."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="teachx serve needs the 'serve' extra: pip install 'teachx[serve]'")
pytest.importorskip("sklearn")

from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _reveal_view_fixtures import session_fixtures  # noqa: E402

from teachx.service import Service, render  # noqa: E402
from teachx.service.app import create_app  # noqa: E402

API = "/api/v1/runs/run/reveal"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = session_fixtures(tmp_path_factory)
    run = tmp_path_factory.mktemp("reveal-view") / "run"  # a copy: these tests write concepts and reveals
    shutil.copytree(out["run"], run)
    mp = pytest.MonkeyPatch()
    mp.setenv("TEACHX_CACHE", str(out["cache"]))  # the run's decoded data and its LRP maps live there
    yield {**out, "run": run}
    mp.undo()


@pytest.fixture(scope="module")
def service(dirs, tmp_path_factory):
    return Service([dirs["run"]], cache_dir=tmp_path_factory.mktemp("serve-cache"))


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service, max_reveal_images=100))


@pytest.fixture(scope="module")
def saved(dirs) -> tuple[dict, dict]:
    """class 0's record and arrays, read without teachx."""
    base = dirs["run"] / "reveal" / "spray" / "class_0"
    rec = json.loads(base.with_suffix(".json").read_text())
    with np.load(base.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return rec, arrays


@pytest.fixture(scope="module")
def train(dirs):
    """(sorted training indices, labels, images) of the run, from its data plan."""
    from teachx.runs.plan import make_plan
    from teachx.runs.reveal import _check_run_dir

    plan = make_plan(_check_run_dir(dirs["run"]), progress=False)
    return np.sort(plan.train_idx), np.asarray(plan.dataset.train.labels), plan.dataset.train.images


def detail(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    d = r.json()["detail"]
    assert isinstance(d, str) and d and "\n" not in d, d
    return d


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def concept_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "reveal" / "concepts").glob("*")) if (run / "reveal").is_dir() else []


def test_index_lists_classes_methods_and_concepts(client, train):
    idx, labels, _ = train
    r = client.get(API)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["run_id"] == "run" and "spray" in d["methods"] and d["max_reveal_images"] == 100
    assert [c["label"] for c in d["classes"]] == [0, 1, 2]
    assert [c["n_images"] for c in d["classes"]] == [int((labels[idx] == c).sum()) for c in range(3)]
    assert d["classes"][0]["methods"] == ["spray"]


def test_class_is_the_saved_record(client, saved):
    rec, arrays = saved
    d = client.get(f"{API}/spray/classes/0").json()
    assert d["label"] == 0 and d["n_images"] == len(arrays["indices"]) == rec["n_samples"]
    assert d["settings"] == rec["settings"] and d["n_groups_eigengap"] == rec["n_groups_eigengap"]
    pts = d["points"]
    np.testing.assert_array_equal([p["index"] for p in pts], arrays["indices"])
    np.testing.assert_array_equal([p["group"] for p in pts], arrays["labels"])
    np.testing.assert_allclose([p["score"] for p in pts], arrays["scores"])
    np.testing.assert_allclose([[p["x"], p["y"]] for p in pts], arrays["embedding"])
    assert [g["group"] for g in d["groups"]] == rec["ranking"]
    assert [g["rank"] for g in d["groups"]] == list(range(1, len(rec["groups"]) + 1))
    for g, s in zip(d["groups"], rec["groups"]):
        assert (g["size"], g["prototypes"], g["parts"]) == (s["size"], s["prototypes"], s["parts"])
        assert g["score"] == pytest.approx(s["score"])


def test_group_images_are_paged_with_their_maps(client, saved, train, dirs):
    from teachx.runs.reveal import RevealMaps

    rec, arrays = saved
    _, labels, images = train
    group = rec["groups"][0]
    members = group["members"]
    first = client.get(f"{API}/spray/classes/0/groups/{group['group']}/images?limit=5").json()
    second = client.get(f"{API}/spray/classes/0/groups/{group['group']}/images?offset=5&limit=5").json()
    assert [it["index"] for it in first["items"] + second["items"]] == members[:10]
    assert first["size"] == group["size"] and "lrp" in first["map_name"]
    score = dict(zip(arrays["indices"].tolist(), arrays["scores"].tolist()))
    maps = RevealMaps(dirs["run"], rec["settings"])(np.asarray(members[:5]))
    for it, m in zip(first["items"], maps):
        i = it["index"]
        assert it["label"] == labels[i] == 0 and it["score"] == pytest.approx(score[i])
        np.testing.assert_array_equal(decode(it["image_png"]), images[i])
        np.testing.assert_array_equal(decode(it["map_png"]), render.bwr(m.sum(0)))  # the viewer's colour map
        assert it["vmax"] == pytest.approx(np.abs(m).max())
    last = client.get(f"{API}/spray/classes/0/groups/{group['group']}/images?offset={group['size'] - 1}").json()
    assert [it["index"] for it in last["items"]] == members[-1:]


def _check_concept(d: dict, run: Path, name: str, train) -> None:
    """The answer against the saved concept, read without teachx."""
    _, labels, images = train
    rec = json.loads((run / "reveal" / "concepts" / f"{name}.json").read_text())
    with np.load(run / "reveal" / "concepts" / f"{name}.npz") as z:
        a = {k: z[k] for k in z.files}
    assert (d["name"], d["label"], d["layer"], d["source"]) == (name, rec["class"], rec["layer"], rec["source"])
    assert d["n_members"] == len(rec["members"]) and d["n_retrieved"] == rec["n_retrieved"]
    assert d["threshold"] == pytest.approx(rec["retrieval_threshold"])
    assert d["auroc_in_class"] == pytest.approx(rec["auroc_in_class"])
    assert f"layer {rec['layer']}" in d["score_meaning"]
    order = np.argsort(-a["scores"], kind="stable")[: len(d["top"])]
    assert [t["index"] for t in d["top"]] == a["indices"][order].tolist()
    np.testing.assert_allclose([t["score"] for t in d["top"]], a["scores"][order])
    for t in d["top"]:
        assert t["member"] == (t["index"] in rec["members"]) and t["label"] == labels[t["index"]]
        assert t["above_threshold"] == (t["score"] >= rec["retrieval_threshold"])
    assert [x["index"] for x in d["localised"]] == a["localised"][: len(d["localised"])].tolist()
    for k, x in enumerate(d["localised"]):
        heat = a["heatmaps"][k].astype(np.float32)
        np.testing.assert_array_equal(decode(x["heatmap_png"]), render.bwr(heat))
        np.testing.assert_array_equal(decode(x["mask_png"]) > 0, a["masks"][k])
        np.testing.assert_array_equal(decode(x["image_png"]), images[x["index"]])


def test_concept_of_a_group_is_what_teachx_reveal_saves(client, saved, dirs, train, tmp_path):
    from teachx.runs.reveal import reveal_run

    rec, _ = saved
    top = rec["groups"][0]
    r = client.post(f"{API}/concepts", json={"class": 0, "group": top["group"], "name": "grp"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["source"] == f"group {top['group']}" and d["n_members"] == top["size"] and len(d["top"]) == 24
    assert len(d["localised"]) == 8 and any("concept 'grp'" in n for n in d["notes"])
    _check_concept(d, dirs["run"], "grp", train)
    # the same concept by the CLI's code on a copy of the run: the same direction and scores
    other = tmp_path / "run"
    shutil.copytree(dirs["run"], other)
    former = {"method": "spray", "features": "layer", "rank": "method"}  # how the fixture revealed class 0
    for _ in reveal_run(
        other, classes=[0], concept=str(top["group"]), name="grp", progress=False, log=lambda _m: 0, **former
    ):
        pass
    for key in ("cav", "scores", "members", "localised"):
        with np.load(dirs["run"] / "reveal/concepts/grp.npz") as a, np.load(other / "reveal/concepts/grp.npz") as b:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    again = client.get(f"{API}/concepts/grp?top=5&localised=2").json()
    assert len(again["top"]) == 5 and len(again["localised"]) == 2 and again["top"] == d["top"][:5]
    listed = client.get(API).json()["concepts"]
    assert {"name": "grp", "label": 0, "source": f"group {top['group']}", "layer": "body"}.items() <= next(
        c for c in listed if c["name"] == "grp"
    ).items()


def test_concept_of_marked_images(client, saved, dirs, train):
    _, arrays = saved
    marked = arrays["indices"][[5, 1, 9, 1]].tolist()  # a repeat counts once
    r = client.post(f"{API}/concepts", json={"class": 0, "indices": marked, "name": "marked-3"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["source"] == "marked" and d["n_members"] == 3
    _check_concept(d, dirs["run"], "marked-3", train)
    assert json.loads((dirs["run"] / "reveal/concepts/marked-3.json").read_text())["members"] == sorted(set(marked))


def test_bad_input_is_one_line_and_writes_nothing(client, saved, dirs, train):
    idx, labels, _ = train
    rec, arrays = saved
    run = dirs["run"]
    before = concept_files(run)
    other = int(idx[labels[idx] == 1][0])
    own = arrays["indices"][:3].tolist()
    assert "unknown run 'nope'" in detail(client.get("/api/v1/runs/nope/reveal"), 404)
    assert "unknown class 7" in detail(client.get(f"{API}/spray/classes/7"), 404)
    assert "unknown reveal method 'sprai'" in detail(client.get(f"{API}/sprai/classes/0"), 404)
    msg = detail(client.get(f"{API}/spray/classes/1"), 404)
    assert "no spray reveal yet" in msg and f"teachx reveal {run} --class 1" in msg
    assert "has no group 99" in detail(client.get(f"{API}/spray/classes/0/groups/99/images"), 404)
    assert "limt" in detail(client.get(f"{API}/spray/classes/0/groups/0/images?limt=3"), 422)
    assert client.get(f"{API}/spray/classes/0/groups/0/images?limit=1000").status_code == 422
    post = lambda body: client.post(f"{API}/concepts", json={"name": "x", **body})  # noqa: E731
    assert "unknown class 5" in detail(post({"class": 5, "group": 0}), 404)
    assert "no spray reveal yet" in detail(post({"class": 2, "group": 0}), 404)
    assert "has no group 42" in detail(post({"class": 0, "group": 42}), 404)
    assert "at least 2" in detail(post({"class": 0, "indices": [own[0], own[0]]}), 422)
    msg = detail(post({"class": 0, "indices": [own[0], other]}), 422)
    assert f"image {other} belongs to class 1" in msg and "not class 0" in msg
    assert "not a training image" in detail(post({"class": 0, "indices": [own[0], 10**6]}), 422)
    assert "either a group" in detail(post({"class": 0, "group": 0, "indices": own}), 422)
    assert "either a group" in detail(post({"class": 0}), 422)
    assert "leave at least 2 outside it" in detail(post({"class": 0, "indices": arrays["indices"].tolist()}), 422)
    assert "name 'a b'" in detail(client.post(f"{API}/concepts", json={"class": 0, "group": 0, "name": "a b"}), 422)
    msg = detail(post({"class": 0, "group": 0, "layer": "head"}), 422)
    assert "revealed at layer body" in msg and "--layer head" in msg
    assert (
        client.post(f"{API}/concepts", json={"class": 0, "indices": list(range(20_000)), "name": "big"}).status_code
        == 422
    )
    assert "no concept named 'nope'" in detail(client.get(f"{API}/concepts/nope"), 404)
    assert concept_files(run) == before


def test_a_used_name_needs_replace(client, dirs):
    body = {"class": 0, "group": 0, "name": "twice"}
    assert client.post(f"{API}/concepts", json=body).status_code == 200
    stamp = (dirs["run"] / "reveal/concepts/twice.json").stat().st_mtime_ns
    msg = detail(client.post(f"{API}/concepts", json={**body, "group": 1}), 409)
    assert "'twice' is saved already" in msg
    assert (dirs["run"] / "reveal/concepts/twice.json").stat().st_mtime_ns == stamp
    r = client.post(f"{API}/concepts", json={**body, "group": 1, "replace": True})
    assert r.status_code == 200 and r.json()["source"] == "group 1"


def test_a_held_run_directory_is_409_and_untouched(client, dirs):
    from teachx.runs.rundir import hold_run_dir

    run = dirs["run"]
    before = concept_files(run)
    with hold_run_dir(run, log=lambda _m: None):
        msg = detail(client.post(f"{API}/concepts", json={"class": 0, "group": 0, "name": "held"}), 409)
        assert str(run) in msg
        detail(client.post(f"{API}/spray/classes/2"), 409)
    assert concept_files(run) == before and not (run / "reveal/spray/class_2.json").exists()


def test_reveal_a_class_from_the_view(client, dirs, service, train):
    idx, labels, _ = train
    run = dirs["run"]
    small = TestClient(create_app(service, max_reveal_images=10))
    msg = detail(small.post(f"{API}/spray/classes/1"), 422)
    assert f"{int((labels[idx] == 1).sum())} training images" in msg and f"teachx reveal {run} --class 1" in msg
    assert not (run / "reveal/spray/class_1.json").exists()
    r = client.post(f"{API}/spray/classes/1")
    assert r.status_code == 200, r.text
    rec = json.loads((run / "reveal/spray/class_1.json").read_text())
    d = r.json()
    assert d["label"] == 1 and [g["group"] for g in d["groups"]] == rec["ranking"]
    assert d == client.get(f"{API}/spray/classes/1").json()
    assert client.get(API).json()["classes"][1]["methods"] == ["spray"]
    # with the settings of the class revealed already (one folder, one reveal), not the defaults
    assert rec["settings"] == json.loads((run / "reveal/spray/class_0.json").read_text())["settings"]
    assert d["score_name"] == "suspicion score" and d["score_meaning"].startswith("Score: the group's mean silhouette")


def test_a_reveal_ranked_by_specificity_is_labelled_so(client, dirs):
    """A class revealed with the defaults of `teachx reveal` (every layer, ranked by specificity): its scores are
    named specificities, and a concept from it is fitted at one layer, any the request names."""
    run = dirs["run"]
    r = client.post(f"{API}/spray_latent/classes/0")
    assert r.status_code == 200, r.text
    d = r.json()
    rec = json.loads((run / "reveal/spray_latent/class_0.json").read_text())
    assert rec["settings"]["features"] == "stack" and rec["settings"]["rank"] == "specificity"
    assert d["score_name"] == "specificity" and d["score_meaning"].startswith("Specificity: ")
    for g, s in zip(d["groups"], rec["groups"]):
        assert g["score"] == pytest.approx(s["parts"]["specificity"]) and 0 <= g["score"] <= 1
    body = {"method": "spray_latent", "class": 0, "group": d["groups"][0]["group"], "name": "spec"}
    c = client.post(f"{API}/concepts", json=body)
    assert c.status_code == 200 and c.json()["layer"] == "neck", c.text
    c = client.post(f"{API}/concepts", json={**body, "name": "spec4", "layer": "body.4"})
    assert c.status_code == 200 and c.json()["layer"] == "body.4", c.text
    assert json.loads((run / "reveal/spray_latent/class_0.json").read_text())["key"] == rec["key"]


def test_openapi_publishes_the_reveal_contract(client):
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/v1/runs/{run_id}/reveal",
        "/api/v1/runs/{run_id}/reveal/{method}/classes/{label}",
        "/api/v1/runs/{run_id}/reveal/{method}/classes/{label}/groups/{group}/images",
        "/api/v1/runs/{run_id}/reveal/concepts",
        "/api/v1/runs/{run_id}/reveal/concepts/{name}",
    ):
        assert path in spec["paths"], path
    for model in ("RevealIndex", "RevealClass", "GroupImages", "ConceptRequest", "ConceptSummary"):
        assert model in spec["components"]["schemas"], model
    assert "409" in spec["paths"]["/api/v1/runs/{run_id}/reveal/concepts"]["post"]["responses"]
