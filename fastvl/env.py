"""Environment switches fastvl reads, one parser each. No imports beyond the standard library:
``fastvl.kernels`` reads the interpreter switch from here when it is first imported."""

from __future__ import annotations

import os
import sys

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's own getenv_bool accepts, compared in lower case


def triton_interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter (Triton's own rule)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def triton_interpret() -> bool:
    """True when fastvl's Triton kernels run in the interpreter: decided when ``fastvl.kernels`` is first imported
    (Triton fixes it as it decorates the kernels), read from the environment until then."""
    kernels = sys.modules.get("fastvl.kernels")
    if kernels is not None:
        return bool(kernels.INTERPRET)
    return triton_interpret_requested()
