"""``fastvl`` command line: pretrain, eval, info, demo, bench, data."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from fastvl.train.loop import NonFiniteLoss
from fastvl.usage import ArgumentParser, UsageError, float_above, int_at_least


def _versions() -> list[tuple[str, str]]:
    import torch

    import fastvl

    out = [
        ("fastvl", fastvl.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch cuda", str(torch.version.cuda)),
    ]
    for mod in ("triton", "flash_attn", "xformers", "apex", "av", "open_clip", "timm"):
        try:
            m = __import__(mod)
            out.append((mod, getattr(m, "__version__", "installed")))
        except Exception:
            out.append((mod, "not installed"))
    from fastvl import _ext

    out.append(("fastvl._C", "built" if _ext.built() else "not built: " + _ext.reasons()[0]))
    return out


def print_capabilities() -> None:
    """The declared capability table of every backend of every op, one block per op."""
    from fastvl import backends

    columns = ("backend", "priority", "requires", "devices", "dtypes", "limits", "features")
    rows = backends.capability_table()
    print("== declared capabilities (each op's backends.py; auto tries backends by priority) ==")
    for op in dict.fromkeys(r["op"] for r in rows):
        block = [r for r in rows if r["op"] == op]
        width = {c: max(len(c), *(len(r[c]) for r in block)) for c in columns}
        print(op)
        print("  " + "  ".join(c.ljust(width[c]) for c in columns).rstrip())
        for r in block:
            print("  " + "  ".join(r[c].ljust(width[c]) for c in columns).rstrip())
        for name in dict.fromkeys(r["backend"] for r in block if r["check"] != "-"):
            print(f"  {name} also checks: {next(r['check'] for r in block if r['backend'] == name)}")


def cmd_info(args) -> int:
    import torch

    from fastvl import backends

    if getattr(args, "capabilities", False):
        print_capabilities()
        return 0
    print("== fastvl info ==")
    for k, v in _versions():
        print(f"  {k:<12} {v}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for d in devices[1:]:
        p = torch.cuda.get_device_properties(d)
        print(f"  {d:<12} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    if not torch.cuda.is_available():
        print("  gpu          none (kernels run on a GPU; TRITON_INTERPRET=1 runs the Triton ones on the CPU)")
    print("\n== backends per op (auto's choice on each device; why the others are not used) ==")
    for op in backends.ops():
        print(f"{op}")
        for b in backends.backends(op):
            avail = b.available()
            print(
                f"    {b.name:<10} {'available' if not avail else 'unavailable: ' + '; '.join(avail)}"
                + (f"  [{b.description}]" if b.description else "")
            )
        for d in devices[:2]:
            chosen, why = backends.example_choice(op, torch.device(d))
            if chosen is None and not why:
                continue
            print(f"    on {d}: {chosen}")
            for name, reasons in why.items():
                if not backends.get(op, name).available():
                    print(f"      - {name}: {'; '.join(reasons)}")
    if getattr(args, "model", None):
        from fastvl import models

        models.describe(args.model)
    return 0


def cmd_demo(args) -> int:
    """A short run of every token op on the best device, checked against its reference."""
    import torch

    import fastvl
    from fastvl.ops.roll import roll_reference
    from fastvl.ops.tokens import gather_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    B, T, text, L, C = 2, 3, 40, 197, 192
    x = torch.randn(B * T, text + L, C, device=dev, requires_grad=True)
    y = fastvl.ops.temporal_token_roll(x, T, text_len=text)
    y.sum().backward()
    ok = torch.equal(y, roll_reference(x.detach(), T, text, L // 8))
    print(f"temporal_token_roll  {tuple(x.shape)} -> {tuple(y.shape)}  matches reference: {ok}")
    v = torch.randn(B, 1568, C, device=dev)
    kept, ids = fastvl.ops.drop_tokens(v, 0.5)
    print(
        f"drop_tokens          {tuple(v.shape)} keep 0.5 -> {tuple(kept.shape)}  shared subset: "
        f"{bool((ids == ids[:1]).all())}  matches gather: {torch.equal(kept, gather_reference(v, ids))}"
    )
    frames = torch.randn(B * 4, 196, C, device=dev)
    vis, mask, restore = fastvl.ops.random_masking(frames, 0.75)
    print(
        f"random_masking       {tuple(frames.shape)} ratio 0.75 -> {tuple(vis.shape)}  "
        f"masked per frame: {int(mask[0].sum())}/196"
    )
    print("\n" + fastvl.explain(fastvl.ops.random_masking, frames, 0.75))
    return 0 if ok else 1


def cmd_bench(args) -> int:
    """The benchmark suite (benchmarks/suite.py): same options as ``python -m benchmarks``."""
    from fastvl.benchmarks import suite

    return suite.run(args, package="fastvl.benchmarks")


def _add_bench(sub) -> None:
    from fastvl.benchmarks import suite

    pb = sub.add_parser(
        "bench",
        help="benchmark every op family (and model) against eager PyTorch, torch.compile and the best peer",
        description=suite.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(pb)
    pb.set_defaults(fn=cmd_bench)


def require_pyav(what: str) -> None:
    from fastvl.data.decode_common import require_av

    try:
        require_av()
    except ImportError:
        raise UsageError("PyAV", f"{what} needs PyAV: pip install 'fastvl[video]' (or pip install av)") from None


def synthetic_config(args, split: str, num: int):
    from fastvl.data import SyntheticConfig

    try:
        return SyntheticConfig(
            num_clips=num,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
            audio=not args.no_audio,
            audio_rate=args.audio_rate,
            paraphrases=args.paraphrases,
        )
    except ValueError as e:
        field = str(e).split("'")[1] if str(e).count("'") >= 2 else "num_clips"
        flag = {"num_clips": "--num", "frames": "--frames", "size": "--size", "fps": "--fps"}.get(field, "--" + field)
        raise UsageError(flag.replace("_", "-"), str(e)) from None


def cmd_data_synth(args) -> int:
    """Write the synthetic dataset (train + held-out splits) as mp4 files plus a manifest."""
    from fastvl.data import SyntheticVideoText, write_videos

    if args.num == 0 and args.num_val == 0:
        raise UsageError("--num", "--num and --num-val are both 0: nothing to write")
    if args.size % 2:
        raise UsageError("--size", f"expected an even frame size (H.264 yuv420p), got {args.size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError("--out", f"{args.out} exists and is not a directory")
    require_pyav("writing mp4 files")
    datasets = [
        SyntheticVideoText(split, seed=args.seed, config=synthetic_config(args, split, n))
        for split, n in (("train", args.num), ("val", args.num_val))
        if n > 0
    ]
    path = write_videos(datasets, args.out, crf=args.crf, progress=True)
    with open(os.path.join(args.out, "codecs.json")) as f:
        codecs = json.load(f)
    print(
        f"wrote {sum(len(d) for d in datasets)} clips ({', '.join(f'{d.split} {len(d)}' for d in datasets)}) "
        f"to {args.out}; video {codecs['video']}, audio {codecs['audio'] or 'none'}"
    )
    print(f"manifest: {path}   (use: --data {path})")
    return 0


def cmd_data_shards(args) -> int:
    """Write any --data spec (synthetic, manifest) as WebDataset tar shards."""
    from fastvl.data import SyntheticVideoText, compact_pattern, expand_pattern, read_manifest, spec_kind, write_shards
    from fastvl.data.manifest import HELDOUT_NAMES, select_split
    from fastvl.data.shard_names import is_remote

    try:
        kind = spec_kind(args.data)
        names = expand_pattern(args.out)
    except ValueError as e:
        raise UsageError("--data" if "open_dataset" in str(e) else "--out", str(e)) from None
    if kind == "shards":
        raise UsageError("--data", f"expected 'synthetic' or a manifest (.csv / .jsonl), got shards {args.data!r}")
    if is_remote(args.out) or len(set(names)) != len(names):
        raise UsageError("--out", f"expected local shard names such as 'shards/{{000..099}}.tar', got {args.out!r}")
    if args.split not in ("all", "train", *HELDOUT_NAMES):
        raise UsageError("--split", f"expected all, train or val, got {args.split!r}")
    split = None if args.split == "all" else args.split
    if kind == "synthetic":
        require_pyav("encoding the synthetic clips")
        syn_split = split or "train"
        cfg = synthetic_config(args, syn_split, args.num or (1024 if syn_split == "train" else 256))
        source = SyntheticVideoText(syn_split, seed=args.seed, config=cfg)
    else:
        try:
            source = read_manifest(args.data)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError("--data", str(e)) from None
        if split is not None and not select_split(source, split, args.data):
            raise UsageError("--split", f"{args.data} has no rows of split {args.split!r}")
    paths = write_shards(source, args.out, args.per_shard, split=split)
    print(f"wrote {len(paths)} shards: {compact_pattern(paths)}")
    return 0


def _add_train(sub) -> None:
    from fastvl.train import commands

    pp = sub.add_parser(
        "pretrain",
        help="pretrain All-in-one / VATT / MAC (default: allinone-ti on the embedded synthetic data)",
        description="Pretrain a model, then evaluate zero-shot retrieval on the held-out split. Scale out with "
        "torchrun --nproc_per_node N -m fastvl.cli pretrain ... (DDP; --fsdp shards the model)",
    )
    commands.add_pretrain_arguments(pp)
    pp.set_defaults(fn=commands.cmd_pretrain)
    pe = sub.add_parser("eval", help="zero-shot retrieval of a run's latest checkpoint on the held-out split")
    commands.add_eval_arguments(pe)
    pe.set_defaults(fn=commands.cmd_eval)


def _add_data(sub) -> None:
    pdata = sub.add_parser("data", help="write the synthetic dataset as mp4 files, or any data as tar shards")
    dsub = pdata.add_subparsers(dest="data_cmd", required=True)
    ps = dsub.add_parser("synth", help="synthetic clips -> DIR/{train,val}/*.mp4 + DIR/manifest.jsonl")
    ps.add_argument("--out", required=True, help="output directory")
    ps.add_argument("--num", type=int_at_least(0), default=1024, help="training clips (default 1024)")
    ps.add_argument("--num-val", type=int_at_least(0), default=256, help="held-out clips (default 256)")
    ps.add_argument("--frames", type=int_at_least(2), default=8, help="frames per clip (default 8)")
    ps.add_argument("--size", type=int_at_least(8), default=64, help="frame size in pixels, even (default 64)")
    ps.add_argument("--fps", type=float_above(0), default=8.0, help="frame rate (default 8: 1-second clips)")
    ps.add_argument("--audio-rate", type=int_at_least(1), default=8000, help="audio sample rate (default 8000)")
    ps.add_argument("--no-audio", action="store_true", help="no audio track")
    ps.add_argument("--paraphrases", type=int_at_least(1), default=1, help="captions per clip (default 1)")
    ps.add_argument("--crf", type=int_at_least(0), default=10, help="H.264 quality, lower is better (default 10)")
    ps.add_argument("--seed", type=int_at_least(0), default=0)
    ps.set_defaults(fn=cmd_data_synth)
    psh = dsub.add_parser("shards", help="--data SPEC -> WebDataset tar shards")
    psh.add_argument("--data", required=True, help="'synthetic' or a manifest (.csv / .jsonl)")
    psh.add_argument("--out", required=True, help="shard names, e.g. 'shards/{000..099}.tar'")
    psh.add_argument("--per-shard", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    psh.add_argument("--split", default="all", help="rows of this split only (train, val; default all)")
    psh.add_argument("--num", type=int_at_least(1), default=None, help="synthetic: clips (default 1024 / 256 val)")
    psh.add_argument("--frames", type=int_at_least(2), default=8, help="synthetic: frames per clip (default 8)")
    psh.add_argument("--size", type=int_at_least(8), default=64, help="synthetic: frame size (default 64)")
    psh.add_argument("--fps", type=float_above(0), default=8.0, help="synthetic: frame rate (default 8)")
    psh.add_argument("--audio-rate", type=int_at_least(1), default=8000, help="synthetic: audio rate (default 8000)")
    psh.add_argument("--no-audio", action="store_true", help="synthetic: no audio track")
    psh.add_argument("--paraphrases", type=int_at_least(1), default=1, help="synthetic: captions per clip (default 1)")
    psh.add_argument("--seed", type=int_at_least(0), default=0)
    psh.set_defaults(fn=cmd_data_shards)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastvl", description="fast video-language pretraining kernels and models")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or FASTVL_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    pi = sub.add_parser("info", help="versions, devices, backends per op and why the others are not used")
    pi.add_argument("--model", default=None, help="also print a model's parameters and FLOPs (fastvl.models.describe)")
    pi.add_argument(
        "--capabilities", action="store_true", help="print what every backend of every op declares it supports"
    )
    pi.set_defaults(fn=cmd_info)
    pd = sub.add_parser("demo", help="run every token op once and check it against its reference")
    pd.set_defaults(fn=cmd_demo)
    _add_bench(sub)
    _add_data(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``fastvl`` entry point. A user mistake prints ``fastvl CMD: error: FLAG: what was expected`` and
    returns 2 (no traceback unless ``--debug`` or ``FASTVL_DEBUG=1``); nothing is written before the arguments
    are checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("FASTVL_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad value (2), already printed
        return int(e.code or 0)
    prog = "fastvl " + " ".join(x for x in (args.cmd, getattr(args, "data_cmd", None)) if x)
    try:
        return args.fn(args)
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
