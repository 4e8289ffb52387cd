"""Run plot: loss curves and final recall against chance, from a run's metrics.jsonl."""

from __future__ import annotations

import json
import os


def plot_run(run_dir: str) -> str:
    """Write ``run_dir/curves.png`` and return its path (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, series, ev = [], {}, None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "eval" in rec:
                ev = rec["eval"] if "t2v" in rec["eval"] else None  # a model without retrieval: losses only
                continue
            steps.append(rec["step"])
            for k, v in rec.items():
                if k == "loss" or k.startswith("loss_"):
                    series.setdefault(k, []).append(v)
    fig, axes = plt.subplots(1, 2 if ev else 1, figsize=(11 if ev else 6, 4), squeeze=False)
    ax = axes[0][0]
    for k, v in series.items():
        ax.plot(steps[: len(v)], v, label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if ev:
        ax = axes[0][1]
        ks = [k for k in ev["t2v"] if k.startswith("R@")]
        x = range(len(ks))
        w = 0.2
        ch_v2t = ev.get("chance_v2t", ev["chance"])
        bars = (
            ("text->video", [ev["t2v"][k] for k in ks], None),
            ("chance (t2v)", [ev["chance"][k] for k in ks], "silver"),
            ("video->text", [ev["v2t"][k] for k in ks], None),
            ("chance (v2t)", [ch_v2t[k] for k in ks], "grey"),
        )
        for j, (label, values, color) in enumerate(bars):
            ax.bar([i + (j - 1.5) * w for i in x], values, w, label=label, color=color)
        ax.set_xticks(list(x), ks)
        ax.set_ylabel("%")
        ax.set_title(f"zero-shot retrieval ({ev.get('split_note') or str(ev['n']) + ' held-out clips'})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
