"""``fastvl pretrain`` / ``fastvl eval`` end to end: fastvl's models on the synthetic data, mp4 files and shards,
resume through the CLI, and 2 gloo ranks against one process with the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastvl.cli import main as cli
from fastvl.train import checkpoint as ckpt
from fastvl.train.loop import TrainConfig, train
from fastvl.train.pretrain import build


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval" not in r:
                out[r["step"]] = r
    return out


SMALL = ["--train-clips", "64", "--val-clips", "24", "--batch-size", "8", "--log-every", "1", "--no-progress"]


@pytest.mark.parametrize("model", ["allinone-tiny", "vatt-tiny", "mac-tiny"])
def test_cli_pretrain_and_eval_synthetic(tmp_path, model, capsys):
    out = str(tmp_path / model)
    assert cli(["pretrain", "--model", model, "--steps", "3", "--out", out, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot retrieval on 24 held-out clips" in printed and "text->video" in printed
    for f in ("metrics.jsonl", "curves.png", "summary.json", "config.json", "tokenizer/vocab.txt", "latest"):
        assert os.path.exists(os.path.join(out, f)), f
    rec = losses(out)
    assert sorted(rec) == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rec.values())
    assert rec[1]["fwd_gflops_per_step"] > 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["eval"]["n"] == 24 and "chance" in summary["eval"]
    probe = summary["eval"]["attributes"]
    assert sorted(probe) == ["colour", "motion", "shape"] and probe["motion"]["chance"] == pytest.approx(100 / 6)
    assert "caption variant picked" in printed
    if model == "vatt-tiny":  # its synthetic default does not learn in the CPU budget: the output says why
        assert printed.count("note: vatt-tiny does not learn on the synthetic data") == 2
        assert summary["note"].startswith("vatt-tiny does not learn")
    else:
        assert "note:" not in printed and "note" not in summary
    if model.startswith("allinone"):  # the fused VTM head re-ranks motion variants (where rolling acts)
        assert summary["eval"]["attributes_fused"]["motion"]["n"] == 24
    assert cli(["eval", out]) == 0
    assert "zero-shot retrieval on 24 held-out clips" in capsys.readouterr().out


def test_cli_resume_continues_the_same_curve(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--model", "allinone-tiny", "--no-eval", *SMALL]
    assert cli(["pretrain", *args, "--steps", "6", "--out", a]) == 0
    assert cli(["pretrain", *args, "--steps", "6", "--out", b, "--ckpt-every", "2"]) == 0
    la = losses(a)
    # rewind b to its step-4 checkpoint (as if it had stopped there) and resume: steps 5-6 are re-run
    os.remove(os.path.join(b, "latest"))
    with open(os.path.join(b, "latest"), "w") as f:
        f.write("ckpt-0000004\n")
    assert cli(["pretrain", *args, "--steps", "6", "--out", b, "--resume", "--ckpt-every", "2"]) == 0
    lb = losses(b)
    assert [la[s]["loss"] for s in range(1, 7)] == [lb[s]["loss"] for s in range(1, 7)]
    assert ckpt.latest(b).endswith("ckpt-0000006")


def test_manifest_and_shards(tmp_path, capsys):
    data = str(tmp_path / "clips")
    assert cli(["data", "synth", "--out", data, "--num", "24", "--num-val", "8", "--frames", "4", "--size", "32"]) == 0
    manifest = os.path.join(data, "manifest.jsonl")
    assert os.path.exists(manifest)
    out = str(tmp_path / "mf")
    common = ["--model", "mac-tiny", "--steps", "2", "--batch-size", "4", "--no-progress", "--log-every", "1"]
    assert cli(["pretrain", *common, "--data", manifest, "--out", out]) == 0
    assert "zero-shot retrieval on 8 held-out clips" in capsys.readouterr().out
    shards = str(tmp_path / "shards" / "{000..002}.tar")
    assert cli(["data", "shards", "--data", manifest, "--out", shards, "--per-shard", "12"]) == 0
    out2 = str(tmp_path / "sh")
    assert cli(["pretrain", *common, "--data", shards, "--out", out2, "--no-eval"]) == 0
    assert sorted(losses(out2)) == [1, 2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out, **kw):
    base = dict(
        model="mac-tiny",
        data="synthetic",
        out=out,
        steps=3,
        batch_size=4,
        lr=1e-3,
        log_every=1,
        progress=False,
        warmup=0,
        eval=False,
        device="cpu",
        extra={"train_clips": 32, "model_overrides": {"video_mask_ratio": 0.0, "text_mask_ratio": 0.0}},
    )
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, port, out, q):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train(_cfg(out), build)
    from fastvl.train import distributed

    distributed.cleanup()
    if rank == 0:
        q.put({s: r["loss"] for s, r in losses(out).items()})


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path):
    """mac-tiny (no masking, so nothing random per rank; LayerNorm only, no batch statistics): 2 ranks x 4 clips
    with the contrastive loss gathered across ranks == 1 process x 8 clips (rank 0's and rank 1's clips)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    out = str(tmp_path / "ddp")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ddp = q.get(timeout=10)

    def single_build(cfg, info):
        from fastvl.data import build_loader

        comp = build(cfg, info)
        tok_dir = os.path.join(cfg.out, "tokenizer")
        ranks = [
            build_loader(
                "synthetic",
                4,
                train=True,
                rank=r,
                world_size=2,
                seed=cfg.seed,
                tokenizer=tok_dir,
                max_len=16,
                num_clips=32,
                num_frames=4,
                size=32,
                cache=True,
            )
            for r in range(2)
        ]

        def make_loader(epoch, skip):
            for ld in ranks:
                ld.load_state_dict({"epoch": epoch, "batch": skip})
            for b0, b1 in zip(*ranks):
                yield {k: (torch.cat([b0[k], b1[k]]) if torch.is_tensor(b0[k]) else b0[k] + b1[k]) for k in b0}

        comp.make_loader, comp.batches_per_epoch = make_loader, len(ranks[0])
        return comp

    single = str(tmp_path / "single")
    train(_cfg(single, batch_size=8), single_build)
    one = {s: r["loss"] for s, r in losses(single).items()}
    assert sorted(one) == sorted(ddp) == [1, 2, 3]
    for s in one:
        assert abs(one[s] - ddp[s]) < 1e-5, (one, ddp)


@pytest.mark.slow
def test_cli_compile_matches_eager(tmp_path, monkeypatch):
    """--compile (torch.compile of the whole model: fastvl ops are custom ops with fakes) trains like eager.
    fallback_random: compiled code draws All-in-one's MLM masks and VTM negatives with eager's RNG."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    common = ["--model", "allinone-tiny", "--steps", "2", "--no-eval", *SMALL]
    assert cli(["pretrain", *common, "--out", str(tmp_path / "eager")]) == 0
    assert cli(["pretrain", *common, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    e, c = losses(str(tmp_path / "eager")), losses(str(tmp_path / "compiled"))
    for s in (1, 2):
        assert abs(e[s]["loss"] - c[s]["loss"]) < 1e-4 * abs(e[s]["loss"]), (e[s]["loss"], c[s]["loss"])


def test_data_set_overrides_the_synthetic_config(tmp_path, capsys):
    out = str(tmp_path / "ds")
    args = ["pretrain", "--model", "mac-tiny", "--steps", "1", "--out", out, *SMALL]
    assert cli([*args, "--data-set", 'motions=["left", "right"]', "--data-set", 'colors=["red"]']) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["data_kwargs"]["motions"] == ["left", "right"] and saved["data_kwargs"]["colors"] == ["red"]
    probe = json.load(open(os.path.join(out, "summary.json")))["eval"]["attributes"]
    assert sorted(probe) == ["motion", "shape"] and probe["motion"]["chance"] == 50.0  # one colour: no colour probe
    assert cli([*args, "--data", "x.csv", "--data-set", "fps=2"]) == 2
    assert "--data-set: applies to --data synthetic only" in capsys.readouterr().err


def test_allinone_synthetic_recipe_is_the_default_and_flags_win(tmp_path, capsys):
    """allinone-ti on synthetic data trains the motion recipe by default (VTC only, rolled video pass, roll 1/4,
    2 colours x 2 shapes, 4096 clips, 10 warmup steps); --set / --data-set / flags override it; eval rebuilds it."""
    from fastvl.train.pretrain import ALLINONE_RECIPE_DATA, ALLINONE_RECIPE_MODEL

    out = str(tmp_path / "ti")
    base = ["pretrain", "--model", "allinone-ti", "--steps", "1", "--batch-size", "4", "--val-clips", "8"]
    assert cli([*base, "--out", out, "--no-progress", "--train-clips", "16"]) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["warmup"] == 10
    assert {k: saved["model_overrides"][k] for k in ALLINONE_RECIPE_MODEL} == {
        "tasks": ["vtc"],
        "video_roll": True,
        "roll_fraction": 0.25,
    }
    assert {k: saved["data_kwargs"][k] for k in ALLINONE_RECIPE_DATA} == {
        k: list(v) for k, v in ALLINONE_RECIPE_DATA.items()
    }
    ev = json.load(open(os.path.join(out, "summary.json")))["eval"]
    assert sorted(ev["attributes"]) == ["colour", "motion", "shape"]
    assert "attributes_fused" not in ev  # the VTM head was not trained: no re-ranking with it
    assert {"loss", "vtc"} <= set(losses(out)[1]) and "vtm" not in losses(out)[1]
    assert cli(["eval", out]) == 0
    assert "zero-shot retrieval on 8 held-out clips" in capsys.readouterr().out
    # the recipe's defaults: 4096 training clips when --train-clips is not given
    from fastvl.cli import build_parser
    from fastvl.train.commands import config_from_args

    cfg = config_from_args(build_parser().parse_args(["pretrain", "--model", "allinone-ti"]))
    assert cfg.extra["train_clips"] == 4096 and cfg.epochs == 4.0 and cfg.warmup == 10
    # user flags win over the recipe, field by field
    cfg = config_from_args(
        build_parser().parse_args(
            [
                "pretrain",
                "--model",
                "allinone-ti",
                "--set",
                "video_roll=false",
                "--data-set",
                'colors=["red"]',
                "--warmup",
                "0.2",
                "--train-clips",
                "64",
            ]
        )
    )
    mo, da = cfg.extra["model_overrides"], cfg.extra["data"]
    assert mo["video_roll"] is False and mo["tasks"] == ("vtc",) and da["colors"] == ("red",)
    assert da["shapes"] == ("circle", "square") and cfg.warmup == 0.2 and cfg.extra["train_clips"] == 64
    # other families and other data keep their own defaults
    cfg = config_from_args(build_parser().parse_args(["pretrain", "--model", "vatt-tiny"]))
    assert cfg.extra["model_overrides"] == {} and cfg.extra["data"] == {} and cfg.warmup == 0.1
    cfg = config_from_args(build_parser().parse_args(["pretrain", "--model", "allinone-ti", "--data", "m.csv"]))
    assert cfg.extra["model_overrides"] == {} and cfg.extra["train_clips"] is None


def test_motion_probe_runs_both_modes_on_the_same_data(tmp_path, capsys):
    from fastvl.train import motion_probe

    argv = ["--train-clips", "64", "--val-clips", "24", "--epochs", "2", "--batch-size", "16", "--seeds", "3"]
    argv += ["--set", "depth=1", "--set", "dim=32", "--set", "num_heads=2", "--set", "pos_init=sincos"]
    out = tmp_path / "probe.jsonl"
    a = motion_probe.main(argv + ["--out", str(out)])
    b = motion_probe.main(argv)
    assert [r["rolling"] for r in a] == ["fused", "none"] and all(r["seed"] == 3 for r in a)
    for r, s in zip(a, b):  # deterministic per (seed, mode): same data, init and order
        assert len(r["accuracy_per_epoch"]) == 2 and r["accuracy"] == r["accuracy_per_epoch"][-1]
        assert {k: v for k, v in r.items() if k != "seconds"} == {k: v for k, v in s.items() if k != "seconds"}
        assert 0.0 <= r["accuracy"] <= 100.0 and 100 / 6 <= r["majority_chance"] <= 100.0
    assert [json.loads(line)["rolling"] for line in out.read_text().splitlines()] == ["fused", "none"]
    assert "motion probe  rolling=fused" in capsys.readouterr().out
