"""torchcodec implementation of :func:`fastvl.data.decode.decode_clip` (frames resized by torch's bilinear
antialiased interpolation, torchvision's resize).

torchcodec is optional: it needs a torch it was built for and FFmpeg's shared libraries (4 to 8) on the
library path (Debian: ``apt-get install ffmpeg``). :func:`probe` decodes a one-second clip written by PyAV
and returns why torchcodec cannot be used ("" when it can).
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np

from fastvl.data.decode_common import ClipError, audio_offset, crop_offsets, place_audio, plan_window
from fastvl.data.transforms import short_side_size

EPS = 1e-6  # a target within this of a frame's start shows that frame (PyAV's rule too)


def probe() -> str:
    """ "" when torchcodec decodes a probe clip here, else the reason (one line)."""
    try:
        import torchcodec  # noqa: F401
        from torchcodec.decoders import VideoDecoder
    except ImportError as e:
        return f"not installed ({e.name or e}): pip install torchcodec"
    except Exception as e:  # a wrong torch build or missing FFmpeg libraries fail at import on some versions
        return f"installed but fails to import: {type(e).__name__}: {str(e).splitlines()[0]}"
    try:
        from fastvl.data.mp4 import encode_mp4_bytes

        clip = encode_mp4_bytes(np.zeros((2, 16, 16, 3), np.uint8), 2.0)
    except ImportError:
        clip = None  # no PyAV to write the probe clip: loading the libraries is the test
    try:
        if clip is None:
            from torchcodec._core import ops  # noqa: F401  (loads libtorchcodec and FFmpeg)
        else:
            VideoDecoder(clip).get_frame_at(0)
    except Exception as e:
        msg = " ".join(str(e).split())
        if "libav" in msg or "FFmpeg" in msg or "Could not load" in msg:
            return (
                "installed but cannot load FFmpeg's shared libraries (it needs FFmpeg 4-8 on the library path, "
                f"e.g. apt-get install ffmpeg): {msg[:200]}"
            )
        return f"installed but fails to decode a probe clip: {type(e).__name__}: {msg[:200]}"
    return ""


def _read(source: str | BinaryIO) -> str | bytes:
    if isinstance(source, str):
        return source
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    return source.read()


def decode_clip_torchcodec(
    source: str | BinaryIO,
    *,
    num_frames: int,
    size: int,
    train: bool,
    rng: np.random.Generator,
    start: float | None,
    end: float | None,
    min_frames: int,
    audio_rate: int | None,
    audio_samples: int | None,
    return_times: bool = False,
):
    """See :func:`fastvl.data.decode.decode_clip`; the same random draws in the same order as the PyAV path."""
    import torch
    import torch.nn.functional as F
    from torchcodec.decoders import AudioDecoder, VideoDecoder

    data = _read(source)
    try:
        dec = VideoDecoder(data, seek_mode="approximate", num_ffmpeg_threads=1)
    except ValueError as e:
        if "video stream" in str(e).lower():
            raise ClipError("no video stream") from e
        raise
    md = dec.metadata
    t0 = md.begin_stream_seconds_from_header or 0.0
    duration = md.duration_seconds_from_header or md.duration_seconds
    rate = md.average_fps_from_header or md.average_fps
    if duration is None:
        raise ClipError("cannot determine the duration")
    window = plan_window(
        duration, rate, num_frames=num_frames, train=train, rng=rng, start=start, end=end, min_frames=min_frames
    )
    # the frame on screen at each target: clamp into the stream (before its first frame: the first one)
    lo, hi = md.begin_stream_seconds, md.end_stream_seconds
    at = np.clip(window.targets + t0 + EPS, lo, np.nextafter(hi, -np.inf) if hi is not None else np.inf)
    batch = dec.get_frames_played_at(at.tolist())
    if batch.data.shape[0] != num_frames:
        raise ClipError(f"too short: no frame decoded in the window [{window.start:.3f}, {window.end:.3f}) s")
    h, w = short_side_size(batch.data.shape[2], batch.data.shape[3], size)
    x = batch.data
    if (h, w) != tuple(x.shape[2:]):  # torchvision's resize: bilinear, antialiased
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    top, left = crop_offsets(h, w, size, train, rng)
    frames = x.permute(0, 2, 3, 1)[:, top : top + size, left : left + size].numpy()  # (T, size, size, 3) uint8
    times = batch.pts_seconds.numpy().astype(np.float64) - t0
    if audio_rate is None or audio_samples is None:
        out = frames, None, False
    else:
        try:
            adec = AudioDecoder(data, sample_rate=audio_rate, num_channels=1)
        except (ValueError, RuntimeError):  # no audio stream
            out = frames, np.zeros(audio_samples, dtype=np.float32), False
        else:
            a0 = audio_offset(window, train, rng, audio_rate, audio_samples)
            at0 = adec.metadata.begin_stream_seconds_from_header or 0.0
            stop = a0 + at0 + audio_samples / audio_rate
            got = adec.get_samples_played_in_range(start_seconds=a0 + at0, stop_seconds=stop)
            samples = got.data.numpy().reshape(-1).astype(np.float32)
            out = frames, place_audio(samples, got.pts_seconds - at0, a0, audio_rate, audio_samples), True
    return (*out, times) if return_times else out
