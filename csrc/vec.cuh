// Vector types by byte width and dtype conversions shared by the .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fastvl {

template <int W> struct Vec;
template <> struct Vec<16> { using type = uint4; };
template <> struct Vec<8> { using type = uint2; };
template <> struct Vec<4> { using type = uint32_t; };
template <> struct Vec<2> { using type = uint16_t; };
template <> struct Vec<1> { using type = uint8_t; };

// Widest of 16/8/4/2/1 bytes dividing every byte offset a kernel will form.
inline int vec_width(uint64_t a) {
  for (int w = 16; w > 1; w >>= 1)
    if (a % w == 0) return w;
  return 1;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Threads per row (x) and rows per block (y) for a row of `vpr` vectors, 256 threads a block.
inline dim3 row_block(int64_t vpr) {
  int tx = 32;
  while (tx < vpr && tx < 256) tx <<= 1;
  return dim3(tx, 256 / tx);
}

}  // namespace fastvl
