"""Decoding one clip of a video file: All-in-one's sparse sampling, resize, crop; PyAV or torchcodec underneath.

Sampling (All-in-one): the clip window is cut into T equal segments; training takes a random time in each
segment, evaluation the middle; each time shows the frame on screen then (the last frame starting at or
before it), which equals All-in-one's frame-index rule for constant frame rates and handles variable ones.
Frames are resized (shorter side to ``size``) and cropped to a square (random for training, central
otherwise, the same crop for all frames; never flipped: captions say left and right). Audio is decoded,
resampled to mono ``audio_rate`` and cropped or zero-padded to ``audio_samples`` from the window start (a
random offset inside the window when training).

Two decoders implement the same contract and draw the same random numbers in the same order, so they pick
the same frames: PyAV (:mod:`fastvl.data.decode_pyav`; FFmpeg's swscale area filter for the resize) and
torchcodec (:mod:`fastvl.data.decode_torchcodec`; its bilinear antialiased resize). ``"auto"`` takes
torchcodec when it is installed and decodes a probe clip, PyAV otherwise; :func:`decoder_status` says why.
``FASTVL_VIDEO_DECODER=pyav|torchcodec`` forces one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import BinaryIO

import numpy as np

from fastvl.data.decode_common import ClipError, SkippedVideoWarning, require_av, sample_times

__all__ = [
    "DECODERS",
    "ClipError",
    "SkippedVideoWarning",
    "decode_clip",
    "decoder_status",
    "require_av",
    "sample_times",
]

DECODERS = ("pyav", "torchcodec")


# ---- the decoder choice ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderStatus:
    """Which decoder ``"auto"`` uses and why the other one is not used (empty when it works)."""

    chosen: str | None
    reasons: dict[str, str]

    def __str__(self) -> str:
        lines = [f"video decoder: {self.chosen or 'none'}"]
        lines += [f"  {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


@functools.cache
def unavailable_reason(name: str) -> str:
    """Why decoder ``name`` cannot decode here ("" when it can): not installed, or failing on a probe clip."""
    if name == "pyav":
        try:
            require_av()
        except ImportError as e:
            return str(e)
        return ""
    if name == "torchcodec":
        from fastvl.data.decode_torchcodec import probe

        return probe()
    raise ValueError(f"unknown video decoder {name!r} (expected one of {DECODERS})")


def decoder_status() -> DecoderStatus:
    """The decoder ``"auto"`` picks: ``FASTVL_VIDEO_DECODER`` when set, else torchcodec when it works, else PyAV."""
    reasons = {n: r for n in DECODERS if (r := unavailable_reason(n))}
    forced = os.environ.get("FASTVL_VIDEO_DECODER", "").strip().lower()
    if forced:
        if forced not in DECODERS:
            raise ValueError(f"FASTVL_VIDEO_DECODER must be one of {DECODERS}, got {forced!r}")
        return DecoderStatus(forced if forced not in reasons else None, reasons)
    for n in ("torchcodec", "pyav"):
        if n not in reasons:
            return DecoderStatus(n, reasons)
    return DecoderStatus(None, reasons)


def resolve_decoder(decoder: str | None) -> str:
    """``None`` / ``"auto"`` -> the working decoder; a named one is checked. Raises ImportError saying why."""
    if decoder in (None, "auto"):
        st = decoder_status()
        if st.chosen is None:
            raise ImportError("fastvl.data: no video decoder works here: " + "; ".join(st.reasons.values()))
        return st.chosen
    why = unavailable_reason(decoder)
    if why:
        raise ImportError(f"fastvl.data: video decoder {decoder!r} is unavailable: {why}")
    return decoder


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
    decoder: str | None = None,
    return_times: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Decode one clip: ``(frames uint8 (T, size, size, 3), audio float32 (audio_samples,) or None, has_audio)``.

    ``source`` is a path or a binary file object. Audio is returned when ``audio_rate`` and ``audio_samples``
    are given (zeros, with ``has_audio`` False, when the file has no audio stream). Raises :class:`ClipError`
    for a clip with no video stream, an empty window or fewer than ``min_frames`` (default ``num_frames``)
    frames in its window; decoder errors propagate for unreadable files. ``decoder``: ``"pyav"``,
    ``"torchcodec"`` or ``None`` / ``"auto"`` (see the module docstring). ``return_times`` appends the
    presentation times (T,) of the frames shown, in seconds from the stream's first frame.
    """
    kw = dict(
        num_frames=num_frames,
        size=size,
        train=train,
        rng=rng,
        start=start,
        end=end,
        min_frames=num_frames if min_frames is None else min_frames,
        audio_rate=audio_rate,
        audio_samples=audio_samples,
        return_times=return_times,
    )
    if resolve_decoder(decoder) == "torchcodec":
        from fastvl.data.decode_torchcodec import decode_clip_torchcodec

        return decode_clip_torchcodec(source, **kw)
    from fastvl.data.decode_pyav import decode_clip_pyav

    return decode_clip_pyav(source, **kw)
