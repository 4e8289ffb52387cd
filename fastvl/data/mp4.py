"""Writing mp4 files: H.264 (libx264, else mpeg4) + AAC with PyAV, and the synthetic dataset as files plus a
manifest (``fastvl data synth``)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import BinaryIO

import numpy as np

from fastvl.data.decode_common import require_av

VIDEO_CODECS = ("libx264", "h264", "mpeg4")
AUDIO_CODECS = ("aac",)


def pick_codec(av, names: Sequence[str]) -> str | None:
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
    vcodec = pick_codec(av, VIDEO_CODECS)
    if vcodec is None:
        raise RuntimeError(f"encode_mp4: this PyAV/FFmpeg build has none of the video encoders {VIDEO_CODECS}")
    acodec = pick_codec(av, AUDIO_CODECS) if audio is not None else None
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
