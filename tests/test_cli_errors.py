"""Every user mistake on the ``fastvl`` command line: exit status 2, one or two lines naming the flag (or file,
or package) and what was expected, no traceback, and nothing written."""

import json
import os
import sys

import pytest
import torch

from fastvl.cli import main
from fastvl.data import decode

CASES = [
    # (id, argv, what the message names)
    ("unknown-model", ["pretrain", "--model", "allinone-xl"], "--model: unknown model 'allinone-xl'"),
    ("missing-manifest", ["pretrain", "--data", "{in}/nope.jsonl"], "--data: manifest not found"),
    ("missing-shards", ["pretrain", "--data", "{in}/sh/{{000..003}}.tar"], "--data: 4 of 4 shards"),
    ("unknown-data-kind", ["pretrain", "--data", "{in}/clips.txt"], "--data: cannot tell what"),
    ("manifest-row-without-caption", ["pretrain", "--data", "{in}/nocap.jsonl"], "line 2: 'caption' must be"),
    ("manifest-bad-json", ["pretrain", "--data", "{in}/bad.jsonl"], "line 1: not valid JSON"),
    ("negative-lr", ["pretrain", "--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
    ("lr-not-a-number", ["pretrain", "--lr", "fast"], "argument --lr: expected a number > 0, got 'fast'"),
    ("lr-nan", ["pretrain", "--lr", "nan"], "argument --lr: expected a number > 0"),
    ("batch-size-0", ["pretrain", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    ("epochs-0", ["pretrain", "--epochs", "0"], "argument --epochs: expected a number > 0, got 0"),
    ("steps-0", ["pretrain", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    ("warmup-negative", ["pretrain", "--warmup", "-0.1"], "argument --warmup: expected a number >= 0"),
    ("grad-accum-0", ["pretrain", "--grad-accum", "0"], "argument --grad-accum: expected an integer >= 1"),
    ("workers-negative", ["pretrain", "--workers", "-2"], "argument --workers: expected an integer >= 0"),
    ("unknown-model-field", ["pretrain", "--set", "depht=2"], "--set: create_model('allinone-ti'): unknown config"),
    ("set-without-equals", ["pretrain", "--set", "depth"], "--set: expected FIELD=VALUE"),
    ("unknown-data-field", ["pretrain", "--data-set", "colours=[1]"], "--data-set: unknown SyntheticConfig field"),
    ("bad-data-value", ["pretrain", "--data-set", 'colors=["pink"]'], "--data-set: SyntheticConfig: 'colors'"),
    ("data-set-on-files", ["pretrain", "--data", "{in}/ok.jsonl", "--data-set", "fps=2"], "--data-set: applies to"),
    ("missing-tokenizer", ["pretrain", "--tokenizer", "{in}/tok"], "--tokenizer: no such file"),
    ("fsdp-one-process", ["pretrain", "--fsdp"], "--fsdp: needs several processes"),
    ("unknown-backend", ["pretrain", "--backend", "cudnn9"], "--backend: unknown backend 'cudnn9'"),
    ("bad-device", ["pretrain", "--device", "tpu"], "--device: expected cpu or cuda"),
    ("bad-amp", ["pretrain", "--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("bad-eval-data", ["pretrain", "--eval-data", "{in}/nope.csv"], "--eval-data: manifest not found"),
    ("eval-missing-run", ["eval", "{in}/no-such-run"], "run: {in}/no-such-run is not a run directory"),
    ("eval-run-without-checkpoint", ["eval", "{in}/empty-run"], "run: no checkpoint in"),
    ("synth-odd-size", ["data", "synth", "--out", "out", "--size", "33"], "--size: expected an even frame size"),
    ("synth-nothing", ["data", "synth", "--out", "out", "--num", "0", "--num-val", "0"], "--num: --num and"),
    ("synth-one-frame", ["data", "synth", "--out", "out", "--frames", "1"], "argument --frames: expected an integer"),
    ("shards-of-shards", ["data", "shards", "--data", "a/{{0..1}}.tar", "--out", "s/{{0..1}}.tar"], "--data: expected"),
    (
        "shards-bad-split",
        ["data", "shards", "--data", "{in}/ok.jsonl", "--out", "s/{{0..1}}.tar", "--split", "dev"],
        "--split",
    ),
    (
        "shards-bad-pattern",
        ["data", "shards", "--data", "synthetic", "--out", "s/{{5..1}}.tar"],
        "--out: expand_pattern",
    ),
    ("unknown-command", ["train"], "argument cmd: invalid choice: 'train'"),
]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Input files in ``in/``; the command runs in the empty ``work/`` (where a run directory would appear)."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "clips.txt").write_text("x\n")
    (d / "nocap.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "a cat"}) + '\n{"video": "b.mp4"}\n')
    (d / "bad.jsonl").write_text("{video: a.mp4}\n")
    (d / "ok.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "a cat"}) + "\n")
    (d / "empty-run").mkdir()
    (d / "empty-run" / "config.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return d


def _check_usage_error(capsys, argv, expect, work_before):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (argv, out, err)
    assert 1 <= len(lines) <= 2, err
    assert expect in lines[0], (expect, err)
    assert "Traceback" not in err + out
    assert sorted(os.listdir(".")) == work_before, "nothing may be created before the arguments are checked"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_mistake_is_one_line_and_status_2(case, inputs, capsys):
    _, argv, expect = case
    if case[0] == "bad-device" and torch.cuda.is_available():
        pytest.skip("the device check is about a machine without CUDA")
    argv = [a.format(**{"in": inputs}) for a in argv]
    _check_usage_error(capsys, argv, expect.format(**{"in": inputs}), [])


def test_missing_pyav_for_synth_and_video_data(inputs, capsys, monkeypatch):
    """No PyAV: ``fastvl data synth`` says what to install (before creating --out), and so does a manifest of
    videos when no decoder is left (PyAV forced, torchcodec not considered)."""
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    monkeypatch.setenv("FASTVL_VIDEO_DECODER", "pyav")
    decode.unavailable_reason.cache_clear()
    try:
        _check_usage_error(capsys, ["data", "synth", "--out", "clips"], "PyAV: writing mp4 files needs PyAV", [])
        _check_usage_error(capsys, ["pretrain", "--data", str(inputs / "ok.jsonl")], "pip install 'fastvl[video]'", [])
    finally:
        decode.unavailable_reason.cache_clear()


def test_debug_shows_the_traceback(inputs, monkeypatch):
    from fastvl.usage import UsageError

    with pytest.raises(UsageError, match="unknown model"):
        main(["--debug", "pretrain", "--model", "nope"])
    monkeypatch.setenv("FASTVL_DEBUG", "1")
    with pytest.raises(UsageError, match="unknown model"):
        main(["pretrain", "--model", "nope"])


def test_help_lists_info_model_and_the_new_flags(capsys):
    assert main(["info", "--help"]) == 0
    assert "--model" in capsys.readouterr().out
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--fsdp", "--grad-ckpt", "--eval-data"):
        assert flag in out


def test_run_directories_of_different_manifests_do_not_collide(tmp_path):
    from fastvl.train.pretrain import default_run_dir

    a = default_run_dir("allinone-tiny", str(tmp_path / "a" / "manifest.jsonl"))
    b = default_run_dir("allinone-tiny", str(tmp_path / "b" / "manifest.jsonl"))
    assert a != b and a.startswith("runs/allinone-tiny-a-manifest-") and b.startswith("runs/allinone-tiny-b-manifest-")
    assert default_run_dir("allinone-ti", "synthetic") == "runs/allinone-ti-synthetic"
    c = default_run_dir("mac-b", "data/shards/{000..003}.tar")
    assert c.startswith("runs/mac-b-shards-000..003-") and "{" not in c


def test_fastvl_exposes_models_data_train_as_attributes():
    import fastvl

    assert fastvl.models.create_model is not None and fastvl.data.build_loader is not None
    assert fastvl.train.train is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastvl.nope  # noqa: B018
