"""A small model using every token op runs under torch.compile(fullgraph=True): no graph breaks."""

import pytest
import torch

import fastvl
from fastvl.ops.roll import roll_reference


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.pos = torch.nn.Parameter(torch.randn(19, 8))
        self.roll = fastvl.nn.TemporalTokenRoll(num_frames=3, text_len=2)

    def forward(self, x, noise):
        h = self.roll(self.proj(x))
        vis, mask, restore = fastvl.ops.random_masking(h, 0.5, noise=noise, pos=self.pos)
        g = fastvl.ops.gather_tokens(h, restore[:, :4], unique_indices=True, check_bounds=False)
        kept, ids = fastvl.ops.drop_tokens(h, 0.5)
        return vis.sum() + g.sum() + kept.shape[1] + mask.sum()


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = Tiny()
    x = torch.randn(6, 19, 8)
    noise = torch.rand(6, 19)
    eager = m(x, noise)
    eager.backward()
    g_eager = m.proj.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    out = compiled(x, noise)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(m.proj.weight.grad, g_eager)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 19, 8)
        y = fastvl.ops.temporal_token_roll(x, 3, text_len=2)
        assert y.shape == x.shape
        vis, mask, restore = fastvl.ops.random_masking(x, 0.5, noise=torch.empty(6, 19))
        assert vis.shape == (6, 9, 8) and mask.shape == (6, 19) and restore.shape == (6, 19)


def test_opcheck():
    x = torch.randn(6, 19, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvl.temporal_token_roll.default, (x, 3, 2, 2, 1, "reference"))
    idx = torch.randperm(19)[:5][None].expand(6, 5).contiguous()
    torch.library.opcheck(torch.ops.fastvl.gather_tokens.default, (x, idx, None, None, "reference"))
    assert torch.equal(roll_reference(x.detach(), 3, 2, 2), fastvl.ops.temporal_token_roll(x, 3, text_len=2))
