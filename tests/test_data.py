"""fastvl.data without video files: the synthetic generator, the tokenizer, the sampler and the loader contract."""

import math
import pickle

import numpy as np
import pytest
import torch

from fastvl.data import (
    DistributedSampler,
    SyntheticConfig,
    SyntheticVideoText,
    Tokenizer,
    build_loader,
    caption,
    denormalize,
    open_dataset,
    spec_kind,
)
from fastvl.data.synthetic import COLORS, MOTIONS

# ---- synthetic generator -----------------------------------------------------------------------


def _centroid(mask: np.ndarray, size: int) -> tuple[float, float, int]:
    """Circular-mean centroid (x, y) of a boolean mask on the torus, and its area."""
    ys, xs = np.nonzero(mask)

    def circ(v):
        a = 2 * np.pi * (v + 0.5) / size
        return (math.atan2(np.sin(a).mean(), np.cos(a).mean()) * size / (2 * np.pi)) % size

    return circ(xs), circ(ys), int(mask.sum())


def _torus_delta(a: float, b: float, size: int) -> float:
    return (b - a + size / 2) % size - size / 2


def test_synthetic_item_contract():
    ds = SyntheticVideoText("train", num_clips=10, frames=3, size=32, audio=True, audio_rate=8000, paraphrases=3)
    assert len(ds) == 10
    it = ds[7]
    assert it["video"].dtype == torch.float32 and it["video"].shape == (3, 3, 32, 32)
    assert it["audio"].dtype == torch.float32 and it["audio"].shape == (8000,)  # 3 frames at 3 fps = 1 s
    assert float(it["audio"].abs().max()) <= 1.0 and float(it["audio"].std()) > 0.05
    assert it["index"] == 7 and 0 <= it["label"] < ds.config.num_labels
    assert len(it["captions"]) == 3 and len(set(it["captions"])) == 3 and it["caption"] == it["captions"][0]
    color, shape, motion = ds.decode_label(it["label"])
    assert it["caption"] == caption(color, shape, motion)
    # normalisation is CLIP's: undoing it gives the rendered uint8 frames
    raw = torch.from_numpy(ds.render(7)["frames"]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(denormalize(it["video"]), raw, atol=1e-5, rtol=0)
    assert ds[-3]["index"] == 7
    with pytest.raises(IndexError, match="out of range"):
        ds[10]


def test_cached_items_equal_generated_ones():
    plain = SyntheticVideoText("val", num_clips=5, size=16, audio=True, paraphrases=2)
    cached = open_dataset("synthetic", "val", num_clips=5, size=16, audio=True, paraphrases=2, cache=True)
    for _ in range(2):
        for i in (4, 0, 4):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and a["captions"] == b["captions"] and a["label"] == b["label"]
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert sorted(cached._cache) == [0, 4]


def test_captions_name_colour_shape_motion():
    assert caption("red", "triangle", "left") == "a red triangle moves to the left"
    assert caption("orange", "square", "grow") == "an orange square grows"
    assert caption("blue", "circle", "up", 1) == "the blue circle is moving upward"
    ds = SyntheticVideoText("train", num_clips=4, paraphrases=5)
    caps = ds.captions()
    assert len(caps) == ds.config.num_labels * 5
    for lab in range(ds.config.num_labels):
        c, s, m = ds.decode_label(lab)
        for text in ds.captions_for(lab):
            assert c in text and s in text


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a = SyntheticVideoText("train", num_clips=20, size=24, audio=True)
    b = SyntheticVideoText("train", num_clips=20, size=24, audio=True)
    for i in (0, 5, 19):
        ra, rb = a.render(i), b.render(i)
        assert np.array_equal(ra["frames"], rb["frames"]) and np.array_equal(ra["audio"], rb["audio"])
    other_seed = SyntheticVideoText("train", num_clips=20, size=24, seed=1)
    assert not np.array_equal(a.render(0)["frames"], other_seed.render(0)["frames"])
    held = SyntheticVideoText("val", num_clips=20, size=24)
    train_pos = {(round(a.params(i)["x"][0], 6), round(a.params(i)["y"][0], 6)) for i in range(20)}
    val_pos = {(round(held.params(i)["x"][0], 6), round(held.params(i)["y"][0], 6)) for i in range(20)}
    assert not train_pos & val_pos
    # the default split sizes
    assert len(SyntheticVideoText("train")) == 1024 and len(SyntheticVideoText("val")) == 256


def test_rendered_motion_matches_caption():
    """Measured from the pixels: the shape of the named colour moves/grows as the caption says."""
    S = 32
    ds = SyntheticVideoText("val", num_clips=60, frames=4, size=S)
    seen = set()
    for i in range(len(ds)):
        raw = ds.render(i)
        color, shape, motion = ds.decode_label(raw["label"])
        seen.add(motion)
        mask = np.abs(raw["frames"] / 255.0 - np.array(COLORS[color])).max(-1) < 0.12
        cents = [_centroid(mask[t], S) for t in range(4)]
        assert all(c[2] > 0 for c in cents), f"clip {i}: the {color} shape is not visible in every frame"
        dx = _torus_delta(cents[0][0], cents[-1][0], S)
        dy = _torus_delta(cents[0][1], cents[-1][1], S)
        grow = cents[-1][2] / cents[0][2]
        expect = {
            "left": dx < -4 and abs(dy) < 1.5,
            "right": dx > 4 and abs(dy) < 1.5,
            "up": dy < -4 and abs(dx) < 1.5,
            "down": dy > 4 and abs(dx) < 1.5,
            "grow": grow > 1.25 and abs(dx) < 1.5 and abs(dy) < 1.5,
            "shrink": grow < 1 / 1.25 and abs(dx) < 1.5 and abs(dy) < 1.5,
        }[motion]
        assert expect, f"clip {i} '{raw['captions'][0]}': dx={dx:.2f} dy={dy:.2f} area ratio={grow:.2f}"
    assert seen == set(MOTIONS)


def _best_threshold_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Accuracy of the best single-threshold classifier separating samples a from samples b."""
    v = np.concatenate([a, b])
    y = np.concatenate([np.ones(len(a)), np.zeros(len(b))])[np.argsort(v)]
    below_a, below_b = np.cumsum(y), np.cumsum(1 - y)
    acc = (below_a + (len(b) - below_b)) / len(v)
    return float(max(acc.max(), 1 - acc.min()))


def test_single_frame_does_not_reveal_motion():
    """Over 6000 clips: at every frame, positions of left- vs right-moving (up vs down) shapes are equally
    distributed (uniform on the torus); sizes of growing vs shrinking shapes are identical at the middle frame
    and overlap heavily at the ends. Two frames separate them perfectly."""
    from scipy import stats

    S, T = 32, 3
    ds = SyntheticVideoText("train", num_clips=6000, frames=T, size=S)
    by: dict[str, list] = {m: [] for m in MOTIONS}
    for i in range(len(ds)):
        p = ds.params(i)
        by[p["motion"]].append(p)
    for t in range(T):
        for a, b, axis in (("left", "right", "x"), ("up", "down", "y")):
            va = np.array([p[axis][t] for p in by[a]])
            vb = np.array([p[axis][t] for p in by[b]])
            assert stats.ks_2samp(va, vb).pvalue > 1e-3
            assert stats.kstest(va / S, "uniform").pvalue > 1e-3
            assert _best_threshold_accuracy(va, vb) < 0.56
        rg = np.log([p["r"][t] for p in by["grow"]])
        rs = np.log([p["r"][t] for p in by["shrink"]])
        assert _best_threshold_accuracy(rg, rs) < (0.56 if t == T // 2 else 0.76)
    # two frames tell them apart exactly
    assert all(p["r"][1] > p["r"][0] for p in by["grow"]) and all(p["r"][1] < p["r"][0] for p in by["shrink"])


def test_audio_follows_colour_shape_and_motion():
    sr = 8000
    ds = SyntheticVideoText("train", num_clips=400, frames=3, size=16, audio=True, audio_rate=sr)
    peaks: dict[tuple[str, str], list[float]] = {}
    checked = set()
    for i in range(len(ds)):
        p = ds.params(i)
        a = ds.render(i)["audio"].astype(np.float64)
        half = len(a) // 2
        if p["motion"] == "left" or p["motion"] == "right":
            # pitch sweep: the spectral peak of the second half is lower (left) / higher (right)
            f1 = np.argmax(np.abs(np.fft.rfft(a[:half] * np.hanning(half))))
            f2 = np.argmax(np.abs(np.fft.rfft(a[half:] * np.hanning(len(a) - half))))
            assert (f2 < f1) if p["motion"] == "left" else (f2 > f1), (i, f1, f2)
        elif p["motion"] in ("grow", "shrink"):
            r1, r2 = np.sqrt((a[:half] ** 2).mean()), np.sqrt((a[half:] ** 2).mean())
            assert (r2 > 1.5 * r1) if p["motion"] == "grow" else (r1 > 1.5 * r2), (i, r1, r2)
            spec = np.abs(np.fft.rfft(a * np.hanning(len(a))))
            peaks.setdefault((p["color"], p["shape"]), []).append(np.argmax(spec) * sr / len(a))
        else:
            # rhythm: count envelope pulses per second (fast for up, slow for down)
            env = np.sqrt(np.convolve(a**2, np.ones(200) / 200, mode="same"))
            pulses, high = 0, False
            for v in env / env.max():  # rising edges with hysteresis
                if not high and v > 0.6:
                    pulses, high = pulses + 1, True
                elif high and v < 0.3:
                    high = False
            assert (pulses >= 6) if p["motion"] == "up" else (1 <= pulses <= 4), (i, p["motion"], pulses)
        checked.add(p["motion"])
    assert checked == set(MOTIONS)
    # constant-pitch clips: the same (colour, shape) shares a pitch (within the 1.5% jitter), others differ
    means = {k: np.mean(v) for k, v in peaks.items()}
    for k, v in peaks.items():
        assert np.ptp(v) <= 0.04 * means[k] + 2
    vals = sorted(means.values())
    assert len(vals) >= 10 and min(np.diff(vals)) > 0


def test_synthetic_config_errors():
    with pytest.raises(ValueError, match="'frames' must be >= 2"):
        SyntheticConfig(frames=1)
    with pytest.raises(ValueError, match="'colors' must be distinct names"):
        SyntheticConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="'size' must be >= 8"):
        SyntheticConfig(size=4)
    with pytest.raises(ValueError, match="'split' must be one of"):
        SyntheticVideoText("dev")
    small = SyntheticVideoText("train", num_clips=8, colors=("red", "blue"), shapes=("circle",), motions=("up", "down"))
    assert small.config.num_labels == 4
    assert {small.decode_label(small[i]["label"])[0] for i in range(8)} <= {"red", "blue"}


def test_synthetic_radius_and_travel():
    """radius / travel set the shape's mid-clip radius and its displacement over the clip (fractions of size)."""
    S = 40
    ds = SyntheticVideoText("train", num_clips=64, size=S, frames=3, radius=(0.2, 0.3), travel=(0.42, 0.45))
    moved = 0
    for i in range(len(ds)):
        p = ds.params(i)
        assert 0.2 * S - 1e-9 <= p["r"][1] <= 0.3 * S + 1e-9
        if p["motion"] in ("left", "right", "up", "down"):
            a = p["x"] if p["motion"] in ("left", "right") else p["y"]
            d = abs(_torus_delta(a[0], a[-1], S))
            assert 0.42 * S - 1e-6 <= d <= 0.45 * S + 1e-6, (i, p["motion"], d)
            moved += 1
    assert moved > 10
    for bad in ((0.3, 0.2), (0.0, 0.1), (0.1, 0.5), (0.1,)):
        with pytest.raises(ValueError, match="'travel' must be \\(low, high\\) fractions of size"):
            SyntheticConfig(travel=bad)
    with pytest.raises(ValueError, match="'radius' must be"):
        SyntheticConfig(radius=(0.2, 0.1))


# ---- tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(SyntheticVideoText("train", num_clips=1, paraphrases=8).captions(), vocab_size=300)


def test_tokenizer_specials_and_layout(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert 150 <= tok.vocab_size <= 300
    texts = ["a red triangle moves to the left", "The BLUE circle grows", "a purple zebra juggles"]
    ids, mask = tok.encode(texts, max_len=12)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 12)
    n = mask.sum(1)
    assert n.tolist() == [min(len(tok.tokenize(t)) + 2, 12) for t in texts] and n[2] == 12  # the last is cut
    assert (ids[:, 0] == tok.cls_id).all() and (ids[torch.arange(3), n - 1] == tok.sep_id).all()
    assert (ids[~mask] == 0).all() and (ids[mask] != 0).all()
    assert tok.decode(ids[0]) == texts[0] and tok.decode(ids[1]) == texts[1].lower()
    # words never seen in training split into pieces instead of becoming [UNK]
    assert (ids[2][mask[2]] != tok.unk_id).all() and len(tok.tokenize("zebra")) > 1
    # truncation keeps [CLS] ... [SEP]
    ids, mask = tok.encode(["one two three four five six seven eight"], max_len=5)
    assert mask.all() and ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id
    with pytest.raises(ValueError, match="'max_len' must be an int >= 2"):
        tok.encode(["a"], max_len=1)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("a red square")


def test_tokenizer_training_is_deterministic_save_load_pickle(tok, tmp_path):
    again = Tokenizer.train(SyntheticVideoText("train", num_clips=1, paraphrases=8).captions(), vocab_size=300)
    texts = ["a red triangle moves to the left", "the green cross is shrinking", "unseen words here"]
    ref = tok.encode(texts, 16)
    assert torch.equal(again.encode(texts, 16)[0], ref[0])
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").is_file() and (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = Tokenizer.load(tmp_path / "tok")
    assert torch.equal(loaded.encode(texts, 16)[0], ref[0]) and loaded.vocab_size == tok.vocab_size
    # the vocab.txt alone (BERT format) gives the same ids
    from_vocab = Tokenizer.load(tmp_path / "tok" / "vocab.txt")
    assert torch.equal(from_vocab.encode(texts, 16)[0], ref[0])
    assert torch.equal(pickle.loads(pickle.dumps(tok)).encode(texts, 16)[0], ref[0])


def test_tokenizer_loads_a_bert_vocab(tmp_path):
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["a", "red", "square", "moves", "left", "to", "the", "##s", "move"]
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    t = Tokenizer.load(d)
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 100, 101, 102, 103)
    ids, mask = t.encode(["A red square moves to the LEFT", "a blue square"], max_len=10)
    w = {tok: i for i, tok in enumerate(words)}
    assert ids[0, :9].tolist() == [101, w["a"], w["red"], w["square"], w["moves"], w["to"], w["the"], w["left"], 102]
    assert ids[1, :5].tolist() == [101, w["a"], 100, w["square"], 102] and mask[1].sum() == 5
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nred\n")
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        Tokenizer.load(bad)
    (bad / "vocab.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="'\\[PAD\\]' must have id 0, got 1"):
        Tokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        Tokenizer.load(tmp_path / "bert-base-uncased")  # a hub name is never fetched


# ---- sampler and loader -----------------------------------------------------------------------


def test_distributed_sampler():
    n, W = 103, 4
    train = [DistributedSampler(n, rank=r, world_size=W, shuffle=True, seed=3) for r in range(W)]
    parts = [list(s) for s in train]
    assert all(len(p) == n // W == len(s) for p, s in zip(parts, train))
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) == (n // W) * W
    again = [list(DistributedSampler(n, rank=r, world_size=W, shuffle=True, seed=3)) for r in range(W)]
    assert again == parts
    for s in train:
        s.set_epoch(1)
    assert [list(s) for s in train] != parts
    ev = [list(DistributedSampler(n, rank=r, world_size=W, shuffle=False, drop_last=False)) for r in range(W)]
    assert sorted(i for p in ev for i in p) == list(range(n)) and ev[1][:3] == [1, 5, 9]
    s = DistributedSampler(n, rank=1, world_size=W, shuffle=True, seed=3)
    s.start = 5
    assert list(s) == parts[1][5:] and len(s) == len(parts[1]) - 5
    with pytest.raises(ValueError, match="'rank' must be in"):
        DistributedSampler(n, rank=4, world_size=4, shuffle=False)


def test_loader_batch_contract(tok):
    loader = build_loader(
        "synthetic", 6, train=True, tokenizer=tok, audio=True, paraphrases=3, num_clips=40, max_len=16
    )
    assert len(loader) == 40 // 6
    b = next(iter(loader))
    expect = {
        "video": ((6, 3, 3, 32, 32), torch.float32),
        "text_ids": ((6, 16), torch.int64),
        "text_mask": ((6, 16), torch.bool),
        "audio": ((6, 8000), torch.float32),
        "text_ids_all": ((6, 3, 16), torch.int64),
        "text_mask_all": ((6, 3, 16), torch.bool),
        "label": ((6,), torch.int64),
        "index": ((6,), torch.int64),
    }
    assert set(b) == set(expect) | {"caption"}
    for k, (shape, dtype) in expect.items():
        assert tuple(b[k].shape) == shape and b[k].dtype == dtype, k
    assert isinstance(b["caption"], list) and len(b["caption"]) == 6
    assert torch.equal(b["text_ids"], b["text_ids_all"][:, 0]) and torch.equal(b["text_mask"], b["text_mask_all"][:, 0])
    ds = loader.dataset
    for j in range(6):
        i = int(b["index"][j])
        assert b["caption"][j] == ds[i]["caption"] and int(b["label"][j]) == ds.label(i)
        assert torch.equal(b["video"][j], ds[i]["video"])
        assert torch.equal(b["text_ids"][j], tok.encode([ds[i]["caption"]], 16)[0][0])
    # P == 1: no *_all keys, no audio unless asked
    b1 = next(iter(build_loader("synthetic", 4, train=False, tokenizer=tok, num_clips=8)))
    assert "text_ids_all" not in b1 and "audio" not in b1 and b1["index"].tolist() == [0, 1, 2, 3]


def test_loader_epochs_ranks_and_resume(tok):
    kw = dict(tokenizer=tok, num_clips=50, size=16)
    full = build_loader("synthetic", 4, train=True, seed=1, **kw)
    e0 = [b["index"].tolist() for b in full]
    assert len(e0) == len(full) == 12
    assert e0 == [b["index"].tolist() for b in full]  # same epoch, same order
    full.set_epoch(1)
    e1 = [b["index"].tolist() for b in full]
    assert e1 != e0 and len(e1) == 12 and len(set(sum(e1, []))) == 48
    # two ranks: disjoint halves of the same permutation, equal batch counts
    r = [build_loader("synthetic", 4, train=True, seed=1, rank=k, world_size=2, **kw) for k in range(2)]
    idx = [sum((b["index"].tolist() for b in ld), []) for ld in r]
    assert len(r[0]) == len(r[1]) == 6 and not set(idx[0]) & set(idx[1])
    # resume after 5 batches of epoch 1 reproduces the rest of that epoch
    part = build_loader("synthetic", 4, train=True, seed=1, epoch=1, **kw)
    it = iter(part)
    got = [next(it)["index"].tolist() for _ in range(5)]
    state = part.state_dict()
    assert state == {"epoch": 1, "batch": 5} and got == e1[:5]
    resumed = build_loader("synthetic", 4, train=True, seed=1, **kw)
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for b in resumed]
    assert rest == e1[5:] and resumed.state_dict() == {"epoch": 1, "batch": 12}
    # the next full pass starts at the beginning again
    assert [b["index"].tolist() for b in resumed] == e1


def test_open_dataset_specs_and_errors(tmp_path):
    ds = open_dataset("synthetic", "val", num_frames=4, size=16, audio=True, audio_seconds=0.5, num_clips=3)
    assert ds.split == "val" and len(ds) == 3 and ds[0]["video"].shape == (4, 3, 16, 16)
    assert ds[0]["audio"].shape == (4000,)
    assert spec_kind("synthetic") == "synthetic" and spec_kind("a/b.csv") == "manifest"
    assert spec_kind("x/m.jsonl") == "manifest" and spec_kind("s/{000..009}.tar") == "shards"
    assert spec_kind("s/000.tar") == "shards"
    with pytest.raises(ValueError, match="cannot tell what 'videos/' is"):
        open_dataset("videos/")
    with pytest.raises(ValueError, match="'split' must be one of"):
        open_dataset("synthetic", "dev")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        open_dataset(str(tmp_path / "none.csv"))
    with pytest.raises(ValueError, match="'batch_size' must be a positive int"):
        build_loader("synthetic", 0, train=True)


def test_tokenizer_wordpiece_trainer_option():
    caps = SyntheticVideoText("train", num_clips=1, paraphrases=8).captions()
    t = Tokenizer.train(caps, vocab_size=400, algorithm="wordpiece")
    assert (t.pad_id, t.cls_id, t.mask_id) == (0, 2, 4) and t.vocab_size <= 400
    ids, mask = t.encode(["a red triangle moves to the left"], 16)
    assert t.decode(ids[0]) == "a red triangle moves to the left" and (ids[mask] != t.unk_id).all()
    with pytest.raises(ValueError, match="'algorithm' must be 'words' or 'wordpiece'"):
        Tokenizer.train(caps, algorithm="bpe")
    with pytest.raises(ValueError, match="'vocab_size' must be an int > 141"):
        Tokenizer.train(caps, vocab_size=100)
