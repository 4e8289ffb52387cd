"""SimVTP and VideoMAE: shapes, every parameter trained, a tiny run that beats the patch-mean baseline, the decoder
path against VideoMAE's eager code, bad options and batches, describe() figures beside the papers', the CLI."""

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastvl.cli import main as cli
from fastvl.models import create_model, describe, model_stats
from fastvl.models.videomae import PIXEL_MEAN, PIXEL_STD

MODELS = ["simvtp-tiny", "videomae-tiny"]


def make_batch(model, B=3, seed=0, Lt=10):
    """Real-valued batch at the model's input size, with text (ignored by VideoMAE) of varied padding."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    batch = {"video": torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)}
    ids = torch.randint(1000, 2000, (B, Lt), generator=g)
    mask = torch.ones(B, Lt, dtype=torch.bool)
    mask[1, Lt // 2 :] = False
    ids[:, 0] = 101
    ids[~mask] = 0
    batch["text_ids"], batch["text_mask"] = ids, mask
    return batch


def tiny(name, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_shapes(name):
    m = tiny(name)
    cfg, b = m.config, make_batch(m)
    B, Tp, N = 3, cfg.num_frames // cfg.tubelet, (cfg.img_size // cfg.patch_size) ** 2
    K = int(N * (1 - cfg.mask_ratio))
    vis, mask, ids_restore = m.video_tokens(b["video"])
    assert vis.shape == (B, Tp * K, cfg.dim) and mask.shape == ids_restore.shape == (B, Tp * N)
    assert (mask.sum(1) == Tp * (N - K)).all()
    # tube masking over the whole clip: every token frame masks the same places
    assert (mask.view(B, Tp, N) == mask.view(B, Tp, N)[:, :1]).all()
    pred, places = m.reconstruct(m.encoder(vis), mask, ids_restore)
    D = 3 * cfg.tubelet * cfg.patch_size**2
    assert pred.shape == (B, Tp * (N - K), D) and places.shape == (B, Tp * (N - K))
    assert (torch.gather(mask, 1, places) == 1).all() and (places.diff(dim=1) > 0).all()
    out = m(b)
    expected = {"mvm", "mlm", "vtc", "vtm", "loss"} if name.startswith("simvtp") else {"mvm", "loss"}
    assert set(out) == expected and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    if name.startswith("simvtp"):
        for e in (m.encode_video(b["video"]), m.encode_text(b["text_ids"], b["text_mask"])):
            assert e.shape == (B, cfg.dim) and torch.allclose(e.norm(dim=1), torch.ones(B), atol=1e-5)
    else:
        assert not hasattr(m, "encode_text")  # video only: evaluation reports the held-out losses alone


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    m = tiny(name)
    m(make_batch(m))["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert {n for n, _ in m.named_buffers()} == {"pos_embed", "decoder_pos"}  # fixed sin-cos tables, not trained


def test_decoder_keep_reconstructs_a_subset_of_the_masked_places():
    m = tiny("videomae-tiny", decoder_keep=0.5)
    b = make_batch(m)
    vis, mask, ids_restore = m.video_tokens(b["video"])
    masked = int(mask[0].sum())
    pred, places = m.reconstruct(m.encoder(vis), mask, ids_restore, torch.Generator().manual_seed(0))
    assert places.shape == (3, masked // 2) and pred.shape[1] == masked // 2
    assert (torch.gather(mask, 1, places) == 1).all() and (places.diff(dim=1) > 0).all()
    assert places[0].tolist() != places[1].tolist()  # drawn per sample
    out = m(b)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_decoder_input_and_loss_equal_videomae_eager_code():
    """The fused path (tube_masking, restore_tokens, masked_patch_loss) against VideoMAE's eager pretraining code:
    boolean-mask gather, cat([x_vis + pos_vis, mask_token + pos_mask]), rearrange + per-channel normalisation, MSE."""
    m = tiny("videomae-tiny").double()
    cfg, b = m.config, make_batch(m, B=2)
    video = b["video"].double()
    g = torch.Generator().manual_seed(3)
    vis, mask, ids_restore = m.video_tokens(video, generator=g)
    pred, places = m.reconstruct(m.encoder(vis), mask, ids_restore)
    loss = m.reconstruction_loss(pred, video, mask, places)
    # eager: the same mask, VideoMAE's code
    B, Tp, N, C = 2, m.token_frames, m.num_patches, cfg.dim
    x = m.embed_video(video).reshape(B, Tp * N, C) + m.pos_embed.double()
    bool_masked = mask.bool()
    x_vis = x[~bool_masked].reshape(B, -1, C)
    # tube_masking orders the visible tokens frame-major in the tube's random order; VideoMAE keeps the clip order
    order = torch.argsort(ids_restore, dim=1)[:, : x_vis.shape[1]]
    assert torch.allclose(vis, torch.gather(x, 1, order[..., None].expand(-1, -1, C)))
    enc = m.encoder(torch.gather(x, 1, order[..., None].expand(-1, -1, C)))
    e2d = m.encoder_to_decoder(enc)
    Cd = e2d.shape[-1]
    pos = m.decoder_pos.double().expand(B, -1, -1)
    pos_vis = torch.gather(pos, 1, order[..., None].expand(-1, -1, Cd))
    pos_mask = pos[bool_masked].reshape(B, -1, Cd)
    dec_in = torch.cat([e2d + pos_vis, m.mask_token.double() + pos_mask], dim=1)
    eager_pred = m.head(m.decoder(dec_in)[:, -pos_mask.shape[1] :])
    assert torch.allclose(pred, eager_pred, atol=1e-10)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64).view(1, 1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float64).view(1, 1, 3, 1, 1)
    u, p = cfg.tubelet, cfg.patch_size
    v = (video * std + mean).reshape(B, Tp, u, 3, 32 // p, p, 32 // p, p).permute(0, 1, 4, 6, 2, 5, 7, 3)
    v = v.reshape(B, Tp * N, u * p * p, 3)
    target = ((v - v.mean(-2, keepdim=True)) / (v.var(-2, unbiased=True, keepdim=True).sqrt() + 1e-6)).flatten(2)
    labels = target[bool_masked].reshape(B, -1, target.shape[-1])
    assert torch.allclose(loss, F.mse_loss(eager_pred, labels), rtol=1e-10)
    # the patch-mean baseline is the loss of predicting 0 under the per-channel normalisation
    baseline = m.patch_mean_loss(video, mask, places)
    assert torch.allclose(baseline, (labels**2).mean(), rtol=1e-10)


@pytest.mark.parametrize("norm", ["channel", True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_patch_mean_baselines(norm, per_channel):
    """Each masked patch predicted by its mean (over its pixels and channels, or per channel: its mean colour) in
    the target's space: the loss is the target's mean squared deviation from that mean, computed here directly."""
    m = tiny("videomae-tiny", norm_pix=norm).double()
    video = make_batch(m, B=2)["video"].double()
    vis, mask, ids_restore = m.video_tokens(video)
    places = m.decoder_places(mask)
    u, p, Tp, N = m.config.tubelet, m.config.patch_size, m.token_frames, m.num_patches
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64).view(1, 1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float64).view(1, 1, 3, 1, 1)
    v = (video * std + mean).reshape(2, Tp, u, 3, 8, p, 8, p).permute(0, 1, 4, 6, 2, 5, 7, 3)
    t = v.reshape(2, Tp * N, u * p * p, 3)
    if norm == "channel":
        t = (t - t.mean(-2, keepdim=True)) / (t.var(-2, keepdim=True).sqrt() + 1e-6)
    elif norm:
        flat = t.flatten(2)
        t = (t - flat.mean(-1)[..., None, None]) / (flat.var(-1)[..., None, None] + 1e-6).sqrt()
    dev = t - (t.mean(-2, keepdim=True) if per_channel else t.mean((-2, -1), keepdim=True))
    expected = torch.gather((dev**2).mean((-2, -1)), 1, places).mean()
    assert torch.allclose(m.patch_mean_loss(video, mask, places, per_channel), expected, rtol=1e-9)
    key = "reconstruction_patch_colour" if per_channel else "reconstruction_patch_mean"
    assert torch.allclose(m.baselines(video, mask, places)[key], expected, rtol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_training_beats_the_patch_mean_baseline(name):
    """Seconds of training on synthetic clips (SimVTP: the pixel loss alone, its encoder over video and masked
    text; the synthetic preset's per-patch target) bring the reconstruction loss on held-out clips below the loss
    of predicting each masked patch's mean. With every SimVTP loss on it takes longer (about 100 steps here; the
    CLI run in the README)."""
    from fastvl.data.synthetic import SyntheticVideoText

    text = {"vocab_size": 200, "tasks": ("mvm",)} if name.startswith("simvtp") else {}
    m = tiny(name, norm_pix=True, **text)

    def clips(split, n):
        ds = SyntheticVideoText(split, num_clips=n, frames=4, size=32)
        b = make_batch(m, B=n, Lt=8)
        b["text_ids"] = b["text_ids"] % 200
        b["video"] = torch.stack([ds[i]["video"] for i in range(n)])
        return b

    train, held = clips("train", 64), clips("val", 16)

    def heldout():
        m.eval()
        out = m.heldout_losses(held, generator=torch.Generator().manual_seed(123))
        m.train()
        return {k: float(v) for k, v in out.items()}

    before = heldout()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, 64, (16,), generator=g)
        opt.zero_grad()
        m({k: v[idx] for k, v in train.items()})["loss"].backward()
        opt.step()
    after = heldout()
    assert after["reconstruction_patch_mean"] == before["reconstruction_patch_mean"]  # same masks, same clips
    assert before["reconstruction"] > before["reconstruction_patch_mean"]  # initialisation: no better than the mean
    assert after["reconstruction"] < after["reconstruction_patch_mean"] - 0.05, (before, after)


def test_heldout_losses_are_reproducible_with_a_generator():
    m = tiny("simvtp-tiny")
    m.eval()
    b = make_batch(m)
    a = m.heldout_losses(b, torch.Generator().manual_seed(7))
    c = m.heldout_losses(b, torch.Generator().manual_seed(7))
    d = m.heldout_losses(b, torch.Generator().manual_seed(8))
    assert a == c and a["reconstruction"] != d["reconstruction"]


def test_simvtp_text_masking_and_tasks():
    m = tiny("simvtp-tiny")
    b = make_batch(m, B=4)
    g = torch.Generator().manual_seed(0)
    ids, mask = b["text_ids"], b["text_mask"]
    mids, labels = m.mask_text(ids, mask, g)
    chosen = labels != -100
    assert (mids[chosen] == m.config.mask_id).all() and (mids[~chosen] == ids[~chosen]).all()
    assert not chosen[:, 0].any() and not chosen[~mask].any()  # never the CLS, never padding
    big = torch.randint(1000, 2000, (256, 16), generator=g)
    frac = (m.mask_text(big, torch.ones_like(big, dtype=torch.bool), g)[1] != -100).float().mean()
    assert abs(float(frac) - 0.75) < 0.02
    neg = m.vtm_negatives(ids, mask, g)
    assert (neg != torch.arange(4)).all()
    for tasks in (("mvm",), ("mlm", "vtc"), ("vtm",)):
        out = tiny("simvtp-tiny", tasks=tasks)(b)
        assert set(out) == {*tasks, "loss"} and torch.allclose(out["loss"], sum(out[t] for t in tasks))
    out = tiny("simvtp-tiny", tasks=("mvm", "mlm"), loss_weights=(1.0, 0.5))(b)
    assert torch.allclose(out["loss"], out["mvm"] + 0.5 * out["mlm"])


BAD_OPTIONS = [
    ("videomae-tiny", dict(mask_ratio=0.99), "keeps int"),
    ("videomae-tiny", dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    ("videomae-tiny", dict(mask_ratio=0.0), "masks none"),
    ("videomae-tiny", dict(num_frames=5), "multiple of tubelet"),
    ("videomae-tiny", dict(img_size=30), "divisible by patch_size"),
    ("videomae-tiny", dict(decoder_keep=0.0), "decoder_keep"),
    ("videomae-tiny", dict(norm_pix="pixel"), "norm_pix"),
    ("videomae-tiny", dict(tube=0), "tube must be"),
    ("videomae-tiny", dict(num_heads=3), "divisible by num_heads"),
    ("simvtp-tiny", dict(tasks=("mvm", "itc")), "tasks must be"),
    ("simvtp-tiny", dict(tasks=()), "tasks must be"),
    ("simvtp-tiny", dict(loss_weights=(1.0,)), "one weight per task"),
    ("simvtp-tiny", dict(text_mask_ratio=0.0), "text_mask_ratio"),
    ("simvtp-tiny", dict(vtc_temperature=0.0), "vtc_temperature"),
    ("simvtp-tiny", dict(vocab_size=100), r"cls_id=101 must be a token id in \[0, vocab_size=100\)"),
]


@pytest.mark.parametrize("name, kw, match", BAD_OPTIONS)
def test_bad_options(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kw)


def test_bad_options_on_the_command_line(capsys):
    assert cli(["pretrain", "--model", "videomae-tiny", "--set", "mask_ratio=0.99"]) == 2
    err = capsys.readouterr().err
    assert "--set" in err and "keeps int" in err and "Traceback" not in err
    with pytest.raises(TypeError, match="unknown config field"):
        create_model("videomae-tiny", vocab_size=100)  # video only: no text fields


@pytest.mark.parametrize(
    "name, mutate, match",
    [
        ("videomae-tiny", lambda b: b.update(video=b["video"][:, :3]), r"batch\['video'\] has 3 frames"),
        ("videomae-tiny", lambda b: b.update(video=b["video"][..., :16, :16]), "position table is for 32px"),
        ("simvtp-tiny", lambda b: b.pop("text_ids"), "has no 'text_ids'"),
        ("simvtp-tiny", lambda b: b.update({k: v[:1] for k, v in b.items()}), "VTM negatives need another clip"),
    ],
)
def test_bad_batch(name, mutate, match):
    m = tiny(name)
    b = make_batch(m)
    mutate(b)
    with pytest.raises(ValueError, match=match):
        m(b)


# ---- sizes and FLOPs beside the papers ----------------------------------------------------------


def _encoder_macs(depth, L, C):
    return depth * (L * 12 * C * C + 2 * L * L * C)


def test_videomae_b_figures():
    s = describe("videomae-b", file=(out := io.StringIO()))
    assert s["params_encoder"] == 86_236_416 and abs(s["params_encoder"] / 87e6 - 1) < 0.01  # paper: 87M
    embed = 1568 * (2 * 16 * 16 * 3) * 768
    assert s["flops_encoder_unmasked"].total == 2 * (_encoder_macs(12, 1568, 768) + embed)
    assert abs(s["flops_encoder_unmasked"].macs / 180e9 - 1) < 0.01  # paper: 180 G (fvcore multiply-adds)
    # 90% tube masking keeps int(196 * 0.1) = 19 of 196 patches per token frame: 152 of 1568 tokens
    assert s["tokens"] == (1568, 152)
    assert s["flops_encoder_masked"].total == 2 * (_encoder_macs(12, 152, 768) + embed)
    text = out.getvalue()
    assert "(paper 87M: -0.88%)" in text and "paper 180 G (fvcore multiply-adds)" in text
    assert "(152 of 1568 tokens): 30.37 GFLOPs, 91.6% fewer (11.9x less)" in text
    assert s["params"] == 94_221_696


def test_simvtp_b_figures():
    s = model_stats("simvtp-b")
    assert s["params"] == 141_161_660
    assert s["params_encoder"] == 86_236_416 and s["tokens"] == (1568, 152)
    # text: 30522 x 768 words, 32 positions, LayerNorm; vocabulary head 768 -> 30522
    assert s["params_text"] == 30522 * 768 + 32 * 768 + 2 * 768 + 30522 * 769
    text = "\n".join(s["lines"])
    assert "paper, VideoMAE-B's 87M" in text and "paper (VideoMAE-B's encoder) 180 G" in text
    assert s["flops_train_per_sample"] > s["flops_encoder_masked"].total


# ---- command line ---------------------------------------------------------------------------------

SMALL = ["--train-clips", "32", "--val-clips", "16", "--batch-size", "8", "--log-every", "1", "--no-progress"]


@pytest.mark.parametrize("name", MODELS)
def test_cli_pretrain_synthetic(tmp_path, name, capsys):
    out = str(tmp_path / name)
    assert cli(["pretrain", "--model", name, "--steps", "2", "--out", out, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "losses on 16 held-out clips: reconstruction " in printed and "reconstruction_patch_mean " in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    held = summary["eval"]["heldout"]
    assert set(held) == {"reconstruction", "reconstruction_patch_mean", "reconstruction_patch_colour"}
    assert held["reconstruction_patch_mean"] > held["reconstruction_patch_colour"] > 0.1
    assert ("zero-shot retrieval" in printed) == name.startswith("simvtp")
    assert os.path.exists(os.path.join(out, "curves.png"))
    assert cli(["eval", out]) == 0
    again = capsys.readouterr().out
    assert f"reconstruction {held['reconstruction']:.4f}" in again  # the same masks: the same figure


def test_videomae_trains_on_a_manifest_and_shards(tmp_path, capsys):
    """Video only: the captions of the manifest / shards are read (the loader tokenises them) and ignored."""
    data = str(tmp_path / "clips")
    assert cli(["data", "synth", "--out", data, "--num", "12", "--num-val", "4", "--frames", "4", "--size", "32"]) == 0
    manifest = os.path.join(data, "manifest.jsonl")
    common = ["--model", "videomae-tiny", "--steps", "2", "--batch-size", "4", "--no-progress", "--log-every", "1"]
    assert cli(["pretrain", *common, "--data", manifest, "--out", str(tmp_path / "mf")]) == 0
    printed = capsys.readouterr().out
    assert "losses on 4 held-out clips: reconstruction " in printed and "zero-shot retrieval" not in printed
    shards = str(tmp_path / "shards" / "{000..001}.tar")
    assert cli(["data", "shards", "--data", manifest, "--out", shards, "--per-shard", "8"]) == 0
    out = str(tmp_path / "sh")
    assert cli(["pretrain", *common, "--data", shards, "--out", out, "--no-eval"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2]
