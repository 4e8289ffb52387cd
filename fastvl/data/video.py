"""Real video files: :class:`VideoDataset` over a manifest (:mod:`fastvl.data.manifest`), decoded by
:func:`fastvl.data.decode.decode_clip` (PyAV or torchcodec, All-in-one's sparse sampling).

Corrupt, missing or too-short files never crash a run: :class:`VideoDataset` warns
(:class:`~fastvl.data.decode.SkippedVideoWarning`), counts the skip and substitutes another item.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from fastvl.data.decode import decode_clip, resolve_decoder
from fastvl.data.decode_common import SkippedVideoWarning
from fastvl.data.manifest import ManifestEntry, read_manifest, select_split
from fastvl.data.skips import SkipCounter
from fastvl.data.transforms import normalize_hwc


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over a manifest (path or parsed entries). Items follow the batch contract of
    ``fastvl.data``: ``video`` float32 (T, 3, size, size) CLIP-normalised, ``caption`` str, ``captions``
    list[str] (exactly ``paraphrases``, cycled when a row has fewer), ``label`` int, ``index`` int, and
    ``audio`` float32 (audio_rate * audio_seconds,) in [-1, 1] when ``audio``.

    Random choices (frame times, crop, audio offset) come from ``(seed, epoch, index)``, so an item is the
    same whatever the number of DataLoader workers. An unreadable item is replaced by another (deterministic)
    one after a :class:`SkippedVideoWarning`; ``skipped`` counts replacements across worker processes. At
    construction (``check=True``) entries are probed until one decodes: a manifest with no readable video
    raises ``ValueError`` saying so. ``decoder``: ``"pyav"``, ``"torchcodec"`` or None (auto, see
    :mod:`fastvl.data.decode`).
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[ManifestEntry],
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
        min_frames: int | None = None,
        max_retries: int = 10,
        check: bool = True,
        decoder: str | None = None,
    ):
        decoder = resolve_decoder(decoder)  # ImportError naming what to install when no decoder works
        if isinstance(manifest, (str, os.PathLike)):
            self.source = os.fspath(manifest)
            entries = read_manifest(manifest)
        else:
            self.source = "<entries>"
            entries = list(manifest)
        for name, v in (("num_frames", num_frames), ("size", size), ("audio_rate", audio_rate)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VideoDataset: '{name}' must be a positive int, got {v!r}")
        if isinstance(paraphrases, bool) or not isinstance(paraphrases, int) or paraphrases < 1:
            raise ValueError(f"VideoDataset: 'paraphrases' must be a positive int, got {paraphrases!r}")
        if not audio_seconds > 0:
            raise ValueError(f"VideoDataset: 'audio_seconds' must be > 0, got {audio_seconds!r}")
        self.entries = select_split(entries, split, self.source)
        if not self.entries:
            raise ValueError(f"VideoDataset: manifest {self.source} has no entries for split {split!r}")
        # default labels: clips with the same first caption are equivalent
        ids: dict[str, int] = {}
        for e in self.entries:
            ids.setdefault(e.captions[0], len(ids))
        self.labels = [e.label if e.label is not None else ids[e.captions[0]] for e in self.entries]
        self.num_frames, self.size, self.train = num_frames, size, bool(train)
        self.audio, self.audio_rate, self.audio_seconds = bool(audio), audio_rate, float(audio_seconds)
        self.paraphrases, self.seed, self.epoch = paraphrases, seed, 0
        self.min_frames = min_frames
        self.max_retries = max_retries
        self.bad: set[int] = set()
        self.decoder = decoder
        self.skips = SkipCounter()
        if check:
            self._probe()

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_rate * self.audio_seconds))

    @property
    def skipped(self) -> int:
        """How many times an unreadable item was replaced (summed over DataLoader workers)."""
        return self.skips.total("skipped")

    @property
    def missing_audio(self) -> int:
        """How many items had no audio stream (zeros were returned) while ``audio`` is on."""
        return self.skips.total("missing_audio")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def captions(self) -> list[str]:
        return [c for e in self.entries for c in e.captions]

    def _probe(self) -> None:
        errors = []
        for i in range(len(self.entries)):
            try:
                self._load(i, np.random.default_rng(0), train=False)
                return
            except Exception as e:
                self._mark_bad(i, e)
                if len(errors) < 3:
                    errors.append(f"{self.entries[i].video}: {type(e).__name__}: {e}")
        raise ValueError(
            f"VideoDataset: no readable video in manifest {self.source} ({len(self.entries)} entries tried; "
            f"first errors: {'; '.join(errors)})"
        )

    def _load(self, i: int, rng: np.random.Generator, train: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
        e = self.entries[i]
        return decode_clip(
            e.video,
            num_frames=self.num_frames,
            size=self.size,
            train=train,
            rng=rng,
            start=e.start,
            end=e.end,
            min_frames=self.min_frames,
            audio_rate=self.audio_rate if self.audio else None,
            audio_samples=self.audio_samples if self.audio else None,
            decoder=self.decoder,
        )

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"VideoDataset: index {index} out of range for {n} entries")
        index %= n
        pick = np.random.default_rng([self.seed, self.epoch, index, 1])
        i = index
        for _ in range(self.max_retries + 1):
            if i not in self.bad:
                try:
                    loaded = self._load(i, np.random.default_rng([self.seed, self.epoch, i]), self.train)
                except Exception as e:
                    self._mark_bad(i, e)
                else:
                    return self._item(i, *loaded)
            self.skips.add("skipped")  # item i is replaced by another one
            if len(self.bad) >= n:
                break
            if len(self.bad) > n // 2:
                i = int(pick.choice([j for j in range(n) if j not in self.bad]))
            else:
                i = int(pick.integers(n))
        raise RuntimeError(
            f"VideoDataset: no readable video found for index {index} after {self.max_retries} replacements "
            f"({len(self.bad)} of {n} entries of {self.source} are unreadable)"
        )

    def _mark_bad(self, i: int, e: Exception) -> None:
        self.bad.add(i)
        warnings.warn(
            f"fastvl.data: skipping {self.entries[i].video}: {type(e).__name__}: {e}", SkippedVideoWarning, stacklevel=3
        )

    def _item(self, i: int, frames: np.ndarray, audio: np.ndarray | None, has_audio: bool) -> dict:
        caps = self.entries[i].captions
        caps = [caps[p % len(caps)] for p in range(self.paraphrases)]
        item = {
            "video": normalize_hwc(frames),
            "caption": caps[0],
            "captions": caps,
            "label": self.labels[i],
            "index": i,
        }
        if self.audio:
            if not has_audio:
                self.skips.add("missing_audio")
            item["audio"] = torch.from_numpy(audio)
        return item

    def __repr__(self) -> str:
        return (
            f"VideoDataset({self.source!r}, entries={len(self)}, num_frames={self.num_frames}, size={self.size}, "
            f"train={self.train}, audio={self.audio}, skipped={self.skipped})"
        )
