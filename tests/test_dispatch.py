"""The dispatch front door: explain and the call share one path, capabilities are declared as data."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import fastvl
from fastvl import BackendError, backends
from fastvl.cli import main as cli_main
from fastvl.testing import device, interpret

DEV = device()
SEEN: set[tuple[str, str]] = set()  # (op, backend) pairs the examples ran, checked last
EXAMPLES = [(op, i) for op in backends.ops() for i in range(len(backends.examples(op)))]


def _chosen(report: str) -> list[tuple[str, str, str | None]]:
    """(op, role, chosen backend or None on an error) per request of an explain report."""
    out = []
    for line in report.splitlines():
        if not line.startswith(" "):
            head = line.split(": request")[0]
            out.append([head.split(" (")[0], head.partition(" (")[2].rstrip(")"), None])
        elif "[chosen]" in line:
            out[-1][2] = line.split("] ")[1].split(" (")[0]
    return [tuple(x) for x in out]


@pytest.fixture
def ran(monkeypatch):
    """Every implementation of every backend, instrumented: the list of (op, backend, role) that ran."""
    log = []
    for op in backends.ops():
        for b in backends.backends(op):
            for role, fn in b.impls.items():

                def wrapped(*args, _fn=fn, _at=(op, b.name, role), **kwargs):
                    log.append(_at)
                    return _fn(*args, **kwargs)

                monkeypatch.setitem(b.impls, role, wrapped)
    return log


def _floats_requiring_grad(args, kwargs):
    def prep(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.detach().clone().requires_grad_(True)
        return x

    return [prep(a) for a in args], {k: prep(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("op,index", EXAMPLES)
def test_explain_chooses_what_runs(op, index, ran):
    """For every registered example of every op, under auto and under each backend named: the backend explain
    reports as chosen is the one whose implementation runs, forward and backward (or the call refuses)."""
    name, args, kwargs = backends.examples(op)[index](DEV, True)
    fn = backends.public_function(name)
    for request in [None] + [b.name for b in backends.backends(op)]:
        a, kw = _floats_requiring_grad(args, kwargs)
        chosen = _chosen(fastvl.explain(fn, *a, backend=request, **kw))
        assert op in {o for o, _, _ in chosen}, (op, request, chosen)
        ran.clear()
        if any(b is None for _, _, b in chosen):
            with pytest.raises(BackendError):
                fn(*a, backend=request, **kw)
            continue
        out = fn(*a, backend=request, **kw)
        assert {(o, b) for o, b, _ in ran} == {(o, b) for o, role, b in chosen if role != "backward"}, (request, ran)
        SEEN.update((o, b) for o, b, _ in ran)
        outputs = out if isinstance(out, tuple) else (out,)
        ran.clear()
        sum(t.float().sum() for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad).backward()
        assert {(o, b) for o, b, _ in ran} <= {(o, b) for o, _, b in chosen}, (request, chosen, ran)
        assert {(o, b) for o, role, b in chosen if role == "backward"} <= {(o, b) for o, b, _ in ran}
        SEEN.update((o, b) for o, b, _ in ran)


def test_every_example_dispatches_its_op_and_declared_features():
    """Each op's example plans a request for that op, and every feature a call uses is one the reference serves."""
    for op, index in EXAMPLES:
        name, args, kwargs = backends.examples(op)[index](DEV, True)
        plan = backends.public_function(name).prepare(*args, **kwargs)
        calls = [r.call for r in plan.requests]
        assert op in {c.op for c in calls}
        for c in calls:
            reference = backends.get(c.op, "reference").capabilities[0]
            assert c.features <= reference.features, (c.op, c.features)


@pytest.mark.skipif(not interpret(), reason="the Triton interpreter is not in use here")
@pytest.mark.parametrize(
    "op", ["flash_attention", "layer_norm", "clip_loss", "mil_nce_loss", "siglip_loss", "linear_cross_entropy"]
)
def test_triton_declines_bf16_in_the_interpreter(op):
    """The interpreter's bf16 arithmetic is wrong (a CLIP loss of 1.9e11 where the reference gives 3.2): every
    Triton backend that computes in floating point declares so, and refuses bf16 CPU tensors with the reason."""
    name, args, kwargs = backends.examples(op)[0](torch.device("cpu"), True)
    args = [a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    assert torch.bfloat16 not in backends.get(op, "triton").capabilities[0].interpreted_dtypes
    with pytest.raises(BackendError, match="bfloat16 on the CPU: the Triton interpreter's bfloat16 arithmetic"):
        backends.public_function(name)(*args, backend="triton", **kwargs)
    assert "[chosen] triton" not in fastvl.explain(name, *args, backend="triton", **kwargs)


def test_capability_table_is_the_declarations():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["info", "--capabilities"]) == 0
    text = buf.getvalue()
    rows = backends.capability_table()
    declared = {(op, b.name) for op in backends.ops() for b in backends.backends(op)}
    assert {(r["op"], r["backend"]) for r in rows} == declared
    for r in rows:
        assert r["dtypes"] in text and r["features"] in text
    assert "key_padding_mask (named)" in text  # sdpa on CUDA masks only when named
    assert "float16, bfloat16, float32 (interpreter: float16, float32)" in text
    assert "SDPA takes either is_causal or an attn_mask" in text  # the one special case attention writes as code


@pytest.mark.skipif(not interpret(), reason="the Triton interpreter is not in use here")
def test_the_examples_ran_every_cpu_backend():
    """The instrumented runs above reached every backend that can run on this machine (peers and the CUDA
    extension cannot, so they are left out)."""
    if not SEEN:
        pytest.skip("run with test_explain_chooses_what_runs")
    runnable = {(op, b.name) for op in backends.ops() for b in backends.backends(op)}
    runnable -= {(op, b.name) for op in backends.ops() for b in backends.backends(op) if b.peer or b.name == "cuda"}
    assert runnable <= SEEN, runnable - SEEN


def test_explain_by_name_and_noop():
    x = torch.randn(6, 9, 4)
    assert fastvl.explain("temporal_token_roll", x, 3) == fastvl.explain(fastvl.ops.temporal_token_roll, x, 3)
    assert "nothing to dispatch" in fastvl.explain("temporal_token_roll", x, 1)
    with pytest.raises(KeyError, match="no public op named"):
        fastvl.explain("no_such_op", x)
