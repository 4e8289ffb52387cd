"""Triton kernels and their host launchers (installed as ``fastvl.kernels``).

No autograd and no dispatch here: raw tensors in, raw tensors out. Importing a kernel module
decorates its kernels, and Triton decides *then* whether they run compiled or in the CPU
interpreter (TRITON_INTERPRET=1), so fastvl imports these modules lazily, on first use.
"""

from fastvl.env import triton_interpret_requested

INTERPRET = triton_interpret_requested()
