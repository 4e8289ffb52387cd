"""What both video decoders share: the errors, All-in-one's sparse sampling of a clip window, the crop and the
audio window (the same random draws in the same order, so both decoders pick the same frames)."""

from __future__ import annotations

import dataclasses

import numpy as np


class SkippedVideoWarning(UserWarning):
    """A clip could not be used (missing, corrupt, too short) and was replaced by another one."""


class ClipError(ValueError):
    """A clip cannot be decoded into the requested frames (the reason is in the message)."""


def require_av():
    """Import PyAV or raise an ImportError that says how to get it."""
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "fastvl.data: reading or writing video files needs PyAV: pip install 'fastvl[video]' (or pip install av)"
        ) from e
    return av


def sample_times(start: float, end: float, num_frames: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """All-in-one's sparse sampling in time: ``num_frames`` equal segments of [start, end); a uniform random
    time in each for training, the segment middle for evaluation."""
    edges = np.linspace(start, end, num_frames + 1)
    if train:
        return edges[:-1] + rng.random(num_frames) * (edges[1:] - edges[:-1])
    return (edges[:-1] + edges[1:]) / 2


@dataclasses.dataclass
class ClipWindow:
    """Where a clip's frames come from: window ``[start, end)`` in seconds from the stream's first frame, and
    the ``targets`` (T,) sampled in it."""

    start: float
    end: float
    targets: np.ndarray


def plan_window(
    duration: float,
    rate: float | None,
    *,
    num_frames: int,
    train: bool,
    rng: np.random.Generator,
    start: float | None,
    end: float | None,
    min_frames: int,
) -> ClipWindow:
    """Check the window ``[start, end)`` against the stream (``duration`` s at ``rate`` fps) and sample its
    times; raises :class:`ClipError` for an empty window or one holding fewer than ``min_frames`` frames."""
    s = start or 0.0
    e = duration if end is None else min(end, duration)
    if e - s <= 0:
        raise ClipError(f"too short: window [{s:.3f}, {e:.3f}) s is empty (video lasts {duration:.3f} s)")
    if rate is not None and (e - s) * rate < min_frames - 0.5:
        raise ClipError(
            f"too short: the window [{s:.3f}, {e:.3f}) s holds {(e - s) * rate:.1f} frame(s) at "
            f"{rate:.3g} fps, need {min_frames}"
        )
    return ClipWindow(s, e, sample_times(s, e, num_frames, train, rng))


def crop_offsets(h: int, w: int, size: int, train: bool, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of the square crop: random for training (drawn after the frame times), central otherwise."""
    if train:
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return (h - size) // 2, (w - size) // 2


def audio_offset(window: ClipWindow, train: bool, rng: np.random.Generator, audio_rate: int, samples: int) -> float:
    """Start of the audio crop in seconds: the window start, plus a random offset inside it for training."""
    if not train:
        return window.start
    return window.start + float(rng.uniform(0, max(0.0, (window.end - window.start) - samples / audio_rate)))


def place_audio(samples: np.ndarray, first: float, a0: float, rate: int, n: int) -> np.ndarray:
    """``n`` samples from ``a0`` seconds out of ``samples`` (mono float32) that start at ``first`` seconds:
    zero-padded where the stream starts late or ends early, clipped to [-1, 1]."""
    audio = np.zeros(n, dtype=np.float32)
    offset = int(round((a0 - first) * rate))
    if offset < 0:  # the stream starts after a0: leading silence
        seg = samples[: n + offset]
        audio[-offset : -offset + seg.size] = seg
    else:
        seg = samples[offset : offset + n]
        audio[: seg.size] = seg
    return np.clip(audio, -1.0, 1.0)
