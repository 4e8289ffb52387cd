"""Every Triton kernel fastvl launches compiles for an H100 (sm_90), with no GPU.

The interpreter never lowers a kernel to PTX, so CPU tests cannot see GPU-only compile errors (a tl.dot shape
the hardware rejects, a dtype mismatch in a store, a layout the backend cannot lower). Step 1 runs every op's
Triton backend under TRITON_INTERPRET=1 with fp16 data and records each launch: the kernel, its argument types
and its constexprs. Step 2, in processes without the interpreter, compiles exactly those launches with Triton's
bundled ptxas for sm_90, with every fp16 pointer turned into bf16 (the interpreter cannot run bf16 arithmetic;
the GPU path runs bf16). Kernels added later are covered without editing this file,
as long as some op below reaches them.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_CAPTURE = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("FASTVL_POISON", None)
import torch
from triton.runtime.interpreter import InterpretedFunction

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
         torch.bool: "i1"}
seen = {}
orig = InterpretedFunction.run

def run(self, *args, grid, warmup, **kwargs):
    import inspect
    names = self.arg_names
    ann = {n: str(p.annotation) for n, p in inspect.signature(self.fn).parameters.items()}
    params = dict(zip(names, args))
    params.update({k: v for k, v in kwargs.items() if k in names})
    sig, const = {}, {}
    for name in names:
        v = params.get(name)
        if name not in params or v is None or "constexpr" in ann.get(name, ""):
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            const[name] = v
    rec = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig, "const": const,
           "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    seen[json.dumps(rec, sort_keys=True, default=str)] = rec
    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

InterpretedFunction.run = run
import fastvl
bf = torch.float16
g = torch.Generator().manual_seed(0)
def r(*s, dtype=bf):
    return torch.randn(*s, generator=g).to(dtype)

T = "triton"
x = r(6, 5 + 17, 32).requires_grad_(True)
fastvl.ops.temporal_token_roll(x, 3, text_len=5, backend=T).sum().backward()
v = r(4, 40, 32).requires_grad_(True)
pos = r(40, 32).requires_grad_(True)
fastvl.ops.drop_tokens(v, 0.5, pos=pos, backend=T)[0].sum().backward()
fastvl.ops.random_masking(v, 0.75, pos=pos, backend=T)[0].sum().backward()
fastvl.ops.random_masking(v, 0.75, noise=torch.rand(4, 40), backend=T)
fastvl.ops.gather_tokens(v, torch.randint(0, 40, (4, 9)), backend=T).sum().backward()

q, k, w = (r(6, 21, 2, 64).requires_grad_(True) for _ in range(3))
kpm = torch.rand(6, 21) < 0.2
off = fastvl.ops.roll_frame_offsets(21, 4, fraction=0.25)
fastvl.ops.flash_attention(q, k, w, key_padding_mask=kpm, frame_offsets=off, num_frames=3, backend=T).sum().backward()
fastvl.ops.flash_attention(q, k, w, causal=True, backend=T).sum().backward()
qv, kv, vv = (r(20, 2, 64).requires_grad_(True) for _ in range(3))
cu = torch.tensor([0, 7, 20], dtype=torch.int32)
fastvl.ops.flash_attention_varlen(qv, kv, vv, cu, cu, 13, 13, backend=T).sum().backward()
h = r(5, 96).requires_grad_(True)
res = r(5, 96).requires_grad_(True)
lw, lb = r(96).requires_grad_(True), r(96).requires_grad_(True)
y, hs = fastvl.ops.layer_norm(h, lw, lb, 1e-6, residual=res, backend=T)
(y.float().sum() + hs.float().sum()).backward()
fastvl.ops.layer_norm(h, lw, lb, backend=T).float().sum().backward()

a, b = r(33, 64).requires_grad_(True), r(33, 64).requires_grad_(True)
scale = torch.tensor(10.0, requires_grad=True)
bias = torch.tensor(-5.0, requires_grad=True)
fastvl.ops.clip_loss(a, b, scale, backend=T).backward()
txt = r(33, 3, 64).requires_grad_(True)
valid = torch.rand(33) < 0.8
fastvl.ops.mil_nce_loss(a, txt, scale, valid, backend=T).backward()
fastvl.ops.siglip_loss(a, b, scale, bias, backend=T).backward()
json.dump(list(seen.values()), sys.stdout)
"""

_COMPILE = r"""
import importlib, json, os, sys
from concurrent.futures import ProcessPoolExecutor
os.environ.pop("TRITON_INTERPRET", None)


def build(rec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    while not isinstance(fn, JITFunction):  # an Autotuner / Heuristics wraps the JITFunction
        fn = fn.fn
    sig = dict(rec["sig"])
    for name in rec["const"]:
        sig[name] = "constexpr"
    # the GPU path runs bf16 where the interpreter ran fp16
    sig = {n: ("*bf16" if sig[n] == "*fp16" else sig[n]) for n in fn.arg_names}
    opts = {"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]}
    try:
        triton.compile(ASTSource(fn, sig, rec["const"]), target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as e:
        return f"FAILED {rec['module']}.{rec['name']} {sig} {rec['const']}: {type(e).__name__}: {str(e)[:1500]}"
    return None


if __name__ == "__main__":
    recs = json.load(sys.stdin)
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        errors = [e for e in ex.map(build, recs) if e]
    if errors:
        print("\n".join(errors))
        sys.exit(1)
    print("compiled", len(recs), " ".join(sorted({r["module"].split(".")[-1] + "." + r["name"] for r in recs})))
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}
    cap = subprocess.run([sys.executable, "-c", _CAPTURE], capture_output=True, text=True, env=env, timeout=900)
    assert cap.returncode == 0, cap.stderr[-3000:]
    recs = json.loads(cap.stdout)
    kernels = {f"{r['module'].split('.')[-1]}.{r['name']}" for r in recs}
    # every kernel module fastvl ships is reached by the launches above
    for mod in ("roll", "tokens", "attention", "layer_norm", "contrastive"):
        assert any(k.startswith(mod + ".") for k in kernels), (mod, sorted(kernels))
    script = os.path.join(str(tmp_path), "aot_compile.py")  # a file, so the worker processes can import it
    with open(script, "w") as f:
        f.write(_COMPILE)
    comp = subprocess.run(
        [sys.executable, script], input=cap.stdout, capture_output=True, text=True, env=env, timeout=900
    )
    assert comp.returncode == 0 and comp.stdout.startswith("compiled"), (comp.stdout + comp.stderr)[-4000:]
