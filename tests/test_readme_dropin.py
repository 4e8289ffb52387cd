"""The README's drop-in example runs as written, in a fresh process the way a user runs it (no interpreter
flag: on a CPU every op takes its reference path), and its loss has gradients on the patched ViT."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("timm")

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_dropin_block() -> str:
    text = open(README).read()
    block = text.split("**Drop it into existing code.**", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "patch_timm_vit" in block and "ClipLoss" in block
    return block


def test_readme_dropin_example_runs_and_trains():
    check = (
        "\nassert torch.isfinite(loss) and loss.item() > 0"
        "\nassert not any(isinstance(m, timm.layers.Attention) for m in vit.modules())"
        "\nassert all(p.grad is not None for p in vit.parameters() if p.requires_grad)"
        "\nprint('ok', loss.item())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}
    out = subprocess.run(
        [sys.executable, "-c", readme_dropin_block() + check], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok ")
