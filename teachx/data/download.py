"""Checksum-verified, atomic downloads of the official dataset files.

A download streams into a temporary file next to its destination, is hashed while it streams, and
is renamed into place only when the checksum matches the published one. A reader therefore never
sees a partial or corrupted file under the final name, and an interrupted download leaves nothing.
Only ``download=True`` ever touches the network.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from teachx.errors import DataError
from teachx.utils.io import atomic_path

#: Opener used for every download; tests replace it (or use ``file://`` URLs) so no test hits the network.
urlopen = urllib.request.urlopen

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One official file: its name on disk, mirrors tried in order, and ``"md5:<hex>"``/``"sha256:<hex>"``."""

    filename: str
    urls: tuple[str, ...]
    checksum: str
    size_hint: str = ""  # e.g. "163 MB", shown in messages

    @property
    def algorithm(self) -> str:
        return _split_checksum(self.checksum)[0]


def _split_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not digest:
        raise ValueError(f"checksum must look like 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return algorithm, digest.lower()


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file (md5 is used only because the datasets publish md5 checksums)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | Path, checksum: str) -> None:
    """Raise DataError when ``path`` does not match ``checksum``."""
    algorithm, expected = _split_checksum(checksum)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path}: {algorithm} is {actual}, expected {expected}; "
            f"the file is corrupted or incomplete: delete it and download it again (data.download=true; download=True in load_dataset)"
        )


def download_file(url: str, dest: str | Path, checksum: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``checksum`` before the file appears."""
    dest = Path(dest)
    algorithm, expected = _split_checksum(checksum)
    h = hashlib.new(algorithm)
    try:
        with atomic_path(dest) as tmp:
            try:
                response = urlopen(url)
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise DataError(
                    f"could not download {url} ({reason}); check the network, or fetch the file yourself "
                    f"and put it at {dest}"
                ) from err
            with response, open(tmp, "wb") as out:
                total = _content_length(response)
                bar = _progress_bar(total, dest.name, progress)
                try:
                    while block := response.read(_CHUNK):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
                except OSError as err:
                    raise DataError(f"download of {url} was interrupted ({err}); run it again") from err
                finally:
                    bar.close()
            actual = h.hexdigest()
            if actual != expected:
                raise DataError(
                    f"checksum mismatch for {url}: {algorithm} {actual}, expected {expected}; the download is "
                    f"corrupted (nothing was saved): retry, or fetch the file yourself and put it at {dest}"
                )
            os.chmod(tmp, 0o644)  # temp files are created 0600; a dataset file is ordinary data
    except PermissionError as err:
        raise DataError(
            f"cannot write {dest} ({err}); point data.root=DIR (root= in load_dataset) or $TEACHX_DATA at a writable folder"
        ) from err
    return dest


def download_resource(resource: Resource, directory: str | Path, progress: bool = True) -> Path:
    """Fetch one resource into ``directory``, trying its mirrors in order."""
    dest = Path(directory) / resource.filename
    errors: list[str] = []
    for url in resource.urls:
        try:
            return download_file(url, dest, resource.checksum, progress=progress)
        except DataError as err:
            if "checksum mismatch" in str(err) or len(resource.urls) == 1:
                raise
            errors.append(str(err))
    raise DataError(f"every mirror of {resource.filename} failed: {' | '.join(errors)}")


def _content_length(response) -> int | None:
    try:
        value = response.headers.get("Content-Length")
        return int(value) if value else None
    except (AttributeError, TypeError, ValueError):
        return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, name: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}", leave=False)
