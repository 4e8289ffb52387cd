// C ABI of fastvl's CUDA kernels. Pure CUDA (no torch): the binding file (bindings.cpp) calls these.
// Every launcher returns a cudaError_t (0 on success). Strides are in elements; channel stride is 1.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Temporal token rolling on x (N=B*T, S=text_len+L, C) -> out (contiguous).
int fastvl_roll(const void* x, void* out, int64_t N, int64_t S, int64_t C, int elem_bytes,
                int64_t sxn, int64_t sxs, int T, int text_len, int f, int direction, cudaStream_t stream);

// dtype codes for the gather / scatter launchers
enum { FASTVL_F32 = 0, FASTVL_F16 = 1, FASTVL_BF16 = 2 };

// out[b, j] = src[b, idx[b, j]] (+ pos[idx[b, j]]) for 0 <= idx < n_valid, else 0.
// src (B, Ls, C) strides (ssb, ssl, 1); idx (B or 1, J) strides (isb, isj), isb = 0 when shared;
// pos (Ls, C) strides (psl, 1) or NULL; out (B, J, C) contiguous.
int fastvl_gather(const void* src, const void* idx, int idx_is_int64, const void* pos, void* out, int dtype,
                  int64_t B, int64_t J, int64_t C, int64_t n_valid, int64_t ssb, int64_t ssl, int64_t isb,
                  int64_t isj, int64_t psl, cudaStream_t stream);

// acc (B, L, C) float32 contiguous, pre-zeroed: acc[b, idx[b, j]] += grad[b, j] (atomics) for 0 <= idx < L;
// other indices add nothing.
int fastvl_scatter_add(const void* grad, const void* idx, int idx_is_int64, float* acc, int dtype, int64_t B,
                       int64_t J, int64_t C, int64_t L, int64_t sgb, int64_t sgj, int64_t isb, int64_t isj,
                       cudaStream_t stream);

#ifdef __cplusplus
}
#endif
