"""`teachx serve`: the explanation viewer and JSON API over run and study directories.

``register(cli)`` adds the command to the main click group (called from ``teachx.cli.main``).
The web stack (fastapi, uvicorn, python-multipart) is the optional extra ``teachx[serve]``;
without it the command says so in one line and exits with code 2.
"""

from __future__ import annotations

import socket
from typing import Optional

import click

from teachx.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(cli: click.Group) -> None:
    cli.add_command(serve)


def _require_web_stack() -> None:
    missing = []
    for modules, dist in (
        (("fastapi",), "fastapi"),
        (("uvicorn",), "uvicorn"),
        (("python_multipart", "multipart"), "python-multipart"),
    ):
        for module in modules:
            try:
                __import__(module)
                break
            except ImportError:
                pass
        else:
            missing.append(dist)
    if missing:
        raise ConfigError(
            f"teachx serve needs {', '.join(missing)}, which are not installed: pip install 'teachx[serve]'"
        )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or a one-line error naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # answers go out as written (headers, then body): without it Nagle's algorithm holds the body until
    # the client's delayed ACK (~40 ms per request on a kept-alive connection); accepted sockets inherit it
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port (0 picks a free one) or --host"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _check_cache_dir(cache_dir: Optional[str]) -> None:
    """Make the serve cache folder now: one asked for (--cache-dir, or the default with --no-serve, whose
    whole point is the filled cache) that cannot be made is a one-line error, not a cache kept in memory."""
    from pathlib import Path

    from teachx.utils.io import output_error  # lazy: CLI start-up

    if cache_dir is None:
        from teachx.utils.cache_admin import cache_root  # lazy: CLI start-up

        path = cache_root() / "serve"
    else:
        path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, path, "--cache-dir" if cache_dir else "--cache-dir, or $TEACHX_CACHE") from exc


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_OR_STUDY_DIR...")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback exposes your models and data to the network.",
)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--precompute",
    is_flag=True,
    help="First fill the cache (predictions, built-in maps, teacher maps, pixel flipping, agreement) for every test image.",
)
@click.option("--no-serve", is_flag=True, help="Exit after --precompute instead of serving.")
@click.option(
    "--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache folder (default $TEACHX_CACHE/serve)."
)
@click.option(
    "--max-upload-mb",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Largest accepted upload in MiB (1 MiB = 1,048,576 bytes); a larger one is refused with HTTP 413.",
)
@click.option(
    "--reveal-max-images",
    default=2000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Largest class (training images) the reveal view may reveal on request; larger ones: `teachx reveal`.",
)
@click.option("--device", default="cpu", show_default=True, help="Device for the models (cpu, cuda, cuda:N).")
@click.option(
    "--trust-threshold",
    default=0.0,
    show_default=True,
    type=click.FloatRange(-1.0, 1.0),
    help="Flag a test image when its built-in map correlates below this with the model's gradient x input "
    "(0: what a map unrelated to the model's gradient reaches on average).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def serve(
    dirs: tuple[str, ...],
    host: str,
    port: int,
    open_browser: bool,
    precompute: bool,
    no_serve: bool,
    cache_dir: Optional[str],
    max_upload_mb: float,
    reveal_max_images: int,
    device: str,
    trust_threshold: float,
    quiet: bool,
) -> None:
    """Web page and JSON API to browse the explanations of runs and studies.

    teachx serve RUN_OR_STUDY_DIR [DIR ...]: a page and a JSON API (/api/v1, schema at /openapi.json, docs at /docs): test images with
    filters, each model's prediction, built-in map, teacher maps on demand, pixel-flipping
    curves and agreement, uploads; every answer with its provenance. Serves 127.0.0.1 unless
    --host says otherwise.
    """
    if no_serve and not precompute:
        raise ConfigError("--no-serve only makes sense with --precompute")
    if not no_serve:
        _require_web_stack()
    if cache_dir is not None or no_serve:
        _check_cache_dir(cache_dir)
    from teachx.service import Service  # lazy: CLI start-up

    service = Service(list(dirs), cache_dir=cache_dir, device=device, trust_threshold=trust_threshold)
    n_models = len(service.entries)
    if n_models == 0:
        raise ConfigError(
            f"no trained models found in {', '.join(dirs)}; train one with `teachx run` or `teachx demo` first"
        )
    for run in service.runs:
        bad = [m for m in run.models if m.error]
        click.echo(
            f"{run.kind} {run.id}: {run.path} ({len(run.models)} models"
            + (f", {len(bad)} with errors" if bad else "")
            + ")"
        )
        for m in bad:
            click.echo(f"  {m.id}: {m.error}")
    if precompute:
        service.precompute(progress=not quiet, log=click.echo)
    if no_serve:
        return
    import threading
    import webbrowser

    import uvicorn

    from teachx.service.app import create_app  # lazy: CLI start-up

    sock = _bind(host, port)
    actual = sock.getsockname()[1]
    allowed = list(LOOPBACK) if host in LOOPBACK else None
    app = create_app(
        service,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        allowed_hosts=allowed,
        max_reveal_images=reveal_max_images,
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}/"
    click.echo(f"teachx serve: {url} ({n_models} models; API docs {url}docs; Ctrl+C to stop)", nl=True)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: anyone who can reach this machine can use the API", err=True)
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
