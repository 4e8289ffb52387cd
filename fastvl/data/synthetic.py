"""The embedded dataset: coloured shapes moving on textured backgrounds, with captions and audio.

Every clip is generated lazily and deterministically from ``(seed, split, index)``: nothing is downloaded
or stored. A clip shows one shape of one colour doing one motion (left/right/up/down, growing/shrinking)
on a random texture; its caption names the three ("a red triangle moves to the left"); its audio track
has a pitch set by colour and shape (timbre by shape) and a sweep or rhythm set by the motion.

The motion needs more than one frame: positions live on a torus (shapes wrap around the frame edges) and are
uniform at every frame whatever the direction (a single frame's position says nothing about the motion), and
radii are drawn at the middle of the clip from the same log-uniform range for every motion. Bounded sizes
leak a little at the clip's ends: the best size threshold on the first or last frame tells "grow" from
"shrink" about 72% of the time (50% is chance), the middle frame 50%.

``label`` identifies the (colour, shape, motion) combination, so retrieval can treat clips with identical
captions as equivalent.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from fastvl.data.transforms import normalize_hwc

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "white": (0.97, 0.97, 0.97),
    "purple": (0.62, 0.15, 0.88),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.90, 0.90),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink")

# Caption pieces: paraphrase p uses template p % len(TEMPLATES) and motion phrase p % 5.
TEMPLATES = (
    "{a} {color} {shape} {motion}",
    "the {color} {shape} {motion}",
    "there is {a} {color} {shape} that {motion}",
    "{a} {shape} in {color} {motion}",
    "one {color} {shape} {motion} over a textured background",
    "in this clip {a} {color} {shape} {motion}",
    "we see {a} {color} {shape} that {motion}",
    "{a} {color} coloured {shape} {motion}",
)
MOTION_PHRASES = {
    "left": ("moves to the left", "is moving left", "slides to the left", "travels left", "goes left"),
    "right": ("moves to the right", "is moving right", "slides to the right", "travels right", "goes right"),
    "up": ("moves up", "is moving upward", "slides up", "rises", "goes up"),
    "down": ("moves down", "is moving downward", "slides down", "falls", "goes down"),
    "grow": ("grows", "is growing", "gets bigger", "expands", "becomes larger"),
    "shrink": ("shrinks", "is shrinking", "gets smaller", "contracts", "becomes smaller"),
}
# harmonic amplitudes per shape (timbre); pitch comes from (colour, shape)
_TIMBRE = {
    "circle": (1.0,),
    "square": (1.0, 0.0, 0.33, 0.0, 0.2),
    "triangle": (1.0, 0.5, 0.33, 0.25),
    "cross": (1.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.35),
    "diamond": (1.0, 0.7, 0.0, 0.0, 0.3),
}
_SPLITS = {"train": 0, "val": 1}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val", "heldout": "val"}


def caption(color: str, shape: str, motion: str, paraphrase: int = 0) -> str:
    """The caption of a (colour, shape, motion) triple; ``paraphrase`` 0 is the canonical one
    ("a red triangle moves to the left")."""
    p = int(paraphrase)
    template = TEMPLATES[p % len(TEMPLATES)]
    phrases = MOTION_PHRASES[motion]
    phrase = phrases[(p + p // len(TEMPLATES)) % len(phrases)]
    first = template.split("{a}")[-1].lstrip().split(" ", 1)[0].format(color=color, shape=shape)
    article = "an" if first[:1] in "aeiou" else "a"
    return template.format(a=article, color=color, shape=shape, motion=phrase)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What a synthetic split looks like. ``fps`` sets the clip duration (``frames / fps`` seconds, over which
    the motion runs); ``audio_seconds`` the audio length (default: the clip duration)."""

    num_clips: int = 1024
    frames: int = 3
    size: int = 32
    fps: float = 3.0
    audio: bool = False
    audio_rate: int = 8000
    audio_seconds: float | None = None
    paraphrases: int = 1
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    motions: tuple[str, ...] = MOTIONS
    radius: tuple[float, float] = (0.07, 0.21)  # shape radius at the clip's middle, fraction of size (log-uniform)
    travel: tuple[float, float] = (0.25, 0.4)  # displacement over the clip, fraction of size (< 0.5: unambiguous)

    def __post_init__(self):
        for name in ("num_clips", "frames", "size", "audio_rate", "paraphrases"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SyntheticConfig: '{name}' must be a positive int, got {v!r}")
        if self.frames < 2:
            raise ValueError(f"SyntheticConfig: 'frames' must be >= 2 (a motion needs two frames), got {self.frames}")
        if self.size < 8:
            raise ValueError(f"SyntheticConfig: 'size' must be >= 8 pixels, got {self.size}")
        if not self.fps > 0:
            raise ValueError(f"SyntheticConfig: 'fps' must be > 0, got {self.fps}")
        if self.audio_seconds is not None and not self.audio_seconds > 0:
            raise ValueError(f"SyntheticConfig: 'audio_seconds' must be > 0, got {self.audio_seconds}")
        for field in ("radius", "travel"):
            v = getattr(self, field)
            ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, (int, float)) for a in v)
            if not ok or not 0 < v[0] <= v[1] < 0.5:
                raise ValueError(
                    f"SyntheticConfig: '{field}' must be (low, high) fractions of size with 0 < low <= high < 0.5, "
                    f"got {v!r}"
                )
            object.__setattr__(self, field, (float(v[0]), float(v[1])))
        for field, known in (("colors", COLORS), ("shapes", SHAPES), ("motions", MOTIONS)):
            vals = tuple(getattr(self, field))
            bad = [v for v in vals if v not in known]
            if not vals or bad or len(set(vals)) != len(vals):
                raise ValueError(f"SyntheticConfig: '{field}' must be distinct names from {tuple(known)}, got {vals!r}")
            object.__setattr__(self, field, vals)

    @property
    def duration(self) -> float:
        return self.frames / self.fps

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_rate * (self.audio_seconds or self.duration)))

    @property
    def num_labels(self) -> int:
        return len(self.colors) * len(self.shapes) * len(self.motions)


class SyntheticVideoText(torch.utils.data.Dataset):
    """Map-style dataset of generated clips. ``split`` is ``"train"`` or ``"val"`` (held out; generated from a
    disjoint seed stream). Items (see :meth:`__getitem__`) follow the batch contract of ``fastvl.data``.

    ``SyntheticVideoText("train", num_clips=1024, frames=3, size=32, audio=True, paraphrases=4)``

    ``cache=True`` keeps every generated item in memory (items are deterministic, so this only saves time; per
    process: worth it with ``num_workers=0``, about 45 kB per default clip with audio).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        config: SyntheticConfig | None = None,
        cache: bool = False,
        **overrides,
    ):
        if split not in SPLIT_ALIASES:
            raise ValueError(f"SyntheticVideoText: 'split' must be one of {sorted(SPLIT_ALIASES)}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SyntheticVideoText: 'seed' must be a non-negative int, got {seed!r}")
        base = config or SyntheticConfig(num_clips=1024 if SPLIT_ALIASES[split] == "train" else 256)
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self.split = SPLIT_ALIASES[split]
        self.seed = seed
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.config.num_clips

    # ---- labels and captions -----------------------------------------------------------------
    def decode_label(self, label: int) -> tuple[str, str, str]:
        """label -> (colour, shape, motion)."""
        c = self.config
        nm, ns = len(c.motions), len(c.shapes)
        return c.colors[label // (ns * nm)], c.shapes[(label // nm) % ns], c.motions[label % nm]

    def captions_for(self, label: int) -> list[str]:
        """The ``paraphrases`` captions of a label (the first is the canonical one)."""
        return [caption(*self.decode_label(label), p) for p in range(self.config.paraphrases)]

    def captions(self) -> list[str]:
        """Every caption this dataset can produce (for training a tokenizer), without rendering a clip."""
        return [t for lab in range(self.config.num_labels) for t in self.captions_for(lab)]

    def label(self, index: int) -> int:
        return int(self._rng(index).integers(self.config.num_labels))

    # ---- generation --------------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], index])

    def _index(self, index: int) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"SyntheticVideoText: index {index} out of range for {n} clips")
        return index % n

    def params(self, index: int) -> dict:
        """The clip's latent parameters: label, colour/shape/motion names, and per-frame centre (x, y) in
        pixels (on the torus [0, size)) and radius, each an array of length ``frames``."""
        index = self._index(index)
        c = self.config
        rng = self._rng(index)
        label = int(rng.integers(c.num_labels))
        color, shape, motion = self.decode_label(label)
        S, T = c.size, c.frames
        progress = np.arange(T, dtype=np.float64) / (T - 1) - 0.5  # -0.5 .. 0.5 over the clip
        x0, y0 = rng.uniform(0, S, size=2)
        r_mid = math.exp(rng.uniform(math.log(c.radius[0] * S), math.log(c.radius[1] * S)))  # at the clip's middle
        dist = rng.uniform(*c.travel) * S  # total displacement over the clip, < S/2 so wrapping is unambiguous
        growth = rng.uniform(1.4, 1.8)  # radius ratio over the clip: wide size range, mild growth (less leak)
        x = np.full(T, x0)
        y = np.full(T, y0)
        r = np.full(T, r_mid)
        if motion == "left":
            x = x0 - dist * progress
        elif motion == "right":
            x = x0 + dist * progress
        elif motion == "up":
            y = y0 - dist * progress
        elif motion == "down":
            y = y0 + dist * progress
        elif motion == "grow":
            r = r_mid * growth**progress
        elif motion == "shrink":
            r = r_mid * growth ** (-progress)
        return {
            "rng": rng,
            "label": label,
            "color": color,
            "shape": shape,
            "motion": motion,
            "x": np.mod(x, S),
            "y": np.mod(y, S),
            "r": r,
        }

    def render(self, index: int) -> dict:
        """Raw clip: ``frames`` uint8 (T, H, W, 3), ``audio`` float32 (n,) in [-1, 1] or None, ``captions``
        list[str] (P), ``label`` int, ``index`` int."""
        index = self._index(index)
        c = self.config
        p = self.params(index)
        rng = p.pop("rng")
        S = c.size
        f32 = np.float32
        # background: a tinted grey with two random gratings and fixed-pattern noise (static over time)
        yy, xx = np.mgrid[0:S, 0:S].astype(f32)
        bg = np.full((S, S), rng.uniform(0.25, 0.45), dtype=f32)
        for _ in range(2):
            theta = rng.uniform(0, math.pi)
            freq = rng.uniform(1.5, 5.0) * 2 * math.pi / S
            phase = rng.uniform(0, 2 * math.pi)
            bg += f32(rng.uniform(0.04, 0.1)) * np.sin(freq * (math.cos(theta) * xx + math.sin(theta) * yy) + phase)
        bg += rng.normal(0, 0.03, size=(S, S)).astype(f32)
        tint = (1.0 + rng.uniform(-0.2, 0.2, size=3)).astype(f32)
        bg = np.clip(bg[..., None] * tint, 0, 1)  # (S, S, 3)
        # shape: signed distance on the torus (offsets per row / column, broadcast), one-pixel anti-aliased edge
        half = f32(S / 2)
        grid = np.arange(S, dtype=f32) + f32(0.5)
        dx = np.mod(grid[None, None, :] - p["x"].astype(f32)[:, None, None] + half, f32(S)) - half  # (T, 1, S)
        dy = np.mod(grid[None, :, None] - p["y"].astype(f32)[:, None, None] + half, f32(S)) - half  # (T, S, 1)
        sdf = _sdf(p["shape"], dx, dy, p["r"].astype(f32)[:, None, None])
        alpha = np.clip(f32(0.5) - sdf, 0, 1)[..., None]  # (T, S, S, 1)
        color = np.clip(np.array(COLORS[p["color"]], dtype=f32) + rng.uniform(-0.05, 0.05, size=3).astype(f32), 0, 1)
        bg *= f32(255)
        frames = bg + alpha * (color * f32(255) - bg)
        frames += f32(0.5)
        frames = frames.astype(np.uint8)
        audio = _audio(c, p, rng) if c.audio else None
        return {
            "frames": frames,
            "audio": audio,
            "captions": self.captions_for(p["label"]),
            "label": p["label"],
            "index": index,
        }

    def __getitem__(self, index: int) -> dict:
        """``video`` float32 (T, 3, H, W) CLIP-normalised, ``caption`` str, ``captions`` list[str] (P),
        ``label`` int, ``index`` int, and ``audio`` float32 (n,) in [-1, 1] when the config has audio."""
        if self._cache is not None:
            index = self._index(index)
            if index in self._cache:
                return dict(self._cache[index])
        raw = self.render(index)
        item = {
            "video": normalize_hwc(raw["frames"]),
            "caption": raw["captions"][0],
            "captions": raw["captions"],
            "label": raw["label"],
            "index": raw["index"],
        }
        if raw["audio"] is not None:
            item["audio"] = torch.from_numpy(raw["audio"])
        if self._cache is not None:
            self._cache[raw["index"]] = dict(item)
        return item

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SyntheticVideoText(split={self.split!r}, seed={self.seed}, clips={c.num_clips}, frames={c.frames}, "
            f"size={c.size}, labels={c.num_labels}, paraphrases={c.paraphrases}, audio={c.audio})"
        )


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of radius ``r`` centred at the origin."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(ax, ay) - 0.85 * r
    if shape == "triangle":  # pointing up (image y grows downwards), inradius 0.6 r
        return np.maximum(dy, 0.866 * ax - 0.5 * dy) - 0.6 * r
    if shape == "diamond":
        return (ax + ay) * 0.7071 - 0.75 * r
    if shape == "cross":
        arm = 0.35 * r
        return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
    raise ValueError(f"unknown shape {shape!r}")


def _audio(c: SyntheticConfig, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Pitch from (colour, shape) on a semitone grid, timbre from shape; left/right sweep down/up,
    up/down pulse fast/slow, grow/shrink fade in/out."""
    sr, n = c.audio_rate, c.audio_samples
    f32 = np.float32
    t = np.arange(n, dtype=f32) / f32(sr)
    prog = np.arange(n, dtype=f32) / f32(n)  # 0 .. 1 over the track
    semitone = COLORS_INDEX[p["color"]] * len(SHAPES) + SHAPES.index(p["shape"])
    f0 = 196.0 * 2 ** (semitone / 12 * 0.75) * rng.uniform(0.985, 1.015)
    motion = p["motion"]
    env = None
    if motion in ("left", "right"):
        freq = f0 * np.exp2((-0.7 if motion == "left" else 0.7) * prog.astype(np.float64))
        phase = np.cumsum(freq) * (2 * math.pi / sr)  # float64: the running sum needs the precision
        fmax = float(freq.max())
    else:
        phase = np.arange(n, dtype=np.float64) * (2 * math.pi * f0 / sr)
        fmax = f0
        if motion in ("up", "down"):
            rate = 8.0 if motion == "up" else 2.5
            env = np.square(
                f32(0.5) - f32(0.5) * np.cos(f32(2 * math.pi * rate) * t + f32(rng.uniform(0, 2 * math.pi)))
            )
        elif motion == "grow":
            env = f32(0.1) + f32(0.9) * prog
        else:
            env = f32(1.0) - f32(0.9) * prog
    x = np.mod(phase + rng.uniform(0, 2 * math.pi), 2 * math.pi).astype(f32)
    # harmonics by the recurrence sin((h+1)x) = 2 cos(x) sin(hx) - sin((h-1)x): one sin and one cos in all
    two_cos = 2 * np.cos(x)
    s_prev, s_h = np.zeros_like(x), np.sin(x)
    wave = np.zeros_like(x)
    for h, a in enumerate(_TIMBRE[p["shape"]], start=1):
        if h * fmax >= 0.45 * sr:
            break
        if a:
            wave += f32(a) * s_h
        s_prev, s_h = s_h, two_cos * s_h - s_prev
    wave *= f32(0.7 * rng.uniform(0.7, 1.0) / max(float(np.abs(wave).max()), 1e-6))
    if env is not None:
        wave *= env
    wave += rng.standard_normal(n, dtype=f32) * f32(0.01)
    return np.clip(wave, -1, 1, out=wave)


COLORS_INDEX = {name: i for i, name in enumerate(COLORS)}
