"""Models: the op contract they rely on (fastvl/models/layers.py), tiny-config behaviour, backend equality,
sizes and FLOPs pinned against the papers, bad input. Full-size models are built on the meta device."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import fastvl
from fastvl import BackendError
from fastvl.models import create_model, describe, example_batch, layers, list_models, model_stats
from fastvl.models.flops import count
from fastvl.ops.contrastive import clip_loss_reference
from fastvl.testing import assert_close, kernel_backends, randn

TINY = ["allinone-tiny", "vatt-tiny", "vatt-ma-tiny", "mac-tiny"]
HAS_TRITON = bool(kernel_backends("triton"))


def make_batch(model, B=3, seed=0, P=None):
    """Real-valued batch at the model's input size with varied text padding (VATT: one sample without text)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    Lt = cfg.max_text_len - 2
    ids = torch.randint(1000, 2000, (B, Lt), generator=g)
    mask = torch.ones(B, Lt, dtype=torch.bool)
    mask[1, Lt // 2 :] = False
    ids[:, 0] = cfg.cls_id
    ids[~mask] = cfg.pad_id
    batch = {
        "video": torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g),
        "text_ids": ids,
        "text_mask": mask,
    }
    if hasattr(cfg, "audio_patch"):
        batch["audio"] = torch.randn(B, (cfg.max_audio_tokens - 4) * cfg.audio_patch, generator=g)
        batch["text_mask"][B - 1] = B < 3  # sample 2 has no text (MIL-NCE 'valid')
        if P:
            batch["text_ids_all"] = torch.randint(1000, 2000, (B, P, Lt), generator=g)
            batch["text_mask_all"] = torch.rand(B, P, Lt, generator=g) < 0.8
            batch["text_mask_all"][B - 1] = False
    return batch


def tiny(name, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw)


def noise_for(model, batch, seed=1):
    """Fixed DropToken / masking draws for the models' noise hooks (identical on every backend)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    B, T = batch["video"].shape[:2]
    if type(model).__name__ == "VATT":
        Lv = (T // cfg.patch_t) * (cfg.img_size // cfg.patch_s) ** 2
        return {"video": torch.rand(Lv, generator=g), "audio": torch.rand(batch["audio"].shape[1] // 128, generator=g)}
    if type(model).__name__ == "MAC":
        N = model.num_patches
        return {"video": torch.rand(B * T, N, generator=g), "text": torch.rand(B, batch["text_ids"].shape[1] - 1)}
    return None


def run(model, batch, seed=5, noise=None):
    torch.manual_seed(seed)
    return model(batch, noise=noise) if noise is not None else model(batch)


def losses_and_grads(model, batch, noise=None):
    model.zero_grad(set_to_none=True)
    out = run(model, batch, noise=noise)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-4, atol=1e-6, what=""):
    # fp32 end to end; the two paths differ in summation order only (frame average, kernel vs torch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")


# ---- the op contract (layers): these tests keep holding when the real ops are swapped in -------


@pytest.mark.parametrize("T,text_len,steps", [(2, 5, 1), (3, 5, 1), (3, 0, 2), (4, 5, 5)])
def test_roll_frame_offsets_match_temporal_token_roll(T, text_len, steps):
    S, B = text_len + 17, 2
    x = randn(B * T, S, 3, dtype=torch.float64, device="cpu")
    y = x
    for _ in range(steps):
        y = fastvl.ops.temporal_token_roll(y, T, text_len=text_len)
    off = layers.roll_frame_offsets(S, text_len, steps=steps)
    assert off.dtype == torch.int64 and off.shape == (S,)
    f = 17 // 8
    assert off[: text_len + 1].eq(0).all() and off[text_len + 1 : text_len + 1 + f].eq(-steps).all()
    assert off[S - f :].eq(steps).all() and off[text_len + 1 + f : S - f].eq(0).all()
    for b in range(B):
        for t in range(T):
            for s in range(S):
                assert torch.equal(y[b * T + t, s], x[b * T + (t + int(off[s])) % T, s])


def test_flash_attention_matches_sdpa_and_padded_rows():
    N, Sq, Sk, H, D = 3, 5, 7, 2, 8
    q, k, v = (randn(N, S, H, D, dtype=torch.float64, device="cpu").requires_grad_() for S in (Sq, Sk, Sk))
    mask = torch.rand(N, Sk) < 0.3
    mask[2] = True  # a fully padded row
    out = layers.flash_attention(q, k, v, key_padding_mask=mask, softmax_scale=0.3)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=~mask[:, None, None], scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out[:2], ref[:2])
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # zeros, not NaN
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    causal = layers.flash_attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=torch.ones(Sq, Sk).tril(Sk - Sq).bool()
    ).transpose(1, 2)
    torch.testing.assert_close(causal, ref)


@pytest.mark.parametrize("steps", [1, 2, 4])  # mod T=3: 3 rolls are the identity
def test_flash_attention_roll_aware_equals_explicit_roll(steps):
    """Roll-aware addressing == roll q, k, v (and the mask) `steps` times, attend, roll the output back."""
    B, T, text_len, L, H, D = 2, 3, 4, 17, 2, 8
    S, N = text_len + L, B * T
    q, k, v = (randn(N, S, H, D, dtype=torch.float64, device="cpu").requires_grad_() for _ in range(3))
    mask = torch.rand(N, S) < 0.2
    mask[:, 0] = False

    def roll(x, times):
        shape = x.shape
        y = x.reshape(N, S, -1)
        for _ in range(times % T):
            y = fastvl.ops.temporal_token_roll(y, T, text_len=text_len)
        return y.reshape(shape)

    off = layers.roll_frame_offsets(S, text_len, steps=steps)
    out = layers.flash_attention(q, k, v, key_padding_mask=mask, frame_offsets=off, num_frames=T)
    m_rolled = roll(mask[..., None].double(), steps)[..., 0] > 0.5
    ref = roll(
        layers.flash_attention(roll(q, steps), roll(k, steps), roll(v, steps), key_padding_mask=m_rolled), -steps
    )
    torch.testing.assert_close(out, ref)
    g = randn(N, S, H, D, dtype=torch.float64, device="cpu")
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    # the roll matters: without offsets the result differs
    assert not torch.allclose(out, layers.flash_attention(q, k, v, key_padding_mask=mask))


def test_layer_norm_and_module_contract():
    x, r = randn(4, 6, 16, dtype=torch.float64, device="cpu"), randn(4, 6, 16, dtype=torch.float64, device="cpu")
    w, b = randn(16, dtype=torch.float64, device="cpu"), randn(16, dtype=torch.float64, device="cpu")
    y = layers.layer_norm(x, w, b, 1e-6)
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w, b, 1e-6))
    y, h = layers.layer_norm(x, w, b, 1e-6, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,), w, b, 1e-6))
    ln = layers.LayerNorm(16, eps=1e-6)
    assert set(ln.state_dict()) == set(torch.nn.LayerNorm(16).state_dict())


def test_attention_is_timm_attention():
    torch.manual_seed(0)
    attn = layers.Attention(32, num_heads=4, qkv_bias=True).double()
    assert set(attn.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = randn(2, 7, 32, dtype=torch.float64, device="cpu")
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    # timm's Attention.forward (non-fused path) with an additive key mask
    qkv = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    a = a.masked_fill(mask[:, None, None], float("-inf")).softmax(-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x, key_padding_mask=mask), ref)


def test_clip_and_mil_nce_losses():
    B, P, D = 4, 3, 8
    a = F.normalize(randn(B, D, dtype=torch.float64, device="cpu"), dim=-1)
    b = F.normalize(randn(B, D, dtype=torch.float64, device="cpu"), dim=-1)
    s = torch.tensor(7.0, dtype=torch.float64)
    logits = s * a @ b.T
    exp = -(torch.diag(logits.log_softmax(1)).mean() + torch.diag(logits.log_softmax(0)).mean()) / 2
    torch.testing.assert_close(layers.clip_loss(a, b, s).double(), exp, rtol=1e-5, atol=1e-6)

    text = F.normalize(randn(B, P, D, dtype=torch.float64, device="cpu"), dim=-1).requires_grad_()
    valid = torch.tensor([True, False, True, True])

    def naive(valid):
        total = 0.0
        for i in range(B):
            if not valid[i]:
                continue
            den = [s * a[i] @ text[j, p] for j in range(B) if valid[j] for p in range(P)]
            den += [s * a[j] @ text[i, p] for j in range(B) for p in range(P)]
            num = [s * a[i] @ text[i, p] for p in range(P)]
            total = total + torch.logsumexp(torch.stack(den), 0) - torch.logsumexp(torch.stack(num), 0)
        return total / int(valid.sum())

    got = layers.mil_nce_loss(a, text, s, valid)
    torch.testing.assert_close(got.double(), naive(valid), rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.equal(text.grad[1], torch.zeros_like(text.grad[1]))  # an invalid sample's texts get no gradient
    all_valid = torch.ones(B, dtype=torch.bool)
    torch.testing.assert_close(layers.mil_nce_loss(a, text, s).double(), naive(all_valid), rtol=1e-5, atol=1e-6)
    # P = 1 is plain NCE: logsumexp over row i and column i of the B x B logits, minus the positive
    t1 = text[:, :1].detach()
    L = s * a @ t1[:, 0].T
    nce = torch.stack([torch.logsumexp(torch.cat([L[i], L[:, i]]), 0) - L[i, i] for i in range(B)]).mean()
    torch.testing.assert_close(layers.mil_nce_loss(a, t1, s).double(), nce, rtol=1e-5, atol=1e-6)


# ---- tiny models ---------------------------------------------------------------------------

EXPECTED_LOSSES = {
    "AllInOne": {"mlm", "vtm", "vtc", "loss"},
    "VATT": {"nce_va", "mil_nce_vt", "loss"},
    "MAC": {"vtc_masked", "loss"},
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_losses_and_gradients(name):
    m = tiny(name)
    batch = make_batch(m)
    out = run(m, batch)
    assert set(out) == EXPECTED_LOSSES[type(m).__name__]
    for k, v in out.items():
        assert v.shape == () and torch.isfinite(v), k
    parts = [v for k, v in out.items() if k != "loss"]
    expect = sum(parts) / 2 if type(m).__name__ == "VATT" else sum(parts)
    torch.testing.assert_close(out["loss"], expect)
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == [], f"parameters without gradient: {dead}"


def test_vatt_mil_nce_positives():
    m = tiny("vatt-tiny")
    out = run(m, make_batch(m, P=2))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.text_to_vt.weight.grad.abs().sum() > 0


def _mlm_every_position(m, batch, generator):
    """All-in-one's MLM loss written the eager way: decoder logits over the vocabulary at every text position."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    mids, labels = m.mlm_mask(ids, mask, generator)
    y = m.fused(m.embed_text(mids), mask, m.embed_video(batch["video"]))
    logits = m.mlm_decoder(m.mlm_transform(y[:, : ids.shape[1]]))
    n = (labels != -100).sum().clamp_min(1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n, int((labels != -100).sum())


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_allinone_mlm_at_masked_positions_equals_every_position(backend):
    """The MLM head at the masked positions only (linear_cross_entropy, no logits) gives the loss and gradients
    of the eager head over every text position: float64, tiny model (the decoder is not tied to the word
    embeddings). The Triton path is held to the reference in test_backends_give_equal_losses_and_gradients."""
    m = tiny("allinone-tiny", tasks=("mlm",)).double()
    assert m.mlm_decoder.weight.data_ptr() != m.word_embeddings.weight.data_ptr()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in make_batch(m, B=4).items()}
    with fastvl.use_backend({"linear_cross_entropy": backend}):
        new = m(batch, generator=torch.Generator().manual_seed(3))["mlm"]
    params = [m.mlm_decoder.weight, m.mlm_decoder.bias, m.mlm_transform[0].weight, m.patch_embed.weight]
    g_new = torch.autograd.grad(new, params)
    old, n = _mlm_every_position(m, batch, torch.Generator().manual_seed(3))
    g_old = torch.autograd.grad(old, params)
    assert n > 0 and new.dtype == torch.float64
    torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_allinone_mlm_without_masked_tokens():
    """No token masked (mlm_prob 0): the MLM loss is 0, not NaN, and the head's gradients are zeros."""
    m = tiny("allinone-tiny", tasks=("mlm",), mlm_prob=0.0)
    out = m(make_batch(m))
    out["loss"].backward()
    assert out["mlm"].item() == 0.0
    assert torch.equal(m.mlm_decoder.weight.grad, torch.zeros_like(m.mlm_decoder.weight))


def test_allinone_fused_rolling_equals_explicit():
    m = tiny("allinone-tiny")
    batch = make_batch(m)
    fused = losses_and_grads(m, batch)
    m.config.rolling = "explicit"
    explicit = losses_and_grads(m, batch)
    assert_same(fused[0], explicit[0], what="losses")
    assert_same(fused[1], explicit[1], what="grads")
    # the roll is not a no-op on this config (L = 17 video tokens, f = 2): the fused tokens change
    with torch.no_grad():
        args = (m.embed_text(batch["text_ids"]), batch["text_mask"], m.embed_video(batch["video"]))
        y = {}
        for mode in ("fused", "explicit", "none"):
            m.config.rolling = mode
            y[mode] = m.fused(*args)
    torch.testing.assert_close(y["fused"], y["explicit"], rtol=1e-5, atol=1e-5)
    assert (y["fused"] - y["none"]).abs().max() > 1e-2


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name", ["allinone-tiny:explicit", "allinone-tiny:fused", *TINY[1:]])
def test_backends_give_equal_losses_and_gradients(name):
    """The same weights and random state under use_backend('triton') and 'reference': every op with a Triton
    kernel runs it (interpreted on the CPU), drop/mask subsets are injected. Both fp32 runs are held against a
    float64 run of the reference: the kernel path's error must stay within 2x PyTorch's own fp32 error
    (flash-attn's rule) or within 1e-4 of each tensor's scale. The per-op 2x rule is enforced op by op in the
    op tests; here errors compound through blocks and BN heads on tiny batches (fp32 gradients of these tiny
    models are ill-conditioned), and what this test guards is the wiring: a wrong input, offset or mask
    shows as an O(1) relative difference.
    All-in-one runs the roll kernel when explicit, roll-aware attention when fused."""
    name, _, rolling = name.partition(":")
    m = tiny(name, rolling=rolling) if rolling else tiny(name)
    batch = make_batch(m)
    noise = noise_for(m, batch)
    with fastvl.use_backend("reference"):
        ref = losses_and_grads(m, batch, noise)
    with fastvl.use_backend("triton"):
        tri = losses_and_grads(m, batch, noise)
    m64 = copy.deepcopy(m).double()
    b64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    with fastvl.use_backend("reference"):
        r64 = losses_and_grads(m64, b64, noise)
    for part in (0, 1):
        for k in ref[part]:
            scale = r64[part][k].abs().max().item()
            assert_close(
                tri[part][k],
                r64[part][k],
                torch.float32,
                torch_same_dtype=ref[part][k],
                atol=1e-4 * max(scale, 1e-3),
                name=f"{name} {'loss' if part == 0 else 'grad'} {k}",
            )


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
def test_kernel_draws_without_noise():
    """DropToken / masking drawn by the Triton kernels themselves (no injected noise): finite, trainable."""
    for name in ("vatt-tiny", "mac-tiny"):
        m = tiny(name)
        with fastvl.use_backend("triton"):
            out = run(m, make_batch(m))
            out["loss"].backward()
        assert torch.isfinite(out["loss"])
        patch = m.video_tokenizer.proj if name.startswith("vatt") else m.patch_embed
        assert patch.weight.grad.abs().sum() > 0


def test_vatt_droptoken_keeps_the_noise_subset():
    m = tiny("vatt-tiny")
    x, pos = torch.randn(2, 8, 64), torch.randn(8, 64)
    noise = torch.rand(8)
    kept = m._drop(x, pos, 0.5, noise)
    ids = torch.argsort(noise)[:4]
    torch.testing.assert_close(kept, (x + pos)[:, ids])
    kept = m._drop(x, pos, 0.25, None)  # drawn by drop_tokens: 2 of 8 rows of x + pos, one subset for the batch
    assert kept.shape == (2, 2, 64)
    rows = [int(((x[0] + pos) - kept[0, j]).abs().sum(-1).argmin()) for j in range(2)]
    torch.testing.assert_close(kept, (x + pos)[:, rows])


def test_mac_text_masking_drops_real_tokens_only():
    m = tiny("mac-tiny")
    B, Lt = 3, 11
    x = torch.arange(B * Lt, dtype=torch.float32).reshape(B, Lt, 1).expand(B, Lt, 4)
    mask = torch.ones(B, Lt, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    vis, keep = m.mask_text(x, mask, 0.3)
    K = int(10 * 0.7)
    assert vis.shape == (B, 1 + K, 4) and keep.shape == (B, 1 + K)
    assert torch.equal(vis[:, 0], x[:, 0]) and keep[:, 0].all()  # the CLS stays
    for i, n in enumerate((10, 5, 1)):  # real tokens after the CLS
        assert int(keep[i].sum()) - 1 == int(n * 0.7)
        kept_vals = vis[i, 1:][keep[i, 1:], 0]
        real_vals = x[i, 1:][mask[i, 1:], 0]
        assert set(kept_vals.tolist()) <= set(real_vals.tolist())  # never padding
        assert len(set(kept_vals.tolist())) == len(kept_vals)


@pytest.mark.parametrize("name", TINY)
def test_deterministic_and_state_dict_round_trip(name):
    m = tiny(name)
    batch = make_batch(m)
    a, b = run(m, batch), run(m, batch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    torch.manual_seed(123)
    m2 = create_model(name)
    assert not torch.equal(run(m2, batch)["loss"], a["loss"])
    buf.seek(0)
    m2.load_state_dict(torch.load(buf))
    c = run(m2, batch)
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", TINY)
def test_encoders_give_unit_embeddings(name):
    m = tiny(name).eval()
    batch = make_batch(m)
    with torch.no_grad():
        v = m.encode_video(batch["video"])
        t = m.encode_text(batch["text_ids"], batch["text_mask"])
    assert v.shape == t.shape and v.shape[0] == 3
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))


def test_backend_argument_reaches_the_ops():
    m = tiny("allinone-tiny", rolling="explicit", backend="cuda")  # explicit: never falls back
    with pytest.raises(BackendError, match="cuda"):
        run(m, make_batch(m))
    m.set_backend("reference")
    assert all(mod.backend == "reference" for mod in m.modules() if hasattr(mod, "backend"))
    assert torch.isfinite(run(m, make_batch(m))["loss"])


# ---- sizes and FLOPs (meta device), pinned ------------------------------------------------

PARAMS = {  # exact counts; All-in-one excluding the MLM decoder, VATT video backbone = encoder + patch embedding
    "allinone-ti": (17_556_924, 11_666_178, 12e6),
    "allinone-s": (45_846_588, 34_095_618, 33e6),
    "allinone-b": (134_718_780, 111_247_362, 110e6),
}
TOTAL_PARAMS = {
    "vatt-bbs": 203_076_088,
    "vatt-mbs": 270_104_568,
    "vatt-lbs": 421_259_256,
    "vatt-ma-medium": 172_148_216,
    "mac-b": 152_191_233,
}
VATT_VIDEO_BACKBONE = {"vatt-bbs": (87_416_064, 87.9e6), "vatt-mbs": (154_303_488, 155.0e6)}
VATT_VIDEO_BACKBONE["vatt-lbs"] = (305_458_176, 306.1e6)
VATT_VIDEO_BACKBONE["vatt-ma-medium"] = (154_303_488, 155.0e6)


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name", list(PARAMS))
def test_allinone_params(name):
    total, excl, paper = PARAMS[name]
    m = _meta(name)
    assert m.num_params() == total
    assert m.num_params(exclude=("mlm_decoder",)) == excl
    assert abs(excl / paper - 1) < 0.05


@pytest.mark.parametrize("name", list(VATT_VIDEO_BACKBONE))
def test_vatt_backbone_params(name):
    n, paper = VATT_VIDEO_BACKBONE[name]
    m = _meta(name)
    enc = m.backbone if m.config.agnostic else m.backbones["video"]
    got = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in m.video_tokenizer.proj.parameters())
    assert got == n
    assert abs(got / paper - 1) < 0.02


@pytest.mark.parametrize("name", list(TOTAL_PARAMS))
def test_total_params(name):
    assert _meta(name).num_params() == TOTAL_PARAMS[name]


def _encoder_macs(depth, L, C, n=1):
    return n * depth * (L * 12 * C * C + 2 * L * L * C)  # qkv + proj + MLP per token, q k^T and p v per sequence


def test_allinone_b_flops():
    s = model_stats("allinone-b")
    T, S, C, N = 3, 40 + 197, 768, 196
    macs = _encoder_macs(12, S, C, T) + T * N * 3 * 16 * 16 * C
    assert s["flops_fused"].total == 2 * macs == 127_682_555_904  # paper: 58.7 G thop MACs
    assert s["flops_fused"].linear == 121_470_713_856  # thop's scope: 60.7 GMACs
    # training forward, batch 2: MLM and VTM fused passes, unimodal text and video passes, heads, VTC logits
    V, Lt = 30522, 40
    per_sample = (
        2 * _encoder_macs(12, S, C, T) + T * N * 768 * C + _encoder_macs(12, Lt, C) + _encoder_macs(12, 197, C, T)
    )
    # MLM head (transform + decoder) at the masked positions only: round(0.15 * 2 * 40) / 2 = 6 per sample (the full
    # vocabulary at all 40 text positions was 736_270_354_432 in all)
    K = 6
    assert s["mlm_head"]["masked_per_sample"] == K and s["mlm_head"]["flops_masked"] == K * 2 * (C * C + C * V)
    per_sample += K * (C * C + C * V) + C * C + 2 * C + 2 * C * 512
    assert s["flops_train_batch2"].total == 2 * (2 * per_sample + 2 * 2 * 512) == 733_002_176_512


def test_vatt_mbs_droptoken_flops():
    s = describe("vatt-mbs", file=io.StringIO())
    assert s["backbone_params"]["video"] == VATT_VIDEO_BACKBONE["vatt-mbs"][0]
    pinned = {0: 862_759_452_672, 25: 617_263_398_912, 50: 393_508_651_008, 75: 191_495_208_960}
    for d, keep in ((0, 1.0), (25, 0.75), (50, 0.5), (75, 0.25)):
        Lv, La = int(keep * 1568) + 1, int(keep * 1200) + 1
        macs = _encoder_macs(12, Lv, 1024) + 1568 * 3072 * 1024  # video Medium, patches embedded before dropping
        macs += _encoder_macs(12, La, 768) + 1200 * 128 * 768  # audio Base
        macs += _encoder_macs(6, 17, 512) + 16 * 300 * 512  # text Small (16 words + AGG)
        assert s["flops_drop"][d].total == 2 * macs == pinned[d], d  # paper: 784.8 / 574.2 / 375.4 / 188.1


def test_mac_b_masked_flops():
    s = model_stats("mac-b")
    assert s["flops_masked"].total == 37_698_023_936
    assert s["flops_unmasked"].total == 159_726_342_656
    K, Lt = 196 // 4, 1 + int(31 * 0.7)
    macs = _encoder_macs(12, 4 * K + 1, 768) + 4 * 196 * 768 * 768 + _encoder_macs(6, Lt, 768) + 2 * 768 * 256 + 256
    assert s["flops_masked"].total == 2 * macs
    assert 1 - s["flops_masked"].total / s["flops_unmasked"].total == pytest.approx(0.764, abs=1e-3)  # paper: 0.60


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
def test_flops_do_not_depend_on_the_backend():
    """Fused ops must register FLOP formulas: the count under Triton dispatch equals the reference's."""
    for name in ("vatt-tiny", "mac-tiny"):  # attention, LayerNorm, both losses, DropToken and masking
        m = tiny(name)
        b = make_batch(m)
        noise = noise_for(m, b)
        n = {}
        for backend in ("reference", "triton"):
            with fastvl.use_backend(backend):
                n[backend] = count(lambda m=m, b=b, noise=noise: run(m, b, noise=noise)["loss"].backward()).total
        assert n["triton"] == n["reference"] > 0


def test_describe_and_cli(capsys):
    out = io.StringIO()
    describe("mac-b", file=out)
    assert "76.4% fewer (paper: 60% fewer)" in out.getvalue()
    from fastvl.cli import main

    assert main(["info", "--model", "allinone-b"]) == 0
    text = capsys.readouterr().out
    assert "params excl. MLM decoder 111,247,362  (paper 110M: +1.13%)" in text
    assert "paper 58.7 G (thop MACs)" in text


# ---- registry and bad input ------------------------------------------------------------------


def test_registry():
    assert {"allinone-ti", "allinone-s", "allinone-b", "vatt-bbs", "vatt-mbs", "vatt-lbs", "vatt-ma-medium"} <= set(
        list_models()
    )
    assert {"mac-b", "allinone-tiny", "vatt-tiny", "vatt-ma-tiny", "mac-tiny"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'vatt-xl'"):
        create_model("vatt-xl")
    with pytest.raises(TypeError, match="unknown config field"):
        create_model("mac-tiny", mask_ratio=0.5)
    m = create_model("allinone-tiny", vocab_size=1000, mask_id=3)
    assert m.word_embeddings.num_embeddings == 1000 and m.config.mask_id == 3


def test_allinone_sincos_position_init():
    from fastvl.models._common import sincos_1d, sincos_2d

    t = sincos_1d(5, 8)
    pos, i = 3, 1
    assert t[pos, i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)))
    assert t[pos, 4 + i].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)))
    g = sincos_2d(3, 16)  # row-major grid: patch 5 is row 1, column 2
    assert torch.equal(g[5, :8], sincos_1d(3, 8)[1]) and torch.equal(g[5, 8:], sincos_1d(3, 8)[2])
    torch.manual_seed(0)
    m = create_model("allinone-tiny", pos_init="sincos", vocab_size=100)
    torch.manual_seed(0)
    r = create_model("allinone-tiny", vocab_size=100)
    C, grid = m.config.dim, m.config.img_size // m.config.patch_size
    assert torch.equal(m.pos_embed[1:].detach(), sincos_2d(grid, C).float())
    assert torch.equal(m.text_pos_embed.detach(), sincos_1d(m.config.max_text_len, C).float())
    assert m.pos_embed.requires_grad and m.num_params() == r.num_params()
    assert torch.equal(m.pos_embed[0], r.pos_embed[0]) and torch.equal(m.temporal_embed, r.temporal_embed)
    with pytest.raises(ValueError, match="pos_init must be 'random' or 'sincos', got 'fixed'"):
        create_model("allinone-tiny", pos_init="fixed")
    with pytest.raises(ValueError, match="dim divisible by 4, got dim=66"):
        create_model("allinone-tiny", pos_init="sincos", dim=66, num_heads=2)


def test_allinone_video_roll():
    """video_roll=True rolls the unimodal video pass (VTC) as the fused one does: fused == explicit after the frame
    average, different from no rolling, and the VTC loss in forward uses that pass. Off (the paper), the video pass
    ignores the rolling mode."""
    torch.manual_seed(0)
    m = create_model("allinone-tiny", video_roll=True, roll_fraction=0.25, vocab_size=2048).double()
    video = torch.randn(3, m.config.num_frames, 3, 32, 32, dtype=torch.float64)
    y = {}
    for mode in ("fused", "explicit", "none"):
        m.config.rolling = mode
        y[mode] = m.video_features(video)
    torch.testing.assert_close(y["fused"], y["explicit"], rtol=1e-10, atol=1e-10)
    assert (y["fused"] - y["none"]).abs().max() > 1e-2
    m.config.rolling = "fused"
    batch = make_batch(m)
    batch["video"] = batch["video"].double()
    m.config.tasks = ("vtc",)
    got = m(batch)["vtc"]
    v = m.encode_video(batch["video"])
    t = m.encode_text(batch["text_ids"], batch["text_mask"])
    want = clip_loss_reference(v, t, 1.0 / m.config.vtc_temperature)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)  # the loss op reduces in fp32
    m.config.video_roll = False
    off = {}
    for mode in ("fused", "none"):
        m.config.rolling = mode
        off[mode] = m.video_features(video)
    assert torch.equal(off["fused"], off["none"])


def test_allinone_vtc_pool_mean():
    """vtc_pool="mean": the VTC text embedding is the projected mean of the real text tokens (padding ignored), the
    video one the projected mean of the frame-averaged patch tokens (CLS excluded); forward's VTC loss uses them."""
    torch.manual_seed(0)
    m = create_model("allinone-tiny", vtc_pool="mean", vocab_size=2048, tasks=("vtc",)).double()
    batch = make_batch(m)
    batch["video"] = batch["video"].double()
    ids, mask = batch["text_ids"], batch["text_mask"]
    assert (~mask).any()  # some padding to ignore
    y = m.text_features(ids, mask)
    want_t = F.normalize(m.vtc_text_proj(torch.stack([y[i][mask[i]].mean(0) for i in range(len(y))])), dim=-1)
    torch.testing.assert_close(m.encode_text(ids, mask), want_t.float(), rtol=1e-6, atol=1e-6)  # fp32 out
    want_v = F.normalize(m.vtc_video_proj(m.video_features(batch["video"])[:, 1:].mean(1)), dim=-1)
    torch.testing.assert_close(m.encode_video(batch["video"]), want_v.float(), rtol=1e-6, atol=1e-6)
    want = clip_loss_reference(want_v, want_t, 1.0 / m.config.vtc_temperature)
    torch.testing.assert_close(m(batch)["vtc"].double(), want.double(), rtol=1e-6, atol=1e-6)
    m.config.vtc_pool = "cls"
    assert (m.encode_text(ids, mask) - want_t).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vtc_pool must be 'cls' or 'mean', got 'max'"):
        create_model("allinone-tiny", vtc_pool="max")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
def test_allinone_video_roll_kernels_match_reference():
    """The rolled video pass (no text, no padding mask) under the Triton backend, forward and backward: roll-aware
    attention when fused, the roll kernel when explicit, against the reference backend."""
    torch.manual_seed(0)
    m = create_model("allinone-tiny", video_roll=True, roll_fraction=0.25, vocab_size=64)
    video = torch.randn(2, m.config.num_frames, 3, 32, 32)
    w = torch.randn(1 + m.num_patches, m.config.dim)

    def out_and_grads():
        m.zero_grad(set_to_none=True)
        y = m.video_features(video)
        (y * w).sum().backward()
        return y.detach(), m.patch_embed.weight.grad.clone(), m.encoder.blocks[0].attn.qkv.weight.grad.clone()

    for mode in ("fused", "explicit"):
        m.config.rolling = mode
        with fastvl.use_backend("reference"):
            ref = out_and_grads()
        with fastvl.use_backend("triton"):
            tri = out_and_grads()
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_vtm_negatives_never_share_the_caption():
    m = create_model("allinone-tiny", vocab_size=100)
    B, Lt = 12, 6
    g = torch.Generator().manual_seed(1)
    caps = torch.randint(10, 100, (3, Lt), generator=g)
    ids = caps[torch.arange(B) % 3].clone()  # three captions, four clips each
    mask = torch.ones(B, Lt, dtype=torch.bool)
    mask[2::3, 4:] = False
    ids[2::3, 4:] = torch.randint(10, 100, (4, 2), generator=g)  # padded slots differ: still the same caption
    seen = set()
    for seed in range(20):
        vidx, labels = m.vtm_pairs(ids, mask, torch.Generator().manual_seed(seed))
        neg = labels == 0
        assert neg.sum() == B // 2 and torch.equal(vidx[~neg], torch.arange(B)[~neg])
        assert ((vidx[neg] % 3) != (torch.arange(B)[neg] % 3)).all()
        seen |= {(i, int(j)) for i, j in zip(torch.arange(B)[neg].tolist(), vidx[neg])}
    assert len(seen) > B * 4  # uniform over the 8 allowed videos, not one fixed shift
    a = m.vtm_pairs(ids, mask, torch.Generator().manual_seed(3))
    b = m.vtm_pairs(ids, mask, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # one caption for the whole batch: no negative exists, every pair stays positive
    vidx, labels = m.vtm_pairs(ids[:1].expand(B, Lt), mask[:1].expand(B, Lt), torch.Generator().manual_seed(0))
    assert labels.eq(1).all() and torch.equal(vidx, torch.arange(B))


def test_vtm_hard_negatives_follow_the_similarity():
    m = create_model("allinone-tiny", vtm_negatives="hard")
    B = 8
    ids = torch.arange(10, 10 + B)[:, None].repeat(1, 4)  # all captions differ
    mask = torch.ones(B, 4, dtype=torch.bool)
    sim = torch.randn(B, B, generator=torch.Generator().manual_seed(0))
    hard = (torch.arange(B) + 3) % B
    sim[torch.arange(B), hard] = 50.0  # one dominant non-matching video per text
    sim[torch.arange(B), torch.arange(B)] = 100.0  # the match itself must never be drawn
    for seed in range(5):
        vidx, labels = m.vtm_pairs(ids, mask, torch.Generator().manual_seed(seed), sim)
        neg = labels == 0
        assert torch.equal(vidx[neg], hard[neg])
    vidx, labels = m.vtm_pairs(ids[:1].expand(B, 4), mask, torch.Generator().manual_seed(0), sim)
    assert labels.eq(1).all() and torch.equal(vidx, torch.arange(B))  # one caption: no negative to draw
    batch = example_batch(m, batch_size=4, device="cpu")
    out = m(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["vtm"]) and m.vtm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vtm_negatives must be 'random' or 'hard', got 'mined'"):
        create_model("allinone-tiny", vtm_negatives="mined")
    with pytest.raises(ValueError, match="tasks must hold vtm and vtc"):
        create_model("allinone-tiny", vtm_negatives="hard", tasks=("vtm", "mlm"))


def _bad(name, mutate, exc, match):
    m = tiny(name)
    batch = make_batch(m, B=2)
    mutate(batch, m.config)
    with pytest.raises(exc, match=match):
        m(batch)


@pytest.mark.parametrize(
    "name,mutate,exc,match",
    [
        ("allinone-tiny", lambda b, c: b.pop("video"), ValueError, "no 'video'"),
        ("allinone-tiny", lambda b, c: b.update(video=b["video"][:, :2]), ValueError, r"'video'.*2 frames"),
        ("allinone-tiny", lambda b, c: b.update(video=b["video"][..., :30, :30]), ValueError, "not divisible"),
        ("allinone-tiny", lambda b, c: b.update(video=b["video"][..., :24, :24]), ValueError, "position table"),
        ("allinone-tiny", lambda b, c: b.update(video=b["video"][:, :, 0]), ValueError, r"'video'.*5-D"),
        (
            "allinone-tiny",
            lambda b, c: b.update(text_ids=torch.ones(2, 13, dtype=torch.long), text_mask=torch.ones(2, 13).bool()),
            ValueError,
            r"'text_ids'.*longer than the text position table \(12\)",
        ),
        ("allinone-tiny", lambda b, c: b.update(text_ids=b["text_ids"].float()), TypeError, "'text_ids'.*dtype"),
        ("allinone-tiny", lambda b, c: b.update(text_mask=b["text_mask"].long()), TypeError, "'text_mask'.*dtype"),
        ("allinone-tiny", lambda b, c: b.update(text_ids=b["text_ids"] + 40000), ValueError, "vocabulary"),
        ("allinone-tiny", lambda b, c: b.update({k: v[:1] for k, v in b.items()}), ValueError, "batch size 1"),
        ("vatt-tiny", lambda b, c: b.pop("audio"), ValueError, "no 'audio'"),
        ("vatt-tiny", lambda b, c: b.update(audio=b["audio"][:, :100]), ValueError, r"'audio'.*multiple of"),
        ("vatt-tiny", lambda b, c: b.update(audio=torch.randn(2, 17 * 128)), ValueError, r"'audio'.*position table"),
        ("vatt-tiny", lambda b, c: b.update(video=b["video"][:, :6]), ValueError, r"'video'.*6 frames"),
        ("vatt-tiny", lambda b, c: b.update(video=torch.randn(2, 8, 3, 48, 48)), ValueError, "position table"),
        ("vatt-tiny", lambda b, c: b.pop("text_mask"), ValueError, "no 'text_mask'"),
        ("mac-tiny", lambda b, c: b.update(video=b["video"][:, :3]), ValueError, r"'video'.*3 frames"),
        ("mac-tiny", lambda b, c: b.update(video=b["video"][..., :28, :28]), ValueError, "not divisible"),
    ],
)
def test_bad_input(name, mutate, exc, match):
    _bad(name, mutate, exc, match)


def test_bad_batch_type():
    m = tiny("mac-tiny")
    with pytest.raises(TypeError, match="dict"):
        m([1, 2])


# ---- GPU (bf16, realistic shapes) ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name,batch_size", [("allinone-b", 8), ("vatt-mbs", 2), ("mac-b", 16)])
def test_gpu_bf16_fused_matches_reference(name, batch_size):
    torch.manual_seed(0)
    m = create_model(name).cuda()
    batch = example_batch(m, batch_size, device="cuda")
    noise = None
    if name.startswith("vatt"):
        noise = {"video": torch.rand(1568, device="cuda"), "audio": torch.rand(1200, device="cuda")}
    elif name.startswith("mac"):
        noise = {
            "video": torch.rand(batch_size * 4, 196, device="cuda"),
            "text": torch.rand(batch_size, 31, device="cuda"),
        }
    out = {}
    for backend in ("reference", None):
        with torch.autocast("cuda", dtype=torch.bfloat16), fastvl.use_backend(backend or "auto"):
            torch.manual_seed(1)
            loss = (m(batch, noise=noise) if noise else m(batch))["loss"]
        loss.backward()
        out[backend] = (loss.detach().float(), m.patch_embed.weight.grad.clone() if hasattr(m, "patch_embed") else None)
        m.zero_grad(set_to_none=True)
    assert math.isfinite(out[None][0].item())
    torch.testing.assert_close(out[None][0], out["reference"][0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", TINY)
def test_train_step_under_bf16_autocast(name):
    """What `fastvl pretrain` does on a GPU (bf16 autocast), here on the CPU: finite losses and gradients."""
    m = tiny(name)
    batch = make_batch(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(m, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
