"""The README's shard example end to end: its four commands as written (with smaller sizes appended), ending in
a summary with held-out retrieval; and the train-only shard set alone, whose evaluation falls back and says so."""

import json
import os
import shlex

import pytest

pytest.importorskip("av", reason="PyAV is not installed (pip install 'fastvl[video]'): the example writes mp4s")

from fastvl.cli import main  # noqa: E402

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
# appended to each command (argparse keeps the last value): the same commands on 16 + 8 small clips
SMALLER = {
    ("data", "synth"): ["--num", "16", "--num-val", "8", "--frames", "4", "--size", "32"],
    ("data", "shards", "train"): ["--per-shard", "4"],  # 16 clips -> train-000..003, as the README's spec reads
    ("data", "shards", "val"): ["--per-shard", "8"],  # 8 clips -> val-000
    ("pretrain",): ["--steps", "2", "--batch-size", "4", "--no-progress", "--out", "run"],
}


def readme_shard_commands() -> list[list[str]]:
    text = open(README).read()
    block = text.split("**Files and shards.**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [shlex.split(line.split(" # ")[0]) for line in block.strip().splitlines()]
    assert all(c[0] == "fastvl" for c in cmds) and len(cmds) == 4, cmds
    return [c[1:] for c in cmds]


def _smaller(argv: list[str]) -> list[str]:
    key = tuple(argv[:2]) if argv[0] == "data" else (argv[0],)
    if key == ("data", "shards"):
        key += (argv[argv.index("--split") + 1],)
    return argv + SMALLER[key]


def test_readme_shard_example_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cmds = readme_shard_commands()
    for argv in cmds:
        assert main(_smaller(argv)) == 0, argv
    printed = capsys.readouterr().out
    assert "zero-shot retrieval on 8 held-out clips" in printed
    summary = json.load(open("run/summary.json"))
    assert summary["eval"]["n"] == 8 and "split_note" not in summary["eval"]
    assert os.path.exists("run/curves.png") and summary["skipped_videos"] == 0

    # the train-only shard set on its own (the README's earlier example): evaluation falls back, says so, and
    # the run still ends with its summary and plot
    pretrain = [a for a in cmds[-1] if a != "--eval-data" and not a.endswith("val-000.tar")]
    assert main(_smaller(pretrain)[:-1] + ["fallback"]) == 0
    printed = capsys.readouterr().out
    assert "has no held-out split, these are not held-out figures" in printed
    summary = json.load(open("fallback/summary.json"))
    assert summary["eval"]["n"] == 16 and "no held-out split" in summary["eval"]["split_note"]
    assert os.path.exists("fallback/curves.png")
