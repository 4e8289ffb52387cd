import pytest
import torch

import fastvl
from fastvl import BackendError, backends
from fastvl.backends import Call


@pytest.fixture
def toy_op():
    op = "toy_test_op"
    backends.register(op, "reference", priority=0)
    backends.register(
        op, "fast", priority=10, check=lambda c: [] if c.tensors["x"].dtype == torch.float32 else ["fast wants float32"]
    )
    backends.register(op, "broken", priority=20, available=lambda: ["broken is not installed"])
    yield op
    backends.unregister(op)


def test_auto_picks_best_qualifying(toy_op):
    call = Call(toy_op, {"x": torch.zeros(2)})
    assert backends.select(toy_op, "auto", call) == "fast"
    call = Call(toy_op, {"x": torch.zeros(2, dtype=torch.float64)})
    assert backends.select(toy_op, "auto", call) == "reference"


def test_explicit_backend_raises_with_reasons(toy_op):
    call = Call(toy_op, {"x": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(BackendError, match="'fast' cannot serve this call: fast wants float32"):
        backends.select(toy_op, "fast", call)
    with pytest.raises(BackendError, match="broken is not installed"):
        backends.select(toy_op, "broken", call)


def test_no_backend_lists_every_reason(toy_op):
    backends.register(toy_op, "reference", priority=0, check=lambda c: ["reference refuses"])
    call = Call(toy_op, {"x": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(BackendError) as e:
        backends.select(toy_op, "auto", call)
    msg = str(e.value)
    assert "broken is not installed" in msg and "fast wants float32" in msg and "reference refuses" in msg


def test_request_resolution_order(toy_op, monkeypatch):
    monkeypatch.delenv("FASTVL_BACKEND", raising=False)
    assert backends.resolve_request(toy_op, None) == ("auto", False)
    monkeypatch.setenv("FASTVL_BACKEND", "fast")
    assert backends.resolve_request(toy_op, None) == ("fast", True)
    monkeypatch.setenv("FASTVL_BACKEND", f"other_op=fast,{toy_op}=reference")
    assert backends.resolve_request(toy_op, None) == ("reference", True)
    with fastvl.use_backend("fast"):
        assert backends.resolve_request(toy_op, None) == ("fast", True)  # context beats env
        with fastvl.use_backend({toy_op: "broken"}):
            assert backends.resolve_request(toy_op, None) == ("broken", True)
        assert backends.resolve_request(toy_op, "reference") == ("reference", True)  # argument beats all
    # a global name this op does not have falls back to auto; an argument never does
    with fastvl.use_backend("cuda"):
        assert backends.resolve_request(toy_op, None) == ("auto", False)
    assert backends.resolve_request(toy_op, "cuda") == ("cuda", True)


def test_use_backend_rejects_garbage():
    with pytest.raises(TypeError, match="spec must be"):
        with fastvl.use_backend(3):
            pass


def test_every_op_has_reference_and_reasons():
    for op in backends.ops():
        names = [b.name for b in backends.backends(op)]
        assert "reference" in names, op
        assert backends.get(op, "reference").available() == []


def test_explain_report():
    x = torch.randn(6, 17, 8)
    report = fastvl.explain(fastvl.ops.temporal_token_roll, x, 3)
    assert "[chosen] reference" in report
    assert "cuda" in report and "triton" in report
    with fastvl.use_backend("cuda"):
        report = fastvl.explain("temporal_token_roll", x, 3)
        assert "request 'cuda' (explicit)" in report and "-> error" in report


def test_env_backend_applies_to_calls(monkeypatch):
    x = torch.randn(6, 17, 8)
    monkeypatch.setenv("FASTVL_BACKEND", "cuda")
    # the reason depends on whether fastvl._C is built here, the refusal does not
    with pytest.raises(
        BackendError, match="backend 'cuda' cannot serve this call: (x is on cpu|fastvl._C is not built)"
    ):
        fastvl.ops.temporal_token_roll(x, 3)
