"""PyAV implementation of :func:`fastvl.data.decode.decode_clip` (frames resized by FFmpeg's swscale, area filter)."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from fastvl.data.decode_common import ClipError, audio_offset, crop_offsets, place_audio, plan_window, require_av
from fastvl.data.transforms import short_side_size


def stream_duration(container, stream) -> float | None:
    """Seconds from the stream header, else the container's; None when neither says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def decode_clip_pyav(
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
    """See :func:`fastvl.data.decode.decode_clip`; ``return_times`` appends the chosen frames' times (T,) in
    seconds from the stream's first frame."""
    av = require_av()
    with av.open(source, metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ClipError("no video stream")
        vs = container.streams.video[0]
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        duration = stream_duration(container, vs)
        rate = float(vs.average_rate or vs.guessed_rate or 0) or None
        if duration is None:  # no header duration: one counting pass
            n = sum(1 for _ in container.decode(vs))
            if not n or rate is None:
                raise ClipError("cannot determine the duration")
            duration = n / rate
            container.seek(0)
        window = plan_window(
            duration, rate, num_frames=num_frames, train=train, rng=rng, start=start, end=end, min_frames=min_frames
        )
        chosen = frames_at(container, vs, window.targets, t0, rate)
        if chosen is None:
            raise ClipError(f"too short: no frame decoded in the window [{window.start:.3f}, {window.end:.3f}) s")
        last = chosen[-1]
        h, w = short_side_size(last.height, last.width, size)
        frames = np.stack(
            [f.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA") for f in chosen]
        )  # (T, h, w, 3)
        top, left = crop_offsets(h, w, size, train, rng)
        frames = frames[:, top : top + size, left : left + size]
        times = np.array([float(f.time) - t0 if f.time is not None else np.nan for f in chosen])
        if audio_rate is None or audio_samples is None:
            out = frames, None, False
        elif not container.streams.audio:
            out = frames, np.zeros(audio_samples, dtype=np.float32), False
        else:
            a0 = audio_offset(window, train, rng, audio_rate, audio_samples)
            out = frames, decode_audio(av, container, a0, audio_rate, audio_samples), True
    return (*out, times) if return_times else out


SEEK_GAP_S = 2.0  # seek (to the keyframe before) instead of decoding through gaps longer than this


def frames_at(container, vs, targets: np.ndarray, t0: float, rate: float | None) -> list | None:
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


def decode_audio(av, container, a0: float, rate: int, n: int) -> np.ndarray:
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
    if not chunks or first is None:
        return np.zeros(n, dtype=np.float32)
    return place_audio(np.concatenate(chunks), first, a0, rate, n)
