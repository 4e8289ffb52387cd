// The one torch-facing file: checks arguments, takes the current stream, calls the C ABI launchers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fastvl_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FASTVL_F32;
    case at::kHalf: return FASTVL_F16;
    case at::kBFloat16: return FASTVL_BF16;
    default: TORCH_CHECK(false, "fastvl._C: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastvl._C: ", name, " must be a CUDA tensor");
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "fastvl._C: ", name, " needs channel stride 1, got ",
              t.stride(-1));
}

void check_err(int err, const char* what) {
  TORCH_CHECK(err == 0, "fastvl._C.", what, ": CUDA error ", cudaGetErrorString((cudaError_t)err));
}

void roll(const at::Tensor& x, at::Tensor& out, int64_t T, int64_t text_len, int64_t f, int64_t direction) {
  check_cuda(x, "x");
  check_cuda(out, "out");
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3 && out.is_contiguous() && out.sizes() == x.sizes(), "fastvl._C.roll: bad shapes");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "fastvl._C.roll: dtype mismatch");
  const c10::cuda::CUDAGuard guard(x.device());
  check_err(fastvl_roll(x.data_ptr(), out.data_ptr(), x.size(0), x.size(1), x.size(2), (int)x.element_size(),
                        x.stride(0), x.stride(1), (int)T, (int)text_len, (int)f, (int)direction,
                        c10::cuda::getCurrentCUDAStream()),
            "roll");
}

void gather(const at::Tensor& src, const at::Tensor& idx, const c10::optional<at::Tensor>& pos, at::Tensor& out,
            int64_t n_valid) {
  check_cuda(src, "src");
  check_cuda(idx, "idx");
  check_cuda(out, "out");
  check_rows(src, "src");
  TORCH_CHECK(src.dim() == 3 && idx.dim() == 2 && out.is_contiguous(), "fastvl._C.gather: bad shapes");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "fastvl._C.gather: idx int32/int64");
  const void* pos_ptr = nullptr;
  int64_t psl = 0;
  if (pos.has_value()) {
    check_cuda(*pos, "pos");
    check_rows(*pos, "pos");
    TORCH_CHECK(pos->scalar_type() == src.scalar_type(), "fastvl._C.gather: pos dtype must match src");
    pos_ptr = pos->data_ptr();
    psl = pos->stride(0);
  }
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t isb = idx.size(0) == 1 ? 0 : idx.stride(0);
  check_err(fastvl_gather(src.data_ptr(), idx.data_ptr(), idx.scalar_type() == at::kLong, pos_ptr, out.data_ptr(),
                          dtype_code(src), out.size(0), out.size(1), out.size(2), n_valid, src.stride(0),
                          src.stride(1), isb, idx.stride(1), psl, c10::cuda::getCurrentCUDAStream()),
            "gather");
}

void scatter_add(const at::Tensor& grad, const at::Tensor& idx, at::Tensor& acc) {
  check_cuda(grad, "grad");
  check_cuda(idx, "idx");
  check_cuda(acc, "acc");
  check_rows(grad, "grad");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "fastvl._C.scatter_add: acc fp32 contiguous");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t isb = idx.size(0) == 1 ? 0 : idx.stride(0);
  check_err(fastvl_scatter_add(grad.data_ptr(), idx.data_ptr(), idx.scalar_type() == at::kLong,
                               acc.data_ptr<float>(), dtype_code(grad), grad.size(0), grad.size(1), grad.size(2),
                               acc.size(1), grad.stride(0), grad.stride(1), isb, idx.stride(1),
                               c10::cuda::getCurrentCUDAStream()),
            "scatter_add");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvl CUDA kernels (roll, gather, scatter_add)";
  m.def("roll", &roll, "temporal token roll into out");
  m.def("gather", &gather, "token gather (+pos) into out");
  m.def("scatter_add", &scatter_add, "scatter-add rows into an fp32 accumulator");
}
