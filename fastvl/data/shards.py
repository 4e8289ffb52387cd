"""Streaming WebDataset-format tar shards (:class:`ShardDataset`); names in :mod:`fastvl.data.shard_names`,
the writer in :mod:`fastvl.data.shard_writer`.

Reading splits the shards over ranks and DataLoader workers (over samples instead when there are fewer shards
than readers), shuffles the shard order per epoch (same on every rank, so ranks read disjoint shards) and
samples with a seeded buffer per (epoch, rank, worker). Every rank yields the same number of samples per epoch
(``total // world_size``, wrapping around its own shards when short), so DDP ranks stay in lockstep; ``skip``
resumes mid-epoch without decoding the skipped samples. At construction every shard is scanned once for the
split and captions of its samples (local shards: headers and the small text members only).
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastvl.data.decode import decode_clip, resolve_decoder
from fastvl.data.decode_common import SkippedVideoWarning
from fastvl.data.manifest import split_matches
from fastvl.data.shard_names import expand_pattern, is_remote
from fastvl.data.shard_reader import iter_tar, scan_shard
from fastvl.data.skips import SkipCounter
from fastvl.data.transforms import normalize_hwc


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
        decoder: str | None = None,
    ):
        decoder = resolve_decoder(decoder)  # ImportError naming what to install when no decoder works
        self.spec = urls if isinstance(urls, str) else "::".join(urls)
        self.urls = expand_pattern(urls)
        if not self.urls:
            raise ValueError(f"ShardDataset: {self.spec!r} matches no shard")
        missing = [u for u in self.urls if not is_remote(u) and not os.path.isfile(u)]
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
        self.decoder = decoder
        self.shard_index = [scan_shard(u) for u in self.urls]
        self._kept = [[self._keep(v) for v in ix.splits] for ix in self.shard_index]  # per sample: in the split?
        self.counts = [len(k) for k in self._kept]  # samples per shard (all splits)
        self.total = sum(sum(k) for k in self._kept)  # samples of the requested split
        if self.total == 0:
            raise ValueError(
                f"ShardDataset: the shards of {self.spec!r} hold no samples"
                + (f" of split {split!r}" if split is not None and sum(self.counts) else "")
            )
        self._skip: list[int] | None = None
        self.skips = SkipCounter()

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
        return self.skips.total("skipped")

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_rate * self.audio_seconds))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_skip(self, per_worker: list[int] | None) -> None:
        """Skip the first ``per_worker[w]`` samples of worker ``w`` in the next iteration (resume)."""
        self._skip = per_worker

    def captions(self) -> list[str]:
        """Every caption of the split's samples, from the scan made at construction (no video is read)."""
        out: list[str] = []
        for ix, kept in zip(self.shard_index, self._kept):
            for caps, keep in zip(ix.captions, kept):
                if keep:
                    out.extend(caps)
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
        n = fails = 0
        for raw in self._raw_stream(worker, num_workers):
            if n >= quota:
                return
            if n < skip:  # resuming: these were consumed before, do not decode them
                n += 1
                continue
            item = self._decode(raw)
            if item is None:  # undecodable: counted, and the next sample takes its place in the quota
                self.skips.add("skipped")
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
                decoder=self.decoder,
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
