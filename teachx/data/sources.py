"""The dataset registry and the common load path: locate -> (download) -> decode once -> ImageDataset.

A format is one module defining a ``DatasetSource`` subclass and registering an instance in
``DATASETS``. The base class does the rest the same way for every format: where to look for the
files, the one-line error when they are missing, checksum-verified downloads, option checking and
the decoded-array cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from teachx.data.base import ImageDataset, Split
from teachx.data.cache import Decoded, cached_decode, files_fingerprint, finish
from teachx.data.download import Resource, download_resource
from teachx.errors import ConfigError, DataError
from teachx.registry import Registry

DATASETS: Registry["DatasetSource"] = Registry("dataset")


def default_data_root(name: str) -> Path:
    """``$TEACHX_DATA/<name>`` when the variable is set, else ``~/.cache/teachx/data/<name>``."""
    env = os.environ.get("TEACHX_DATA")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "teachx" / "data"
    return base / name


class DatasetSource:
    """One dataset format. Subclasses set the class attributes and implement ``find`` and ``decode``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    license: ClassVar[str] = ""
    url: ClassVar[str] = ""
    #: Whether training flips images horizontally by default: only for data known to keep its class
    #: when mirrored. ``hflip_reason`` says why, in ``teachx config`` and the run log.
    hflip: ClassVar[bool] = False
    hflip_reason: ClassVar[str] = "not known to be flip-invariant"
    #: Files fetched by ``download=True`` (empty: cannot be downloaded).
    resources: tuple[Resource, ...] = ()
    #: Folders searched after the default root (e.g. where a distribution package installs the data).
    system_dirs: ClassVar[tuple[str, ...]] = ()
    #: Keyword options ``load_dataset`` accepts for this format, with their defaults.
    options: ClassVar[dict[str, Any]] = {}
    #: What to put where, for the "not found" message.
    expected_files: ClassVar[str] = ""
    #: Whether decoded arrays go through the on-disk cache (tiny datasets decode faster than they map).
    use_cache: ClassVar[bool] = True
    #: Bumped when the decoder changes, so old cache entries are not reused.
    decoder_version: ClassVar[int] = 1

    # -- to implement -------------------------------------------------------------------------
    def find(self, directory: Path) -> Path | None:
        """The source (file or folder) inside ``directory``, or None when it is not there."""
        raise NotImplementedError

    def source_files(self, source: Path) -> list[Path]:
        """The files whose identity keys the cache."""
        return [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())

    def decode(self, source: Path, progress: bool, **options: Any) -> Decoded:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    def search_dirs(self, root: str | Path | None, arg: str | None = None) -> list[Path]:
        if root is not None:
            return [Path(root).expanduser()]
        return [default_data_root(self.name)] + [Path(d) for d in self.system_dirs]

    def locate(self, root: str | Path | None, arg: str | None = None) -> Path | None:
        for directory in self.search_dirs(root, arg):
            if directory.is_dir() or directory.is_file():
                found = self.find(directory)
                if found is not None:
                    return found
        return None

    def present(self, root: str | Path | None = None) -> bool:
        try:
            return self.locate(root) is not None
        except TeachxErrorTypes:
            return False

    def missing_message(self, root: str | Path | None, arg: str | None = None) -> str:
        dirs = self.search_dirs(root, arg)
        where = " or ".join(str(d) for d in dirs)
        fetch = (
            f", or set data.download=true (download=True in load_dataset) to fetch it from "
            f"{self.resources[0].urls[0].rsplit('/', 1)[0]}"
            + (f" ({self.download_size})" if self.download_size else "")
            if self.resources
            else ""
        )
        return (
            f"dataset '{self.name}' not found: put {self.expected_files} in {where} "
            f"(or point data.root=DIR at them (root= in load_dataset), or set $TEACHX_DATA){fetch}"
        )

    @property
    def download_size(self) -> str:
        return " + ".join(r.size_hint for r in self.resources if r.size_hint)

    def download(self, root: str | Path | None, progress: bool) -> None:
        target = self.search_dirs(root)[0]
        for resource in self.resources:
            if not (target / resource.filename).is_file():
                download_resource(resource, target, progress=progress)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"dataset '{self.name}' has no option {', '.join(unknown)}; valid options: {valid}")
        return {**self.options, **options}

    def display_name(self, arg: str | None) -> str:
        return self.name

    def load(
        self,
        arg: str | None = None,
        root: str | Path | None = None,
        download: bool = False,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        **options: Any,
    ) -> ImageDataset:
        options = self.check_options(options)
        source = self.locate(root, arg)
        if source is None and download and self.resources:
            self.download(root, progress)
            source = self.locate(root, arg)
        if source is None:
            raise DataError(self.missing_message(root, arg))

        def run_decoder() -> Decoded:
            return self.decode(source, progress, **options)

        if self.use_cache:
            key = {
                "decoder": f"{type(self).__module__}.{type(self).__qualname__}:{self.decoder_version}",
                "source": self.fingerprint(source),
                "options": options,
            }
            decoded = cached_decode(self.display_name(arg), key, run_decoder, cache_dir)
        else:
            decoded = finish(run_decoder())
        return self.to_dataset(decoded, source, arg)

    def fingerprint(self, source: Path) -> Any:
        return files_fingerprint(self.source_files(source))

    def to_dataset(self, decoded: Decoded, source: Path, arg: str | None) -> ImageDataset:
        extra = dict(decoded.extra)
        if decoded.cache_path:
            extra["cache_path"] = decoded.cache_path
        extra["hflip"] = self.hflip
        return ImageDataset(
            name=self.display_name(arg),
            class_names=list(decoded.class_names),
            train=Split(decoded.train_images, decoded.train_labels, decoded.train_masks),
            test=Split(decoded.test_images, decoded.test_labels, decoded.test_masks),
            mean=tuple(decoded.mean),
            std=tuple(decoded.std),
            source=str(source),
            license=self.license,
            extra=extra,
            hflip=self.hflip,
        )

    def status(self) -> dict:
        dirs = self.search_dirs(None)
        return {
            "name": self.name,
            "description": self.description,
            "locations": [str(d) for d in dirs],
            "expected_files": self.expected_files,
            "present": self.present(),
            "downloadable": bool(self.resources),
            "license": self.license,
            "url": self.url,
        }


TeachxErrorTypes = (DataError, ConfigError, OSError)


def get_source(name: str) -> tuple[DatasetSource, str | None]:
    """The format object for ``name`` and its argument (the PATH of ``imagefolder:PATH``)."""
    key, sep, arg = str(name).partition(":")
    cls = DATASETS.get(key)
    source = cls()
    if sep and source.name != "imagefolder":
        raise ConfigError(f"dataset '{key}' takes no ':' argument (got '{name}'); only imagefolder:PATH does")
    return source, (arg if sep else None)
