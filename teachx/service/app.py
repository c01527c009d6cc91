"""The web layer of `teachx serve`: a thin FastAPI app over :class:`teachx.service.engine.Service`.

Why one file of over 500 lines: every route of the versioned API is declared here, next to
the checks and answers they share, so that the routes and the OpenAPI schema read as one contract.


- ``/api/v1/...``: the JSON API (typed by :mod:`teachx.service.schemas`; schema at ``/openapi.json``,
  browsable at ``/docs``); maps also as PNG and ``.npy`` with the provenance in the
  ``X-Teachx-Provenance`` header;
- ``/``: the page, and ``/static/...``: its files, served from this package's ``static`` folder
  only (Starlette's ``StaticFiles`` refuses paths that resolve outside it).

Bad input is a 4xx with a one-line ``detail``: unknown model, index or method 404; a model whose
checkpoint or data cannot be used 409; a method that fails on a model, or a query parameter the
route does not take, 422 (a misspelt parameter is never silently ignored); an upload over the size
limit 413 (checked from ``Content-Length`` and while the body streams in); a file that is not an
image 415. Anything else is a 500 with a one-line message, never a traceback.

Every answer about one test image explains one class, the predicted one unless ``class=label``
(the true class) or ``class=K`` asks for another; its provenance names it (``explained_class``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from teachx.errors import TeachxError
from teachx.service import render, reveal
from teachx.service.catalog import default_model
from teachx.service.engine import Service
from teachx.service.errors import ServiceError
from teachx.service.loading import teachx_version
from teachx.service.metrics import SORT_KEYS
from teachx.service.schemas import (
    ErrorResponse,
    Health,
    ImageDetail,
    ImageList,
    MapData,
    MetricsResponse,
    ModelInfo,
    ModelsResponse,
    RunsResponse,
    TeachersResponse,
    UploadResponse,
)
from teachx.teachers import TEACHERS

STATIC = Path(__file__).parent / "static"
API = "/api/v1"
MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD = 10 * MIB
GRID_MAX = 64  # images in one exported PNG grid (a figure, not a bulk export: that is export.npz)
log = logging.getLogger("teachx.serve")

ERRORS = {
    404: {"model": ErrorResponse, "description": "unknown model, image index or method"},
    409: {
        "model": ErrorResponse,
        "description": "the model or its test data cannot be used (damaged checkpoint, missing dataset)",
    },
    422: {"model": ErrorResponse, "description": "bad parameters, or the method failed on this model"},
}

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class _Guard:
    """Pure ASGI middleware (no task groups, so errors keep their status):

    - requests for a Host not in ``allowed_hosts`` (when given) get 400: a page on another site
      that rebinds its DNS name to 127.0.0.1 cannot read this API;
    - request bodies over ``max_bytes`` get 413, from ``Content-Length`` before anything is read,
      or while a body without one streams in;
    - every response gets security headers (a content security policy for the page, nosniff).
    """

    def __init__(self, app, max_bytes: int, allowed_hosts: Optional[list[str]] = None):
        self.app, self.max_bytes, self.allowed_hosts = app, int(max_bytes), allowed_hosts

    def _message(self) -> str:
        return upload_limit_message(self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed_hosts:
                return await JSONResponse(
                    {"detail": f"host '{host}' is not served here; open the URL teachx serve printed"}, status_code=400
                )(scope, receive, send)
        try:
            too_big = int(headers.get(b"content-length", b"0")) > self.max_bytes
        except ValueError:
            too_big = False
        if too_big:
            return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        async def secured(message):
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", CSP.encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await self.app(scope, counted, secured)


def upload_limit_message(max_bytes: int) -> str:
    """The 413 answer's text, in the unit of ``teachx serve --max-upload-mb`` (MiB, 1,048,576 bytes)."""
    return (
        f"upload too large: the limit is {max_bytes / MIB:.4g} MiB ({max_bytes:,} bytes); send a smaller file "
        "or start teachx serve with a larger --max-upload-mb"
    )


def _query_names(dependant) -> set[str]:
    """The query parameters a route declares, its dependencies' included."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


class _KnownQuery:
    """Pure ASGI middleware: a query parameter that the matched API route does not declare is a 422 naming
    the ones it takes, instead of being ignored (``?clas=3`` would otherwise answer for another class).
    The routes' declared parameters -- what ``/openapi.json`` publishes -- are the contract."""

    def __init__(self, app, routes: list):
        self.app, self.routes = app, routes
        self._known: dict[int, tuple[str, frozenset[str]]] = {}

    def _declared(self, scope) -> Optional[tuple[str, frozenset[str]]]:
        for route in self.routes:
            if isinstance(route, APIRoute) and route.include_in_schema and route.matches(scope)[0] == Match.FULL:
                if id(route) not in self._known:
                    names = frozenset(_query_names(route.dependant))
                    self._known[id(route)] = (route.path, names)
                return self._known[id(route)]
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("query_string"):
            from urllib.parse import parse_qsl

            given = {k for k, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)}
            declared = self._declared(scope) if given else None
            if declared is not None and given - declared[1]:
                path, names = declared
                unknown = ", ".join(sorted(given - names))
                takes = f"it takes {', '.join(sorted(names))}" if names else "it takes none"
                return await JSONResponse(
                    {"detail": f"unknown query parameter(s) {unknown} for {path}: {takes} (see /docs)"}, status_code=422
                )(scope, receive, send)
        return await self.app(scope, receive, send)


def _prov_header(prov: dict) -> dict[str, str]:
    return {"X-Teachx-Provenance": json.dumps(prov, ensure_ascii=True, separators=(",", ":"), default=str)}


def _map_data(name: str, m: np.ndarray, prov: dict, png: bool = False) -> MapData:
    ok = np.isfinite(m)
    finite = m[ok]
    values = m.astype(np.float64).ravel().tolist()  # one C call; non-finite values (rare) become null
    if finite.size != m.size:
        values = [v if b else None for v, b in zip(values, ok.ravel().tolist())]
    return MapData(
        name=name,
        method=prov.get("method"),
        shape=list(m.shape),
        vmax=render.symmetric_vmax(m),
        min=float(finite.min()) if finite.size else None,
        max=float(finite.max()) if finite.size else None,
        values=values,
        png=render.data_url(render.map_png(m)) if png else None,
        provenance=prov,
    )


async def _answer(ready: bool, fn, *args):
    """Answers from the cache run on the event loop (no thread hand-off: ~0.1 ms of work); anything that
    may load a model or compute goes to the worker threads, so the loop never blocks on it."""
    return fn(*args) if ready else await run_in_threadpool(fn, *args)


def create_app(
    service: Service,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    allowed_hosts: Optional[list[str]] = None,
    max_reveal_images: int = reveal.DEFAULT_MAX_REVEAL_IMAGES,
) -> FastAPI:
    """The app for ``service``; ``allowed_hosts`` (e.g. loopback names) guards against DNS rebinding."""
    app = FastAPI(
        title="teachx serve",
        version=teachx_version(),
        description="Explanations of teachx runs and studies: predictions, built-in and teacher maps, "
        "faithfulness and agreement metrics, uploads; every answer with its provenance.",
    )
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"nothing at '{request.url.path}'; the API lives under {API} (see /docs), the page at /"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(TeachxError)
    async def _teachx_error(_request: Request, exc: TeachxError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.exception("teachx serve: internal error")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server's log"}, status_code=500)

    app.add_middleware(_KnownQuery, routes=app.router.routes)  # the list itself: routes added below count too
    app.add_middleware(_Guard, max_bytes=max_upload_bytes, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get(f"{API}/health", response_model=Health)
    def health():
        return Health(status="ok", teachx_version=teachx_version(), models=len(service.entries))

    @app.get(f"{API}/runs", response_model=RunsResponse)
    def runs():
        """Every run and study directory served, with its models (config, test accuracy, errors)."""
        return {
            "teachx_version": teachx_version(),
            "default_model": default_model(service.runs),
            "runs": [
                {
                    "id": r.id,
                    "path": str(r.path),
                    "kind": r.kind,
                    "summary": r.summary,
                    "error": r.error,
                    "models": [service.model_info(m.id) for m in r.models],
                }
                for r in service.runs
            ],
        }

    @app.get(f"{API}/models", response_model=ModelsResponse)
    def models():
        return {"models": [service.model_info(mid) for mid in service.entries]}

    @app.get(f"{API}/models/{{model_id}}", response_model=ModelInfo, responses=ERRORS)
    def model(model_id: str):
        """One model; loads it and its test data, so a damaged checkpoint or missing data shows up in ``error``."""
        return service.model_info(model_id, load=True)

    @app.get(f"{API}/teachers", response_model=TeachersResponse)
    def teachers():
        out = []
        for name in TEACHERS.names():
            doc = (TEACHERS.get(name).__doc__ or "").strip().splitlines()
            out.append({"name": name, "description": doc[0] if doc else ""})
        return {"methods": out, "map_names": ["built_in", "teacher", "difference"]}

    def _list(
        model_id,
        label,
        predicted,
        correct,
        min_agreement,
        max_agreement,
        min_morf,
        max_morf,
        sort,
        order,
        offset,
        limit,
        disagrees=None,
    ):
        return service.list_images(
            model_id,
            label=label,
            predicted=predicted,
            correct=correct,
            min_agreement=min_agreement,
            max_agreement=max_agreement,
            min_morf=min_morf,
            max_morf=max_morf,
            disagrees=disagrees,
            sort=sort,
            order=order,
            offset=offset,
            limit=limit,
        )

    filters = dict(
        label=Query(None, ge=0, description="true class index"),
        predicted=Query(None, ge=0, description="predicted class index"),
        correct=Query(None, description="true: correctly classified only; false: errors only"),
        min_agreement=Query(None),
        max_agreement=Query(None),
        min_morf=Query(None),
        max_morf=Query(None),
        disagrees=Query(
            None,
            description="true: only images whose built-in map disagrees with the model's gradient (trust below the "
            "threshold); false: only those that agree (models with a built-in map)",
        ),
        sort=Query("index", description=f"one of {', '.join(SORT_KEYS)}"),
        order=Query("asc", pattern="^(asc|desc)$"),
        offset=Query(0, ge=0),
        limit=Query(100, ge=1, le=1000),
    )

    @app.get(f"{API}/models/{{model_id}}/images", response_model=ImageList, responses=ERRORS)
    def images(
        model_id: str,
        label: Optional[int] = filters["label"],
        predicted: Optional[int] = filters["predicted"],
        correct: Optional[bool] = filters["correct"],
        min_agreement: Optional[float] = filters["min_agreement"],
        max_agreement: Optional[float] = filters["max_agreement"],
        min_morf: Optional[float] = filters["min_morf"],
        max_morf: Optional[float] = filters["max_morf"],
        disagrees: Optional[bool] = filters["disagrees"],
        sort: str = filters["sort"],
        order: str = filters["order"],
        offset: int = filters["offset"],
        limit: int = filters["limit"],
    ):
        """Test images with their prediction and cached metrics, filtered and sorted.

        Agreement and MoRF filters and sorts use the images whose metrics are cached
        (``coverage``); `teachx serve --precompute` fills them for the whole split. The trust value (the
        built-in map's correlation with the model's gradient x input) is computed for the images of the page,
        and for every image when the list is filtered (``disagrees``) or sorted by it.
        """
        return _list(
            model_id,
            label,
            predicted,
            correct,
            min_agreement,
            max_agreement,
            min_morf,
            max_morf,
            sort,
            order,
            offset,
            limit,
            disagrees,
        )

    @app.get(f"{API}/models/{{model_id}}/images.csv", responses=ERRORS, response_class=Response)
    def images_csv(
        model_id: str,
        label: Optional[int] = filters["label"],
        predicted: Optional[int] = filters["predicted"],
        correct: Optional[bool] = filters["correct"],
        min_agreement: Optional[float] = filters["min_agreement"],
        max_agreement: Optional[float] = filters["max_agreement"],
        min_morf: Optional[float] = filters["min_morf"],
        max_morf: Optional[float] = filters["max_morf"],
        disagrees: Optional[bool] = filters["disagrees"],
        sort: str = filters["sort"],
        order: str = filters["order"],
    ):
        """The same selection as CSV (all matching images), provenance in the header."""
        res = _list(
            model_id,
            label,
            predicted,
            correct,
            min_agreement,
            max_agreement,
            min_morf,
            max_morf,
            sort,
            order,
            0,
            10**9,
            disagrees,
        )
        buf = io.StringIO()
        w = csv.writer(buf)
        cols = [
            "index",
            "label",
            "predicted",
            "correct",
            "confidence",
            "true_prob",
            "agreement",
            "morf_auc",
            "trust",
            "disagrees",
        ]
        w.writerow(cols + ["label_name", "predicted_name"])
        for it in res["items"]:
            w.writerow(
                [("" if it[c] is None else it[c]) for c in cols]
                + [res["class_names"][it["label"]], res["class_names"][it["predicted"]]]
            )
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers={
                **_prov_header(res["provenance"]),
                "Content-Disposition": f'attachment; filename="{model_id}-images.csv"',
            },
        )

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}", response_model=ImageDetail, responses=ERRORS)
    async def image(model_id: str, index: int):
        """One test image: prediction, class probabilities, which maps exist, cached metrics."""
        return await _answer(service.ready(model_id, index), service.image, model_id, index)

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}/input.png", responses=ERRORS, response_class=Response)
    def input_png(model_id: str, index: int, scale: int = Query(1, ge=1, le=16)):
        img = service.input_image(model_id, index)
        lm = service.loaded(model_id)
        return Response(
            render.png_bytes(img, scale),
            media_type="image/png",
            headers={**_prov_header(service.provenance(lm, index=index)), "Cache-Control": "max-age=3600"},
        )

    map_name = PathParam(
        description="built_in | teacher (the run's method on this model) | difference (built_in - teacher) | a teacher method"
    )

    def explained_class():
        return Query(
            None,
            alias="class",
            pattern=r"^(predicted|label|[0-9]+)$",
            description="the class explained: predicted (the default), label (the true class) or a class index; "
            "every map, difference, agreement and curve of the answer is of this class",
        )

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}/maps/{{name}}.png", responses=ERRORS, response_class=Response)
    async def map_png(
        model_id: str,
        index: int,
        name: str = map_name,
        scale: int = Query(1, ge=1, le=16),
        vmax: Optional[float] = Query(None, gt=0, description="colour scale; default max |map|"),
        cls: Optional[str] = explained_class(),
    ):
        """A map as a PNG, bwr colour map symmetric around 0."""
        m, prov = await _answer(
            cls is None and service.ready(model_id, index, name), service.map, model_id, index, name, cls
        )

        def png() -> Response:
            return Response(
                render.map_png(m, vmax, scale),
                media_type="image/png",
                headers={**_prov_header(prov), "X-Teachx-Vmax": repr(vmax or render.symmetric_vmax(m))},
            )

        return await _answer(scale <= 4, png)  # a large PNG takes milliseconds to encode: not on the event loop

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}/maps/{{name}}.npy", responses=ERRORS, response_class=Response)
    async def map_npy(model_id: str, index: int, name: str = map_name, cls: Optional[str] = explained_class()):
        """A map as a float32 (C, H, W) ``.npy`` array (read with ``np.load(f, allow_pickle=False)``)."""
        m, prov = await _answer(
            cls is None and service.ready(model_id, index, name), service.map, model_id, index, name, cls
        )
        return Response(
            render.npy_bytes(m.astype(np.float32)),
            media_type="application/octet-stream",
            headers={
                **_prov_header(prov),
                "Content-Disposition": f'attachment; filename="{model_id}-{index}-{name}.npy"',
            },
        )

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}/maps/{{name}}", response_model=MapData, responses=ERRORS)
    async def map_json(model_id: str, index: int, name: str = map_name, cls: Optional[str] = explained_class()):
        """A map as JSON: shape, symmetric scale and the row-major values."""
        m, prov = await _answer(
            cls is None and service.ready(model_id, index, name), service.map, model_id, index, name, cls
        )
        return _map_data(name, m, prov)

    @app.get(f"{API}/models/{{model_id}}/images/{{index}}/metrics", response_model=MetricsResponse, responses=ERRORS)
    def metrics(
        model_id: str,
        index: int,
        map: Optional[str] = Query(None, description="map to evaluate; default the model's primary map"),
        cls: Optional[str] = explained_class(),
    ):
        """Pixel-flipping (MoRF) curve of a map and, for IMPACTX, built-in vs teacher agreement, all of the explained
        class: the curve ranks pixels by that class's map and tracks that class's probability."""
        return service.metrics(model_id, index, map, cls)

    def _selection(indices: str, maps: str, most: int) -> tuple[list[int], list[str]]:
        """Parse an export's comma-separated indices and map names; 422 with a message when off."""
        try:
            idx = [int(s) for s in indices.split(",") if s.strip()]
        except ValueError:
            raise HTTPException(422, "indices must be comma-separated integers, e.g. 0,5,17") from None
        names = [s.strip() for s in maps.split(",") if s.strip()]
        if not idx or len(idx) > most or not names or len(names) > 8:
            raise HTTPException(422, f"give 1 to {most} indices and 1 to 8 map names")
        return idx, names

    def _selection_prov(prov: Optional[dict], names: list[str]) -> dict:
        """The provenance of an export of several images: each explains its own class when chosen as
        predicted or label, so only a class index is one class for all."""
        prov = {**(prov or {}), "index": None, "method": ",".join(names)}
        if prov.get("explained_choice") != "index":
            prov.update(explained_class=None, explained_class_name=None)
        return prov

    @app.get(f"{API}/models/{{model_id}}/export.npz", responses=ERRORS, response_class=Response)
    def export_npz(
        model_id: str,
        indices: str = Query(..., description="comma-separated test indices (at most 1000)"),
        maps: str = Query("built_in,teacher", description="comma-separated map names"),
        cls: Optional[str] = explained_class(),
    ):
        """Maps of a selection as an NPZ (``np.load(f, allow_pickle=False)``): one (K, C, H, W) array per map, plus ``index``."""
        idx, names = _selection(indices, maps, 1000)
        arrays: dict[str, np.ndarray] = {"index": np.asarray(idx, dtype=np.int64)}
        prov = None
        for name in names:
            rows = []
            for i in idx:
                m, prov = service.map(model_id, i, name, cls)
                rows.append(m.astype(np.float32))
            arrays[name] = np.stack(rows)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return Response(
            buf.getvalue(),
            media_type="application/octet-stream",
            headers={
                **_prov_header(_selection_prov(prov, names)),
                "Content-Disposition": f'attachment; filename="{model_id}-maps.npz"',
            },
        )

    @app.get(f"{API}/models/{{model_id}}/export.png", responses=ERRORS, response_class=Response)
    def export_png(
        model_id: str,
        indices: str = Query(..., description=f"comma-separated test indices (at most {GRID_MAX})"),
        maps: str = Query("built_in,teacher", description="comma-separated map names, one column each"),
        cls: Optional[str] = explained_class(),
    ):
        """A selection as one PNG figure: a row per image (true -> predicted class), the input and one column per
        map on a symmetric blue-white-red scale with a colour bar -- for a paper or a slide."""
        idx, names = _selection(indices, maps, GRID_MAX)
        columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
        images, labels, prov = [], [], None
        for i in idx:
            d = service.image(model_id, i)
            images.append(service.input_image(model_id, i))
            labels.append(f"#{i} {d['label_name']}" + ("" if d["correct"] else f" -> {d['predicted_name']}"))
            for name in names:
                m, prov = service.map(model_id, i, name, cls)
                columns[name].append(m.astype(np.float32))
        png = render.grid_png(np.stack(images), {n: np.stack(v) for n, v in columns.items()}, labels)
        return Response(
            png,
            media_type="image/png",
            headers={
                **_prov_header(_selection_prov(prov, names)),
                "Content-Disposition": f'attachment; filename="{model_id}-grid.png"',
            },
        )

    @app.post(
        f"{API}/models/{{model_id}}/predict",
        response_model=UploadResponse,
        responses={
            **ERRORS,
            413: {"model": ErrorResponse, "description": "upload over the size limit"},
            415: {"model": ErrorResponse, "description": "not an image Pillow can read"},
        },
    )
    def predict(
        model_id: str,
        file: UploadFile = File(..., description="a PNG/JPEG/... image"),
        method: Optional[str] = Form(None, description="also a teacher map: a method name or 'teacher'"),
    ):
        """Upload an image: prediction, class probabilities, built-in map (IMPACTX) and optionally a teacher map."""
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, upload_limit_message(max_upload_bytes))
        res = service.predict_upload(model_id, data, method or None)
        res["image_png"] = render.data_url(render.png_bytes(res.pop("image")))
        res["maps"] = {name: _map_data(name, m, prov, png=True) for name, (m, prov) in res["maps"].items()}
        return res

    reveal.mount(app, service, max_reveal_images)  # the reveal view: /api/v1/runs/{run_id}/reveal/...
    return app
