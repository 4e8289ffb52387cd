"""FSDP2 (``--fsdp``: fully_shard per block) with activation checkpointing and sharded checkpoints, on 2 gloo
ranks: the first steps' losses equal DDP's, and a resumed FSDP run equals an uninterrupted one."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastvl.train.loop import TrainConfig


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval" not in r:
                out[r["step"]] = r["loss"]
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out, **kw):
    base = dict(
        model="allinone-tiny",
        data="synthetic",
        out=out,
        steps=4,
        batch_size=4,
        lr=1e-3,
        log_every=1,
        progress=False,
        warmup=0,
        eval=False,
        device="cpu",
        extra={"train_clips": 32, "val_clips": 8},
    )
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, port, root, q):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from fastvl.train import distributed
    from fastvl.train.loop import train
    from fastvl.train.pretrain import build

    try:
        tok = os.path.join(root, "tok")

        def cfg(name, **kw):
            c = _cfg(os.path.join(root, name), **kw)
            c.extra = {**c.extra, "tokenizer": tok if name != "ddp" else None}
            return c

        train(cfg("ddp"), build)  # trains the tokenizer (rank 0) that the other runs share
        if rank == 0:
            os.makedirs(tok, exist_ok=True)
            for f in os.listdir(os.path.join(root, "ddp", "tokenizer")):
                os.link(os.path.join(root, "ddp", "tokenizer", f), os.path.join(tok, f))
        dist.barrier()
        fsdp = train(cfg("fsdp", fsdp=True, grad_ckpt=True, eval=True), build)
        # interrupted at step 2 (its checkpoint), then resumed
        train(cfg("resumed", fsdp=True, grad_ckpt=True, ckpt_every=2, steps=4), build)
        if rank == 0:
            with open(os.path.join(root, "resumed", "latest"), "w") as f:
                f.write("ckpt-0000002\n")
        dist.barrier()
        train(cfg("resumed", fsdp=True, grad_ckpt=True, ckpt_every=2, steps=4, resume=True), build)
        if rank == 0:
            q.put({"fsdp_eval": fsdp.get("eval", {}).get("n")})
    finally:
        distributed.cleanup()


@pytest.mark.distributed
def test_fsdp_equals_ddp_and_resumes_exactly(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    info = q.get(timeout=10)
    ddp, fsdp, resumed = (losses(str(tmp_path / n)) for n in ("ddp", "fsdp", "resumed"))
    assert sorted(ddp) == sorted(fsdp) == sorted(resumed) == [1, 2, 3, 4]
    for s in ddp:  # same init (rank 0's), same data, gradients averaged over ranks: equal within fp32 rounding
        assert abs(ddp[s] - fsdp[s]) < 1e-5 * max(1.0, abs(ddp[s])), (ddp, fsdp)
    assert [fsdp[s] for s in (3, 4)] == [resumed[s] for s in (3, 4)], (fsdp, resumed)  # bit-identical after resume
    # sharded checkpoints: one DCP file per rank, weights_only state, full weights in the final checkpoint
    final = tmp_path / "fsdp" / "ckpt-0000004"
    assert sorted(p.name for p in (final / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (final / "model.safetensors").exists() and not (
        tmp_path / "resumed" / "ckpt-0000002" / "model.safetensors"
    ).exists()
    state = torch.load(final / "state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rank_rng"]) == 2 and "optimizer" not in state
    assert info["fsdp_eval"] == 8  # evaluation ran with the sharded model (every rank, rank 0 reports)
