"""Attribute probes on synthetic data: does a clip prefer its own caption over the captions that differ from it
in one attribute only (colour, shape or motion)? By embeddings, or by a pair scorer such as a fused head."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
        beaten = (rival_labels(labels, attributes, name) & (sim >= own)).any(dim=1)
        out[name] = {
            "acc": 100.0 * (~beaten).float().mean().item(),
            "chance": 100.0 / int(values.unique().numel()),
            "n": int(video.shape[0]),
        }
    return out


def rival_labels(labels: torch.Tensor, attributes: dict[str, torch.Tensor], name: str) -> torch.Tensor:
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
        rivals = rival_labels(labels, attributes, name)
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
