"""Zero-shot retrieval evaluation: R@1/5/10 and median rank, text-to-video and video-to-text.

Items that share a ``label`` (e.g. synthetic clips with the same caption) are equivalent: a query is
answered at the rank of the first retrieved item with its label. Without labels, only the paired item
(same index) is correct. Chance levels are exact for a random ranking of the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KS = (1, 5, 10)


def first_hit_ranks(
    query: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of the first gallery item sharing the query's label, by descending similarity.

    query (Nq, D), gallery (Ng, D) L2-normalised; labels (Nq,), (Ng,). Ties count against the query
    (an equal-scoring wrong item ranks first), so a constant embedding cannot score above chance.
    """
    ranks = []
    for s in range(0, query.shape[0], chunk):
        sim = query[s : s + chunk].float() @ gallery.float().T  # (c, Ng)
        correct = q_labels[s : s + chunk, None] == g_labels[None, :]
        best_correct = torch.where(correct, sim, torch.full_like(sim, -math.inf)).max(dim=1).values
        better_wrong = ((sim >= best_correct[:, None]) & ~correct).sum(dim=1)
        ranks.append(better_wrong)
    return torch.cat(ranks)


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def chance_levels(n: int, num_correct: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected R@k (%) and median of the first-hit rank (1-based) for a uniformly random ranking."""
    out = {}
    for k in ks:
        p = [1.0 - math.exp(_log_comb(n - m, k) - _log_comb(n, k)) if n - m >= k else 1.0 for m in num_correct]
        out[f"R@{k}"] = 100.0 * sum(p) / len(p)
    medians = []
    for m in num_correct:
        # P(first hit within r) = 1 - C(n-m, r) / C(n, r); the per-query median is the first r reaching 1/2
        r = 1
        while r < n and 1.0 - math.exp(_log_comb(n - m, r) - _log_comb(n, r)) < 0.5 - 1e-12:
            r += 1
        medians.append(r)
    medians.sort()
    out["MdR"] = float(medians[len(medians) // 2])
    return out


def retrieval_metrics(
    video: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None, ks: Sequence[int] = KS
) -> dict[str, dict[str, float]]:
    """Both directions: {"t2v": {R@1, R@5, R@10, MdR}, "v2t": {...}, "chance": {...}, "n": N}.

    video, text: (N, D) embeddings of paired items (row i of each is one pair), L2-normalised.
    labels: (N,) equivalence labels or None (pairs only).
    """
    if video.shape != text.shape:
        raise ValueError(f"retrieval_metrics: video {tuple(video.shape)} and text {tuple(text.shape)} must match")
    n = video.shape[0]
    labels = torch.arange(n) if labels is None else labels.cpu()
    video, text = video.cpu(), text.cpu()
    res: dict = {"n": n}
    for name, q, g in (("t2v", text, video), ("v2t", video, text)):
        r = first_hit_ranks(q, g, labels, labels)
        d = {f"R@{k}": 100.0 * (r < k).float().mean().item() for k in ks}
        d["MdR"] = float((r + 1).float().median().item())
        res[name] = d
    counts = torch.bincount(torch.unique(labels, return_inverse=True)[1])
    per_query = counts[torch.unique(labels, return_inverse=True)[1]].tolist()
    res["chance"] = chance_levels(n, per_query, ks)
    return res


def attribute_accuracy(
    video: torch.Tensor, labels: torch.Tensor, label_text: torch.Tensor, attributes: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Which caption variant does each clip pick? For every attribute (e.g. motion), a clip is shown the
    captions of the labels that differ from its own in that attribute only and counts as correct when its
    own caption scores strictly highest (ties count against it, so a constant embedding scores 0).

    video (N, D) L2-normalised clip embeddings, labels (N,) their label ids, label_text (NL, D) the
    embedding of each label's canonical caption, attributes {name: (NL,) value index of every label}.
    Returns {name: {"acc": %, "chance": %, "n": N}} for attributes with more than one value; chance is
    1 / (number of values).
    """
    sim = video.float().cpu() @ label_text.float().cpu().T  # (N, NL)
    labels = labels.cpu().long()
    own = sim.gather(1, labels[:, None])  # (N, 1)
    out = {}
    for name, values in attributes.items():
        if values.unique().numel() < 2:  # a constant attribute has nothing to tell apart
            continue
        beaten = (_rivals(labels, attributes, name) & (sim >= own)).any(dim=1)
        out[name] = {
            "acc": 100.0 * (~beaten).float().mean().item(),
            "chance": 100.0 / int(values.unique().numel()),
            "n": int(video.shape[0]),
        }
    return out


def _rivals(labels: torch.Tensor, attributes: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(N, NL) bool: labels that differ from each clip's label in attribute ``name`` only."""
    same_rest = torch.ones(labels.shape[0], attributes[name].shape[0], dtype=torch.bool)
    for other, ov in attributes.items():
        if other != name:
            ov = ov.cpu().long()
            same_rest &= ov[labels][:, None] == ov[None, :]
    values = attributes[name].cpu().long()
    return same_rest & (values[labels][:, None] != values[None, :])


def pair_attribute_accuracy(
    score,
    video: torch.Tensor,
    labels: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    attributes: dict[str, torch.Tensor],
    names: Sequence[str],
    chunk: int = 64,
) -> dict[str, dict[str, float]]:
    """:func:`attribute_accuracy` with a pair scorer instead of embeddings (e.g. All-in-one's fused VTM
    head, the paper's re-ranking): ``score(video (n, ...), ids (n, Lt), mask (n, Lt)) -> (n,)``.

    video (N, ...) raw clips, labels (N,), text_ids / text_mask (NL, Lt) each label's canonical caption.
    """
    labels = labels.cpu().long()
    out = {}
    for name in names:
        if attributes[name].unique().numel() < 2:
            continue
        rivals = _rivals(labels, attributes, name)
        pairs = torch.cat([torch.stack([torch.arange(len(labels)), labels], 1), rivals.nonzero()])  # (P, 2)
        clip, cand = pairs[:, 0], pairs[:, 1]
        s = torch.cat(
            [
                score(video[clip[i : i + chunk]], text_ids[cand[i : i + chunk]], text_mask[cand[i : i + chunk]])
                .float()
                .cpu()
                for i in range(0, len(pairs), chunk)
            ]
        )
        own, r = s[: len(labels)], slice(len(labels), None)
        hits = torch.zeros(len(labels), dtype=torch.long).index_add_(0, clip[r], (s[r] >= own[clip[r]]).long())
        beaten = hits > 0
        out[name] = {
            "acc": 100.0 * (~beaten).float().mean().item(),
            "chance": 100.0 / int(attributes[name].unique().numel()),
            "n": int(len(labels)),
        }
    return out


def format_metrics(m: dict) -> str:
    """Table lines: each figure beside the chance level for the split's size."""
    ch = m["chance"]
    lines = [f"zero-shot retrieval on {m['n']} held-out clips (chance in brackets)"]
    for d in ("t2v", "v2t"):
        parts = [f"{k} {m[d][k]:5.1f} [{ch[k]:4.1f}]" for k in m[d] if k.startswith("R@")]
        parts.append(f"MdR {m[d]['MdR']:.0f} [{ch['MdR']:.0f}]")
        lines.append(f"  {'text->video' if d == 't2v' else 'video->text'}: " + "  ".join(parts))
    if m.get("attributes"):
        parts = [f"{k} {v['acc']:5.1f} [{v['chance']:4.1f}]" for k, v in m["attributes"].items()]
        lines.append("  caption variant picked (same clip, one attribute changed): " + "  ".join(parts))
    if m.get("attributes_fused"):
        parts = [f"{k} {v['acc']:5.1f} [{v['chance']:4.1f}]" for k, v in m["attributes_fused"].items()]
        lines.append("  ... by the fused video-text matching head (re-ranking): " + "  ".join(parts))
    return "\n".join(lines)
