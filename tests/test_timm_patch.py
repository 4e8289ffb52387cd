"""fastvl.patch_timm_vit on small timm VisionTransformers built directly (no pretrained weights, no downloads)."""

import copy

import pytest
import torch

import fastvl
from fastvl.testing import assert_close, kernel_backends

timm = pytest.importorskip("timm")
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

KERNELS = kernel_backends("triton")


def _vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, qkv_bias=True)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _out_and_grads(model, x):
    model.zero_grad()
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), xx.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_patch_keeps_weights_and_matches(qk_norm):
    model = _vit(qk_norm=qk_norm)
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastvl.patch_timm_vit(model) is model
    assert not any(isinstance(m, TimmAttention) for m in model.modules())
    n_attn = sum(isinstance(m, fastvl.nn.Attention) for m in model.modules())
    n_ln = sum(isinstance(m, fastvl.nn.LayerNorm) for m in model.modules())
    assert n_attn == 2 and n_ln == 2 * 2 + 1 + (4 if qk_norm else 0)
    # the same Parameter objects under the same names, values untouched
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(3, 3, 32, 32)
    out, gx, gp = _out_and_grads(model, x)
    r_out, r_gx, r_gp = _out_and_grads(ref, x)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, r_gx, rtol=1e-5, atol=1e-5)
    for n in gp:
        torch.testing.assert_close(gp[n], r_gp[n], rtol=1e-4, atol=1e-5, msg=n)
    assert fastvl.patch_timm_vit(model) is model  # idempotent


@pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")
def test_patched_vit_triton_interpreter():
    # tiny: 4 patches + CLS = 5 tokens, one head of 32
    model = _vit(img_size=16, embed_dim=32, num_heads=1, depth=1)
    ref = copy.deepcopy(model)
    fastvl.patch_timm_vit(model, backend="triton")
    x = torch.randn(2, 3, 16, 16)
    out, gx, gp = _out_and_grads(model, x)
    r_out, r_gx, r_gp = _out_and_grads(ref, x)
    assert_close(out, r_out.double(), torch.float32, rtol=1e-4, atol=1e-5)
    assert_close(gx, r_gx.double(), torch.float32, rtol=1e-4, atol=1e-5, name="grad x")
    for n in gp:
        assert_close(gp[n], r_gp[n].double(), torch.float32, rtol=1e-4, atol=1e-5, name=n)


def test_attention_module_state_dict_matches_timm():
    t = TimmAttention(48, num_heads=3, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    ours = fastvl.nn.Attention(48, num_heads=3, qkv_bias=True, qk_norm=True)
    assert ours.state_dict().keys() == t.state_dict().keys()
    ours.load_state_dict(t.state_dict())
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(x), t(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_vit_b16_bf16():
    model = _vit(img_size=224, patch_size=16, embed_dim=768, depth=4, num_heads=12, num_classes=10).cuda()
    ref = copy.deepcopy(model)
    fastvl.patch_timm_vit(model, backend="triton")
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        r_out = ref(x)
    assert_close(out.float(), r_out.double(), torch.bfloat16, rtol=5e-2, atol=5e-2)
