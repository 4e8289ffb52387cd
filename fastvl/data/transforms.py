"""Frame transforms shared by the datasets: CLIP normalisation and the shorter-side resize size."""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 (..., 3, H, W), CLIP mean/std normalised."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (frames.to(torch.float32) / 255.0 - mean) / std


# uint8 value -> normalised float32, per channel (3, 256)
_LUT = ((np.arange(256)[None, :] / 255.0 - np.asarray(CLIP_MEAN)[:, None]) / np.asarray(CLIP_STD)[:, None]).astype(
    np.float32
)


def normalize_hwc(frames: np.ndarray) -> torch.Tensor:
    """uint8 numpy (T, H, W, 3) -> float32 tensor (T, 3, H, W), CLIP-normalised, by table lookup in numpy on one
    thread (per-item work in a data pipeline must not fight the training step for cores)."""
    T, H, W, _ = frames.shape
    out = np.empty((T, 3, H, W), dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], frames[..., c], out=out[:, c])
    return torch.from_numpy(out)


def denormalize(video: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, float32 in [0, 1] (for inspection and tests)."""
    mean = torch.tensor(CLIP_MEAN, dtype=video.dtype, device=video.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=video.dtype, device=video.device).view(3, 1, 1)
    return video * std + mean


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side equal to ``size`` and the aspect ratio kept."""
    if height <= width:
        return size, max(size, int(round(width * size / height)))
    return max(size, int(round(height * size / width))), size
