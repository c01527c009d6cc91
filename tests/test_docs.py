"""The documentation's commands: every `teachx` command quoted in README.md and docs/ parses.

A command parses when click accepts its options and arguments (a dry run of the parser: nothing is
executed), and, for `run`, `train`, `demo`, `config` and `study` with a shipped or no CONFIG (or a research
study of the repository's studies/ folder, which must exist), when its KEY=VALUE overrides resolve to a valid
config. Synopses (`[CONFIG]`, `K=V ...`) are read with their brackets removed
and their placeholders taken as values. The Sphinx build itself (warnings as errors) runs in `.ci/run`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator

import click
import pytest

from teachx.errors import TeachxError
from teachx.cli.main import _split_args, cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "studies" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
PAGES = [p for p in PAGES if "_build" not in p.parts]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SEPARATORS = re.compile(r"&&|\|\||;|\||(?<![<>])&(?!>)|\bdo\b|\bthen\b")


def _teachx_segments(line: str) -> Iterator[str]:
    """The `teachx ...` commands in one shell line (after env assignments and a path prefix)."""
    line = re.sub(r"\s#.*$", "", line)  # a trailing comment
    for seg in SEPARATORS.split(line):
        seg = re.split(r"\s(?:\d?>>?|<)\s?\S+", seg)[0].strip()  # redirections end the arguments
        words = seg.split()
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        if words and re.fullmatch(r"(?:\S*/)?teachx", words[0]):
            yield " ".join(["teachx", *words[1:]])


def quoted_commands() -> list[tuple[str, str]]:
    """(where, command) for every teachx command in a shell code block or an inline code span."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        text = page.read_text()
        rel = page.relative_to(ROOT)
        for m in FENCE.finditer(text):
            if m.group(1) in SHELL_LANGS:
                for line in m.group(2).replace("\\\n", " ").splitlines():
                    found += [(f"{rel} (code block)", c) for c in _teachx_segments(line.lstrip("$ "))]
        prose = FENCE.sub("", text)
        for m in INLINE.finditer(prose):
            span = m.group(1).strip()
            if re.match(r"(?:\S*/)?teachx\s", span):
                found += [(f"{rel} (inline)", c) for c in _teachx_segments(span)]
    return found


def _words(command: str) -> list[str]:
    """The words after `teachx`, with usage brackets taken off (``[--class C]``, ``[K=V ...]``) but a value's
    own brackets kept (``study.revise.methods=[pclarc, rrclarc]``)."""
    words = []
    for w in shlex.split(command)[1:]:
        if w.startswith("["):
            w = w[1:]
        if w.endswith("]") and "[" not in w:
            w = w[:-1]
        if w and w not in ("...", "|"):
            words.append(w)
    return words


def parse(command: str, mention: bool = True) -> None:
    """Parse like `teachx` would, without running anything; raise click's error when it does not.

    ``mention``: `teachx NAME` followed by nothing but option names only has to name a command and its
    options (prose mentions them that way)."""
    words = _words(command)
    if not words or words[0].startswith("-"):
        try:
            cli.make_context("teachx", words)  # e.g. teachx --help
        except click.exceptions.Exit as done:
            assert done.exit_code == 0
        return
    group: click.Group = cli
    parent = click.Context(cli, info_name="teachx")
    while True:
        name = words.pop(0)
        sub = group.get_command(parent, name)
        if sub is None:
            raise click.UsageError(f"no such command '{name}'")
        if isinstance(sub, click.Group) and words and not words[0].startswith("-"):
            parent, group = click.Context(sub, info_name=name, parent=parent), sub
            continue
        if mention and not isinstance(sub, click.Group) and all(w.startswith("-") for w in words):
            # `teachx study` or `teachx explain --class` in a sentence names a command or its option, it is no call
            known = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
            unknown = [w for w in words if w.split("=")[0] not in known]
            if unknown:
                raise click.NoSuchOption(unknown[0])
            return
        try:
            ctx = sub.make_context(name, words, parent=parent)
        except click.exceptions.Exit as done:  # --help and the like
            assert done.exit_code == 0
            return
        break
    _resolve(ctx)


def _resolve(ctx: click.Context) -> None:
    """A dry run of the config: the KEY=VALUE overrides of run/train/demo/config/study against a shipped or
    no CONFIG, resolved as the command would (a study config as a study)."""
    from teachx.config.shipped import is_study
    from teachx.runs.resolve import check_names, resolve_config
    from teachx.studies.spec import load_study

    name = ctx.info_name
    if name not in ("run", "train", "demo", "config", "study") or ctx.params.get("list_"):
        return
    args = ctx.params.get("args", ctx.params.get("overrides", ()))
    if name == "study":
        args = tuple(a for a in (ctx.params.get("config"), *args) if a)
    path, overrides = _split_args(tuple(args))
    file = _config_file(path)
    if path is not None and file is None:
        return  # a placeholder (CONFIG) or the reader's own file
    if any(re.search(r"=[A-Z][A-Z_]*$|=path/|\.\.\./", o) for o in overrides):
        return  # placeholders such as data.name=NAME
    if name in ("config", "study") and file is not None and is_study(file):
        load_study(str(file), overrides)
        return
    cfg = resolve_config(None if file is None else str(file), overrides)
    check_names(cfg)


def _config_file(path: str | None) -> Path | None:
    """The file a quoted CONFIG names: a shipped config, or a research study by its path in the repository
    (which has to exist: a command that names a missing one would fail); None for a placeholder."""
    from teachx.config.shipped import shipped_configs

    if path is None:
        return None
    if path in shipped_configs():
        return shipped_configs()[path]
    if path.startswith("studies/") and not re.search(r"[A-Z]", path):
        assert (ROOT / path).is_file(), f"{path}: no such study in the repository's studies/ folder"
        return ROOT / path
    return None


COMMANDS = quoted_commands()


def test_the_docs_quote_commands():
    assert len(COMMANDS) > 40
    assert any("study" in c for _, c in COMMANDS) and any("serve" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{i}" for i in range(len(COMMANDS))])
def test_quoted_command_parses(where: str, command: str):
    try:
        parse(command)
    except (click.ClickException, TeachxError) as exc:
        pytest.fail(f"{where}: `{command}` does not parse: {exc}")


def test_the_checker_finds_bad_commands():
    with pytest.raises(click.UsageError):
        parse("teachx trian --out x")
    with pytest.raises(click.ClickException):
        parse("teachx train", mention=False)
    with pytest.raises(click.NoSuchOption):
        parse("teachx explain --clas")
    parse("teachx explain --class")
    with pytest.raises(click.ClickException):
        parse("teachx run --out", mention=False)  # option without its value
    with pytest.raises(TeachxError):
        parse("teachx run train.epoch=3 --out x")  # misspelt key
    with pytest.raises(click.ClickException):
        parse("teachx serve runs/x --no-such-flag")
    parse("teachx run train.epochs=3 --out x")
    assert list(_teachx_segments("for i in 1 2; do OMP_NUM_THREADS=1 teachx study s --out r -q > w$i.log & done")) == [
        "teachx study s --out r -q"
    ]
