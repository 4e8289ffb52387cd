"""Shards at scale: webdataset reads fastvl's shards and fastvl reads webdataset's, ``pipe:`` and http(s) shard
specs, caption-only scans (no video member is read), one rank trains the tokenizer, and unreadable videos
counted in the log and summary.json."""

import functools
import http.server
import json
import os
import tarfile
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="PyAV is not installed (pip install 'fastvl[video]'): shard tests skipped")

from fastvl.data import (  # noqa: E402
    ShardDataset,
    SyntheticVideoText,
    compact_pattern,
    denormalize,
    encode_mp4_bytes,
    write_shards,
)
from fastvl.data.shard_reader import scan_shard  # noqa: E402

GEN_KW = dict(num_clips=6, frames=4, size=16, fps=4.0, motions=("left", "up"), paraphrases=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    gen = SyntheticVideoText("train", **GEN_KW)
    paths = write_shards(gen, str(out / "{000..009}.tar"), 2)
    return {"gen": gen, "dir": out, "paths": paths, "spec": compact_pattern(paths)}


def _items(spec, **kw):
    ds = ShardDataset(spec, num_frames=4, size=16, **kw)
    return sorted(((it["index"], it["caption"], it["label"], it["video"]) for it in ds), key=lambda t: t[0])


def _same_items(a, b):
    assert [x[:3] for x in a] == [y[:3] for y in b] and len(a) > 0
    for x, y in zip(a, b):
        assert torch.equal(x[3], y[3])


def test_webdataset_reads_fastvl_shards(shards):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset(shards["spec"], shardshuffle=False, empty_check=False))
    assert len(samples) == 6
    gen = shards["gen"]
    for i, s in enumerate(samples):
        meta = json.loads(s["json"])
        assert meta["index"] == i and meta["label"] == gen.label(i) and meta["captions"] == gen.render(i)["captions"]
        assert s["txt"].decode() == meta["captions"][0] and s["mp4"][4:8] == b"ftyp"
    decoded = list(wds.WebDataset(shards["spec"], shardshuffle=False, empty_check=False).decode())
    assert decoded[2]["json"]["label"] == gen.label(2) and decoded[2]["txt"] == gen.render(2)["captions"][0]


def test_fastvl_reads_webdataset_shardwriter_output(shards, tmp_path):
    wds = pytest.importorskip("webdataset")
    gen = shards["gen"]
    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=4) as sink:
        for i in range(6):
            raw = gen.render(i)
            sample = {"__key__": f"clip{i:04d}", "mp4": encode_mp4_bytes(raw["frames"], 4.0), "txt": raw["captions"][0]}
            if i % 2 == 0:  # with and without a json member
                sample["json"] = {"captions": raw["captions"], "label": raw["label"]}
            sink.write(sample)
    spec = str(tmp_path / "wds-*.tar")
    ds = ShardDataset(spec, num_frames=4, size=16, paraphrases=2)
    assert len(ds.urls) == 2 and len(ds) == 6
    items = list(ds)
    assert len(items) == 6
    by_caption = {gen.render(i)["captions"][0]: i for i in range(6)}
    for it in items:
        i = by_caption[it["caption"]]
        raw = gen.render(i)
        if i % 2 == 0:
            assert it["label"] == raw["label"] and it["captions"] == raw["captions"]
        else:  # txt only: one caption cycled, a label derived from it
            assert it["captions"] == [raw["captions"][0]] * 2 and isinstance(it["label"], int)
        ref = torch.from_numpy(raw["frames"]).permute(0, 3, 1, 2).float() / 255
        assert (denormalize(it["video"]) - ref).abs().mean() < 0.04
    assert sorted(ds.captions()) == sorted(
        c for i in range(6) for c in (gen.render(i)["captions"] if i % 2 == 0 else gen.render(i)["captions"][:1])
    )


def test_pipe_shards_equal_local_ones(shards):
    local = _items(shards["spec"])
    piped = _items("pipe:cat " + shards["spec"])
    _same_items(local, piped)
    first = shards["paths"][0]
    with pytest.raises(OSError, match="exited with status 3"):  # read to the end, then the status is checked
        ShardDataset(f"pipe:cat {first}; exit 3", num_frames=4, size=16)
    with pytest.raises(OSError, match="exited with status 1"):  # nothing read: the failed command is named
        ShardDataset(f"pipe:cat {first}.missing", num_frames=4, size=16)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_from_a_local_server(shards):
    handler = functools.partial(_QuietHandler, directory=str(shards["dir"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        names = [os.path.basename(p) for p in shards["paths"]]
        spec = f"http://127.0.0.1:{port}/{{{names[0][:3]}..{names[-1][:3]}}}.tar"
        _same_items(_items(shards["spec"]), _items(spec))
        remote = ShardDataset(spec, num_frames=4, size=16)
        assert remote.captions() == ShardDataset(shards["spec"], num_frames=4, size=16).captions()
    finally:
        server.shutdown()
        server.server_close()


def test_caption_scan_reads_no_video_member(shards, monkeypatch):
    extracted = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        extracted.append(member.name if hasattr(member, "name") else member)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    ix = scan_shard(shards["paths"][0])
    ds = ShardDataset(shards["spec"], num_frames=4, size=16)
    caps = ds.captions()
    assert extracted and not [n for n in extracted if not n.endswith((".json", ".txt"))]
    assert ix.splits == ["train", "train"] and ix.captions[1] == shards["gen"].render(1)["captions"]
    assert caps == [c for i in range(6) for c in shards["gen"].render(i)["captions"]]


def test_only_rank_0_trains_the_tokenizer(tmp_path):
    """A rank other than 0 never reads the captions: it loads what rank 0 saved (here: nothing saved yet, so the
    load fails instead of a second tokenizer being trained)."""
    from fastvl.train import distributed
    from fastvl.train.loop import TrainConfig
    from fastvl.train.pretrain import load_or_train_tokenizer

    class NoCaptions:
        def captions(self):
            raise AssertionError("rank 1 read the captions")

    cfg = TrainConfig(out=str(tmp_path), extra={})
    with pytest.raises(FileNotFoundError):
        load_or_train_tokenizer(cfg, distributed.DistInfo(rank=1, world_size=1), NoCaptions())
    tok, where = load_or_train_tokenizer(cfg, distributed.DistInfo(), SyntheticVideoText("train", num_clips=2))
    assert where == str(tmp_path / "tokenizer") and os.path.isfile(os.path.join(where, "tokenizer.json"))
    again, _ = load_or_train_tokenizer(cfg, distributed.DistInfo(rank=1, world_size=1), NoCaptions())
    assert again.encode(["a red circle grows"], 8)[0].tolist() == tok.encode(["a red circle grows"], 8)[0].tolist()


def test_unreadable_videos_are_counted_in_the_log_and_summary(shards, tmp_path, capsys):
    from fastvl.cli import main

    gen = shards["gen"]
    samples = [
        {"mp4": encode_mp4_bytes(gen.render(i)["frames"], 4.0), "captions": gen.render(i)["captions"]} for i in range(6)
    ]
    samples[3]["mp4"] = b"\x00not an mp4"
    spec = compact_pattern(write_shards(samples, str(tmp_path / "bad" / "{0..2}.tar"), 2))
    out = str(tmp_path / "run")
    argv = ["pretrain", "--model", "mac-tiny", "--data", spec, "--out", out, "--steps", "2", "--batch-size", "4"]
    with pytest.warns(UserWarning, match="skipping shard sample"):
        assert main([*argv, "--no-progress", "--log-every", "1", "--val-clips", "4"]) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped_videos"] >= 1 and summary["skipped_steps"] == 0
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"eval"' not in x]
    assert recs[-1]["skipped_videos"] == summary["skipped_videos"] and "skipped_steps" in recs[-1]
    assert f"skipped {summary['skipped_videos']} unreadable videos" in printed
    assert "no held-out split" in printed and np.isfinite(summary["eval"]["t2v"]["R@1"])
