"""Host-side helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from . import INTERPRET

H100_SMS = 132  # streaming multiprocessors of an H100 / H200 SXM: the grid size forced GPU configs plan for
_FORCED: list[int] = []  # SM counts of the active gpu_configs() contexts, innermost last


def poison_enabled() -> bool:
    return os.environ.get("FASTVL_POISON", "0") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN / -1-filled when FASTVL_POISON=1 so unwritten elements show in tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def row_block(n_cols: int, elem_bytes: int, max_bytes: int = 8192) -> int:
    """Power-of-two block covering a row of ``n_cols`` elements, capped at ``max_bytes`` per block."""
    return max(16, min(triton.next_power_of_2(n_cols), max(16, max_bytes // elem_bytes)))


def col_block(n_cols: int, elem_bytes: int, max_bytes: int = 2048) -> int:
    """Power-of-two column block of at most ``max_bytes`` (at least 16 elements) that pads the row by at most
    1/8 when one exists: 768 columns give 256 (three full blocks), not 1024 (a quarter of the lanes idle)."""
    cap = max(16, min(triton.next_power_of_2(n_cols), max(16, max_bytes // elem_bytes)))
    p = cap
    while p >= 16:
        if (triton.cdiv(n_cols, p) * p - n_cols) * 8 <= n_cols:
            return p
        p //= 2
    return cap


def warps_for(block_elems: int) -> int:
    if block_elems >= 8192:
        return 8
    if block_elems >= 2048:
        return 4
    return 2 if block_elems >= 512 else 1


def device_of(*tensors) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of the first CUDA tensor (or CUDA ``torch.device``) given; a no-op otherwise.

    Triton launches on the *current* device; a tensor on ``cuda:1`` while ``cuda:0`` is current would
    otherwise be read by a kernel running on the wrong device.
    """
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.device(t.device)
        if isinstance(t, torch.device) and t.type == "cuda":  # a launcher's device= argument
            return torch.cuda.device(t)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator for a host launcher: runs it under the device of its first CUDA tensor argument."""

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        with device_of(*args, *kwargs.values()):
            return launcher(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def gpu_configs(sms: int = H100_SMS):
    """Launchers pick the block shapes, warps and grid they pick on a CUDA device, also under the interpreter.

    Under TRITON_INTERPRET=1 launchers otherwise pick large blocks and few programs (the interpreter pays per
    operation, not per element). Tests force the GPU configs to prove them against the reference without a
    GPU; ``sms`` is the SM count the grid is planned for (a small count makes each program loop longer).
    """
    _FORCED.append(int(sms))
    try:
        yield
    finally:
        _FORCED.pop()


def use_gpu_configs(device: torch.device) -> bool:
    """True when a launcher for tensors on ``device`` should pick its CUDA configuration."""
    return bool(_FORCED) or (device.type == "cuda" and not INTERPRET)


def sm_count(device: torch.device) -> int:
    """SMs a persistent grid is planned for: the device's, the forced count, or an H100's."""
    if _FORCED:
        return _FORCED[-1]
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


@triton.jit
def draw_key(seed, noise_ptr, row64, idx, n, s_nr, s_nl, HAS_NOISE: tl.constexpr):
    """The 64-bit sort key of token ``idx`` (a block of int32) of row ``row64`` (int64) out of ``n``: a random
    or noise key ``<< 20 | idx``, unique thanks to the index bits; ``2**62 - 1`` (after every token) where
    ``idx >= n``. Ranking tokens by it is ``argsort(noise, stable=True)`` with ``noise (rows, n)`` float32 at
    strides ``(s_nr, s_nl)``, else a uniform random order from Philox keyed by ``seed`` and (row, token): a
    pure function of its arguments, so a program recomputes the keys it compares against (no sort). The
    random key has 40 bits; the index takes 20 (``n < 2**20``)."""
    m = idx < n
    idx64 = idx.to(tl.int64)
    if HAS_NOISE:
        nz = tl.load(noise_ptr + row64 * s_nr + idx64 * s_nl, mask=m, other=0.0)
        nz = tl.where(nz == 0.0, 0.0, nz)  # -0.0 ties with +0.0, as in argsort
        bits = nz.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        # IEEE-754 bits -> unsigned key in float order (negatives reversed, below the positives)
        key = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, row64 * n + idx64)
        key = (r0.to(tl.int64) & 0xFFFFFFFF) * 256 + (r1.to(tl.int64) & 255)  # 40 random bits
    return tl.where(m, key * 1048576 + idx64, 0x3FFFFFFFFFFFFFFF)
