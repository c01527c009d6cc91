"""`teachx serve` responsiveness: p50/p95 latency under 1 and 16 concurrent clients, and memory.

Starts `teachx serve RUN_DIR --port 0` (a fresh cache folder, 127.0.0.1 only), picks the run's
IMPACTX model, and measures with bounded loops of HTTP requests from this process:

- ``cached_view``: ``GET /images/{i}`` (prediction, probabilities, cached metrics) of images already
  in the cache;
- ``cached_map``: ``GET /images/{i}/maps/built_in`` (JSON values) of cached images;
- ``uncached_built_in``: ``GET /images/{i}/maps/built_in`` of images never asked for: one forward
  pass (prediction + built-in map), written to the cache;
- ``upload``: ``POST /predict`` of a PNG at the model's input size (prediction + built-in map);
- ``deepshap``: ``GET /images/{i}/maps/deepshap`` of images never asked for (computed on demand);
- ``list_page`` (measured last): the grid's list, ``GET /images?sort=confidence&order=desc&correct=false``,
  pages of 120 at every offset over the whole test split, after one cold first page (``list_cold``:
  predictions for every test image computed then).

Each scenario runs with every ``--clients`` count (threads with one keep-alive connection each;
uncached scenarios never repeat an index). ``memory`` samples the server's resident memory
(/proc/PID/status) every 1,000 of ``--memory-requests`` cached requests at the largest client
count: flat means no growth with the number of requests. Targets (issue 15): cached view p95
<= 20 ms, built-in map of an uncached image p95 <= 50 ms at 16 clients, no errors, memory flat.
Results are merged (by ``--label``) into bench/results/serve.json, written atomically.

    python bench/bench_serve.py teachx-demo --label demo
    python bench/bench_serve.py runs/c --label cifar10-lenet5 [--clients 1 16] [--requests 400]
        [--uncached 400] [--deepshap 40] [--uploads 200] [--memory-requests 10000] [--threads N]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
HOST = "127.0.0.1"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summary(latencies_s: list[float], errors: int, wall_s: float) -> dict:
    ms = [1000 * v for v in latencies_s]
    return {
        "requests": len(ms) + errors,
        "errors": errors,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": float(np.mean(ms)) if ms else float("nan"),
        "max_ms": max(ms) if ms else float("nan"),
        "requests_per_s": (len(ms) + errors) / wall_s if wall_s > 0 else float("nan"),
    }


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (never anything else)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=300)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=300)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def run_load(port: int, jobs: list, clients: int, send) -> dict:
    """``send(client, job) -> status``; ``jobs`` dealt to ``clients`` threads; latency per request."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    chunks = [jobs[i::clients] for i in range(clients)]

    def worker(chunk):
        c = Client(port)
        mine, bad = [], 0
        try:
            for job in chunk:
                t0 = time.perf_counter()
                status = send(c, job)
                dt = time.perf_counter() - t0
                if status == 200:
                    mine.append(dt)
                else:
                    bad += 1
        finally:
            c.close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, chunks))
    return summary(lat, errors[0], time.perf_counter() - t0)


def rss_kb(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def start_server(run_dir: str, cache: Path, threads: int | None) -> tuple[subprocess.Popen, int, Path]:
    log = cache / "serve.log"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["TEACHX_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-m",
        "teachx",
        "serve",
        run_dir,
        "--host",
        HOST,
        "--port",
        "0",
        "--cache-dir",
        str(cache / "serve"),
        "-q",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"teachx serve exited: {log.read_text()[-2000:]}")
        m = re.search(r"teachx serve: http://127\.0\.0\.1:(\d+)/", log.read_text())
        if m:
            return proc, int(m.group(1)), log
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("teachx serve did not start within 300 s")


def get_json(port: int, path: str):
    c = Client(port)
    try:
        status, body = c.request("GET", path)
    finally:
        c.close()
    if status != 200:
        raise SystemExit(f"GET {path}: {status} {body[:300]!r}")
    return json.loads(body)


def upload_png(size: list[int], channels: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[0], size[1], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if channels == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def multipart(data: bytes, boundary: str = "teachxbench") -> tuple[bytes, dict]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}


def bench(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="teachx-bench-serve-") as tmp:
        proc, port, _log = start_server(args.run_dir, Path(tmp), args.threads)
        try:
            return measure(args, proc, port)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(args, proc: subprocess.Popen, port: int) -> dict:
    models = get_json(port, "/api/v1/models")["models"]
    pick = [m for m in models if m["kind"] == "impactx" and not m["error"]]
    if args.model:
        pick = [m for m in models if m["id"] == args.model]
    if not pick:
        raise SystemExit(f"no usable IMPACTX model in {args.run_dir}; models: {[m['id'] for m in models]}")
    mid = pick[0]["id"]
    base = f"/api/v1/models/{mid}"
    info = get_json(port, base)  # loads the model and its test data
    if info["error"]:
        raise SystemExit(f"model {mid}: {info['error']}")
    n = int(info["n_images"])
    clients = sorted(set(args.clients))
    out = {
        "run_dir": str(Path(args.run_dir).resolve()),
        "model": mid,
        "dataset": info["dataset"],
        "n_images": n,
        "image_size": info["image_size"],
        "scenarios": {},
    }
    warm = list(range(min(n, args.warm)))  # cached rows for the cached scenarios
    fresh = iter(range(len(warm), n))  # rows nobody has asked for yet, used once each
    t0 = time.perf_counter()
    run_load(port, warm, min(4, max(clients)), lambda cl, i: cl.request("GET", f"{base}/images/{i}")[0])
    out["warmup_seconds"] = time.perf_counter() - t0

    def cached(path_fn, count):
        jobs = [warm[k % len(warm)] for k in range(count)]
        return {str(k): run_load(port, jobs, k, lambda cl, i: cl.request("GET", path_fn(i))[0]) for k in clients}

    out["scenarios"]["cached_view"] = cached(lambda i: f"{base}/images/{i}", args.requests)
    out["scenarios"]["cached_map"] = cached(lambda i: f"{base}/images/{i}/maps/built_in", args.requests)

    def uncached(path_fn, count):
        res = {}
        for k in clients:
            jobs = [i for _, i in zip(range(count), fresh)]
            if len(jobs) < count:
                res[str(k)] = {"skipped": f"only {len(jobs)} uncached images left of {n}"}
                continue
            res[str(k)] = run_load(port, jobs, k, lambda cl, i: cl.request("GET", path_fn(i))[0])
        return res

    out["scenarios"]["uncached_built_in"] = uncached(lambda i: f"{base}/images/{i}/maps/built_in", args.uncached)
    body, headers = multipart(upload_png(info["image_size"], info["channels"]))
    out["scenarios"]["upload"] = {
        str(k): run_load(
            port, list(range(args.uploads)), k, lambda cl, _i: cl.request("POST", f"{base}/predict", body, headers)[0]
        )
        for k in clients
    }
    if args.deepshap:
        out["scenarios"]["deepshap"] = uncached(lambda i: f"{base}/images/{i}/maps/deepshap", args.deepshap)
    # memory over many cached requests at the largest client count
    k = max(clients)
    samples = [{"requests": 0, **rss_kb(proc.pid)}]
    errors = 0
    done = 0
    t0 = time.perf_counter()
    while done < args.memory_requests:
        step = min(1000, args.memory_requests - done)
        jobs = [warm[(done + j) % len(warm)] for j in range(step)]
        r = run_load(port, jobs, k, lambda cl, i: cl.request("GET", f"{base}/images/{i}")[0])
        errors += r["errors"]
        done += step
        samples.append({"requests": done, **rss_kb(proc.pid)})
    rss = [s["VmRSS"] for s in samples[1:]] or [samples[0]["VmRSS"]]
    out["memory"] = {
        "clients": k,
        "requests": done,
        "errors": errors,
        "seconds": time.perf_counter() - t0,
        "samples_kb": samples,
        "rss_first_mb": rss[0] / 1024,
        "rss_last_mb": rss[-1] / 1024,
        "growth_mb": (rss[-1] - rss[0]) / 1024,
    }
    # the grid's list over the whole test split (last: the first sorted list computes every prediction, which
    # would turn the uncached scenarios above into cached ones): the cold first page, then pages of 120
    # sorted by confidence, wrong predictions only, at every offset
    cl = Client(port)
    try:
        t0 = time.perf_counter()
        status, _ = cl.request("GET", f"{base}/images?sort=confidence&order=desc&offset=0&limit=120")
        out["list_cold"] = {"status": status, "seconds": time.perf_counter() - t0, "images": n}
    finally:
        cl.close()
    offsets = [(120 * j) % max(1, n) for j in range(args.requests)]
    out["scenarios"]["list_page"] = {
        str(k): run_load(
            port,
            offsets,
            k,
            lambda cl, o: cl.request(
                "GET", f"{base}/images?sort=confidence&order=desc&correct=false&offset={o}&limit=120"
            )[0],
        )
        for k in clients
    }
    return out


def server_stack() -> dict:
    """What uvicorn runs on in this environment (the server is started from the same interpreter): its
    C-accelerated HTTP parser and event loop (httptools, uvloop) when installed, else h11 and asyncio."""
    from importlib.util import find_spec
    from importlib.metadata import version

    return {
        "uvicorn": version("uvicorn"),
        "httptools": find_spec("httptools") is not None,
        "uvloop": find_spec("uvloop") is not None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="teachx-demo", help="a `teachx run` / `teachx demo` directory")
    ap.add_argument("--label", default=None, help="key in serve.json (default: the run directory's name)")
    ap.add_argument("--model", default=None, help="model id (default: the run's IMPACTX model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=400, help="requests per cached scenario and client count")
    ap.add_argument("--uncached", type=int, default=200, help="uncached built-in-map requests per client count")
    ap.add_argument("--uploads", type=int, default=200, help="uploads per client count")
    ap.add_argument("--deepshap", type=int, default=32, help="on-demand DeepSHAP maps per client count (0: skip)")
    ap.add_argument("--warm", type=int, default=64, help="images cached before the cached scenarios")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: its own policy)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if min(args.clients) < 1 or args.warm < 1:
        ap.error("--clients and --warm must be >= 1")
    res = bench(args)
    res.update(
        {
            "command": "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "note": args.note,
            "server_stack": server_stack(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    from teachx.utils.io import write_json_atomic

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("runs", {})[args.label or Path(args.run_dir).resolve().name] = res
    write_json_atomic(out, data)
    for name, by_k in res["scenarios"].items():
        for k, r in by_k.items():
            if "p50_ms" in r:
                print(
                    f"{name:<18} clients={k:>2}  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  errors {r['errors']}  ({r['requests']} requests)"
                )
            else:
                print(f"{name:<18} clients={k:>2}  {r.get('skipped')}")
    mem = res["memory"]
    print(
        f"list: first sorted page of {res['list_cold']['images']} images in {res['list_cold']['seconds']:.2f} s (status {res['list_cold']['status']})"
    )
    print(
        f"memory: {mem['rss_first_mb']:.0f} -> {mem['rss_last_mb']:.0f} MB RSS over {mem['requests']} requests ({mem['errors']} errors); -> {out}"
    )
    return res


if __name__ == "__main__":
    main()
