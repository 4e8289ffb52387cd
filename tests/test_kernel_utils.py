"""kernels.utils: the device guard every launcher runs under, forced GPU configs, column blocks."""

import contextlib

import pytest
import torch

from fastvl.testing import interpret

needs_interp = pytest.mark.skipif(not interpret(), reason="runs the launchers under the Triton interpreter")


def test_device_of_picks_the_first_cuda_tensor_or_device():
    from fastvl.kernels.utils import device_of

    assert isinstance(device_of(torch.zeros(2), 3, None), contextlib.nullcontext)
    guard = device_of(torch.zeros(1), torch.device("cuda", 1))  # a launcher's device= argument counts
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not entered: no CUDA needed


@needs_interp
def test_every_memory_bound_launcher_runs_under_its_tensors_device(monkeypatch):
    import fastvl.kernels.utils as U
    from fastvl.kernels import layer_norm, roll, tokens

    seen = []

    def spy(*args):
        seen.append(args)
        return contextlib.nullcontext()

    monkeypatch.setattr(U, "device_of", spy)
    x = torch.randn(2, 6, 16)
    idx = torch.tensor([[1, 3], [0, 5]])
    calls = [
        lambda: roll.roll(x, 2, 1, 1),
        lambda: tokens.draw(2, 6, 3, seed=torch.zeros(1, dtype=torch.int64)),
        lambda: tokens.gather(x, idx),
        lambda: tokens.gather_backward(torch.randn(2, 2, 16), idx, 6, need_dpos=True),
        lambda: layer_norm.layer_norm_forward(x[0], None, None, 1e-6),
        lambda: layer_norm.layer_norm_backward(x[0], None, x[0], None, torch.zeros(2), torch.ones(2), False, False),
    ]
    for call in calls:
        seen.clear()
        call()
        assert len(seen) == 1 and any(isinstance(a, torch.Tensor) for a in seen[0])  # guarded once, by its tensors


def test_gpu_configs_nest_and_plan_for_the_forced_sm_count():
    from fastvl.kernels.utils import H100_SMS, gpu_configs, sm_count, use_gpu_configs

    cpu = torch.device("cpu")
    assert not use_gpu_configs(cpu)
    with gpu_configs():
        assert use_gpu_configs(cpu) and sm_count(cpu) == H100_SMS
        with gpu_configs(2):
            assert sm_count(cpu) == 2
        assert sm_count(cpu) == H100_SMS
    assert not use_gpu_configs(cpu)


COL_BLOCKS = [(768, 2, 2048, 256), (1024, 2, 2048, 1024), (1000, 2, 2048, 1024), (768, 2, 512, 256), (72, 4, 512, 16)]


@pytest.mark.parametrize("n,elem,max_bytes,block", COL_BLOCKS + [(5, 2, 2048, 16)])
def test_col_block(n, elem, max_bytes, block):
    from fastvl.kernels.utils import col_block

    assert col_block(n, elem, max_bytes) == block
