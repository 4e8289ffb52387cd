"""Token reduction in the models: ToMe merging and SMAUG selection in All-in-one, MAC and VATT.

Shapes and gradients with reduction on every model, the protected tokens (text, CLS, AGG) untouched, rolling
after a reduction (fused == explicit == a hand-written explicit reference), proportional attention against its
float64 reference, the ``--set`` options and their errors, and describe()'s FLOPs falling with the setting.
Small shapes: the tiny configs at batch 2.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from fastvl.cli import main as cli_main
from fastvl.models import (
    create_model,
    describe,
    example_batch,
    layers,
    model_stats,
    reduction_presets,
    train_forward_flops,
)
from fastvl.models.reduction import Reduce, ReductionSettings, TokenReduction
from fastvl.ops import merge_tokens, roll_frame_offsets, select_space_time
from fastvl.ops.attention import roll_rows

# (model, config overrides): every model with merging, selection by attention and by a learned scorer
SETTINGS = [
    ("allinone-tiny", dict(merge_r=2)),
    ("allinone-tiny", dict(merge_r=3, merge_prop_attn=False, rolling="explicit")),
    ("allinone-tiny", dict(select_keep=0.5, select_layer=1)),
    ("allinone-tiny", dict(select_keep=5, select_frames=2, select_scorer="linear", select_layer=1)),
    ("mac-tiny", dict(merge_r=2)),
    ("mac-tiny", dict(merge_r=1, merge_mode="frame")),
    ("mac-tiny", dict(select_keep=0.5, select_frames=2, select_layer=1)),
    ("mac-tiny", dict(select_keep=0.5, select_scorer="linear", select_layer=0)),
    ("vatt-tiny", dict(merge_r=1)),
    ("vatt-tiny", dict(select_keep=0.5, select_layer=1)),
    ("vatt-tiny", dict(keep_rate=1.0, merge_r=1, merge_mode="frame")),
    ("vatt-tiny", dict(keep_rate=1.0, select_keep=0.5, select_frames=1, select_scorer="linear")),
    ("vatt-ma-tiny", dict(merge_r=1)),
]


def _ids(settings):
    return [f"{n}:{','.join(f'{k}={v}' for k, v in o.items())}" for n, o in settings]


def _model(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, **overrides)


def _attention_lengths(encoder):
    """Hooks recording the sequence length each block's attention sees."""
    seen = []
    hooks = [blk.attn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1])) for blk in encoder]
    return seen, hooks


@pytest.mark.parametrize("name,overrides", SETTINGS, ids=_ids(SETTINGS))
def test_losses_and_gradients_with_reduction(name, overrides):
    m = _model(name, **overrides).train()
    batch = example_batch(m, 2, "cpu")
    out = m(batch)
    for k, v in out.items():
        assert v.shape == () and torch.isfinite(v), k
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == [], f"parameters without gradient: {dead}"
    if overrides.get("select_scorer") == "linear":  # the straight-through gate trains the scorer
        assert m.token_reduction.scorer.weight.grad.abs().sum() > 0


def _video_blocks(m):
    return m.encoder.blocks if hasattr(m, "encoder") else (
        m.video_encoder.blocks if hasattr(m, "video_encoder") else m._backbone("video").blocks
    )  # fmt: skip


@pytest.mark.parametrize(
    "name,overrides,lengths",
    [
        # all-in-one fused rows: 12 text + CLS + 16 patches; r=2 per block; selection keeps 8 of 16 before block 1
        ("allinone-tiny", dict(merge_r=2), [29, 27]),
        ("allinone-tiny", dict(select_keep=0.5, select_layer=1), [29, 21]),
        # mac: CLS + 4 frames x 4 visible patches (mask 0.75 of 16)
        ("mac-tiny", dict(merge_r=3), [17, 14]),
        ("mac-tiny", dict(merge_r=1, merge_mode="frame"), [17, 13]),
        ("mac-tiny", dict(select_keep=2, select_frames=3, select_layer=1), [17, 7]),
        # vatt: AGG + 8 video tokens at keep_rate 1 (2 tubelet frames of 2x2)
        ("vatt-tiny", dict(keep_rate=1.0, merge_r=2, merge_mode="frame"), [9, 5]),
        ("vatt-tiny", dict(keep_rate=1.0, select_keep=0.5, select_frames=1), [9, 3]),
    ],
)
def test_reduced_lengths_per_block(name, overrides, lengths):
    m = _model(name, **overrides).eval()
    batch = example_batch(m, 2, "cpu")
    if name.startswith("allinone"):
        seen, hooks = _attention_lengths(m.encoder.blocks)
        with torch.no_grad():
            y = m.fused(m.embed_text(batch["text_ids"]), batch["text_mask"], m.embed_video(batch["video"]))
        assert seen == lengths
        assert y.shape == (2, lengths[-1] - (2 if "merge_r" in overrides else 0), m.config.dim)
    else:
        if name.startswith("mac"):
            m.train()  # MAC masks in training only
        seen, hooks = _attention_lengths(_video_blocks(m))
        with torch.no_grad():
            m(batch)
        assert seen[: len(lengths)] == lengths
    for h in hooks:
        h.remove()


def test_protected_tokens_are_never_reduced():
    torch.manual_seed(1)
    P, T, N, C = 5, 3, 8, 16
    x = torch.randn(2, P + T * N, C)
    for settings in (
        ReductionSettings(merge_r=3),
        ReductionSettings(merge_r=2, merge_mode="frame"),
        ReductionSettings(select_keep=0.5, select_frames=2, select_scorer="linear"),
    ):
        red = TokenReduction(settings, C)
        red_in = Reduce(red, P, frames=T)
        if settings.merges:
            y, size, _ = red_in.merge(x, None, torch.randn(2, P + T * N, 4), None)
            assert torch.equal(size[:, :P], torch.ones(2, P))
        else:
            y, _, _ = red_in.select(x, None, None, None)
        assert torch.equal(y[:, :P], x[:, :P])
        assert y.shape[1] < x.shape[1]


@pytest.mark.parametrize("overrides", [dict(merge_r=3), dict(select_keep=0.5, select_frames=2, select_layer=1)])
def test_allinone_text_stays_aligned_with_its_padding(overrides):
    """The text is protected: after reduction the padded text positions are still masked keys, so changing the ids
    under the padding changes nothing, and the text rows stay first (MLM reads them there)."""
    m = _model("allinone-tiny", **overrides).eval()
    batch = example_batch(m, 2, "cpu")
    mask = batch["text_mask"].clone()
    mask[:, 7:] = False
    ids = batch["text_ids"].clone()
    other = ids.clone()
    other[:, 7:] = 5
    v = m.embed_video(batch["video"])
    with torch.no_grad():
        a = m.fused(m.embed_text(ids), mask, v)
        b = m.fused(m.embed_text(other), mask, v)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], rtol=1e-5, atol=1e-5)


# ---- rolling after a reduction ---------------------------------------------------------------------------


def _reference_fused(m, text, text_mask, video):
    """All-in-one's fused pass written out in float64 with explicit rolls: before each block the rows' first and last
    floor(L_video * fraction) video slots move to the previous / next frame (roll_frame_offsets of the current,
    reduced length); attention is softmax(q k^T / sqrt(D) + log(size)) over the unpadded keys; ToMe merges each row
    after attention (metric: keys averaged over heads); selection keeps, before block select_layer, the top tokens
    of each row by the attention the real text + CLS rows of the previous block gave them, and the frame rows of highest
    mean score."""
    cfg, s = m.config, m.token_reduction.settings
    B, T, L, C = video.shape
    Lt = text.shape[1]
    P = Lt + 1
    x = torch.cat([text[:, None].expand(B, T, Lt, C), video], dim=2).reshape(B * T, Lt + L, C)
    pad = torch.cat([~text_mask, text_mask.new_zeros(B, L)], dim=1)[:, None].expand(B, T, Lt + L).reshape(B * T, -1)
    size, rows = None, None
    for i, blk in enumerate(m.encoder.blocks):
        if s.selects and i == s.select_layer:
            real = (~pad[:, :P]).to(rows.dtype)  # the unpadded text + CLS queries
            scores = (rows[..., P:].mean(1) * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            if s.select_frames is not None and s.select_frames < T:
                fs = scores.mean(1).view(B, T)
                keep = fs.sort(dim=1, descending=True, stable=True).indices[:, : s.select_frames].sort(dim=1).values
                idx = (keep + torch.arange(B)[:, None] * T).flatten()
                x, pad, scores, T = x[idx], pad[idx], scores[idx], s.select_frames
            k = max(1, math.floor((x.shape[1] - P) * s.select_keep + 1e-9))
            x = select_space_time(x, scores, k, frames=1, protected=P, backend="reference")[0]
            pad = torch.cat([pad[:, :P], pad.new_zeros(x.shape[0], k)], dim=1)
        S = x.shape[1]
        f = math.floor((S - Lt) * cfg.roll_fraction + 1e-9)
        if cfg.rolling != "none" and T > 1 and f > 0:
            shift = roll_frame_offsets(S, Lt, cfg.roll_fraction, 1) % T
            x = roll_rows(x, shift, T)
            size = None if size is None else roll_rows(size, shift, T)
        N, H = x.shape[0], blk.attn.num_heads
        q, k_, v = blk.attn.qkv(blk.norm1(x)).view(N, S, 3, H, -1).unbind(2)
        logits = torch.einsum("nqhd,nkhd->nhqk", q, k_) / math.sqrt(q.shape[-1])
        if size is not None and s.merge_prop_attn:
            logits = logits + size.log()[:, None, None, :]
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
        p = logits.softmax(-1)
        rows = p[:, :, :P]
        x = x + blk.attn.proj(torch.einsum("nhqk,nkhd->nqhd", p, v).reshape(N, S, -1))
        if s.merges:
            x, size, _ = merge_tokens(x, size, s.merge_r, protected=P, metric=k_.mean(2), backend="reference")
            pad = torch.cat([pad[:, :P], pad.new_zeros(N, x.shape[1] - P)], dim=1)
        x = x + blk.mlp(blk.norm2(x))
    y = m.encoder.norm(x)
    return y.reshape(B, -1, *y.shape[1:]).mean(1)


ROLL_SETTINGS = [
    dict(merge_r=2),
    dict(merge_r=3, merge_prop_attn=False),
    dict(select_keep=0.5, select_layer=1),
    dict(select_keep=0.5, select_frames=2, select_layer=1),
    dict(select_keep=0.75, select_frames=1, select_layer=1),  # one frame left: rolling stops
]


@pytest.mark.parametrize(
    "overrides", ROLL_SETTINGS, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o in ROLL_SETTINGS]
)
def test_allinone_rolling_after_reduction(overrides):
    """Fused roll-aware attention after a merge / selection equals the explicit roll and the written-out reference
    (float64), and the roll still acts on the reduced rows (unless one frame is left)."""
    m = _model("allinone-tiny", roll_fraction=0.25, **overrides).double().eval()
    batch = example_batch(m, 2, "cpu")
    batch["text_mask"][1, 6:] = False
    with torch.no_grad():
        t, v = m.embed_text(batch["text_ids"]), m.embed_video(batch["video"].double())
        y = {}
        for mode in ("fused", "explicit", "none"):
            m.config.rolling = mode
            y[mode] = m.fused(t, batch["text_mask"], v)
        m.config.rolling = "fused"
        ref = _reference_fused(m, t, batch["text_mask"], v)
    torch.testing.assert_close(y["fused"], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y["explicit"], ref, rtol=1e-10, atol=1e-10)
    if overrides.get("select_frames") != 1:
        assert (y["fused"] - y["none"]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [dict(merge_r=2), dict(select_keep=0.5, select_frames=2, select_layer=1)])
def test_allinone_fused_equals_explicit_gradients_with_reduction(overrides):
    m = _model("allinone-tiny", roll_fraction=0.25, video_roll=True, **overrides).double().train()
    batch = example_batch(m, 2, "cpu")
    batch["video"] = batch["video"].double()
    got = {}
    for mode in ("fused", "explicit"):
        m.config.rolling = mode
        m.zero_grad()
        out = m(batch, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        got[mode] = (out["loss"].detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(got["fused"][0], got["explicit"][0], rtol=1e-10, atol=1e-10)
    for n, g in got["fused"][1].items():
        torch.testing.assert_close(g, got["explicit"][1][n], rtol=1e-8, atol=1e-10, msg=n)


# ---- proportional attention and attention rows ------------------------------------------------------------


def _explicit(q, k, v, bias, kpm, offsets, T):
    if offsets is not None:
        sh = offsets % T
        q, k, v = (roll_rows(t, sh, T) for t in (q, k, v))
        bias = roll_rows(bias, sh, T)
        kpm = roll_rows(kpm, sh, T)
    logits = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    p = logits.masked_fill(kpm[:, None, None, :], float("-inf")).softmax(-1)
    o = torch.einsum("nhqk,nkhd->nqhd", p, v)
    return (roll_rows(o, sh, T, inverse=True) if offsets is not None else o), p


@pytest.mark.parametrize("rolled", [False, True])
def test_proportional_attention_equals_the_size_bias_reference(rolled):
    torch.manual_seed(2)
    T, S, H, D = 3, 11, 2, 8
    N = 2 * T
    q, k, v = (torch.randn(N, S, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    size = torch.randint(1, 6, (N, S)).double()
    bias = size.log().requires_grad_()
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[:, 2:4] = True
    offsets = roll_frame_offsets(S, 4, 0.25, 2) if rolled else None
    got = layers.proportional_attention(
        q, k, v, bias, softmax_scale=D**-0.5, key_padding_mask=kpm, frame_offsets=offsets, num_frames=T if rolled else 1
    )
    want, p = _explicit(q, k, v, bias, kpm, offsets, T)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(want)
    ga = torch.autograd.grad(got, (q, k, v, bias), g)
    gb = torch.autograd.grad(want, (q, k, v, bias), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    rows = layers.attention_rows(
        q, k, 3, softmax_scale=D**-0.5, key_padding_mask=kpm, key_bias=bias, frame_offsets=offsets,
        num_frames=T if rolled else 1,
    )  # fmt: skip
    torch.testing.assert_close(rows, p[:, :, :3], rtol=1e-10, atol=1e-12)
    # the size bias is not a no-op: a token of size s weighs like s copies (ToMe's proportional attention)
    plain, _ = _explicit(q, k, v, torch.zeros_like(bias), kpm, offsets, T)
    assert (plain - want).abs().max() > 1e-3


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    """softmax with log(size) over merged keys equals plain attention over the unmerged copies."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 4, 1, 8, dtype=torch.float64) for _ in range(3))
    copies = torch.tensor([1, 3, 1, 2])
    rep = torch.repeat_interleave(torch.arange(4), copies)
    got = layers.proportional_attention(q, k, v, copies.double().log()[None], softmax_scale=8**-0.5)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k[:, rep], v[:, rep]))).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_without_extras_is_the_base_module():
    torch.manual_seed(5)
    a = layers.Attention(32, 4, qkv_bias=True)
    x = torch.randn(2, 9, 32)
    base = layers.BaseAttention.forward(a, x)
    torch.testing.assert_close(a(x), base)
    out, metric, rows = a(x, key_bias=torch.zeros(2, 9), metric=True, rows=2)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
    assert metric.shape == (2, 9, 8) and rows.shape == (2, 4, 2, 9)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 4, 2))


# ---- options, errors, FLOPs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        ("allinone-tiny", dict(merge_r=-1), "merge_r must be an int >= 0"),
        ("allinone-tiny", dict(merge_r=1.5), "merge_r must be an int"),
        ("allinone-tiny", dict(select_keep=1.5), "select_keep must be a fraction in"),
        ("allinone-tiny", dict(select_keep=0), "select_keep must be a fraction in"),
        ("allinone-tiny", dict(select_keep=0.5, select_frames=4), "select_frames must be at most the 3 frames"),
        ("allinone-tiny", dict(select_keep=0.5, select_layer=2), r"select_layer must be an int in \[0, 2\)"),
        ("allinone-tiny", dict(select_keep=0.5, select_layer=0), "select_layer must be >= 1 with select_scorer="),
        ("allinone-tiny", dict(select_keep=0.5, select_scorer="cls"), "select_scorer must be one of"),
        ("allinone-tiny", dict(merge_r=2, select_keep=0.5), "choose merging or selection"),
        ("mac-tiny", dict(merge_r=2, merge_mode="time"), "merge_mode must be one of joint, frame"),
        ("mac-tiny", dict(merge_prop_attn="yes"), "merge_prop_attn must be a bool"),
        ("vatt-tiny", dict(merge_r=2, merge_mode="frame"), "merge_mode='frame' needs equal frames.*keep_rate=1"),
        ("vatt-tiny", dict(select_keep=0.5, select_frames=1), "select_frames needs equal frames"),
    ],
)
def test_bad_settings_name_the_option(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **overrides)


def test_vatt_frame_forms_refuse_droptoken_at_call_time():
    m = _model("vatt-tiny", keep_rate=1.0, select_keep=0.5, select_frames=1)
    with pytest.raises(ValueError, match="DropToken runs at keep_rate=0.5"):
        m.backbones_forward(example_batch(m, 2, "cpu"), keep_rate=0.5)


def test_set_options_reach_the_model_and_errors_are_one_line(tmp_path, capsys):
    from fastvl.train.commands import check_model, parse_assignments

    sets = ["merge_r=2", "select_layer=1"]
    overrides = parse_assignments(sets, "--set")
    assert overrides == {"merge_r": 2, "select_layer": 1}
    check_model("allinone-tiny", overrides)
    assert parse_assignments(["select_keep=0.5", "select_frames=2"], "--set") == {
        "select_keep": 0.5,
        "select_frames": 2,
    }
    rc = cli_main(["pretrain", "--model", "allinone-tiny", "--set", "select_keep=1.5", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--set" in err and "select_keep" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name,setting", [("allinone-tiny", "merge_r=2"), ("mac-tiny", "select_keep=0.5"),
                                          ("vatt-tiny", "merge_r=1")])  # fmt: skip
def test_trains_with_reduction_from_the_cli(name, setting, tmp_path, capsys):
    argv = ["pretrain", "--model", name, "--data", "synthetic", "--steps", "2", "--batch-size", "4", "--train-clips",
            "8", "--no-eval", "--no-progress", "--set", setting, "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli_main(argv) == 0, capsys.readouterr()
    cfg = (tmp_path / "run" / "config.json").read_text()
    assert setting.split("=")[0] in cfg


def test_describe_shows_flops_falling_with_reduction():
    for name in ("allinone-tiny", "mac-tiny", "vatt-tiny"):
        red = model_stats(name)["flops_reduction"]
        assert set(red) == {"none", *reduction_presets(name)}
        for label, fl in red.items():
            if label != "none":
                assert fl.total < red["none"].total, (name, label)
    red = model_stats("allinone-tiny")["flops_reduction"]
    assert red["merge_r=4"].total < red["merge_r=2"].total
    assert red["select_keep=0.5,select_frames=2"].total < red["select_keep=0.5"].total
    # the baseline is the training forward the family's other figures count (flops.py's convention)
    assert red["none"].total == model_stats("allinone-tiny")["flops_train_batch2"].total // 2
    assert train_forward_flops("allinone-tiny", merge_r=2) == red["merge_r=2"]
    out = io.StringIO()
    describe("mac-tiny", file=out)
    text = out.getvalue()
    assert "token reduction on the video tokens" in text and "merge_r=2" in text and "%)" in text


@pytest.mark.parametrize("name,overrides", [SETTINGS[0], SETTINGS[2], SETTINGS[5], SETTINGS[9]], ids=_ids(
    [SETTINGS[0], SETTINGS[2], SETTINGS[5], SETTINGS[9]]))  # fmt: skip
def test_train_step_with_reduction_under_bf16_autocast(name, overrides):
    """What `fastvl pretrain --set ...` does on a GPU (bf16 autocast), on the CPU: finite losses and gradients."""
    m = _model(name, **overrides).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(example_batch(m, 2, "cpu"))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("name,overrides,batch_size", [
    ("allinone-b", dict(merge_r=8), 8), ("allinone-b", dict(select_keep=0.5, select_frames=2, select_layer=4), 8),
    ("mac-b", dict(merge_r=8, merge_mode="frame"), 16), ("vatt-mbs", dict(select_keep=0.5, select_layer=4), 2),
])  # fmt: skip
def test_gpu_bf16_reduced_models_match_reference(name, overrides, batch_size):
    """The fused kernels with reduction on (merge / select ops, attention after them) against every op's
    reference, bf16 autocast at the papers' sizes."""
    import fastvl

    m = _model(name, **overrides).cuda()
    batch = example_batch(m, batch_size, device="cuda")
    noise = None  # the DropToken / mask draws fixed, so both backends see the same subsets
    if name.startswith("vatt"):
        noise = {"video": torch.rand(1568, device="cuda"), "audio": torch.rand(1200, device="cuda")}
    elif name.startswith("mac"):
        noise = {
            "video": torch.rand(batch_size * 4, 196, device="cuda"),
            "text": torch.rand(batch_size, 31, device="cuda"),
        }
    losses = {}
    for backend in ("reference", "auto"):
        with torch.autocast("cuda", dtype=torch.bfloat16), fastvl.use_backend(backend):
            torch.manual_seed(1)
            loss = (m(batch, noise=noise) if noise else m(batch))["loss"]
        loss.backward()
        losses[backend] = loss.detach().float()
        m.zero_grad(set_to_none=True)
    assert math.isfinite(losses["auto"].item())
    torch.testing.assert_close(losses["auto"], losses["reference"], rtol=2e-2, atol=2e-2)


def test_select_layer_range_is_checked_only_when_selecting():
    """A one-block model without selection builds (the motion probe's depth); with selection, the default layer
    (1) is out of range and the error names the field."""
    create_model("allinone-tiny", depth=1)
    with pytest.raises(ValueError, match="select_layer"):
        create_model("allinone-tiny", depth=1, select_keep=0.5)
