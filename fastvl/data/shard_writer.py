"""Writing WebDataset-format tar shards with the standard library's ``tarfile`` (``fastvl data shards``).

A sample is three consecutive tar members sharing a key: ``<key>.mp4`` (the clip), ``<key>.txt`` (its first
caption) and ``<key>.json`` (``captions``, ``label``, ``index``, ``split``, optional ``start``/``end``), the
layout ``webdataset`` reads.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator

from fastvl.data.decode_common import SkippedVideoWarning
from fastvl.data.manifest import read_manifest, select_split
from fastvl.data.mp4 import encode_mp4_bytes
from fastvl.data.shard_names import expand_pattern


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def samples_from(source, split: str | None) -> Iterator[dict]:
    """(mp4 bytes, metadata) for a synthetic dataset (encoded in memory), a VideoDataset / manifest (the file's
    bytes, start/end kept), or an iterable of dicts with ``mp4`` and ``captions``."""
    from fastvl.data.synthetic import SyntheticVideoText
    from fastvl.data.video import VideoDataset

    if isinstance(source, str):
        source = read_manifest(source)
    if isinstance(source, SyntheticVideoText):
        c = source.config
        for i in range(len(source)):
            raw = source.render(i)
            mp4 = encode_mp4_bytes(raw["frames"], c.fps, raw["audio"], c.audio_rate if c.audio else None)
            yield {"mp4": mp4, "captions": raw["captions"], "label": raw["label"], "split": source.split}
        return
    if isinstance(source, VideoDataset):
        entries = [(e, lab) for e, lab in zip(source.entries, source.labels)]
    elif isinstance(source, list) and source and hasattr(source[0], "video"):
        ids: dict[str, int] = {}
        entries = [(e, e.label if e.label is not None else ids.setdefault(e.captions[0], len(ids))) for e in source]
    else:
        yield from source
        return
    kept = select_split([e for e, _ in entries], split, "the manifest")
    keep = {id(e) for e in kept}
    for e, label in entries:
        if id(e) not in keep:
            continue
        try:
            with open(e.video, "rb") as f:
                mp4 = f.read()
        except OSError as err:
            warnings.warn(f"fastvl.data: not sharding {e.video}: {err}", SkippedVideoWarning, stacklevel=2)
            continue
        meta = {"mp4": mp4, "captions": e.captions, "label": label, "split": e.split}
        if e.start is not None:
            meta["start"] = e.start
        if e.end is not None:
            meta["end"] = e.end
        yield meta


def write_shards(source, pattern: str, per_shard: int, *, split: str | None = None) -> list[str]:
    """Write ``source`` (a SyntheticVideoText, a VideoDataset, a manifest path or entries, or an iterable of
    ``{"mp4": bytes, "captions": [...], "label": int, ...}``) into tar shards of ``per_shard`` samples named by
    ``pattern`` (e.g. ``'out/{000..099}.tar'``; the range must hold enough names, the surplus is left unwritten).
    Each shard is written to a temporary name and renamed. Returns the paths written, in order."""
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"write_shards: 'per_shard' must be a positive int, got {per_shard!r}")
    names = expand_pattern(pattern)
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"write_shards: pattern {pattern!r} must expand to distinct shard names, got {names[:4]}")
    written: list[str] = []
    tar = None
    count = 0

    def close():
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(written[-1] + ".tmp", written[-1])
            tar = None

    for sample in samples_from(source, split):
        if count % per_shard == 0:
            close()
            shard = count // per_shard
            if shard >= len(names):
                raise ValueError(
                    f"write_shards: pattern {pattern!r} names {len(names)} shards of {per_shard}, "
                    f"too few for the data (more than {len(names) * per_shard} samples)"
                )
            os.makedirs(os.path.dirname(os.path.abspath(names[shard])), exist_ok=True)
            written.append(names[shard])
            tar = tarfile.open(names[shard] + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        key = f"{count:09d}"
        caps = sample["captions"]
        caps = [caps] if isinstance(caps, str) else list(caps)
        meta = {k: v for k, v in sample.items() if k not in ("mp4", "captions")}
        meta.update(captions=caps, index=count)
        add_member(tar, f"{key}.mp4", sample["mp4"])
        add_member(tar, f"{key}.txt", caps[0].encode("utf-8"))
        add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        count += 1
    close()
    if not written:
        raise ValueError("write_shards: the source has no samples")
    return written
