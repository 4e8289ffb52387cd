"""Data pipeline throughput on one core: synthetic generation, mp4 decoding (PyAV and torchcodec side by side),
shard streaming, batches.

Each case times a fixed amount of work (N clips, or N batches) and reports ms per clip and clips/s. Work runs
in this process with ``torch.set_num_threads(1)`` (a DataLoader worker's setting), so the figures are per
worker: multiply by the workers you give the loader. On a machine without a GPU every figure is a CPU one.

A standalone script, not a suite family (no ``FAMILY``; the suite skips it): it times host-side work of one
provider (fastvl's pipeline; there is no eager baseline or peer to set it against), touches no registry op,
needs mp4 files written to a temporary directory (PyAV and libx264), and its figures are per CPU worker even
on a GPU machine, where suite rows would carry the GPU's name.

    python -m benchmarks.bench_data [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from fastvl.data import (
    ShardDataset,
    SyntheticVideoText,
    Tokenizer,
    VideoDataset,
    build_loader,
    compact_pattern,
    write_shards,
    write_videos,
)
from fastvl.data.decode import DECODERS, unavailable_reason

try:
    from .common import environment, measure_time, row, write_rows
except ImportError:  # run as a script
    from common import environment, measure_time, row, write_rows


def cases(tmp: str, quick: bool):
    """(name, config, clips per call, fn) tuples."""
    n = 16 if quick else 200
    big = SyntheticVideoText("train", num_clips=n, frames=8, size=64)
    yield "synthetic.render", {"frames": 8, "size": 64, "audio": False}, n, lambda: [big.render(i) for i in range(n)]
    yield "synthetic.item", {"frames": 8, "size": 64, "audio": False}, n, lambda: [big[i] for i in range(n)]
    small = SyntheticVideoText("train", num_clips=n, frames=3, size=32, audio=True, paraphrases=4)
    yield "synthetic.item", {"frames": 3, "size": 32, "audio": True, "P": 4}, n, lambda: [small[i] for i in range(n)]

    m = 8 if quick else 32
    src = SyntheticVideoText("train", num_clips=m, frames=8, size=64, fps=8.0, audio=True)
    manifest = write_videos([src], os.path.join(tmp, "mp4"))
    for decoder in DECODERS:
        why = unavailable_reason(decoder)
        if why:
            print(f"video.decode with {decoder}: not measured, {why}")
            continue
        for train in (False, True):
            for audio in (False, True):
                ds = VideoDataset(manifest, num_frames=3, size=32, audio=audio, train=train, decoder=decoder)
                yield (
                    "video.decode",
                    {
                        "decoder": decoder,
                        "file": "8f@64px h264+aac",
                        "T": 3,
                        "size": 32,
                        "train": train,
                        "audio": audio,
                    },
                    m,
                    (lambda ds=ds: [ds[i] for i in range(m)]),
                )
    paths = write_shards(manifest, os.path.join(tmp, "shards", "{000..099}.tar"), 8)
    sh = ShardDataset(compact_pattern(paths), num_frames=3, size=32, audio=True, train=True)
    cfg = {"decoder": sh.decoder, "shards": len(paths), "T": 3, "size": 32, "train": True}
    yield "shards.stream", cfg, m, lambda: list(sh)

    tok = Tokenizer.train(small.captions(), vocab_size=500)
    batch = min(32, n)
    loader = build_loader(small, batch, train=True, tokenizer=tok, num_workers=0)
    nb = len(loader)
    yield (
        "loader.synthetic",
        {"batch": batch, "frames": 3, "size": 32, "audio": True, "P": 4},
        nb * batch,
        (lambda: list(loader)),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer clips (smoke run)")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the table only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    rows = []
    print(f"device: {env['device']} (1 thread; {'CPU figures' if env['device_kind'] == 'cpu' else 'host side'})")
    print(f"{'case':<18} {'config':<78} {'ms/clip':>9} {'clips/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, clips, fn in cases(tmp, args.quick):
            st = measure_time(fn, warmup=1, rounds=3)
            per = st.median / clips
            cfg = {**cfg, "clips_per_call": clips, "clips_per_s": 1e3 / per}
            rows.append(row(name, "fastvl", "fwd", "time_ms", "clips", clips, st, cfg, env))
            shown = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("clips_per_call", "clips_per_s"))
            print(f"{name:<18} {shown:<78} {per:>9.3f} {1e3 / per:>9.0f}")
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
