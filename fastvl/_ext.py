"""Lazy access to the optional CUDA extension ``fastvl._C`` (built from csrc/)."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def _load():
    try:
        return importlib.import_module("fastvl._C"), None
    except ImportError as e:  # not built, or built against another torch
        return None, str(e)


def module():
    """The extension module; raises ImportError with the build hint if it is missing."""
    mod, err = _load()
    if mod is None:
        raise ImportError(f"fastvl._C is not available ({err}); reinstall with FASTVL_BUILD_CUDA=1 and nvcc present")
    return mod


def reasons() -> list[str]:
    mod, err = _load()
    if mod is None:
        first = (err or "").splitlines()[0][:160]
        return [f"fastvl._C is not built ({first}); install with FASTVL_BUILD_CUDA=1 where nvcc is present"]
    return []


def built() -> bool:
    return _load()[0] is not None
