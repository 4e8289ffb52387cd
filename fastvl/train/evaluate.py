"""Zero-shot evaluation of a model: embeds the evaluation clips and captions, then retrieval metrics
(:mod:`fastvl.train.retrieval`) and, on synthetic data, the attribute probes (:mod:`fastvl.train.attributes`).

What a model is evaluated on follows what it declares: retrieval when it has ``encode_video`` and ``encode_text``,
held-out losses when it has ``heldout_losses(batch, generator)`` (a dict of 0-d tensors, batch means; the masked
autoencoders give their reconstruction loss and the loss of predicting each patch's mean). Those losses draw their
masks from a generator seeded 0, so every evaluation of a run sees the same masks."""

from __future__ import annotations

import contextlib

import torch

from . import distributed
from .attributes import attribute_accuracy, pair_attribute_accuracy
from .distributed import DistInfo
from .retrieval import retrieval_metrics


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a batch onto ``device`` (non-blocking from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def has_retrieval(model) -> bool:
    """Whether ``model`` embeds clips and captions for retrieval (``encode_video`` and ``encode_text``)."""
    return hasattr(model, "encode_video") and hasattr(model, "encode_text")


def embed_batches(
    model, eval_batches, info: DistInfo, autocast, keep_video: bool, retrieval: bool = True, heldout: bool = False
) -> dict:
    """Video and text embeddings (N, D), labels (N,), text ids (N, Lt) and, with ``keep_video``, raw clips (with
    ``retrieval``); with ``heldout``, ``"heldout"``: the model's held-out losses averaged over the N clips."""
    vids, txts, labels, ids, raw = [], [], [], [], []
    sums: dict[str, float] = {}
    n = 0
    generator = torch.Generator(device=info.device).manual_seed(0)
    for batch in eval_batches():
        if keep_video:
            raw.append(batch["video"])
        batch = move_batch(batch, info.device)
        b = batch["video"].shape[0]
        with autocast():
            if retrieval:
                vids.append(model.encode_video(batch["video"]).float().cpu())
                txts.append(model.encode_text(batch["text_ids"], batch["text_mask"]).float().cpu())
            if heldout:
                for k, v in model.heldout_losses(batch, generator=generator).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b
        labels.append(batch["label"].cpu())
        ids.append(batch["text_ids"].cpu())
        n += b
    if not n:
        raise ValueError("evaluation: the evaluation data yielded no batch")
    out: dict = {"n": n, "label": torch.cat(labels), "ids": torch.cat(ids)}
    if retrieval:
        out.update(video=torch.cat(vids), text=torch.cat(txts))
    if heldout:
        out["heldout"] = {k: v / n for k, v in sums.items()}
    if keep_video:
        out["raw"] = torch.cat(raw)
    return out


def probe_attributes(model, emb: dict, label_captions, info: DistInfo, autocast) -> dict:
    """The attribute probes: by VTC embeddings, and by All-in-one's fused VTM head when VTM was trained."""
    ids, mask, attrs = label_captions()
    with autocast():
        lt = [
            model.encode_text(ids[s : s + 256].to(info.device), mask[s : s + 256].to(info.device)).float().cpu()
            for s in range(0, ids.shape[0], 256)
        ]
    result = {"attributes": attribute_accuracy(emb["video"], emb["label"], torch.cat(lt), attrs)}
    trained_vtm = "vtm" in getattr(getattr(model, "config", None), "tasks", ())
    if hasattr(model, "vtm_logits") and trained_vtm and "motion" in attrs:  # All-in-one's fused head

        def score(v, i, m):
            with autocast():
                lg = model.vtm_logits(v.to(info.device), i.to(info.device), m.to(info.device)).float()
            return lg[:, 1] - lg[:, 0]

        result["attributes_fused"] = pair_attribute_accuracy(
            score, emb["raw"], emb["label"], ids, mask, attrs, ("motion",)
        )
    return result


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    eval_batches,
    info: DistInfo,
    autocast=contextlib.nullcontext,
    label_captions=None,
    *,
    all_ranks: bool = False,
) -> dict:
    """Zero-shot retrieval on the evaluation batches (models with ``encode_video`` / ``encode_text``), plus the
    attribute probe when ``label_captions`` is given, and the model's ``heldout_losses`` when it has them.
    Rank 0 evaluates while the other ranks wait, or, with ``all_ranks`` (a sharded model, whose forward is
    collective), every rank runs the same batches and rank 0 reports. Returns {} on other ranks."""
    result: dict = {}
    try:
        if info.is_main or all_ranks:
            was = model.training
            model.eval()
            try:
                retrieval, heldout = has_retrieval(model), hasattr(model, "heldout_losses")
                probe = label_captions is not None and retrieval
                emb = embed_batches(model, eval_batches, info, autocast, probe, retrieval, heldout)
                result = {"n": emb["n"]}
                if retrieval:
                    # identical token ids (with the same label) are one text in the video->text gallery
                    keys = torch.cat([emb["ids"], emb["label"][:, None].to(emb["ids"].dtype)], dim=1)
                    groups = torch.unique(keys, dim=0, return_inverse=True)[1]
                    result = retrieval_metrics(emb["video"], emb["text"], emb["label"], text_groups=groups)
                if heldout:
                    result["heldout"] = emb["heldout"]
                if probe:
                    result.update(probe_attributes(model, emb, label_captions, info, autocast))
            finally:
                model.train(was)
    finally:  # the other ranks wait for rank 0 even when its evaluation fails
        if not all_ranks:
            distributed.barrier(info)
    return result if info.is_main else {}
