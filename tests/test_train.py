"""The training loop, with a small model that follows the models' contract (forward(batch) -> losses,
encode_video / encode_text) and a deterministic toy dataset."""

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastvl.train import checkpoint as ckpt
from fastvl.train.attributes import attribute_accuracy, pair_attribute_accuracy
from fastvl.train.loop import Components, NonFiniteLoss, TrainConfig, train
from fastvl.train.retrieval import chance_levels, retrieval_metrics

N_LABELS, T, HW, LT = 8, 2, 4, 5


def toy_item(i: int) -> dict:
    g = torch.Generator().manual_seed(1000 + i)
    label = i % N_LABELS
    video = torch.randn(T, 3, HW, HW, generator=g) * 0.5
    video[:, 0, 0, label % HW] += 2.0
    video[:, 1, label // HW, 0] += 2.0
    ids = torch.tensor([1, 2 + label, 2 + (label + 3) % N_LABELS, 0, 0])
    return {"video": video, "text_ids": ids, "text_mask": ids > 0, "label": label, "index": i}


def collate(items):
    out = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    return out


class ToyModel(torch.nn.Module):
    """Dual encoder with dropout (random state matters) and a distributed-aware symmetric InfoNCE."""

    def __init__(self, nan_at_call: int | None = None, crash_at_call: int | None = None, dropout: float = 0.1):
        super().__init__()
        self.v = torch.nn.Linear(T * 3 * HW * HW, 16)
        self.emb = torch.nn.Embedding(2 + N_LABELS, 16)
        self.t = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(dropout)
        self.scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.calls, self.nan_at_call, self.crash_at_call = 0, nan_at_call, crash_at_call

    def encode_video(self, video):
        return torch.nn.functional.normalize(self.v(self.drop(video.flatten(1))), dim=-1)

    def encode_text(self, ids, mask):
        e = (self.emb(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(self.t(self.drop(e)), dim=-1)

    def forward(self, batch):
        self.calls += 1
        if self.crash_at_call is not None and self.calls == self.crash_at_call:
            raise KeyboardInterrupt("simulated crash")
        v = self.encode_video(batch["video"])
        t = self.encode_text(batch["text_ids"], batch["text_mask"])
        if torch.distributed.is_initialized():
            import torch.distributed.nn.functional as dnn

            v, t = torch.cat(dnn.all_gather(v)), torch.cat(dnn.all_gather(t))
        logits = self.scale.exp() * v @ t.T
        labels = torch.arange(v.shape[0])
        loss = (
            torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "loss_vtc": loss.detach()}


def make_build(n_train=64, model_kw=None):
    def build(cfg, info):
        torch.manual_seed(123)  # same init on every rank and every run
        model = ToyModel(**(model_kw or {}))
        per_rank = n_train // info.world_size

        def make_loader(epoch, skip):
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            perm = torch.randperm(n_train, generator=g)[info.rank * per_rank : (info.rank + 1) * per_rank].tolist()
            nb = len(perm) // cfg.batch_size
            for b in range(skip, nb):
                yield collate([toy_item(i) for i in perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]])

        def eval_batches():
            for s in range(0, 32, 16):
                yield collate([toy_item(10_000 + i) for i in range(s, s + 16)])

        return Components(model, make_loader, per_rank // cfg.batch_size, eval_batches, cfg.batch_size)

    return build


def read_losses(run_dir):
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval" not in r:
                by_step[r["step"]] = r["loss"]
    return by_step


def cfg(tmp_path, name, **kw):
    base = dict(
        out=str(tmp_path / name), steps=12, batch_size=8, lr=3e-3, log_every=1, progress=False, warmup=2, eval=False
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted(tmp_path):
    a = train(cfg(tmp_path, "a", ckpt_every=4), make_build())
    assert a["steps"] == 12 and a["skipped_steps"] == 0
    with pytest.raises(KeyboardInterrupt):  # crash inside step 11 (after the checkpoint of step 8)
        train(cfg(tmp_path, "b", ckpt_every=4), make_build(model_kw={"crash_at_call": 12}))
    assert ckpt.latest(str(tmp_path / "b")).endswith("ckpt-0000008")
    train(cfg(tmp_path, "b", ckpt_every=4, resume=True), make_build())
    la, lb = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert all(la[s] == lb[s] for s in la), (la, lb)  # bit-identical curve after resume
    wa = torch.load(os.path.join(ckpt.latest(str(tmp_path / "a")), "state.pt"), weights_only=True)
    assert wa["consumed"] == 12  # 64 clips / batch 8 = 8 batches per epoch -> 1.5 epochs


def test_epoch_rollover_and_accumulation(tmp_path):
    s = train(cfg(tmp_path, "acc", steps=6, grad_accum=2), make_build())
    assert s["steps"] == 6
    st = torch.load(os.path.join(ckpt.latest(s["run_dir"]), "state.pt"), weights_only=True)
    assert st["consumed"] == 12


def test_nan_stops_without_poisoned_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match="step 4: non-finite loss.*last checkpoint at step 3"):
        train(cfg(tmp_path, "nan", ckpt_every=1), make_build(model_kw={"nan_at_call": 5}))
    last = ckpt.latest(str(tmp_path / "nan"))
    assert last.endswith("ckpt-0000003")
    model = ToyModel()
    ckpt.load(last, model)
    assert ckpt.weights_finite(model)


def test_nan_skip_policy(tmp_path):
    s = train(cfg(tmp_path, "skip", on_nan="skip"), make_build(model_kw={"nan_at_call": 5}))
    assert s["skipped_steps"] == 1 and s["steps"] == 12


def test_checkpoint_refuses_nonfinite_and_prunes(tmp_path):
    m = ToyModel()
    for step in (1, 2, 3):
        ckpt.save(str(tmp_path), step, m, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("ckpt-")) == ["ckpt-0000002", "ckpt-0000003"]
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp")]
    with torch.no_grad():
        m.v.weight[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite weights"):
        ckpt.save(str(tmp_path), 4, m)
    assert ckpt.latest(str(tmp_path)).endswith("ckpt-0000003")


def test_learns_and_evaluates_with_outputs(tmp_path):
    s = train(cfg(tmp_path, "ev", steps=40, eval=True, log_every=5), make_build(n_train=128))
    ev = s["eval"]
    assert ev["n"] == 32
    assert ev["t2v"]["R@1"] > ev["chance"]["R@1"] + 20  # toy task: labels are easy to read off
    for f in ("metrics.jsonl", "config.json", "summary.json", "curves.png"):
        assert os.path.exists(tmp_path / "ev" / f), f
    rec = [json.loads(x) for x in open(tmp_path / "ev" / "metrics.jsonl")]
    assert rec[0]["fwd_gflops_per_step"] > 0 and rec[-2]["total_fwd_pflops"] > rec[0]["total_fwd_pflops"]


def test_retrieval_metrics_hand_cases():
    e = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    m = retrieval_metrics(e, e.clone())
    assert m["t2v"]["R@1"] == 100.0 and m["v2t"]["MdR"] == 1.0
    # a constant embedding ranks every wrong item first (ties count against the query)
    c = torch.ones(6, 4) / 2
    m = retrieval_metrics(c, c.clone())
    assert m["t2v"]["R@1"] == 0.0 and m["t2v"]["MdR"] == 6.0
    # labels: items 0 and 1 share a caption, so retrieving either answers both
    v = torch.eye(4)
    t = torch.eye(4)[[1, 0, 2, 3]]
    assert retrieval_metrics(v, t)["t2v"]["R@1"] == 50.0
    assert retrieval_metrics(v, t, torch.tensor([0, 0, 1, 2]))["t2v"]["R@1"] == 100.0


def test_attribute_accuracy_hand_cases():
    # 3 colours x 2 motions = 6 labels, label = colour * 2 + motion
    attrs = {"colour": torch.tensor([0, 0, 1, 1, 2, 2]), "motion": torch.tensor([0, 1, 0, 1, 0, 1])}
    text = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 3, 0])
    m = attribute_accuracy(text[labels], labels, text, attrs)  # a clip's embedding is its own caption's
    assert m["colour"] == {"acc": 100.0, "chance": pytest.approx(100 / 3), "n": 8}
    assert m["motion"]["acc"] == 100.0 and m["motion"]["chance"] == 50.0
    # a clip that sees colour but not motion: the same embedding for both motions of a colour
    colour_only = torch.nn.functional.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    text2 = colour_only[attrs["colour"]]
    m = attribute_accuracy(text2[labels], labels, text2, attrs)
    assert m["colour"]["acc"] == 100.0 and m["motion"]["acc"] == 0.0  # ties count against the clip
    # wrong motion on clips 0 and 1 only (swap the two motion captions of colour 0)
    v = text[labels].clone()
    v[0], v[1] = text[1], text[0]
    m = attribute_accuracy(v, labels, text, attrs)
    assert m["motion"]["acc"] == pytest.approx(100 * 6 / 8)  # clips 0 and 1 now pick the other motion


def test_pair_attribute_accuracy_equals_embedding_probe():
    # 3 colours x 2 shapes x 4 motions; a pair scorer that is a dot product must give the embedding probe
    c, sh, mo = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(4), indexing="ij")
    attrs = {"colour": c.flatten(), "shape": sh.flatten(), "motion": mo.flatten(), "constant": torch.zeros(24)}
    text = torch.nn.functional.normalize(torch.randn(24, 16, dtype=torch.float64), dim=-1)
    labels = torch.randint(24, (50,))
    video = torch.nn.functional.normalize(text[labels] + 0.4 * torch.randn(50, 16, dtype=torch.float64), dim=-1)
    ids, mask = torch.arange(24)[:, None], torch.ones(24, 1, dtype=torch.bool)
    calls = []

    def score(v, i, m):
        calls.append(len(v))
        return (v * text[i[:, 0]]).sum(-1)

    a = attribute_accuracy(video, labels, text, attrs)
    p = pair_attribute_accuracy(score, video, labels, ids, mask, attrs, ("colour", "shape", "motion", "constant"), 7)
    assert sorted(a) == sorted(p) == ["colour", "motion", "shape"]  # a constant attribute is not reported
    assert a == p and 0 < a["motion"]["acc"] < 100 and a["motion"]["chance"] == 25.0
    assert max(calls) <= 7 and sum(calls) == 50 * (3 + 2 + 1 + 3)  # own per attribute + its rivals


def test_chance_levels_exact():
    ch = chance_levels(4, [1, 1, 1, 1], ks=(1, 2, 5))
    assert ch["R@1"] == pytest.approx(25.0) and ch["R@2"] == pytest.approx(50.0) and ch["R@5"] == 100.0
    assert ch["MdR"] == 2.0
    ch = chance_levels(10, [2] * 10, ks=(1,))  # two correct items out of 10
    assert ch["R@1"] == pytest.approx(20.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, q):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    c = TrainConfig(
        out=out_dir,
        steps=4,
        batch_size=4,
        lr=3e-3,
        log_every=1,
        progress=False,
        warmup=0,
        eval=False,
        device="cpu",
        extra={},
    )
    train(c, make_build(n_train=32, model_kw={"dropout": 0.0}))
    from fastvl.train import distributed

    distributed.cleanup()
    if rank == 0:
        q.put(read_losses(out_dir))


@pytest.mark.distributed
def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8 (contrastive features gathered across ranks)."""

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path / "ddp"), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    ddp_losses = q.get(timeout=10)
    # one process, global batch 8, same per-epoch order: rank r takes perm[r*16:(r+1)*16] in batches of 4, so
    # global batch b = perm[4b:4b+4] ++ perm[16+4b:16+4b+4]; build that exact stream
    c = TrainConfig(
        out=str(tmp_path / "single"), steps=4, batch_size=8, lr=3e-3, log_every=1, progress=False, warmup=0, eval=False
    )

    def build(cfg_, info):
        comp = make_build(n_train=32, model_kw={"dropout": 0.0})(cfg_, info)

        def make_loader(epoch, skip):
            g = torch.Generator().manual_seed(cfg_.seed * 1000 + epoch)
            perm = torch.randperm(32, generator=g).tolist()
            for b in range(skip, 4):
                idx = perm[4 * b : 4 * b + 4] + perm[16 + 4 * b : 16 + 4 * b + 4]
                yield collate([toy_item(i) for i in idx])

        comp.make_loader, comp.batches_per_epoch = make_loader, 4
        return comp

    single = train(c, build)
    assert single["steps"] == 4
    single_losses = read_losses(tmp_path / "single")
    for s in range(1, 5):
        assert abs(single_losses[s] - ddp_losses[s]) < 1e-5, (single_losses, ddp_losses)


def test_ranks_from_hand_made_similarities_with_ties():
    from fastvl.train.retrieval import ranks_from_similarity

    sim = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.0],  # correct item 0 is best: rank 0
            [0.5, 0.5, 0.1, 0.0],  # correct item 1 ties wrong item 0: the tie counts against the query, rank 1
            [0.2, 0.7, 0.7, 0.7],  # correct items 2 and 3 (equivalent captions) tie with wrong 1: rank 1
            [0.3, 0.3, 0.3, 0.3],  # a constant row: every wrong item ranks first, rank 3
        ]
    )
    correct = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert ranks_from_similarity(sim, correct).tolist() == [0, 1, 1, 3]
    with pytest.raises(ValueError, match="at least one correct"):
        ranks_from_similarity(sim, torch.zeros_like(correct))


def test_chance_levels_equal_the_average_over_every_ranking():
    """Exact chance: the mean over all n! orders of the gallery of R@k, and the pooled median rank, for queries
    with 1, 2 and 3 equivalent correct items."""
    import itertools

    n, num_correct = 6, [1, 2, 3, 1]
    hits = {k: 0.0 for k in (1, 2, 5)}
    pooled = []
    for order in itertools.permutations(range(n)):
        for m in num_correct:  # correct items are 0..m-1; the first hit's rank in this order
            r = min(order.index(i) for i in range(m))
            pooled.append(r + 1)
            for k in hits:
                hits[k] += r < k
    total = math.factorial(n) * len(num_correct)
    ch = chance_levels(n, num_correct, ks=(1, 2, 5))
    for k in hits:
        assert ch[f"R@{k}"] == pytest.approx(100.0 * hits[k] / total)
    pooled.sort()
    assert ch["MdR"] == pooled[(len(pooled) - 1) // 2]  # the lower median of the pooled first-hit ranks


def test_video_to_text_ranks_each_distinct_caption_once():
    """12 clips of 3 captions (4 clips each, identical texts): video->text ranks the 3 distinct captions. A video
    embedding that picks the right caption first scores R@1 = 100 against chance 1/3; the chance levels of the two
    directions follow their galleries (12 videos with 4 correct; 3 captions with 1 correct)."""
    captions = torch.eye(3, 8)  # orthonormal caption embeddings
    labels = torch.arange(12) % 3
    text = captions[labels]
    video = torch.nn.functional.normalize(captions[labels] + 0.05 * torch.randn(12, 8), dim=-1)
    m = retrieval_metrics(video, text, labels, text_groups=labels)
    assert m["n"] == 12 and m["n_texts"] == 3
    assert m["v2t"]["R@1"] == 100.0 and m["v2t"]["MdR"] == 1.0
    assert m["chance_v2t"]["R@1"] == pytest.approx(100 / 3) and m["chance_v2t"]["R@5"] == 100.0
    assert m["chance"]["R@1"] == pytest.approx(100 * 4 / 12)
    # one wrong caption above the right one: rank 2 among distinct captions (R@5 hit), where the 12-item
    # gallery would have put it at rank 5 (the 4 copies of the wrong caption first)
    video[0] = torch.nn.functional.normalize(captions[1] + 0.5 * captions[0], dim=-1)
    m = retrieval_metrics(video, text, labels, text_groups=labels)
    assert m["v2t"]["R@1"] == pytest.approx(100 * 11 / 12) and m["v2t"]["R@5"] == 100.0
    old = retrieval_metrics(video, text, labels)  # without text_groups: every text its own gallery item
    assert old["n_texts"] == 12 and old["v2t"]["R@1"] == pytest.approx(100 * 11 / 12)
    assert first_rank_without_groups(video[0], text, labels) == 4
    with pytest.raises(ValueError, match="must share a label"):
        retrieval_metrics(video, text, labels, text_groups=torch.zeros(12, dtype=torch.long))


def first_rank_without_groups(v, text, labels):
    from fastvl.train.retrieval import first_hit_ranks

    return int(first_hit_ranks(v[None], text, labels[:1], labels)[0])


def test_checkpoint_files_and_weights_only_state(tmp_path):
    s = train(cfg(tmp_path, "w", steps=2), make_build())
    last = ckpt.latest(s["run_dir"])
    assert oct(os.stat(os.path.join(last, "model.safetensors")).st_mode & 0o777) == oct(ckpt.file_mode())
    assert oct(os.stat(os.path.join(last, "state.pt")).st_mode & 0o777) == oct(ckpt.file_mode())
    state = torch.load(os.path.join(last, "state.pt"), weights_only=True)  # tensors and plain values only
    assert state["step"] == 2 and "optimizer" in state and "scheduler" in state and state["skipped_steps"] == 0
    import numpy as np

    np.random.seed(5)
    before = ckpt.rng_state()
    draws = np.random.rand(3)
    ckpt.set_rng_state(torch.load(os.path.join(last, "state.pt"), weights_only=True)["rng"])
    ckpt.set_rng_state(before)
    assert np.array_equal(np.random.rand(3), draws)  # numpy's state round-trips through plain values


def test_summary_and_plot_survive_a_failing_evaluation(tmp_path):
    def build(c, info):
        comp = make_build()(c, info)

        def broken():
            raise ValueError("the held-out data is unreadable")
            yield

        comp.eval_batches = broken
        return comp

    with pytest.raises(ValueError, match="unreadable"):
        train(cfg(tmp_path, "evalfail", steps=2, eval=True), build)
    summary = json.load(open(tmp_path / "evalfail" / "summary.json"))
    assert summary["eval_error"] == "ValueError: the held-out data is unreadable" and summary["steps"] == 2
    assert (tmp_path / "evalfail" / "curves.png").exists() and ckpt.latest(str(tmp_path / "evalfail"))
