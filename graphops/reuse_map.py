"""The reuse map: the one data type that carries a reuse decision from search to rewrite.

For each site (a named tensor and its channel axis) a list of pairs
``(target, source)`` meaning ``X'[:, target] = X[:, source]``. Every source
is read from the original tensor, so pairs commute and a channel may be both
a target and another pair's source. Saved as readable JSON::

    {
      "format": "sam-reuse/reuse-map@1",
      "model_fingerprint": "<sha256 of the encoder graph it was made for>",
      "sites": {
        "embedding": {"tensor": "image_embeddings", "axis": 1, "channels": 256,
                      "pairs": [[12, 200], [87, 3]]}
      },
      "meta": {"strategy": "...", "...": "..."}
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from sam_reuse.base.contract import REUSE_MAP_FORMAT
from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import write_json

MAX_MAP_BYTES = 64 << 20  # a map of every channel of the widest site is a few hundred kilobytes


def reuse_index(channels: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Gather indices of a set of pairs: ``X' = take(X, index, axis)``, every source read from the original."""
    index = np.arange(channels, dtype=np.int64)
    for target, source in pairs:
        index[target] = source
    return index


@dataclass(frozen=True)
class SiteReuse:
    """Pairs for one site."""

    tensor: str
    axis: int
    channels: int
    pairs: tuple[tuple[int, int], ...]

    def index(self) -> np.ndarray:
        """Gather indices: ``X' = take(X, index, axis)``."""
        return reuse_index(self.channels, self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "axis": self.axis, "channels": self.channels,
                "pairs": [list(p) for p in sorted(self.pairs)]}


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _integer(value: Any) -> int:
    """A JSON integer; 3.5 (or "3", or true) is refused, never truncated to a channel nobody asked for."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


@dataclass
class ReuseMap:
    """Site name -> pairs, bound to one model by its graph fingerprint."""

    model_fingerprint: str
    sites: dict[str, SiteReuse] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return sum(len(s.pairs) for s in self.sites.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": REUSE_MAP_FORMAT, "model_fingerprint": self.model_fingerprint,
                "sites": {name: site.to_json() for name, site in sorted(self.sites.items())}, "meta": self.meta}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "reuse map") -> "ReuseMap":
        if not isinstance(data, Mapping):
            raise SamReuseError(f"{source}: not a reuse map (a JSON {type(data).__name__}, expected an object)")
        if data.get("format") != REUSE_MAP_FORMAT:
            raise SamReuseError(f"{source}: not a reuse map (format {data.get('format')!r}, expected {REUSE_MAP_FORMAT!r})")
        try:
            sites = {
                name: SiteReuse(tensor=_string(s["tensor"]), axis=_integer(s["axis"]),
                                channels=_integer(s["channels"]),
                                pairs=tuple((_integer(t), _integer(src)) for t, src in s["pairs"]))
                for name, s in data["sites"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SamReuseError(f"{source}: malformed site entry ({exc})") from None
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise SamReuseError(f"{source}: malformed 'meta' (a JSON {type(meta).__name__}, expected an object)")
        try:
            fingerprint = _string(data.get("model_fingerprint", ""))
        except ValueError as exc:
            raise SamReuseError(f"{source}: malformed 'model_fingerprint' ({exc})") from None
        return cls(model_fingerprint=fingerprint, sites=sites, meta=dict(meta))

    @classmethod
    def load(cls, path: str | Path) -> "ReuseMap":
        path = Path(path)
        if path.exists() and not path.is_file():
            raise SamReuseError(f"{path}: reuse map is not a regular file")
        if path.is_file() and path.stat().st_size > MAX_MAP_BYTES:
            raise SamReuseError(f"{path}: {path.stat().st_size:,} bytes, too large for a reuse map")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SamReuseError(f"{path}: reuse map not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise SamReuseError(f"{path}: not a JSON reuse map ({type(exc).__name__}: {exc})") from None
        return cls.from_json(data, str(path))

    def validate(self, available: Mapping[str, Any], model_fingerprint: str | None = None) -> None:
        """Reject maps that cannot apply to this model, naming the first problem.

        ``available`` maps site names to objects with ``tensor``, ``axis`` and
        ``channels`` (``graphops.sites.Site``).
        """
        if model_fingerprint is not None and self.model_fingerprint != model_fingerprint:
            raise SamReuseError(f"reuse map was made for another model (fingerprint {self.model_fingerprint[:12]}…, "
                                f"this model is {model_fingerprint[:12]}…)")
        for name, site in self.sites.items():
            if name not in available:
                raise SamReuseError(f"unknown site '{name}'; this model has {', '.join(sorted(available)) or 'none'}")
            actual = available[name]
            if (site.tensor, site.axis, site.channels) != (actual.tensor, actual.axis, actual.channels):
                raise SamReuseError(f"site '{name}' is {actual.tensor}[axis {actual.axis}, {actual.channels} channels] "
                                    f"in this model, the map says {site.tensor}[axis {site.axis}, {site.channels}]")
            targets: set[int] = set()
            for target, source in site.pairs:
                for role, value in (("target", target), ("source", source)):
                    if not 0 <= value < site.channels:
                        raise SamReuseError(f"site '{name}': {role} {value} out of range 0..{site.channels - 1}")
                if target == source:
                    raise SamReuseError(f"site '{name}': pair ({target}, {source}) copies a channel onto itself")
                if target in targets:
                    raise SamReuseError(f"site '{name}': target {target} is listed twice")
                targets.add(target)
