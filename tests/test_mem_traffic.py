"""Memory-bound op calls (roll, gather and its backward, DropToken / masking with pos, LayerNorm, the MAE decoder
input's forward) move at most 1.15x their minimum bytes, counting every launch and every PyTorch op of the call.

Bytes are counted lane by lane from the Triton interpreter's loads, stores and atomics with the launchers'
GPU configurations (benchmarks/mem_traffic.py), at the suite's widths with fewer rows; a repeated read counts
each time, so this bounds what the GPU's caches see, not only DRAM.
"""

import pytest

from fastvl.testing import interpret

pytestmark = pytest.mark.skipif(not interpret(), reason="counts bytes in the Triton interpreter (CPU only)")
LIMIT = 1.15


def _pairs():
    from fastvl.benchmarks.mem_traffic import cases

    out = {}
    for c in cases("ci"):
        if c.bounded:
            out.setdefault(f"{c.name.split('/')[0]} {c.shape}", []).append(c)
    return out


PAIRS = _pairs()


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_op_call_moves_at_most_115x_its_minimum(name, monkeypatch):
    from fastvl.kernels.utils import gpu_configs

    monkeypatch.setenv("FASTVL_POISON", "0")  # poisoning outputs is a test-only write
    for case in PAIRS[name]:  # forward, then the backward of its outputs
        with gpu_configs(case.sms):
            t = case.run()
        kernels = ", ".join(f"{x.name} {x.grid} {x.read + x.written} B" for x in t.launches)
        torch_ops = ", ".join(f"{n} {r + w} B" for n, r, w in t.torch_ops)
        assert t.launches, f"{case.name}: no Triton launch recorded"
        assert t.total <= LIMIT * case.minimum, (
            f"{case.name} {case.shape}: {t.total} B moved, {t.total / case.minimum:.3f}x the minimum "
            f"{case.minimum} B (kernels: {kernels}; torch: {torch_ops or 'none'})"
        )
