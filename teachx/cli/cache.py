"""`teachx cache list|clean`: a thin command line over :mod:`teachx.utils.cache_admin`.

``register(cli)`` adds the ``cache`` group to the main click group (called from ``teachx.cli.main``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

DIR_HELP = "A cache folder other than $TEACHX_CACHE (e.g. a run's teacher.maps_dir)."


def register(cli: click.Group) -> None:
    group = type(cli)(
        "cache", help=_GROUP_HELP, short_help="See and clean the cache: decoded datasets and teacher-map stores."
    )
    group.add_command(list_cmd)
    group.add_command(clean_cmd)
    cli.add_command(group)


_GROUP_HELP = """See and clean teachx's cache: decoded datasets and teacher-map stores.

The cache is $TEACHX_CACHE, else ~/.cache/teachx/cache; teacher maps are under its maps/ folder. Only
entries teachx wrote (recognised by their meta.json) are listed or deleted; other files there are never
touched, and neither are downloaded datasets ($TEACHX_DATA or ~/.cache/teachx/data).
"""


def _root(cache_dir: Optional[str]) -> Path:
    """The cache folder; one that cannot exist (a file stands in its path) is a one-line error."""
    from teachx.errors import ConfigError  # lazy: CLI start-up
    from teachx.utils.cache_admin import cache_root  # lazy: CLI start-up

    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        option = "--dir" if cache_dir else "$TEACHX_CACHE"
        raise ConfigError(
            f"cache folder '{root}' cannot exist: '{blocker}' is a file, not a folder; pass the cache folder with {option}"
        )
    return root


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "?"


def _rows(entries) -> list[str]:
    from teachx.utils.cache_admin import age, human_size  # lazy: CLI start-up

    kw = max([len(e.key) for e in entries] + [3])
    lines = [f"{'KIND':<5} {'KEY':<{kw}}  {'SIZE':>9}  {'CREATED':<16}  {'LAST USED':<13}  WHAT"]
    for e in entries:
        holder = e.holder()
        busy = f" [in use by pid {holder.get('pid')}]" if holder is not None else ""
        lines.append(
            f"{e.kind:<5} {e.key:<{kw}}  {human_size(e.size):>9}  {_when(e.created):<16}  {age(e.last_used):<13}  {e.description}{busy}"
        )
    return lines


@click.command("list")
@click.option("--dir", "cache_dir", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
def list_cmd(cache_dir: Optional[str]) -> None:
    """List cache entries: kind, key, size, age, what they are for."""
    from teachx.utils.cache_admin import foreign, human_size, legacy_maps_dir, scan  # lazy: CLI start-up

    root = _root(cache_dir)
    entries = scan(root)
    click.echo(f"cache: {root}" + ("" if cache_dir else " ($TEACHX_CACHE moves it)"))
    if entries:
        for line in _rows(entries):
            click.echo(line)
    total = sum(e.size for e in entries)
    kinds = {k: sum(1 for e in entries if e.kind == k) for k in ("maps", "data")}
    click.echo(
        f"total: {len(entries)} entries ({kinds['maps']} teacher-map stores, {kinds['data']} decoded datasets), {human_size(total)}"
    )
    others = foreign(root)
    if others:
        click.echo(f"({len(others)} other item(s) in the cache folder are not teachx entries and are never touched)")
    old = None if cache_dir else legacy_maps_dir()
    if old is not None:
        click.echo(f"older teachx versions kept teacher maps in {old}: see them with `teachx cache list --dir {old}`")
    if entries:
        click.echo("clean with `teachx cache clean KEY|--maps|--data|--older-than DAYS|--all [--yes]`")


@click.command("clean")
@click.argument("keys", nargs=-1)
@click.option("--maps", "maps_", is_flag=True, help="Teacher-map stores.")
@click.option("--data", "data_", is_flag=True, help="Decoded datasets.")
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="DAYS",
    help="Only entries not used for DAYS days.",
)
@click.option("--all", "all_", is_flag=True, help="Every teachx entry (with no KEY, --maps, --data or --older-than).")
@click.option("--yes", "-y", is_flag=True, help="Delete; without it the command only shows what it would delete.")
@click.option("--dir", "cache_dir", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
def clean_cmd(
    keys: tuple[str, ...],
    maps_: bool,
    data_: bool,
    older_than: Optional[float],
    all_: bool,
    yes: bool,
    cache_dir: Optional[str],
) -> None:
    """Delete cache entries (only shows what it would delete, unless --yes).

    Select them with KEY... (from `teachx cache list`, or a unique prefix), --maps, --data,
    --older-than DAYS or --all. Without --yes nothing is deleted: the command shows what would go. Entries another process is
    using (a map store being filled holds its lock) are kept. Selectors combine: `--maps
    --older-than 30` deletes map stores unused for 30 days.
    """
    from teachx.utils.cache_admin import clean, human_size, scan, select  # lazy: CLI start-up

    root = _root(cache_dir)
    kinds = [k for k, on in (("maps", maps_), ("data", data_)) if on]
    chosen = select(scan(root), keys, kinds, older_than, all_)
    if not chosen:
        click.echo(f"nothing to clean in {root}")
        return
    outcomes = clean(chosen, dry_run=not yes)
    gone = [o for o in outcomes if o.deleted]
    kept = [o for o in outcomes if not o.deleted and o.note != "would delete" and not o.failed]
    failed = [o for o in outcomes if o.failed]
    would = [o for o in outcomes if o.note == "would delete"]
    if not yes:
        click.echo(
            f"would delete {len(would)} entr{'y' if len(would) == 1 else 'ies'}, {human_size(sum(o.entry.size for o in would))}, from {root}:"
        )
        for o in would:
            click.echo(f"  {o.entry.kind:<5} {o.entry.key}  {human_size(o.entry.size)}  {o.entry.description}")
    for o in gone:
        click.echo(
            f"deleted {o.entry.kind} {o.entry.key} ({human_size(o.entry.size)})" + (f"; {o.note}" if o.note else "")
        )
    for o in kept:
        click.echo(f"kept {o.entry.kind} {o.entry.key}: {o.note}")
    if yes:
        click.echo(
            f"freed {human_size(sum(o.entry.size for o in gone))}" + (f"; kept {len(kept)} in use" if kept else "")
        )
    elif would:
        click.echo("nothing deleted: run the same command with --yes to delete them")
    if failed:
        from teachx.errors import OutputError  # lazy: CLI start-up

        more = (
            f" ({len(failed) - 1} more entr{'y' if len(failed) == 2 else 'ies'} not deleted either)"
            if len(failed) > 1
            else ""
        )
        raise OutputError(f"{failed[0].entry.kind} {failed[0].entry.key}: {failed[0].note}{more}")
