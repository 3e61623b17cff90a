"""Resumable search progress: an append-only JSONL file of finished evaluations.

Line 1 is a header holding the search's full configuration (model and data
fingerprints, prompts, parameters). Every later line records one finished
unit of work with its per-image IoUs, tagged with the header's hash. On
restart with the same configuration finished units are read back instead of
recomputed; floats survive the JSON round trip exactly, so an interrupted and
resumed search ends with the same numbers, and the same map, as an
uninterrupted one. A line cut short by a kill, or one whose tag is another
configuration's (pasted from another run), is dropped with all after it. A
journal written for another configuration is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sam_reuse.base.files import atomic_path

FORMAT = "sam-reuse/search-journal@1"


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, sort_keys=True))


class Journal:
    """Finished work of one search configuration, keyed by ``(kind, key)``."""

    def __init__(self, path: str | Path, config: dict[str, Any]):
        self.path = Path(path)
        self.config = _normalise(config)
        self.tag = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.restarted = False  # an existing journal belonged to other settings
        if self.path.is_file() and self._read_existing():
            return
        self.restarted = self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"kind": "header", "format": FORMAT, "config": self.config}, sort_keys=True) + "\n")

    def _read_existing(self) -> bool:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")[:-1]  # the last element is b"" or a line cut short by a kill
        try:
            header = json.loads(lines[0]) if lines else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if header.get("format") != FORMAT or header.get("config") != self.config:
            return False
        good_bytes = len(lines[0]) + 1
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                if entry.pop("run") != self.tag:
                    break  # another configuration's unit: it and everything after it are recomputed
                self.entries[(entry["kind"], entry["key"])] = entry
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                break  # a damaged line: it and everything after it are recomputed
            good_bytes += len(line) + 1
        if good_bytes != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return True

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return self.entries.get((kind, key))

    def add(self, kind: str, key: str, **payload: Any) -> dict[str, Any]:
        """Record a finished unit durably (flushed and fsynced) and return it."""
        entry = {"kind": kind, "key": key, **payload}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**entry, "run": self.tag}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[(kind, key)] = entry
        return entry
