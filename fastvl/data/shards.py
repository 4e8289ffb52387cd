"""WebDataset-format tar shards, written and read with the standard library's ``tarfile``.

A sample is three consecutive tar members sharing a key: ``<key>.mp4`` (the clip), ``<key>.txt`` (its first
caption) and ``<key>.json`` (``captions``, ``label``, ``index``, ``split``, optional ``start``/``end``), which
is the layout ``webdataset`` itself reads. Patterns use WebDataset's brace notation
(``'shards/{000..009}.tar'``, ``{a,b}`` lists, several braces) or shell globs.

Reading (:class:`ShardDataset`, an ``IterableDataset``) splits the shards over ranks and DataLoader workers
(over samples instead when there are fewer shards than readers), shuffles the shard order per epoch (same on
every rank, so ranks read disjoint shards) and samples with a seeded buffer per (epoch, rank, worker). Every
rank yields the same number of samples per epoch (``total // world_size``, wrapping around its own shards when
short), so DDP ranks stay in lockstep; ``skip`` resumes mid-epoch without decoding the skipped samples.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastvl.data.transforms import normalize_hwc
from fastvl.data.video import (
    SkippedVideoWarning,
    decode_clip,
    encode_mp4_bytes,
    require_av,
    select_split,
    split_matches,
)

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Expand WebDataset brace patterns: ``'s/{000..003}.tar'`` -> 4 names (zero-padded like the lower bound),
    ``'{a,b}'`` -> alternatives, several braces multiply; ``::`` separates several patterns; a pattern with
    ``*`` or ``?`` is a glob (sorted). A list of patterns expands each."""
    if not isinstance(pattern, str):
        return [p for pat in pattern for p in expand_pattern(pat)]
    if "::" in pattern:
        return expand_pattern(pattern.split("::"))
    m = _BRACE.search(pattern)
    if m is None:
        if any(ch in pattern for ch in "*?["):
            return sorted(glob.glob(pattern))
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"expand_pattern: empty range {{{body}}} in {pattern!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"expand_pattern: cannot expand {{{body}}} in {pattern!r} (use {{000..009}} or {{a,b}})")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for opt in options for p in expand_pattern(head + opt + tail)]


def is_shard_spec(spec: str) -> bool:
    return isinstance(spec, str) and (spec.endswith(".tar") or bool(_BRACE.search(spec)) and ".tar" in spec)


# ---- writing -----------------------------------------------------------------------------------


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _samples_from(source, split: str | None) -> Iterator[dict]:
    """(mp4 bytes, metadata) for a synthetic dataset (encoded in memory), a VideoDataset / manifest (the file's
    bytes, start/end kept), or an iterable of dicts with ``mp4`` and ``captions``."""
    from fastvl.data.synthetic import SyntheticVideoText
    from fastvl.data.video import VideoDataset, read_manifest

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

    for sample in _samples_from(source, split):
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
        _tar_add(tar, f"{key}.mp4", sample["mp4"])
        _tar_add(tar, f"{key}.txt", caps[0].encode("utf-8"))
        _tar_add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        count += 1
    close()
    if not written:
        raise ValueError("write_shards: the source has no samples")
    return written


def compact_pattern(paths: Sequence[str]) -> str:
    """``['d/000.tar', ..., 'd/006.tar']`` -> ``'d/{000..006}.tar'`` (when the names are such a run)."""
    m0 = re.fullmatch(r"(.*?)(\d+)(\.tar)", paths[0])
    if len(paths) > 1 and m0:
        head, first, tail = m0.groups()
        want = [f"{head}{str(int(first) + i).zfill(len(first))}{tail}" for i in range(len(paths))]
        if list(paths) == want:
            return f"{head}{{{first}..{str(int(first) + len(paths) - 1).zfill(len(first))}}}{tail}"
    return "::".join(paths)


# ---- reading -----------------------------------------------------------------------------------


def iter_tar(path: str) -> Iterator[dict]:
    """Samples of one shard as dicts ``{"__key__": key, ext: bytes, ...}`` (WebDataset grouping: consecutive
    members with the same key, the key being the member name up to the first dot of its base name)."""
    with tarfile.open(path, "r|*") as tar:
        current: dict | None = None
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(dirname, stem)
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current


def scan_shard(path: str) -> list[str | None]:
    """The ``split`` of every sample of a shard, in order (None when a sample has no json or no split); reads
    the tar headers and the small ``.json`` members only."""
    order: dict[str, str | None] = {}
    with tarfile.open(path, "r") as tar:
        for m in tar.getmembers():
            dirname, base = os.path.split(m.name)
            if not m.isfile() or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(dirname, stem)
            order.setdefault(key, None)
            if ext == "json":
                try:
                    order[key] = json.loads(tar.extractfile(m).read()).get("split")
                except (ValueError, AttributeError):
                    pass
    return list(order.values())


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream samples from tar shards (see the module docstring). Items follow the batch contract of
    ``fastvl.data`` (``video`` (T, 3, size, size), ``caption``, ``captions`` (P), ``label``, ``index``,
    ``audio`` when asked). ``len()`` is the number of samples this rank yields per epoch.

    Undecodable samples are skipped with a :class:`SkippedVideoWarning` and counted in ``skipped``
    (summed over worker processes); the reader moves on to the next sample.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        split: str | None = None,
        num_frames: int = 3,
        size: int = 32,
        train: bool = False,
        audio: bool = False,
        audio_rate: int = 8000,
        audio_seconds: float = 1.0,
        paraphrases: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        min_frames: int | None = None,
        equalize: bool | None = None,
    ):
        require_av()
        self.spec = urls if isinstance(urls, str) else "::".join(urls)
        self.urls = expand_pattern(urls)
        if not self.urls:
            raise ValueError(f"ShardDataset: {self.spec!r} matches no shard")
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"ShardDataset: {len(missing)} of {len(self.urls)} shards of {self.spec!r} are missing, "
                f"e.g. {missing[:3]}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardDataset: 'rank' must be in [0, world_size={world_size}), got {rank}")
        self.split = split
        self.num_frames, self.size, self.train = num_frames, size, bool(train)
        self.audio, self.audio_rate, self.audio_seconds = bool(audio), audio_rate, float(audio_seconds)
        self.paraphrases, self.seed, self.epoch = paraphrases, seed, epoch
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.buffer = max(1, int(buffer))
        self.rank, self.world_size = rank, world_size
        self.min_frames = min_frames
        self.equalize = self.train if equalize is None else bool(equalize)
        self._kept = [[self._keep(v) for v in scan_shard(u)] for u in self.urls]  # per sample: in the split?
        self.counts = [len(k) for k in self._kept]  # samples per shard (all splits)
        self.total = sum(sum(k) for k in self._kept)  # samples of the requested split
        if self.total == 0:
            raise ValueError(
                f"ShardDataset: the shards of {self.spec!r} hold no samples"
                + (f" of split {split!r}" if split is not None and sum(self.counts) else "")
            )
        self._skip: list[int] | None = None
        self._counts = torch.zeros(2, 256, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        """Samples this rank yields per epoch: ``total // world_size`` when equalising (training), else the
        samples of its own shards."""
        if self.equalize:
            return self.total // self.world_size
        return self._available(1)[self._reader(self.rank, 0, 1)]

    def _order(self) -> list[int]:
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order

    def _reader(self, rank: int, worker: int, num_workers: int) -> int:
        # workers of one rank are spread across the shard list, so ranks get nearly equal shard counts
        return worker * self.world_size + rank

    def _available(self, num_workers: int) -> list[int]:
        """Samples of the split each reader (rank, worker) holds this epoch, indexed by :meth:`_reader`."""
        readers = self.world_size * num_workers
        avail = [0] * readers
        order = self._order()
        if len(order) >= readers:  # whole shards per reader
            for i, s in enumerate(order):
                avail[i % readers] += sum(self._kept[s])
        else:  # too few shards: samples dealt out in turn
            pos = 0
            for s in order:
                for keep in self._kept[s]:
                    avail[pos % readers] += keep
                    pos += 1
        return avail

    def quotas(self, num_workers: int, rank: int | None = None) -> list[int]:
        """Samples each DataLoader worker of ``rank`` (default: this one) yields this epoch. Equalising, the
        rank's quota ``total // world_size`` is spread over its workers in proportion to what they hold
        (trimming the largest, or repeating samples of workers that hold any when short)."""
        rank = self.rank if rank is None else rank
        avail = self._available(num_workers)
        mine = [avail[self._reader(rank, w, num_workers)] for w in range(num_workers)]
        if not self.equalize:
            return mine
        q = self.total // self.world_size
        quota = list(mine)
        excess = sum(quota) - q
        while excess > 0:
            i = max(range(num_workers), key=lambda k: (quota[k], -k))
            quota[i] -= 1
            excess -= 1
        holders = [w for w in range(num_workers) if mine[w] > 0]
        if excess < 0:
            if not holders:
                raise ValueError(
                    f"ShardDataset: rank {rank} holds no samples of {self.spec!r} this epoch (the split filter "
                    "left its shards empty): write the splits into separate shard sets"
                )
            for j in range(-excess):
                quota[holders[j % len(holders)]] += 1
        return quota

    def worker_quota(self, worker: int, num_workers: int) -> int:
        return self.quotas(num_workers)[worker]

    @property
    def skipped(self) -> int:
        return int(self._counts[0].sum())

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_rate * self.audio_seconds))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_skip(self, per_worker: list[int] | None) -> None:
        """Skip the first ``per_worker[w]`` samples of worker ``w`` in the next iteration (resume)."""
        self._skip = per_worker

    def captions(self) -> list[str]:
        out = []
        for u in self.urls:
            for s in iter_tar(u):
                if "json" in s:
                    out.extend(json.loads(s["json"]).get("captions", []))
                elif "txt" in s:
                    out.append(s["txt"].decode("utf-8"))
        return out

    def _raw_stream(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Undecoded samples for this (rank, worker): shard order shuffled per epoch (the same on every rank),
        then a seeded shuffle buffer; wraps around to the start when exhausted (the caller stops at the quota)."""
        order = self._order()
        readers = self.world_size * num_workers
        me = self._reader(self.rank, worker, num_workers)
        by_shard = len(order) >= readers
        offsets = dict(zip(order, np.cumsum([0] + [self.counts[s] for s in order]).tolist()))
        mine = order[me::readers] if by_shard else order
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        while True:
            produced = 0
            buf: list[dict] = []
            for s in mine:
                for j, sample in enumerate(iter_tar(self.urls[s])):
                    if not by_shard and (offsets[s] + j) % readers != me:
                        continue
                    if not self._split_ok(sample):
                        continue
                    produced += 1
                    if not self.shuffle:
                        yield sample
                    elif len(buf) < self.buffer:
                        buf.append(sample)
                    else:
                        k = rng.randrange(len(buf))
                        buf[k], sample = sample, buf[k]
                        yield sample
            rng.shuffle(buf)
            yield from buf
            if produced == 0:
                return

    def _keep(self, value: str | None) -> bool:
        return self.split is None or value is None or split_matches(value, self.split)

    def _split_ok(self, sample: dict) -> bool:
        if self.split is None or "json" not in sample:
            return True
        return self._keep(json.loads(sample["json"]).get("split"))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        quota = self.worker_quota(worker, num_workers)
        skip = self._skip[worker] if self._skip else 0
        slot = 0 if info is None else 1 + info.id % 255
        n = fails = 0
        for raw in self._raw_stream(worker, num_workers):
            if n >= quota:
                return
            if n < skip:  # resuming: these were consumed before, do not decode them
                n += 1
                continue
            item = self._decode(raw)
            if item is None:  # undecodable: counted, and the next sample takes its place in the quota
                self._counts[0, slot] += 1
                fails += 1
                if fails > self.total:
                    raise RuntimeError(f"ShardDataset: no readable video in the shards of {self.spec!r}")
                continue
            fails = 0
            n += 1
            yield item

    def _decode(self, raw: dict) -> dict | None:
        key = raw.get("__key__", "?")
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            caps = meta.get("captions") or [raw["txt"].decode("utf-8")]
            rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
            frames, audio, has_audio = decode_clip(
                io.BytesIO(raw["mp4"]),
                num_frames=self.num_frames,
                size=self.size,
                train=self.train,
                rng=rng,
                start=meta.get("start"),
                end=meta.get("end"),
                min_frames=self.min_frames,
                audio_rate=self.audio_rate if self.audio else None,
                audio_samples=self.audio_samples if self.audio else None,
            )
        except Exception as e:
            msg = f"fastvl.data: skipping shard sample {key} of {self.spec}: {type(e).__name__}: {e}"
            warnings.warn(msg, SkippedVideoWarning, stacklevel=3)
            return None
        caps = [caps[p % len(caps)] for p in range(self.paraphrases)]
        item = {
            "video": normalize_hwc(frames),
            "caption": caps[0],
            "captions": caps,
            "label": int(meta.get("label", zlib.crc32(caps[0].encode()) & 0x7FFFFFFF)),
            "index": int(meta.get("index", zlib.crc32(key.encode()) & 0x7FFFFFFF)),
        }
        if self.audio:
            item["audio"] = torch.from_numpy(audio)
        return item

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.spec!r}, shards={len(self.urls)}, samples={self.total}, rank={self.rank}/"
            f"{self.world_size}, train={self.train}, shuffle={self.shuffle})"
        )
