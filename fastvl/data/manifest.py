"""Manifests of video files and the train / held-out split of their rows.

A manifest is a CSV (header row) or JSONL file with one clip per row: ``video`` (path, relative to the
manifest's directory unless absolute), ``caption`` (a string; in JSONL also a list of paraphrases), and
optionally ``start`` / ``end`` (seconds), ``label`` (int; clips sharing a label count as equivalent in
retrieval, default: clips with the same first caption) and ``split`` (e.g. ``train`` / ``val``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class ManifestEntry:
    """One row of a manifest; ``video`` is resolved against the manifest's directory."""

    video: str
    captions: list[str]
    start: float | None = None
    end: float | None = None
    label: int | None = None
    split: str | None = None


def parse_seconds(v: Any, where: str, name: str) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: '{name}' must be a number of seconds, got {v!r}") from None
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"{where}: '{name}' must be a finite number of seconds >= 0, got {v!r}")
    return f


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Parse a ``.csv`` or ``.jsonl`` manifest (see the module docstring). Raises ``FileNotFoundError`` when the
    manifest is missing and ``ValueError`` naming the line and field for malformed rows or an empty manifest.
    Video files are not opened here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"manifest {path}: expected a .csv or .jsonl file, got extension {ext!r}")
    root = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[int, dict]] = []
    with open(path, newline="", encoding="utf-8") as f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            missing = {"video", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"manifest {path}: the CSV header must name columns 'video' and 'caption', got {reader.fieldnames}"
                )
            rows = [(i + 2, r) for i, r in enumerate(reader)]
        else:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"manifest {path} line {i}: not valid JSON ({e.msg})") from None
                if not isinstance(r, dict):
                    raise ValueError(f"manifest {path} line {i}: expected a JSON object, got {type(r).__name__}")
                rows.append((i, r))
    entries = []
    for line, r in rows:
        where = f"manifest {path} line {line}"
        video = r.get("video")
        if not isinstance(video, str) or not video.strip():
            raise ValueError(f"{where}: 'video' must be a non-empty path, got {video!r}")
        cap = r.get("caption")
        caps = [cap] if isinstance(cap, str) else cap
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{where}: 'caption' must be a non-empty string (or list of strings), got {cap!r}")
        start = parse_seconds(r.get("start"), where, "start")
        end = parse_seconds(r.get("end"), where, "end")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"{where}: 'end' ({end}) must be greater than 'start' ({start})")
        label = r.get("label")
        if label is not None and not (isinstance(label, str) and not label.strip()):
            try:
                label = int(label)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: 'label' must be an integer, got {label!r}") from None
        else:
            label = None
        split = r.get("split") or None
        video = video.strip()
        entries.append(
            ManifestEntry(
                video=video if os.path.isabs(video) else os.path.join(root, video),
                captions=[c.strip() for c in caps],
                start=start,
                end=end,
                label=label,
                split=str(split) if split is not None else None,
            )
        )
    if not entries:
        raise ValueError(f"manifest {path}: no rows (expected one clip per row with 'video' and 'caption')")
    return entries


HELDOUT_NAMES = ("val", "valid", "validation", "test", "heldout")


def split_matches(value: str, split: str) -> bool:
    """Whether a row's ``split`` value belongs to the requested split (the held-out names are synonyms)."""
    if split in HELDOUT_NAMES:
        return value in HELDOUT_NAMES
    return value == split


def select_split(entries: Sequence, split: str | None, source: str) -> list:
    """Entries whose ``split`` matches ``split`` (``val`` also matches ``valid``/``validation``/``test``/``heldout``).
    With ``split=None``, or when no entry carries a split, all entries are kept (with a warning in the latter
    case when a held-out split was asked for)."""
    entries = list(entries)
    if split is None:
        return entries
    if all(getattr(e, "split", None) is None for e in entries):
        if split != "train":
            warnings.warn(
                f"fastvl.data: {source} has no 'split' field; split {split!r} uses all {len(entries)} entries",
                stacklevel=3,
            )
        return entries
    return [e for e in entries if getattr(e, "split", None) is not None and split_matches(e.split, split)]
