"""Test setup: on a machine without a GPU, Triton kernels run in the interpreter; outputs are poisoned."""

import os

import pytest
import torch

# Must be set before fastvl.kernels is imported: Triton decides interpreted-or-compiled at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTVL_POISON", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs a CUDA device (run on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
