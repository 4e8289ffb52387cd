"""One entry point from a ``--data`` spec to batches: :func:`open_dataset` and :func:`build_loader`.

Batch contract (what the models consume)::

    video          float32 (B, T, 3, H, W)  CLIP mean/std normalised
    text_ids       int64   (B, Lt)          [CLS] ... [SEP] [PAD]... (the first caption)
    text_mask      bool    (B, Lt)          True = real token
    audio          float32 (B, n_samples)   in [-1, 1]            (when the dataset has audio)
    text_ids_all   int64   (B, P, Lt)       all P paraphrases     (when P > 1; text_ids = [:, 0])
    text_mask_all  bool    (B, P, Lt)                             (when P > 1)
    caption        list[str] (B)            the first caption
    label          int64   (B,)             clips with equal labels have equivalent captions
    index          int64   (B,)             the item's index in its dataset (shards: in the shard set)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastvl.data.tokenizer import Tokenizer

SYNTHETIC_SIZES = {"train": 1024, "val": 256}


def spec_kind(spec: str) -> str:
    """``"synthetic"``, ``"manifest"`` (``.csv`` / ``.jsonl``) or ``"shards"`` (``.tar`` / brace pattern)."""
    from fastvl.data.shard_names import is_shard_spec

    if not isinstance(spec, str) or not spec:
        raise TypeError(f"open_dataset: 'spec' must be a non-empty string, got {spec!r}")
    if spec == "synthetic":
        return "synthetic"
    if is_shard_spec(spec):
        return "shards"
    if os.path.splitext(spec)[1].lower() in (".csv", ".jsonl", ".json"):
        return "manifest"
    raise ValueError(
        f"open_dataset: cannot tell what {spec!r} is: expected 'synthetic', a manifest (.csv / .jsonl) "
        "or tar shards ('dir/{000..009}.tar', '*.tar')"
    )


def open_dataset(
    spec: str,
    split: str = "train",
    *,
    train: bool | None = None,
    num_frames: int = 3,
    size: int = 32,
    audio: bool = False,
    audio_rate: int = 8000,
    audio_seconds: float = 1.0,
    paraphrases: int = 1,
    seed: int = 0,
    num_clips: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    **kwargs: Any,
) -> torch.utils.data.Dataset:
    """The dataset behind a ``--data`` spec, for ``split`` (``"train"`` or ``"val"``, the held-out split).

    - ``"synthetic"``: :class:`~fastvl.data.synthetic.SyntheticVideoText` with ``num_clips`` (default 1024 train /
      256 val) clips of ``num_frames`` frames spanning ``audio_seconds`` (1 s) at ``size`` px; extra ``kwargs`` go
      to :class:`~fastvl.data.synthetic.SyntheticConfig` (``colors``, ``shapes``, ``motions``, ``fps``), except
      ``cache=True`` (keep generated items in memory).
    - a ``.csv`` / ``.jsonl`` manifest: :class:`~fastvl.data.video.VideoDataset` (rows whose ``split`` matches;
      all rows when the manifest has no ``split`` column).
    - shards (``*.tar``, brace pattern): :class:`~fastvl.data.shards.ShardDataset` for this ``rank`` of
      ``world_size``.

    ``train`` (default: ``split == "train"``) turns on random frame times and crops for files and shards.
    """
    from fastvl.data.synthetic import SPLIT_ALIASES, SyntheticConfig, SyntheticVideoText

    kind = spec_kind(spec)
    if split not in SPLIT_ALIASES:
        raise ValueError(f"open_dataset: 'split' must be one of {sorted(SPLIT_ALIASES)}, got {split!r}")
    split = SPLIT_ALIASES[split]
    train = (split == "train") if train is None else bool(train)
    if kind == "synthetic":
        cache = bool(kwargs.pop("cache", False))
        cfg = SyntheticConfig(
            num_clips=num_clips or SYNTHETIC_SIZES[split],
            frames=num_frames,
            size=size,
            fps=kwargs.pop("fps", num_frames / audio_seconds),
            audio=audio,
            audio_rate=audio_rate,
            audio_seconds=audio_seconds,
            paraphrases=paraphrases,
            **kwargs,
        )
        return SyntheticVideoText(split, seed=seed, config=cfg, cache=cache)
    common = dict(
        split=split,
        num_frames=num_frames,
        size=size,
        train=train,
        audio=audio,
        audio_rate=audio_rate,
        audio_seconds=audio_seconds,
        paraphrases=paraphrases,
        seed=seed,
    )
    if num_clips is not None:
        raise ValueError(f"open_dataset: 'num_clips' only applies to the synthetic dataset, not to {spec!r}")
    if kind == "manifest":
        from fastvl.data.video import VideoDataset

        return VideoDataset(spec, **common, **kwargs)
    from fastvl.data.shards import ShardDataset

    return ShardDataset(spec, **common, rank=rank, world_size=world_size, **kwargs)


class DistributedSampler(torch.utils.data.Sampler[int]):
    """Indices for one rank, like ``torch.utils.data.DistributedSampler``: training shuffles with
    ``seed + epoch`` (the same permutation on every rank) and drops the tail so every rank gets
    ``n // world_size`` indices; evaluation keeps order and every index once (rank r takes r, r + W, ...).
    ``start`` skips the first indices of this rank (resuming mid-epoch)."""

    def __init__(
        self, n: int, *, rank: int = 0, world_size: int = 1, shuffle: bool, seed: int = 0, drop_last: bool = True
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedSampler: 'rank' must be in [0, world_size={world_size}), got {rank}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: (self.n // self.world_size) * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size - self.start
        return len(range(self.rank, self.n, self.world_size)) - self.start


class Collate:
    """Items -> a batch dict of the contract above; tokenises the captions (P per item)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = 16):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        B = len(items)
        P = len(items[0]["captions"])
        texts = [c for it in items for c in it["captions"]]
        ids, mask = self.tokenizer.encode(texts, self.max_len)
        ids, mask = ids.view(B, P, -1), mask.view(B, P, -1)
        batch = {
            "video": torch.stack([it["video"] for it in items]),
            "text_ids": ids[:, 0].contiguous(),
            "text_mask": mask[:, 0].contiguous(),
            "caption": [it["caption"] for it in items],
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        }
        if "audio" in items[0]:
            batch["audio"] = torch.stack([it["audio"] for it in items])
        if P > 1:
            batch["text_ids_all"], batch["text_mask_all"] = ids, mask
        return batch


class Loader:
    """A DataLoader with epochs and a resumable position: ``set_epoch(e)`` before each epoch (reshuffles the
    sampler / shards and the per-item randomness), ``state_dict()`` -> ``{"epoch", "batch"}`` (batches consumed
    in the epoch) and ``load_state_dict`` to continue from there with the same batches an uninterrupted run
    would have seen. ``len()`` is the number of batches per epoch on this rank."""

    def __init__(
        self, dataset, batch_size: int, *, collate: Collate, sampler, train: bool, drop_last: bool, seed: int = 0, **dl
    ):
        self.dataset, self.batch_size, self.collate, self.sampler = dataset, batch_size, collate, sampler
        self.seed = seed
        self.tokenizer = collate.tokenizer
        self.train, self.drop_last = train, drop_last
        self._dl_kwargs = dl
        self.epoch = 0
        self.batch = 0  # batches consumed in the current epoch
        self._start = 0

    @property
    def iterable(self) -> bool:
        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.batch = self._start = 0
        for obj in (self.sampler, self.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.batch = self._start = int(state["batch"])

    def _worker_batches(self, rank: int | None = None) -> list[int]:
        """Batches each DataLoader worker of an iterable dataset yields per epoch (on ``rank``)."""
        nw = max(1, self._dl_kwargs.get("num_workers", 0))
        quotas = self.dataset.quotas(nw, rank)
        return [q // self.batch_size if self.drop_last else math.ceil(q / self.batch_size) for q in quotas]

    def __len__(self) -> int:
        if self.iterable:
            if self.drop_last:  # every rank stops at the same count, or DDP ranks would fall out of step
                return min(sum(self._worker_batches(r)) for r in range(self.dataset.world_size))
            return sum(self._worker_batches())
        n = len(self.sampler) + self.sampler.start
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _skip_per_worker(self, done: int) -> list[int]:
        """Samples each worker already produced after ``done`` batches (DataLoader takes workers in turn,
        passing over exhausted ones)."""
        left = self._worker_batches()
        taken = [0] * len(left)
        w = 0
        for _ in range(done):
            while left[w] == 0:
                w = (w + 1) % len(left)
            taken[w] += 1
            left[w] -= 1
            w = (w + 1) % len(left)
        return [t * self.batch_size for t in taken]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self._start
        if self.iterable:
            self.dataset.set_skip(self._skip_per_worker(start) if start else None)
            sampler = None
        else:
            self.sampler.start = start * self.batch_size
            sampler = self.sampler
        # the DataLoader's own generator: without one it draws its workers' base seed from the global RNG each
        # time an iterator starts, so a run resumed mid-epoch would shift the model's random stream
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            drop_last=self.drop_last,
            generator=g,
            **self._dl_kwargs,
        )
        self.batch = start
        stop = len(self)
        try:
            for batch in dl:
                if self.batch >= stop:
                    break
                self.batch += 1
                yield batch
        finally:
            self._start = 0
            if self.iterable:
                self.dataset.set_skip(None)
            else:
                self.sampler.start = 0


def check_loader_arguments(batch_size: int, num_workers: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"build_loader: 'batch_size' must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"build_loader: 'num_workers' must be an int >= 0, got {num_workers!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"build_loader: 'rank' must be in [0, world_size={world_size}), got {rank}")


def resolve_tokenizer(tokenizer: Tokenizer | str | os.PathLike | None, dataset, vocab_size: int) -> Tokenizer:
    """A :class:`Tokenizer` as given, loaded from a directory, or trained on the dataset's captions."""
    if tokenizer is None:
        return Tokenizer.train(dataset.captions(), vocab_size=vocab_size)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return Tokenizer.load(tokenizer)


def make_sampler(dataset, rank: int, world_size: int, train: bool, seed: int, drop_last: bool):
    """A :class:`DistributedSampler` for a map-style dataset; None for shards (they split themselves, and must
    have been built for this rank)."""
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        return DistributedSampler(
            len(dataset), rank=rank, world_size=world_size, shuffle=train, seed=seed, drop_last=drop_last
        )
    if (getattr(dataset, "rank", rank), getattr(dataset, "world_size", world_size)) != (rank, world_size):
        raise ValueError(
            f"build_loader: the shard dataset was built for rank {dataset.rank} of {dataset.world_size}, "
            f"not rank {rank} of {world_size}"
        )
    return None


def build_loader(
    dataset_or_spec,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    pin_memory: bool | None = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    max_len: int = 16,
    drop_last: bool | None = None,
    split: str | None = None,
    vocab_size: int = 1000,
    prefetch_factor: int | None = None,
    **dataset_kwargs: Any,
) -> Loader:
    """A :class:`Loader` yielding batches of the contract above.

    ``dataset_or_spec``: a dataset (synthetic, video or shards) or a spec for :func:`open_dataset` (then
    ``split`` defaults to ``"train"`` if ``train`` else ``"val"``, and ``dataset_kwargs`` go there). Map-style
    datasets use a :class:`DistributedSampler` (shuffled per ``seed + epoch`` when ``train``); shards split
    themselves over ranks and workers. ``drop_last`` defaults to ``train``. ``tokenizer``: a
    :class:`Tokenizer`, a directory to load one from, or None to train one (``vocab_size``) on the dataset's
    captions. ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    """
    check_loader_arguments(batch_size, num_workers, rank, world_size)
    if isinstance(dataset_or_spec, (str, os.PathLike)):
        dataset = open_dataset(
            os.fspath(dataset_or_spec),
            split or ("train" if train else "val"),
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            **dataset_kwargs,
        )
    else:
        if dataset_kwargs:
            raise TypeError(f"build_loader: unexpected arguments for a dataset object: {sorted(dataset_kwargs)}")
        dataset = dataset_or_spec
    tokenizer = resolve_tokenizer(tokenizer, dataset, vocab_size)
    drop_last = train if drop_last is None else drop_last
    dl: dict[str, Any] = dict(
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    # no persistent workers: each epoch's workers must see the dataset's new epoch (per-item randomness)
    if num_workers > 0 and prefetch_factor is not None:
        dl["prefetch_factor"] = prefetch_factor
    loader = Loader(
        dataset,
        batch_size,
        collate=Collate(tokenizer, max_len),
        sampler=make_sampler(dataset, rank, world_size, train, seed, drop_last),
        train=train,
        drop_last=drop_last,
        seed=seed,
        **dl,
    )
    loader.set_epoch(epoch)
    return loader
