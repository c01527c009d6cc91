"""The example configs shipped inside the package (``teachx/configs/*.yaml``), usable by name.

A CONFIG argument is a path when that file exists; otherwise a shipped name such as
``cifar10-lenet5`` (with or without ``.yaml``) resolves to the packaged file. ``teachx config
--list`` shows every shipped config with the first line of its header comment. The research studies
of the repository (``studies/NAME.yaml`` in a checkout) are not shipped: they are passed by path, and
their bare name, given from the checkout's root, gets an error that names the path.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

from teachx.config.loader import load_yaml
from teachx.config.schema import missing_value
from teachx.errors import ConfigError
from teachx.registry import suggest


def shipped_dir() -> Path:
    """The folder holding the shipped configs (a real folder for every normal install)."""
    with as_file(files("teachx") / "configs") as path:  # a no-op for installed (non-zipped) packages
        return Path(path)


def shipped_configs() -> dict[str, Path]:
    """name -> path of every shipped config, sorted by name."""
    return {p.stem: p for p in sorted(shipped_dir().glob("*.yaml"))}


def header(path: Path) -> str:
    """The first line of the file's leading comment block, its description: whole sentences for users
    ('' when it has none)."""
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        return line.lstrip("#").strip() if line.startswith("#") else ""
    return ""


def is_study(path: str | Path) -> bool:
    """Whether the config file has a top-level ``study:`` section (a `teachx study` config)."""
    return "study" in load_yaml(str(path))


def find_config(arg: str) -> str:
    """An existing file ``arg`` as given, else the shipped config of that name; else a one-line error."""
    if Path(arg).expanduser().is_file():
        return str(Path(arg).expanduser())
    missing = missing_value(arg)
    if missing is not None:  # `teachx run train.epochs` (the =VALUE forgotten) is no config file
        raise missing
    shipped = shipped_configs()
    name = Path(arg).name
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name[: -len(".yml")] if name.endswith(".yml") else name
    looks_like_name = "/" not in arg and "\\" not in arg
    if looks_like_name and stem in shipped:
        return str(shipped[stem])
    names = ", ".join(shipped)
    research = Path("studies") / f"{stem}.yaml"  # a checkout's research studies, not shipped: named by their path
    if looks_like_name and research.is_file():
        raise ConfigError(
            f"config '{arg}' is not shipped with teachx: it is a study in this folder's studies/; "
            f"pass its path: {research.as_posix()}"
        )
    if looks_like_name:
        raise ConfigError(
            f"config '{arg}' is neither a file nor a shipped config{suggest(stem, list(shipped))}; "
            f"shipped configs: {names} (see `teachx config --list`)"
        )
    hint = f"; the shipped '{stem}' is used by its name: {stem}" if stem in shipped else ""
    raise ConfigError(
        f"config file '{arg}' not found{hint}; pass the path of a YAML file or a shipped config: {names} (see `teachx config --list`)"
    )
