"""The CUDA extension: built by CI with the machine's nvcc (no GPU needed to compile it)."""

import os

import pytest

from fastvl import _ext


@pytest.mark.skipif(os.environ.get("FASTVL_BUILD_CUDA") != "1", reason="extension build not requested")
def test_extension_built_and_exports_kernels():
    assert _ext.built(), _ext.reasons()
    mod = _ext.module()
    for name in ("roll", "gather", "scatter_add"):
        assert callable(getattr(mod, name))


def test_readme_test_command_is_ci():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".ci", "run")) as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#") and "pytest" in ln]
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    assert len(ci) == 1 and ci[0] in readme
