// Temporal token rolling (All-in-one) as a vectorised row copy: one row (token) per threadIdx.y,
// the row's 16-byte (or narrower, by alignment) vectors across threadIdx.x.
#include "fastvl_kernels.h"
#include "vec.cuh"

namespace fastvl {

template <int W>
__global__ void roll_kernel(const char* __restrict__ x, char* __restrict__ out, int64_t rows, int S, int64_t vpr,
                            int64_t sxn_b, int64_t sxs_b, int64_t row_b, int T, int text_len, int L, int f,
                            int dir) {
  using V = typename Vec<W>::type;
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t n = row / S;
  const int s = (int)(row - n * S);
  const int t = (int)(n % T);
  const int v = s - text_len;
  int shift = 0;
  if (v >= 1 && v <= f) shift = -dir;
  else if (f > 0 && v >= L - f && v < L) shift = dir;
  const int64_t src_n = n - t + (t + shift + T) % T;
  const V* src = reinterpret_cast<const V*>(x + src_n * sxn_b + (int64_t)s * sxs_b);
  V* dst = reinterpret_cast<V*>(out + row * row_b);
  for (int64_t i = threadIdx.x; i < vpr; i += blockDim.x) dst[i] = __ldg(src + i);
}

template <int W>
static void launch_roll(const void* x, void* out, int64_t N, int64_t S, int64_t row_b, int64_t sxn_b,
                        int64_t sxs_b, int T, int text_len, int f, int dir, cudaStream_t stream) {
  const int64_t vpr = row_b / W;
  const dim3 block = row_block(vpr);
  const int64_t rows = N * S;
  const dim3 grid((unsigned)((rows + block.y - 1) / block.y));
  roll_kernel<W><<<grid, block, 0, stream>>>((const char*)x, (char*)out, rows, (int)S, vpr, sxn_b, sxs_b, row_b,
                                              T, text_len, (int)(S - text_len), f, dir);
}

}  // namespace fastvl

extern "C" int fastvl_roll(const void* x, void* out, int64_t N, int64_t S, int64_t C, int elem_bytes, int64_t sxn,
                           int64_t sxs, int T, int text_len, int f, int direction, cudaStream_t stream) {
  using namespace fastvl;
  if (N * S * C == 0) return 0;
  const int64_t row_b = C * elem_bytes, sxn_b = sxn * elem_bytes, sxs_b = sxs * elem_bytes;
  const int w = vec_width((uint64_t)row_b | (uint64_t)sxn_b | (uint64_t)sxs_b | (uint64_t)(uintptr_t)x |
                          (uint64_t)(uintptr_t)out);
  switch (w) {
    case 16: launch_roll<16>(x, out, N, S, row_b, sxn_b, sxs_b, T, text_len, f, direction, stream); break;
    case 8: launch_roll<8>(x, out, N, S, row_b, sxn_b, sxs_b, T, text_len, f, direction, stream); break;
    case 4: launch_roll<4>(x, out, N, S, row_b, sxn_b, sxs_b, T, text_len, f, direction, stream); break;
    case 2: launch_roll<2>(x, out, N, S, row_b, sxn_b, sxs_b, T, text_len, f, direction, stream); break;
    default: launch_roll<1>(x, out, N, S, row_b, sxn_b, sxs_b, T, text_len, f, direction, stream); break;
  }
  return (int)cudaGetLastError();
}
