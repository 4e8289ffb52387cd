"""Zero-shot retrieval metrics: R@1/5/10 and median rank, text-to-video and video-to-text, with exact chance.

Items that share a ``label`` (e.g. synthetic clips with the same colour, shape and motion) are equivalent: a
query is answered at the rank of the first retrieved item with its label. Without labels, only the paired
item (same index) is correct. Ties count against the query (an equal-scoring wrong item ranks first), so a
constant embedding never scores above chance.

Identical texts are one text. When several clips carry the same caption (``text_groups``), the
video-to-text gallery holds each distinct text once: otherwise every wrong caption would enter the ranking
as many times as it has clips, and a single wrong caption scored above the right one would push it past
rank 10 (which made video-to-text R@1 = R@5 and put R@5 and R@10 "below chance" for a chance level that
assumed independent items). Text-to-video keeps one query per clip (identical queries rank identically).

Chance levels are exact for a uniformly random ranking of each direction's gallery: with ``n`` gallery items
of which ``m`` are correct for a query, P(first hit within k) = 1 - C(n - m, k) / C(n, k), averaged over the
queries; the chance MdR is the median of the first-hit rank pooled over the queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KS = (1, 5, 10)


def ranks_from_similarity(sim: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank of the first correct gallery item of each query: the number of wrong items scoring at
    least as high as the best correct one (ties count against the query).

    sim (Nq, Ng) float similarities, correct (Nq, Ng) bool; every query needs at least one correct item.
    Returns int64 (Nq,).
    """
    if sim.shape != correct.shape:
        raise ValueError(f"ranks_from_similarity: sim {tuple(sim.shape)} and correct {tuple(correct.shape)} differ")
    if not bool(correct.any(dim=1).all()):
        raise ValueError("ranks_from_similarity: every query needs at least one correct gallery item")
    best_correct = torch.where(correct, sim, torch.full_like(sim, -math.inf)).max(dim=1).values
    return ((sim >= best_correct[:, None]) & ~correct).sum(dim=1)


def first_hit_ranks(
    query: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of the first gallery item sharing the query's label, by descending cosine similarity.

    query (Nq, D), gallery (Ng, D) L2-normalised; labels (Nq,), (Ng,). Returns int64 (Nq,).
    """
    ranks = []
    for s in range(0, query.shape[0], chunk):
        sim = query[s : s + chunk].float() @ gallery.float().T  # (c, Ng)
        ranks.append(ranks_from_similarity(sim, q_labels[s : s + chunk, None] == g_labels[None, :]))
    return torch.cat(ranks)


def log_comb(n: int, k: int) -> float:
    """log C(n, k); -inf outside 0 <= k <= n."""
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hit_within(n: int, m: int, k: int) -> float:
    """P(first of ``m`` correct items among ``n`` in a random order is within the first ``k``)."""
    if m <= 0:
        return 0.0
    if n - m < k:
        return 1.0
    return 1.0 - math.exp(log_comb(n - m, k) - log_comb(n, k))


def chance_levels(n: int, num_correct: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected R@k (%) for a uniformly random ranking of ``n`` gallery items, query q having
    ``num_correct[q]`` correct items, and the chance MdR: the smallest rank r (1-based) with
    mean_q P(first hit within r) >= 1/2."""
    out = {f"R@{k}": 100.0 * sum(hit_within(n, m, k) for m in num_correct) / len(num_correct) for k in ks}
    r = 1
    while r < n and sum(hit_within(n, m, r) for m in num_correct) / len(num_correct) < 0.5 - 1e-12:
        r += 1
    out["MdR"] = float(r)
    return out


def _summary(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    d = {f"R@{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}
    d["MdR"] = float((ranks + 1).float().median().item())
    return d


def _correct_counts(q_labels: torch.Tensor, g_labels: torch.Tensor) -> list[int]:
    values, counts = torch.unique(g_labels, return_counts=True)
    lookup = dict(zip(values.tolist(), counts.tolist()))
    return [lookup.get(v, 0) for v in q_labels.tolist()]


def retrieval_metrics(
    video: torch.Tensor,
    text: torch.Tensor,
    labels: torch.Tensor | None = None,
    ks: Sequence[int] = KS,
    text_groups: torch.Tensor | None = None,
) -> dict:
    """Both directions with their chance levels.

    video, text: (N, D) L2-normalised embeddings of paired items (row i of each is one clip and its caption).
    labels: (N,) equivalence labels or None (pairs only). text_groups: (N,) ids, equal for identical texts
    (e.g. ``torch.unique(text_ids, dim=0, return_inverse=True)[1]``) or None (all texts distinct); identical
    texts must share a label.

    Returns ``{"n": N, "n_texts": G, "t2v": {R@k, MdR}, "v2t": {...}, "chance": {...} (text->video),
    "chance_v2t": {...}}`` with G the number of distinct texts in the video-to-text gallery.
    """
    if video.shape != text.shape:
        raise ValueError(f"retrieval_metrics: video {tuple(video.shape)} and text {tuple(text.shape)} must match")
    n = video.shape[0]
    labels = torch.arange(n) if labels is None else labels.cpu()
    video, text = video.cpu(), text.cpu()
    if text_groups is None:
        keep = torch.arange(n)
    else:
        uniq, inverse = torch.unique(text_groups.cpu(), return_inverse=True)
        first = torch.full((len(uniq),), n, dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")  # first clip of each distinct text
        if not bool((labels[first[inverse]] == labels).all()):
            raise ValueError("retrieval_metrics: identical texts (same text_groups id) must share a label")
        keep = first.sort().values
    gallery_text, gallery_labels = text[keep], labels[keep]
    return {
        "n": n,
        "n_texts": int(keep.numel()),
        "t2v": _summary(first_hit_ranks(text, video, labels, labels), ks),
        "v2t": _summary(first_hit_ranks(video, gallery_text, labels, gallery_labels), ks),
        "chance": chance_levels(n, _correct_counts(labels, labels), ks),
        "chance_v2t": chance_levels(int(keep.numel()), _correct_counts(labels, gallery_labels), ks),
    }


def format_metrics(m: dict) -> str:
    """Table lines: the held-out losses a model declares, then each retrieval figure beside the chance level of its
    direction's gallery."""
    where = m.get("split_note") or f"on {m['n']} held-out clips"
    lines = []
    if m.get("heldout"):
        lines.append(f"losses {where}: " + "  ".join(f"{k} {v:.4f}" for k, v in m["heldout"].items()))
    if "t2v" not in m:
        return "\n".join(lines)
    lines.append(f"zero-shot retrieval {where} (chance in brackets)")
    for d, name, ch in (("t2v", "text->video", m["chance"]), ("v2t", "video->text", m.get("chance_v2t", m["chance"]))):
        parts = [f"{k} {m[d][k]:5.1f} [{ch[k]:4.1f}]" for k in m[d] if k.startswith("R@")]
        parts.append(f"MdR {m[d]['MdR']:.0f} [{ch['MdR']:.0f}]")
        lines.append(f"  {name}: " + "  ".join(parts))
    if m.get("n_texts", m["n"]) != m["n"]:
        lines.append(f"  (video->text ranks the {m['n_texts']} distinct captions of the {m['n']} clips)")
    if m.get("attributes"):
        parts = [f"{k} {v['acc']:5.1f} [{v['chance']:4.1f}]" for k, v in m["attributes"].items()]
        lines.append("  caption variant picked (same clip, one attribute changed): " + "  ".join(parts))
    if m.get("attributes_fused"):
        parts = [f"{k} {v['acc']:5.1f} [{v['chance']:4.1f}]" for k, v in m["attributes_fused"].items()]
        lines.append("  ... by the fused video-text matching head (re-ranking): " + "  ".join(parts))
    return "\n".join(lines)
