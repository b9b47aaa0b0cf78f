// Torch binding for the fused steer kernel in steer_cuda.cu.
//
// Kept separate from the .cu so the kernel compiles without torch headers. The Python side
// (cuda_steer.py) has already validated shapes and converted the vectors to contiguous fp32;
// the checks here only guard against misuse of the raw binding.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

extern "C" int steer_rows_cuda_launch(int dtype, const void* hidden, void* out, int64_t rows, int64_t width,
                                      int64_t stride_in, int64_t stride_out, const float* table,
                                      const int64_t* index, const float* coef, const float* lo,
                                      const float* hi, int has_cap, const float* monitor, int n_mon,
                                      float* proj, const float* gate_dir, const int64_t* gate_index,
                                      const float* gate_lo, const float* gate_hi, uint8_t* gate_open,
                                      void* stream);

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return 0;
    case torch::kFloat16:
      return 1;
    case torch::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, "steer kernel: hidden must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return -1;
}

const float* vector_ptr(const std::optional<torch::Tensor>& t, const torch::Tensor& hidden,
                        int64_t numel, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == hidden.device(), "steer kernel: ", name, " is on ", t->device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "steer kernel: ", name,
              " must be contiguous float32");
  TORCH_CHECK(t->numel() == numel, "steer kernel: ", name, " has ", t->numel(), " elements, expected ",
              numel);
  return t->data_ptr<float>();
}

// The per-row op: `table` [V, D] fp32, `index` [N] int64 (-1 = none), `coef`/`lo`/`hi` [N] fp32.
// Optional gate: `gate_dir` [G, D] fp32 with `gate_index` [N] int64 and `gate_lo`/`gate_hi` [N] fp32;
// `gate_open` [N] bool receives which rows' gates were open.
void steer_rows(const torch::Tensor& hidden, const torch::Tensor& out, const torch::Tensor& table,
                const torch::Tensor& index, const torch::Tensor& coef, const torch::Tensor& lo,
                const torch::Tensor& hi, bool has_cap, const std::optional<torch::Tensor>& monitor,
                const std::optional<torch::Tensor>& proj, const std::optional<torch::Tensor>& gate_dir,
                const std::optional<torch::Tensor>& gate_index, const std::optional<torch::Tensor>& gate_lo,
                const std::optional<torch::Tensor>& gate_hi, const std::optional<torch::Tensor>& gate_open) {
  TORCH_CHECK(hidden.is_cuda(), "steer kernel: hidden must be a CUDA tensor");
  TORCH_CHECK(hidden.dim() == 2 && out.dim() == 2 && out.sizes() == hidden.sizes(),
              "steer kernel: hidden and out must be [N, D] of the same shape");
  TORCH_CHECK(out.scalar_type() == hidden.scalar_type() && out.device() == hidden.device(),
              "steer kernel: out must match hidden's dtype and device");
  const int64_t rows = hidden.size(0);
  const int64_t width = hidden.size(1);
  TORCH_CHECK(width <= 1 || (hidden.stride(1) == 1 && out.stride(1) == 1),
              "steer kernel: rows must be contiguous");
  TORCH_CHECK(table.dim() == 2 && (table.size(0) == 0 || table.size(1) == width),
              "steer kernel: table must be [V, D]");
  const float* table_ptr = table.size(0) ? vector_ptr(table, hidden, table.numel(), "table") : nullptr;
  TORCH_CHECK(index.device() == hidden.device() && index.scalar_type() == torch::kInt64 &&
                  index.is_contiguous() && index.numel() == rows,
              "steer kernel: index must be a contiguous int64 [N] tensor on hidden's device");
  const int n_mon = monitor.has_value() ? static_cast<int>(monitor->size(0)) : 0;
  TORCH_CHECK(n_mon <= 16, "steer kernel: at most 16 monitor directions, got ", n_mon);
  const float* mon_ptr = vector_ptr(monitor, hidden, static_cast<int64_t>(n_mon) * width, "monitor");
  float* proj_ptr = nullptr;
  if (n_mon > 0) {
    TORCH_CHECK(proj.has_value() && proj->is_contiguous() && proj->scalar_type() == torch::kFloat32 &&
                    proj->device() == hidden.device() && proj->numel() == rows * n_mon,
                "steer kernel: proj must be a contiguous float32 [N, K] tensor on hidden's device");
    proj_ptr = proj->data_ptr<float>();
  }
  const float* gate_dir_ptr = nullptr;
  const int64_t* gate_index_ptr = nullptr;
  const float* gate_lo_ptr = nullptr;
  const float* gate_hi_ptr = nullptr;
  if (gate_dir.has_value()) {
    TORCH_CHECK(gate_index.has_value() && gate_lo.has_value() && gate_hi.has_value(),
                "steer kernel: gate_dir needs gate_index, gate_lo and gate_hi");
    TORCH_CHECK(gate_dir->dim() == 2 && gate_dir->size(1) == width, "steer kernel: gate_dir must be [G, D]");
    gate_dir_ptr = vector_ptr(gate_dir, hidden, gate_dir->numel(), "gate_dir");
    TORCH_CHECK(gate_index->device() == hidden.device() && gate_index->scalar_type() == torch::kInt64 &&
                    gate_index->is_contiguous() && gate_index->numel() == rows,
                "steer kernel: gate_index must be a contiguous int64 [N] tensor on hidden's device");
    gate_index_ptr = gate_index->data_ptr<int64_t>();
    gate_lo_ptr = vector_ptr(gate_lo, hidden, rows, "gate_lo");
    gate_hi_ptr = vector_ptr(gate_hi, hidden, rows, "gate_hi");
  }
  uint8_t* gate_open_ptr = nullptr;
  if (gate_open.has_value()) {
    TORCH_CHECK(gate_dir.has_value(), "steer kernel: gate_open needs gate_dir");
    TORCH_CHECK(gate_open->device() == hidden.device() && gate_open->scalar_type() == torch::kBool &&
                    gate_open->is_contiguous() && gate_open->numel() == rows,
                "steer kernel: gate_open must be a contiguous bool [N] tensor on hidden's device");
    gate_open_ptr = reinterpret_cast<uint8_t*>(gate_open->data_ptr<bool>());
  }
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  const int err = steer_rows_cuda_launch(
      dtype_code(hidden), hidden.data_ptr(), out.data_ptr(), rows, width, rows > 0 ? hidden.stride(0) : 0,
      rows > 0 ? out.stride(0) : 0, table_ptr, index.data_ptr<int64_t>(), vector_ptr(coef, hidden, rows, "coef"),
      vector_ptr(lo, hidden, rows, "cap_min"), vector_ptr(hi, hidden, rows, "cap_max"), has_cap ? 1 : 0,
      mon_ptr, n_mon, proj_ptr, gate_dir_ptr, gate_index_ptr, gate_lo_ptr, gate_hi_ptr, gate_open_ptr,
      static_cast<void*>(stream));
  TORCH_CHECK(err == 0, "steer kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("steer_rows", &steer_rows, "Per-row fused steer / cap / gate / monitor update (CUDA)", py::arg("hidden"),
        py::arg("out"), py::arg("table"), py::arg("index"), py::arg("coef"), py::arg("lo"), py::arg("hi"),
        py::arg("has_cap"), py::arg("monitor"), py::arg("proj"), py::arg("gate_dir") = py::none(),
        py::arg("gate_index") = py::none(), py::arg("gate_lo") = py::none(), py::arg("gate_hi") = py::none(),
        py::arg("gate_open") = py::none());
}
