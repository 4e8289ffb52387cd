"""fastvl.data with real files: the mp4 writer and PyAV reader (against frames written by the generator), bad
manifests, tar shards (ranks, workers, shuffling, resume) and the ``fastvl data`` CLI."""

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'fastvl[video]'): video-file tests skipped")

from fastvl.data import (  # noqa: E402
    ManifestEntry,
    ShardDataset,
    SkippedVideoWarning,
    SyntheticVideoText,
    Tokenizer,
    VideoDataset,
    build_loader,
    compact_pattern,
    denormalize,
    encode_mp4,
    encode_mp4_bytes,  # noqa: E402
    expand_pattern,
    read_manifest,
    write_shards,
    write_videos,
)

FRAMES, SIZE, FPS, SR = 8, 32, 8.0, 8000


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """6 training + 2 held-out synthetic clips (8 frames, 32 px, 8 fps, 1 s of 8 kHz audio) as mp4 files.
    Translations only: a moved shape identifies its frame robustly through H.264's chroma subsampling and
    noise, while a slightly grown one may not (frame identity is what these tests check)."""
    out = tmp_path_factory.mktemp("synth")
    kw = dict(frames=FRAMES, size=SIZE, fps=FPS, audio=True, audio_rate=SR, paraphrases=2)
    kw["motions"] = ("left", "right", "up", "down")
    train = SyntheticVideoText("train", num_clips=6, **kw)
    val = SyntheticVideoText("val", num_clips=2, **kw)
    manifest = write_videos([train, val], out)
    return {"dir": out, "manifest": manifest, "train": train, "val": val}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(SyntheticVideoText("train", num_clips=1, paraphrases=2).captions(), vocab_size=300)


def _closest_frames(decoded: torch.Tensor, reference: np.ndarray) -> list[int]:
    """For each decoded frame (normalised (T, 3, H, W)), the index of the closest generator frame (uint8 THWC)."""
    dec = denormalize(decoded).permute(0, 2, 3, 1).numpy()
    ref = reference.astype(np.float32) / 255
    return [int(np.argmin(((ref - d[None]) ** 2).mean(axis=(1, 2, 3)))) for d in dec]  # MSE: the shape, not noise


def _mean_err(decoded: torch.Tensor, reference: np.ndarray) -> float:
    dec = denormalize(decoded).permute(0, 2, 3, 1).numpy()
    return float(np.abs(dec - reference.astype(np.float32) / 255).mean())


# ---- writer + reader ----------------------------------------------------------------------------


def test_writer_output_and_manifest(written):
    d = written["dir"]
    assert json.loads((d / "codecs.json").read_text()) == {"video": "libx264", "audio": "aac"}
    entries = read_manifest(written["manifest"])
    assert [e.split for e in entries] == ["train"] * 6 + ["val"] * 2
    for e, i in zip(entries, range(6)):
        assert os.path.isfile(e.video) and e.video.endswith(f"train/{i:06d}.mp4")
        assert e.captions == written["train"].render(i)["captions"] and e.label == written["train"].label(i)
    with av.open(entries[0].video) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.width, v.height, a.codec_context.name, a.rate) == ("h264", 32, 32, "aac", SR)
        assert sum(1 for _ in c.decode(video=0)) == FRAMES


def test_read_back_every_frame_caption_and_audio(written):
    ds = VideoDataset(written["manifest"], split="train", num_frames=FRAMES, size=SIZE, audio=True, paraphrases=2)
    assert len(ds) == 6
    gen = written["train"]
    for i in range(6):
        item, raw = ds[i], gen.render(i)
        assert item["video"].shape == (FRAMES, 3, SIZE, SIZE) and item["video"].dtype == torch.float32
        assert _closest_frames(item["video"], raw["frames"]) == list(range(FRAMES))  # order and timing survive
        assert _mean_err(item["video"], raw["frames"]) < 0.03  # H.264 at CRF 10: a few levels of 255
        assert item["captions"] == raw["captions"] and item["caption"] == raw["captions"][0]
        assert item["label"] == raw["label"] and item["index"] == i
        assert item["audio"].shape == (SR,) and item["audio"].dtype == torch.float32
        assert float(item["audio"].abs().max()) <= 1.0
        assert np.corrcoef(item["audio"].numpy(), raw["audio"])[0, 1] > 0.85  # AAC is lossy, but aligned
    held = VideoDataset(written["manifest"], split="val", num_frames=FRAMES, size=SIZE)
    assert len(held) == 2 and held[1]["caption"] == written["val"].render(1)["captions"][0]
    assert ds.skipped == 0 and ds.missing_audio == 0


def test_sparse_sampling_eval_and_train(written):
    raw = written["train"].render(2)["frames"]
    for T, expect in ((4, [1, 3, 5, 7]), (3, [1, 4, 6]), (2, [2, 6])):  # segment middles
        ds = VideoDataset(written["manifest"], split="train", num_frames=T, size=SIZE)
        assert _closest_frames(ds[2]["video"], raw) == expect
    ds = VideoDataset(written["manifest"], split="train", num_frames=4, size=SIZE, train=True)
    picks = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        got = _closest_frames(ds[2]["video"], raw)
        assert all(2 * t <= f <= 2 * t + 1 for t, f in enumerate(got)), got  # one frame inside each segment
        picks.append(got)
    assert len({tuple(p) for p in picks}) > 1  # random within the segments, varying per epoch
    ds.set_epoch(3)
    assert _closest_frames(ds[2]["video"], raw) == picks[3]  # and reproducible


def test_start_end_window(written, tmp_path):
    video = read_manifest(written["manifest"])[1].video
    m = tmp_path / "window.jsonl"
    m.write_text(json.dumps({"video": video, "caption": "x", "start": 0.25, "end": 0.75}) + "\n")
    ds = VideoDataset(m, num_frames=4, size=SIZE, audio=True, audio_seconds=0.5)
    raw = written["train"].render(1)
    item = ds[0]
    assert _closest_frames(item["video"], raw["frames"]) == [2, 3, 4, 5]
    assert item["audio"].shape == (4000,)
    assert np.corrcoef(item["audio"].numpy(), raw["audio"][2000:6000])[0, 1] > 0.85  # audio from the window start


@pytest.mark.parametrize("gop", [4, None])
def test_long_video_seeks_to_the_sampled_times(tmp_path, gop):
    """20 s at 2 fps, each frame a flat grey level = its index: sampled frames are found by seeking (targets
    5 s apart) whether keyframes are dense (every 4 frames) or only at the start."""
    n = 40
    frames = np.repeat((np.arange(n) * 6).astype(np.uint8), 16 * 16 * 3).reshape(n, 16, 16, 3)
    path = tmp_path / "long.mp4"
    encode_mp4(str(path), frames, 2.0, gop=gop)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"video": path.name, "caption": "grey"}) + "\n")
    m.write_text(m.read_text() + json.dumps({"video": path.name, "caption": "grey", "start": 3.2, "end": 15.0}) + "\n")
    ds = VideoDataset(m, num_frames=4, size=16)

    def indices(item):
        return (denormalize(item["video"]).mean(dim=(1, 2, 3)) * 255 / 6).round().long().tolist()

    assert indices(ds[0]) == [5, 15, 25, 35]  # segment middles 2.5, 7.5, 12.5, 17.5 s
    assert indices(ds[1]) == [9, 15, 21, 27]  # 4.675, 7.625, 10.575, 13.525 s at 2 fps


def test_resize_and_crop(tmp_path):
    H, W = 32, 48
    cols = np.linspace(0, 255, W).astype(np.uint8)
    frames = np.zeros((4, H, W, 3), np.uint8)
    frames[..., 0] = cols[None, None, :]
    frames[..., 1] = 128
    for t in range(4):
        frames[t, :, :, 2] = 60 * t
    path = tmp_path / "wide.mp4"
    encode_mp4(str(path), frames, 4.0)
    m = tmp_path / "m.csv"
    m.write_text(f"video,caption\n{path.name},a gradient\n")
    item = VideoDataset(m, num_frames=4, size=16)[0]
    assert item["video"].shape == (4, 3, 16, 16)
    red = denormalize(item["video"])[:, 0].mean(dim=(0, 1)).numpy() * 255
    # shorter side 32 -> 16 (width 48 -> 24), central crop = original columns 8..39
    expect = cols[8:40].astype(np.float32).reshape(16, 2).mean(1)
    assert np.abs(red - expect).max() < 6
    blue = denormalize(item["video"])[:, 2].mean(dim=(1, 2)).numpy() * 255
    assert np.abs(blue - 60 * np.arange(4)).max() < 6
    # training crops: random offsets, one crop shared by all frames of a clip
    ds = VideoDataset(m, num_frames=4, size=16, train=True)
    lefts = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        v = denormalize(ds[0]["video"])[:, 0].mean(dim=1).numpy() * 255  # (T, 16) columns
        assert np.abs(v - v[0:1]).max() < 6
        lefts.add(int(np.argmin(np.abs(cols[::2].astype(np.float32)[:9, None] - v[0, 0]).ravel())))
    assert len(lefts) > 2


def test_audio_resampled_padded_and_missing(written, tmp_path):
    raw = written["train"].render(0)
    ds = VideoDataset(
        written["manifest"], split="train", num_frames=2, size=SIZE, audio=True, audio_rate=16000, audio_seconds=1.5
    )
    a = ds[0]["audio"].numpy()
    assert a.shape == (24000,)
    up = np.interp(np.arange(16000) / 16000, np.arange(SR) / SR, raw["audio"])
    assert np.corrcoef(a[:16000], up)[0, 1] > 0.85
    assert np.all(a[16500:] == 0)  # the track lasts ~1.02 s: zero padding after it
    silent = tmp_path / "silent.mp4"
    encode_mp4(str(silent), raw["frames"], FPS)  # no audio stream
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"video": "silent.mp4", "caption": "quiet"}) + "\n")
    ds = VideoDataset(m, num_frames=2, size=SIZE, audio=True)
    item = ds[0]
    assert item["audio"].shape == (SR,) and not item["audio"].any() and ds.missing_audio == 1


# ---- bad inputs ---------------------------------------------------------------------------------


def _bad_manifest(written, tmp_path) -> tuple[str, set[int]]:
    good = read_manifest(written["manifest"])[0].video
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    rows = [
        {"video": "missing.mp4", "caption": "gone"},
        {"video": "corrupt.mp4", "caption": "noise"},
        {"video": "truncated.mp4", "caption": "half a file"},
        {"video": good, "caption": "starts after the end", "start": 5.0},
        {"video": good, "caption": "a good clip"},
        {"video": good, "caption": "one frame window", "start": 0.0, "end": 0.1},
    ]
    m = tmp_path / "bad.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(m), {0, 1, 2, 3, 5}


def test_bad_videos_are_skipped_and_counted(written, tmp_path):
    m, bad = _bad_manifest(written, tmp_path)
    with pytest.warns(SkippedVideoWarning) as rec:
        ds = VideoDataset(m, num_frames=3, size=SIZE)  # the probe reaches the good row 4
    text = " ".join(str(w.message) for w in rec)
    for reason in ("missing.mp4", "corrupt.mp4", "truncated.mp4", "too short"):
        assert reason in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedVideoWarning)  # row 5 is new: it must warn
        with pytest.raises(SkippedVideoWarning, match=r"too short: the window \[0.000, 0.100\) s holds 0.8 frame"):
            ds[5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedVideoWarning)
        items = [ds[i] for i in range(6)]
    assert all(it["index"] == 4 for it in items) and all(it["caption"] == "a good clip" for it in items)
    assert ds.bad == bad and ds.skipped >= len(bad)
    # the counter is shared with DataLoader worker processes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedVideoWarning)
        fresh = VideoDataset(m, num_frames=3, size=SIZE)
        loader = build_loader(fresh, 3, train=False, num_workers=1, tokenizer=Tokenizer.train(["a good clip"], 200))
        batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 6 and fresh.skipped >= 5


def test_manifest_without_readable_video(written, tmp_path):
    m, _ = _bad_manifest(written, tmp_path)
    rows = [json.loads(line) for line in open(m)]
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedVideoWarning)
        with pytest.raises(ValueError, match=r"no readable video in manifest .*only_bad.jsonl \(4 entries tried"):
            VideoDataset(only_bad, num_frames=3)
        ds = VideoDataset(only_bad, num_frames=3, check=False)
        with pytest.raises(RuntimeError, match="no readable video found for index 2"):
            ds[2]


@pytest.mark.parametrize(
    "name,content,err,match",
    [
        ("m.csv", "path,text\nx.mp4,hello\n", ValueError, "must name columns 'video' and 'caption'"),
        ("m.jsonl", '{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4"\n', ValueError, "line 2: not valid JSON"),
        ("m.jsonl", '{"video": "a.mp4"}\n', ValueError, "line 1: 'caption' must be a non-empty string"),
        ("m.jsonl", '{"video": "", "caption": "x"}\n', ValueError, "line 1: 'video' must be a non-empty path"),
        ("m.csv", "video,caption,start,end\na.mp4,x,2,1\n", ValueError, r"line 2: 'end' \(1.0\) must be greater"),
        ("m.csv", "video,caption,start\na.mp4,x,soon\n", ValueError, "'start' must be a number of seconds"),
        ("m.jsonl", '{"video": "a.mp4", "caption": "x", "label": "cat"}\n', ValueError, "'label' must be an integer"),
        ("m.csv", "video,caption\n", ValueError, "no rows"),
        ("m.txt", "video,caption\n", ValueError, "expected a .csv or .jsonl file"),
    ],
)
def test_malformed_manifests(tmp_path, name, content, err, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(err, match=match):
        read_manifest(tmp_path / name)


def test_csv_manifest_relative_paths_and_labels(written, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    rel = os.path.relpath(written["dir"] / "train" / "000003.mp4", sub)
    (sub / "m.csv").write_text(
        f"video,caption,split\n{rel},same words,train\n{rel},other words,train\n{rel},same words,val\n"
        f"{rel},same words,train\n"
    )
    ds = VideoDataset(sub / "m.csv", split="train", num_frames=2, size=SIZE)
    assert len(ds) == 3 and ds.labels == [0, 1, 0]
    assert ds[2]["caption"] == "same words" and ds[2]["video"].shape == (2, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match="no 'split' field; split 'val' uses all 1 entries"):
        VideoDataset([ManifestEntry(video=ds.entries[0].video, captions=["c"])], split="val", num_frames=2)


# ---- shards ------------------------------------------------------------------------------------


def test_expand_pattern(tmp_path):
    assert expand_pattern("s/{000..003}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar", "s/003.tar"]
    assert expand_pattern("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_pattern("x.tar::y/{0..1}.tar") == ["x.tar", "y/0.tar", "y/1.tar"]
    for n in ("b.tar", "a.tar"):
        (tmp_path / n).write_bytes(b"")
    assert expand_pattern(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert compact_pattern(["d/007.tar", "d/008.tar", "d/009.tar"]) == "d/{007..009}.tar"
    with pytest.raises(ValueError, match="empty range"):
        expand_pattern("{5..1}.tar")
    with pytest.raises(FileNotFoundError, match="2 of 3 shards .* are missing"):
        ShardDataset(str(tmp_path / "{a,c,d}.tar"))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """12 synthetic clips (4 frames, 16 px, audio) in 6 shards of 2, and the same in 2 shards of 6."""
    out = tmp_path_factory.mktemp("shards")
    gen = SyntheticVideoText("train", num_clips=12, frames=4, size=16, fps=4.0, audio=True, motions=("left", "up"))
    small = write_shards(gen, str(out / "a/{000..099}.tar"), 2)
    big = write_shards(gen, str(out / "b/{0..1}.tar"), 6)
    return {"gen": gen, "small": compact_pattern(small), "big": compact_pattern(big), "paths": small}


def test_shard_layout_and_roundtrip(shard_set):
    assert shard_set["small"].endswith("a/{000..005}.tar")
    with tarfile.open(shard_set["paths"][1]) as t:
        assert t.getnames() == [f"00000000{k}.{e}" for k in (2, 3) for e in ("mp4", "txt", "json")]
        meta = json.loads(t.extractfile("000000003.json").read())
        assert meta["index"] == 3 and meta["split"] == "train" and meta["label"] == shard_set["gen"].label(3)
        assert t.extractfile("000000003.txt").read().decode() == shard_set["gen"].render(3)["captions"][0]
    ds = ShardDataset(shard_set["small"], num_frames=4, size=16, audio=True)
    items = list(ds)
    assert len(ds) == 12 and [it["index"] for it in items] == list(range(12))  # eval: in order, once each
    for it in items:
        raw = shard_set["gen"].render(it["index"])
        assert _closest_frames(it["video"], raw["frames"]) == [0, 1, 2, 3]
        assert _mean_err(it["video"], raw["frames"]) < 0.04
        assert it["caption"] == raw["captions"][0] and it["label"] == raw["label"] and it["audio"].shape == (SR,)
    with pytest.raises(ValueError, match="too few for the data"):
        write_shards(shard_set["gen"], str(shard_set["paths"][0]) + "{0..1}.tar", 2)


def _epoch(spec, *, rank=0, world=1, epoch=0, train=True, workers=0, tok=None, start=None, batch=2):
    loader = build_loader(
        spec,
        batch,
        train=train,
        rank=rank,
        world_size=world,
        epoch=epoch,
        seed=5,
        num_workers=workers,
        tokenizer=tok,
        num_frames=2,
        size=16,
    )
    if start is not None:
        loader.load_state_dict({"epoch": epoch, "batch": start})
    return [b["index"].tolist() for b in loader], len(loader)


def test_shards_split_over_ranks_and_shuffle_per_epoch(shard_set, tok):
    # 2 ranks: by shard (6 shards >= 2 readers), and by sample (2 shards < 4 readers with 2 workers each)
    # (batches are made per worker: 3 samples per worker and a batch of 3 lose nothing to drop_last)
    for spec, workers, batch in ((shard_set["small"], 0, 2), (shard_set["big"], 2, 3)):
        ranks = [_epoch(spec, rank=r, world=2, workers=workers, tok=tok, batch=batch) for r in range(2)]
        seen = [sum(b, []) for b, _ in ranks]
        assert len(seen[0]) == len(seen[1]) == 6 and ranks[0][1] == ranks[1][1] == len(ranks[0][0])
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(12))
    e0, _ = _epoch(shard_set["small"], tok=tok)
    assert e0 == _epoch(shard_set["small"], tok=tok)[0] and sorted(sum(e0, [])) == list(range(12))
    e1, _ = _epoch(shard_set["small"], epoch=1, tok=tok)
    assert e1 != e0 and sorted(sum(e1, [])) == list(range(12))
    assert sum(e0, []) != list(range(12))  # shuffled


def test_shards_workers_and_resume(shard_set, tok):
    full, n = _epoch(shard_set["small"], workers=2, tok=tok)
    assert n == len(full) == 6 and sorted(sum(full, [])) == list(range(12))
    rest, _ = _epoch(shard_set["small"], workers=2, tok=tok, start=4)
    assert rest == full[4:]
    full0, _ = _epoch(shard_set["small"], epoch=2, tok=tok)
    assert _epoch(shard_set["small"], epoch=2, tok=tok, start=3)[0] == full0[3:]


def test_corrupt_shard_sample_is_skipped(shard_set, tmp_path):
    gen = shard_set["gen"]
    good = encode_mp4_bytes(gen.render(0)["frames"], 4.0)
    samples = [{"mp4": good, "captions": ["fine"], "label": 0}, {"mp4": b"not a video", "captions": ["broken"]}]
    samples += [{"mp4": good, "captions": ["fine too"], "label": 1}]
    paths = write_shards(samples, str(tmp_path / "{0..0}.tar"), 10)
    ds = ShardDataset(paths, num_frames=2, size=16)
    with pytest.warns(SkippedVideoWarning, match="skipping shard sample 000000001"):
        items = list(ds)
    assert len(items) == 3 and ds.skipped == 1  # the quota is still met (the stream wraps around)
    assert [it["caption"] for it in items] == ["fine", "fine too", "fine"]


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_data_synth_and_shards(tmp_path, capsys, tok):
    from fastvl.cli import main

    out = tmp_path / "clips"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--num",
                "4",
                "--num-val",
                "2",
                "--frames",
                "4",
                "--size",
                "16",
                "--paraphrases",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 6 clips (train 4, val 2)" in printed and "video libx264, audio aac" in printed
    manifest = str(out / "manifest.jsonl")
    assert len(read_manifest(manifest)) == 6
    pattern = str(tmp_path / "sh" / "{000..009}.tar")
    assert main(["data", "shards", "--data", manifest, "--out", pattern, "--per-shard", "3", "--split", "train"]) == 0
    assert "wrote 2 shards: " + str(tmp_path / "sh" / "{000..001}.tar") in capsys.readouterr().out
    loader = build_loader(
        str(tmp_path / "sh" / "{000..001}.tar"), 2, train=True, tokenizer=tok, audio=True, paraphrases=2, num_frames=3
    )
    b = next(iter(loader))
    assert b["video"].shape == (2, 3, 3, 32, 32) and b["audio"].shape == (2, 8000)
    assert b["text_ids_all"].shape == (2, 2, 16) and b["label"].dtype == torch.int64
    val = build_loader(manifest, 2, train=False, tokenizer=tok, num_frames=3)
    assert len(val.dataset) == 2 and len(val) == 1
    assert (
        main(
            [
                "data",
                "shards",
                "--data",
                "synthetic",
                "--num",
                "3",
                "--frames",
                "4",
                "--size",
                "16",
                "--out",
                str(tmp_path / "sy" / "{0..9}.tar"),
                "--per-shard",
                "2",
            ]
        )
        == 0
    )
    assert "wrote 2 shards" in capsys.readouterr().out


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu(written, tok):
    loader = build_loader(written["manifest"], 4, train=True, tokenizer=tok, num_workers=2, size=224, num_frames=3)
    assert loader._dl_kwargs["pin_memory"]
    b = next(iter(loader))
    assert b["video"].is_pinned() and b["text_ids"].is_pinned()
    v = b["video"].to("cuda", non_blocking=True)
    assert v.shape == (4, 3, 3, 224, 224) and torch.isfinite(v).all()


def test_decode_from_memory(written):
    data = open(read_manifest(written["manifest"])[0].video, "rb").read()
    from fastvl.data import decode_clip

    frames, audio, has_audio = decode_clip(
        io.BytesIO(data),
        num_frames=2,
        size=16,
        train=False,
        rng=np.random.default_rng(0),
        audio_rate=SR,
        audio_samples=100,
    )
    assert frames.shape == (2, 16, 16, 3) and frames.dtype == np.uint8 and audio.shape == (100,) and has_audio


def test_uneven_shards_keep_ranks_in_step(shard_set, tok, tmp_path):
    """13 samples in 7 shards (the last holds 1), 2 ranks x 2 workers: both ranks run the same number of
    batches (DDP lockstep), read disjoint shards, and each batch count matches what the loader announces."""
    gen = SyntheticVideoText("train", num_clips=13, frames=2, size=16, fps=2.0, motions=("left",))
    paths = write_shards(gen, str(tmp_path / "{00..09}.tar"), 2)
    assert len(paths) == 7
    spec = compact_pattern(paths)
    for epoch in (0, 1):
        runs = [_epoch(spec, rank=r, world=2, workers=2, tok=tok, epoch=epoch) for r in range(2)]
        (b0, n0), (b1, n1) = runs
        assert n0 == n1 == len(b0) == len(b1) > 0
        seen = [set(sum(b, [])) for b in (b0, b1)]
        assert not seen[0] & seen[1]
