"""Real video files: manifests, PyAV decoding with All-in-one's sparse sampling, and an mp4 writer.

A manifest is a CSV (header row) or JSONL file with one clip per row: ``video`` (path, relative to the
manifest's directory unless absolute), ``caption`` (a string; in JSONL also a list of paraphrases), and
optionally ``start`` / ``end`` (seconds), ``label`` (int; clips sharing a label count as equivalent in
retrieval, default: clips with the same first caption) and ``split`` (e.g. ``train`` / ``val``).

Sampling (All-in-one): the clip window is cut into T equal segments; training takes a random time in each
segment, evaluation the middle; each time shows the frame on screen then (the last frame starting at or
before it), which equals All-in-one's frame-index rule for constant frame rates and handles variable ones.
Frames are resized (shorter side to ``size``, by FFmpeg's swscale, area filter) and cropped to a square
(random for training, central otherwise, the same crop for all frames; never flipped: captions say left and
right), then CLIP-normalised. Audio is decoded, resampled to mono ``audio_rate`` and cropped or zero-padded
to ``audio_seconds`` from the window start (a random offset inside the window when training).

Corrupt, missing or too-short files never crash a run: :class:`VideoDataset` warns
(:class:`SkippedVideoWarning`), counts the skip and substitutes another item.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, BinaryIO

import numpy as np
import torch

from fastvl.data.transforms import normalize_hwc, short_side_size

MAX_WORKERS = 256  # per-worker slots of the shared skip counter


class SkippedVideoWarning(UserWarning):
    """A clip could not be used (missing, corrupt, too short) and was replaced by another one."""


class ClipError(ValueError):
    """A clip cannot be decoded into the requested frames (the reason is in the message)."""


def require_av():
    """Import PyAV or raise an ImportError that says how to get it."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fastvl.data: reading or writing video files needs PyAV: pip install 'fastvl[video]' (or pip install av)"
        ) from e
    return av


# ---- manifests ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ManifestEntry:
    """One row of a manifest; ``video`` is resolved against the manifest's directory."""

    video: str
    captions: list[str]
    start: float | None = None
    end: float | None = None
    label: int | None = None
    split: str | None = None


def _float_or_none(v: Any, where: str, name: str) -> float | None:
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
        start = _float_or_none(r.get("start"), where, "start")
        end = _float_or_none(r.get("end"), where, "end")
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


# ---- decoding ----------------------------------------------------------------------------------


def sample_times(start: float, end: float, num_frames: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """All-in-one's sparse sampling in time: ``num_frames`` equal segments of [start, end); a uniform random
    time in each for training, the segment middle for evaluation."""
    edges = np.linspace(start, end, num_frames + 1)
    if train:
        return edges[:-1] + rng.random(num_frames) * (edges[1:] - edges[:-1])
    return (edges[:-1] + edges[1:]) / 2


def _stream_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def decode_clip(
    source: str | BinaryIO,
    *,
    num_frames: int,
    size: int,
    train: bool,
    rng: np.random.Generator,
    start: float | None = None,
    end: float | None = None,
    min_frames: int | None = None,
    audio_rate: int | None = None,
    audio_samples: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Decode one clip: ``(frames uint8 (T, size, size, 3), audio float32 (audio_samples,) or None, has_audio)``.

    ``source`` is a path or a binary file object. Audio is returned when ``audio_rate`` and ``audio_samples``
    are given (zeros, with ``has_audio`` False, when the file has no audio stream). Raises :class:`ClipError`
    for a clip with no video stream, an empty window or fewer than ``min_frames`` (default ``num_frames``)
    frames in its window; PyAV errors propagate for unreadable files.
    """
    av = require_av()
    min_frames = num_frames if min_frames is None else min_frames
    with av.open(source, metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ClipError("no video stream")
        vs = container.streams.video[0]
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        duration = _stream_duration(container, vs)
        rate = float(vs.average_rate or vs.guessed_rate or 0) or None
        s = start or 0.0
        if duration is None:  # no header duration: one counting pass
            n = sum(1 for _ in container.decode(vs))
            if not n or rate is None:
                raise ClipError("cannot determine the duration")
            duration = n / rate
            container.seek(0)
        e = duration if end is None else min(end, duration)
        if e - s <= 0:
            raise ClipError(f"too short: window [{s:.3f}, {e:.3f}) s is empty (video lasts {duration:.3f} s)")
        if rate is not None and (e - s) * rate < min_frames - 0.5:
            raise ClipError(
                f"too short: the window [{s:.3f}, {e:.3f}) s holds {(e - s) * rate:.1f} frame(s) at "
                f"{rate:.3g} fps, need {min_frames}"
            )
        targets = sample_times(s, e, num_frames, train, rng)
        chosen = _frames_at(container, vs, targets, t0, rate)
        if chosen is None:
            raise ClipError(f"too short: no frame decoded in the window [{s:.3f}, {e:.3f}) s")
        prev = chosen[-1]
        h, w = short_side_size(prev.height, prev.width, size)
        frames = np.stack(
            [f.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA") for f in chosen]
        )  # (T, h, w, 3)
        if train:
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        frames = frames[:, top : top + size, left : left + size]
        if audio_rate is None or audio_samples is None:
            return frames, None, False
        if not container.streams.audio:
            return frames, np.zeros(audio_samples, dtype=np.float32), False
        a0 = s
        if train:
            a0 += float(rng.uniform(0, max(0.0, (e - s) - audio_samples / audio_rate)))
        return frames, _decode_audio(av, container, a0, audio_rate, audio_samples), True


SEEK_GAP_S = 2.0  # seek (to the keyframe before) instead of decoding through gaps longer than this


def _frames_at(container, vs, targets: np.ndarray, t0: float, rate: float | None) -> list | None:
    """The frame on screen at each (increasing) time in ``targets``: the last frame starting at or before it
    (the first decoded frame if none does). Decodes forward, seeking over long gaps. None if nothing decodes."""
    eps = 1e-6
    chosen: list = []
    it = None
    prev = nxt = None
    pos = -np.inf  # time of prev
    count = 0
    for target in targets:
        if it is None or target - max(pos, 0.0) > SEEK_GAP_S:
            if it is not None or target > SEEK_GAP_S / 2:
                container.seek(int((target + t0) / vs.time_base), stream=vs, backward=True, any_frame=False)
            it = container.decode(vs)
            prev = nxt = None
            pos = -np.inf
        while True:
            if nxt is None:
                nxt = next(it, None)
                if nxt is None:
                    break
                count += 1
            ft = (nxt.time if nxt.time is not None else count / (rate or 1.0)) - t0
            if ft > target + eps:
                break
            prev, pos, nxt = nxt, ft, None
        pick = prev if prev is not None else nxt
        if pick is None:
            pick = chosen[-1] if chosen else None
            if pick is None:
                return None
        chosen.append(pick)
    return chosen


def _decode_audio(av, container, a0: float, rate: int, n: int) -> np.ndarray:
    """``n`` mono float32 samples at ``rate`` from ``a0`` seconds (zero-padded at the end)."""
    st = container.streams.audio[0]
    t0 = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
    # always seek: decoding the video has consumed the demuxed packets of the audio stream
    container.seek(int((a0 + t0) / st.time_base), stream=st, backward=True, any_frame=False)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks: list[np.ndarray] = []
    first: float | None = None
    have = 0
    need = None
    for frame in container.decode(st):
        if first is None:
            first = (frame.time if frame.time is not None else t0) - t0
            need = max(0, int(round((a0 - first) * rate))) + n
        for out in resampler.resample(frame):
            arr = out.to_ndarray().reshape(-1)
            chunks.append(arr)
            have += arr.size
        if need is not None and have >= need:
            break
    else:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.zeros(n, dtype=np.float32)
    if chunks and first is not None:
        allsamples = np.concatenate(chunks)
        offset = int(round((a0 - first) * rate))
        if offset < 0:  # the stream starts after a0: leading silence
            seg = allsamples[: n + offset]
            audio[-offset : -offset + seg.size] = seg
        else:
            seg = allsamples[offset : offset + n]
            audio[: seg.size] = seg
    return np.clip(audio, -1.0, 1.0)


# ---- the dataset -------------------------------------------------------------------------------


def _worker_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (MAX_WORKERS - 1)


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over a manifest (path or parsed entries). Items follow the batch contract of
    ``fastvl.data``: ``video`` float32 (T, 3, size, size) CLIP-normalised, ``caption`` str, ``captions``
    list[str] (exactly ``paraphrases``, cycled when a row has fewer), ``label`` int, ``index`` int, and
    ``audio`` float32 (audio_rate * audio_seconds,) in [-1, 1] when ``audio``.

    Random choices (frame times, crop, audio offset) come from ``(seed, epoch, index)``, so an item is the
    same whatever the number of DataLoader workers. An unreadable item is replaced by another (deterministic)
    one after a :class:`SkippedVideoWarning`; ``skipped`` counts replacements across worker processes. At
    construction (``check=True``) entries are probed until one decodes: a manifest with no readable video
    raises ``ValueError`` saying so.
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
    ):
        require_av()
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
        self._counts = torch.zeros(2, MAX_WORKERS, dtype=torch.int64).share_memory_()
        if check:
            self._probe()

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_rate * self.audio_seconds))

    @property
    def skipped(self) -> int:
        """How many times an unreadable item was replaced (summed over DataLoader workers)."""
        return int(self._counts[0].sum())

    @property
    def missing_audio(self) -> int:
        """How many items had no audio stream (zeros were returned) while ``audio`` is on."""
        return int(self._counts[1].sum())

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
            self._counts[0, _worker_slot()] += 1  # item i is replaced by another one
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
                self._counts[1, _worker_slot()] += 1
            item["audio"] = torch.from_numpy(audio)
        return item

    def __repr__(self) -> str:
        return (
            f"VideoDataset({self.source!r}, entries={len(self)}, num_frames={self.num_frames}, size={self.size}, "
            f"train={self.train}, audio={self.audio}, skipped={self.skipped})"
        )


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


# ---- writing -----------------------------------------------------------------------------------

VIDEO_CODECS = ("libx264", "h264", "mpeg4")
AUDIO_CODECS = ("aac",)


def _pick_codec(av, names: Sequence[str]) -> str | None:
    for n in names:
        try:
            av.codec.Codec(n, "w")
            return n
        except Exception:
            continue
    return None


def encode_mp4(
    target: str | BinaryIO,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    audio_rate: int | None = None,
    *,
    crf: int = 10,
    gop: int | None = None,
) -> dict[str, str | None]:
    """Write uint8 frames (T, H, W, 3) (H, W even) and optional mono float32 audio in [-1, 1] as an mp4
    (H.264 yuv420p via libx264, else mpeg4; AAC audio when an encoder exists) to a path or binary file.
    ``gop`` sets the keyframe interval (frames). Returns the codecs used: ``{"video": ..., "audio": ... or None}``."""
    av = require_av()
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_mp4: 'frames' must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"encode_mp4: frame height and width must be even for yuv420p, got {H}x{W}")
    vcodec = _pick_codec(av, VIDEO_CODECS)
    if vcodec is None:
        raise RuntimeError(f"encode_mp4: this PyAV/FFmpeg build has none of the video encoders {VIDEO_CODECS}")
    acodec = _pick_codec(av, AUDIO_CODECS) if audio is not None else None
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(target, "w", format="mp4") as c:
        vs = c.add_stream(vcodec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        if gop is not None:
            vs.gop_size = int(gop)
        vs.options = {"crf": str(crf), "preset": "veryfast"} if vcodec in ("libx264", "h264") else {"qscale": "2"}
        ast = None
        if acodec is not None:
            ast = c.add_stream(acodec, rate=int(audio_rate))
            ast.layout = "mono"
        for i, fr in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")
            vf.pts = i
            c.mux(vs.encode(vf))
        c.mux(vs.encode())
        if ast is not None:
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1), format="flt", layout="mono"
            )
            af.sample_rate = int(audio_rate)
            af.pts = 0
            c.mux(ast.encode(af))
            c.mux(ast.encode())
    return {"video": vcodec, "audio": acodec}


def encode_mp4_bytes(frames: np.ndarray, fps: float, audio=None, audio_rate=None, **kw) -> bytes:
    """:func:`encode_mp4` into memory."""
    buf = io.BytesIO()
    encode_mp4(buf, frames, fps, audio, audio_rate, **kw)
    return buf.getvalue()


def write_videos(datasets: Sequence, out_dir: str | os.PathLike, *, crf: int = 10, progress: bool = False) -> str:
    """Write synthetic datasets (:class:`~fastvl.data.synthetic.SyntheticVideoText`, one per split) as mp4 files
    ``out_dir/<split>/<index>.mp4`` plus ``out_dir/manifest.jsonl`` (video, caption list, label, split).
    Returns the manifest path. Codecs: H.264 (libx264, yuv420p, CRF ``crf``) and AAC for the audio track
    when the dataset has audio."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    used: dict[str, str | None] = {}
    for ds in datasets:
        c = ds.config
        os.makedirs(os.path.join(out_dir, ds.split), exist_ok=True)
        it = range(len(ds))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"writing {ds.split}", unit="clip")
        for i in it:
            raw = ds.render(i)
            rel = f"{ds.split}/{i:06d}.mp4"
            used = encode_mp4(
                os.path.join(out_dir, rel),
                raw["frames"],
                c.fps,
                raw["audio"],
                c.audio_rate if c.audio else None,
                crf=crf,
            )
            rows.append({"video": rel, "caption": raw["captions"], "label": raw["label"], "split": ds.split})
    path = os.path.join(out_dir, "manifest.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    with open(os.path.join(out_dir, "codecs.json"), "w") as f:
        json.dump(used, f)
    return path
