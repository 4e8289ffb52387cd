"""``fastvl`` command line: info, demo, bench (later: pretrain, eval)."""

from __future__ import annotations

import argparse
import platform
import sys


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


def cmd_info(args) -> int:
    import torch

    from fastvl import backends

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
                if not backends._REGISTRY[op][name].available():
                    print(f"      - {name}: {'; '.join(reasons)}")
    if getattr(args, "model", None):
        from fastvl import models  # noqa: F401  (added by the models issue)

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvl", description="fast video-language pretraining kernels and models")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="versions, devices, backends per op and why the others are not used")
    pi.add_argument("--model", default=None, help=argparse.SUPPRESS)
    pi.set_defaults(fn=cmd_info)
    pd = sub.add_parser("demo", help="run every token op once and check it against its reference")
    pd.set_defaults(fn=cmd_demo)
    _add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
