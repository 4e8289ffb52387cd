"""Reading tar shards: samples grouped by key (WebDataset's rule) and a header scan that reads the small
``.json`` / ``.txt`` members only (splits and captions, for counting samples and training a tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterator

from fastvl.data.shard_names import is_remote, open_shard

TEXT_EXTENSIONS = ("json", "txt")


def split_member(name: str) -> tuple[str, str] | None:
    """``'dir/000001.mp4'`` -> ``('dir/000001', 'mp4')`` (key up to the first dot of the base name); None for a
    name without an extension."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(dirname, stem), ext


def iter_tar(url: str, extensions: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Samples of one shard (a path, ``pipe:`` command or http(s) URL; see :mod:`fastvl.data.shard_names`) as
    dicts ``{"__key__": key, ext: bytes, ...}``: consecutive members with the same key form a sample. With
    ``extensions``, other members are passed over without being extracted."""
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        current: dict | None = None
        for member in tar:
            parts = split_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            if extensions is None or ext in extensions:
                current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


@dataclasses.dataclass
class ShardIndex:
    """What a scan learnt of one shard, per sample in order: its ``split`` (None when not recorded) and its
    ``captions`` (from ``.json``'s ``captions``, else the ``.txt`` member)."""

    splits: list[str | None]
    captions: list[list[str]]


def sample_text(sample: dict) -> tuple[str | None, list[str]]:
    """(split, captions) of a sample holding its ``json`` and/or ``txt`` bytes."""
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    caps = meta.get("captions") or []
    if isinstance(caps, str):
        caps = [caps]
    if not caps and "txt" in sample:
        caps = [sample["txt"].decode("utf-8")]
    return meta.get("split"), list(caps)


def scan_shard(url: str) -> ShardIndex:
    """Split and captions of every sample of a shard. A local shard is read by seeking over its members'
    headers (only the ``.json`` / ``.txt`` data is read); a remote one is streamed once."""
    samples: list[dict] = []
    if is_remote(url):
        samples = list(iter_tar(url, TEXT_EXTENSIONS))
    else:
        by_key: dict[str, dict] = {}
        with tarfile.open(url, "r") as tar:
            for m in tar.getmembers():
                parts = split_member(m.name) if m.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                sample = by_key.setdefault(key, {"__key__": key})
                if ext in TEXT_EXTENSIONS:
                    sample[ext] = tar.extractfile(m).read()
        samples = list(by_key.values())
    text = [sample_text(s) for s in samples]
    return ShardIndex([t[0] for t in text], [t[1] for t in text])
