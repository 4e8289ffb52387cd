// Token gather (+ positional embedding on the fly, out-of-range rows zeroed) and scatter-add backward
// (out-of-range indices skipped, as the forward zeroes their rows).
#include "fastvl_kernels.h"
#include "vec.cuh"

namespace fastvl {

template <typename T, typename I, int W, bool POS>
__global__ void gather_kernel(const char* __restrict__ src, const I* __restrict__ idx, const char* __restrict__ pos,
                              char* __restrict__ out, int64_t rows, int64_t J, int64_t vpr, int64_t n_valid,
                              int64_t ssb_b, int64_t ssl_b, int64_t isb, int64_t isj, int64_t psl_b,
                              int64_t row_b) {
  using V = typename Vec<W>::type;
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / J, j = row - b * J;
  const int64_t id = (int64_t)idx[b * isb + j * isj];
  V* dst = reinterpret_cast<V*>(out + row * row_b);
  if (id < 0 || id >= n_valid) {
    V zero;
    memset(&zero, 0, sizeof(V));
    for (int64_t i = threadIdx.x; i < vpr; i += blockDim.x) dst[i] = zero;
    return;
  }
  const V* s = reinterpret_cast<const V*>(src + b * ssb_b + id * ssl_b);
  if constexpr (!POS) {
    for (int64_t i = threadIdx.x; i < vpr; i += blockDim.x) dst[i] = __ldg(s + i);
  } else {
    constexpr int n = W / (int)sizeof(T);
    const V* p = reinterpret_cast<const V*>(pos + id * psl_b);
    for (int64_t i = threadIdx.x; i < vpr; i += blockDim.x) {
      V a = __ldg(s + i);
      const V c = __ldg(p + i);
      T* ap = reinterpret_cast<T*>(&a);
      const T* cp = reinterpret_cast<const T*>(&c);
#pragma unroll
      for (int k = 0; k < n; ++k) ap[k] = from_float<T>(to_float(ap[k]) + to_float(cp[k]));
      dst[i] = a;
    }
  }
}

template <typename T, typename I, int W>
static void launch_gather(const void* src, const void* idx, const void* pos, void* out, int64_t B, int64_t J,
                          int64_t C, int64_t n_valid, int64_t ssb, int64_t ssl, int64_t isb, int64_t isj,
                          int64_t psl, cudaStream_t stream) {
  const int64_t e = sizeof(T), row_b = C * e, vpr = row_b / W, rows = B * J;
  const dim3 block = row_block(vpr);
  const dim3 grid((unsigned)((rows + block.y - 1) / block.y));
  if (pos)
    gather_kernel<T, I, W, true><<<grid, block, 0, stream>>>((const char*)src, (const I*)idx, (const char*)pos,
                                                              (char*)out, rows, J, vpr, n_valid, ssb * e, ssl * e,
                                                              isb, isj, psl * e, row_b);
  else
    gather_kernel<T, I, W, false><<<grid, block, 0, stream>>>((const char*)src, (const I*)idx, nullptr, (char*)out,
                                                               rows, J, vpr, n_valid, ssb * e, ssl * e, isb, isj,
                                                               0, row_b);
}

template <typename T, typename I>
static void dispatch_width(const void* src, const void* idx, const void* pos, void* out, int64_t B, int64_t J,
                           int64_t C, int64_t n_valid, int64_t ssb, int64_t ssl, int64_t isb, int64_t isj,
                           int64_t psl, cudaStream_t stream) {
  const uint64_t e = sizeof(T);
  uint64_t a = C * e | ssb * e | ssl * e | (uint64_t)(uintptr_t)src | (uint64_t)(uintptr_t)out;
  if (pos) a |= psl * e | (uint64_t)(uintptr_t)pos;
  if (vec_width(a) == 16)
    launch_gather<T, I, 16>(src, idx, pos, out, B, J, C, n_valid, ssb, ssl, isb, isj, psl, stream);
  else
    launch_gather<T, I, sizeof(T)>(src, idx, pos, out, B, J, C, n_valid, ssb, ssl, isb, isj, psl, stream);
}

template <typename T, typename I>
__global__ void scatter_add_kernel(const T* __restrict__ grad, const I* __restrict__ idx, float* __restrict__ acc,
                                   int64_t rows, int64_t J, int64_t C, int64_t L, int64_t sgb, int64_t sgj,
                                   int64_t isb, int64_t isj) {
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / J, j = row - b * J;
  const int64_t id = (int64_t)idx[b * isb + j * isj];
  if (id < 0 || id >= L) return;  // the forward gathered a zero row: no gradient to add, nothing written
  const T* g = grad + b * sgb + j * sgj;
  float* a = acc + (b * L + id) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(a + c, to_float(g[c]));
}

template <typename T, typename I>
static void launch_scatter(const void* grad, const void* idx, float* acc, int64_t B, int64_t J, int64_t C, int64_t L,
                           int64_t sgb, int64_t sgj, int64_t isb, int64_t isj, cudaStream_t stream) {
  const dim3 block = row_block(C);
  const int64_t rows = B * J;
  const dim3 grid((unsigned)((rows + block.y - 1) / block.y));
  scatter_add_kernel<T, I><<<grid, block, 0, stream>>>((const T*)grad, (const I*)idx, acc, rows, J, C, L, sgb, sgj,
                                                       isb, isj);
}

}  // namespace fastvl

#define FASTVL_DISPATCH(dtype, idx64, FN, ...)                                         \
  switch (dtype) {                                                                     \
    case FASTVL_F32:                                                                   \
      idx64 ? FN<float, int64_t>(__VA_ARGS__) : FN<float, int32_t>(__VA_ARGS__);       \
      break;                                                                           \
    case FASTVL_F16:                                                                   \
      idx64 ? FN<__half, int64_t>(__VA_ARGS__) : FN<__half, int32_t>(__VA_ARGS__);     \
      break;                                                                           \
    case FASTVL_BF16:                                                                  \
      idx64 ? FN<__nv_bfloat16, int64_t>(__VA_ARGS__)                                  \
            : FN<__nv_bfloat16, int32_t>(__VA_ARGS__);                                 \
      break;                                                                           \
    default:                                                                           \
      return (int)cudaErrorInvalidValue;                                               \
  }

extern "C" int fastvl_gather(const void* src, const void* idx, int idx_is_int64, const void* pos, void* out, int dtype,
                             int64_t B, int64_t J, int64_t C, int64_t n_valid, int64_t ssb, int64_t ssl, int64_t isb,
                             int64_t isj, int64_t psl, cudaStream_t stream) {
  using namespace fastvl;
  if (B * J * C == 0) return 0;
  FASTVL_DISPATCH(dtype, idx_is_int64, dispatch_width, src, idx, pos, out, B, J, C, n_valid, ssb, ssl, isb, isj, psl,
                  stream)
  return (int)cudaGetLastError();
}

extern "C" int fastvl_scatter_add(const void* grad, const void* idx, int idx_is_int64, float* acc, int dtype,
                                  int64_t B, int64_t J, int64_t C, int64_t L, int64_t sgb, int64_t sgj, int64_t isb,
                                  int64_t isj, cudaStream_t stream) {
  using namespace fastvl;
  if (B * J * C == 0) return 0;
  FASTVL_DISPATCH(dtype, idx_is_int64, launch_scatter, grad, idx, acc, B, J, C, L, sgb, sgj, isb, isj, stream)
  return (int)cudaGetLastError();
}
