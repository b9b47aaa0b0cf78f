// Fused per-row steer / cap / gate / monitor kernel for fp32, fp16 and bf16 hidden states: the one
// steering op (see RowParams below for what each row does).
//
// This file deliberately includes no torch headers: it builds with a plain `nvcc -c`, and the
// torch binding (steer_binding.cpp) reaches it through the extern "C" launcher at the bottom.
//
// One thread block per row. Each thread keeps up to kCached of its row elements in registers
// between the projection pass and the write pass, so rows up to kCached * kMaxThreads (4096) wide
// are read from global memory once; wider rows re-read the remainder (normally from L2).
//
// Register budget: a block of T threads that each need R registers launches only if R * T fits the
// SM's 65,536 registers. With read-out on, ptxas gave this kernel 72-80 registers on sm_100/sm_120
// when nothing bounded it, so 1024-thread blocks (widths > 6400) failed to launch there. The block is
// therefore capped at kMaxThreads = 512 and the kernel declares __launch_bounds__(kMaxThreads), which
// makes ptxas keep R <= 128 on every architecture (measured: <= 64, no spills, sm_80..sm_120);
// tests/test_kernel_resources.py checks R * T against `nvcc --resource-usage` for each.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kMaxMonitor = 16;  // K limit of the Python API
constexpr int kCached = 8;       // row values per thread kept in registers
constexpr int kMaxThreads = 512;  // the __launch_bounds__ of the kernel
constexpr int kMinThreads = 64;

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_f32(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f32(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sums NV values over the block and gives every thread the totals. blockDim.x must be a
// multiple of 32. smem holds 32 * NV floats.
template <int NV>
__device__ __forceinline__ void block_sum(float (&vals)[NV], float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  // A previous call may still be reading smem.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    vals[i] = warp_sum(vals[i]);
    if (lane == 0) smem[warp * NV + i] = vals[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float v = lane < n_warps ? smem[lane * NV + i] : 0.f;
      vals[i] = warp_sum(v);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[i] = vals[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) vals[i] = smem[i];
}

int threads_for_width(int64_t width) {
  // Enough threads that the register cache covers the row, rounded to whole warps, never more than the
  // kernel's launch bounds.
  int64_t t = (width + kCached - 1) / kCached;
  t = (t + 31) / 32 * 32;
  if (t < kMinThreads) t = kMinThreads;
  if (t > kMaxThreads) t = kMaxThreads;
  return static_cast<int>(t);
}

// ---- each row picks a table entry (or none), a coefficient and cap bounds ----
//   i = index[row];  i < 0: h2 = h
//   else t = table[i]; h1 = h + coef[row] * t; p = <h1, t>;
//        h2 = h1 + (clamp(p, lo[row], hi[row]) - p) * t    (rows with a finite bound; t is unit there)
// Optional gate, decided on the row before the edit: gi = gate_index[row]; gi < 0: open; else
//   g = <h, gate_dir[gi]>, open = gate_lo[row] <= g <= gate_hi[row]; a closed row is left as it is
//   (its read-out is still computed) and gate_open[row] receives open when that pointer is set.
struct RowParams {
  const void* hidden;
  void* out;
  int64_t width;
  int64_t stride_in;
  int64_t stride_out;
  const float* table;    // [V, D]
  const int64_t* index;  // [N], -1 = unsteered
  const float* coef;     // [N]
  const float* lo;       // [N], -inf = unbounded
  const float* hi;       // [N], +inf = unbounded
  int has_cap;           // some row has a finite bound: run the projection pass
  const float* monitor;  // [K, D] or nullptr
  int n_mon;
  float* proj;  // [N, K] or nullptr
  const float* gate_dir;      // [G, D] or nullptr (no gates)
  const int64_t* gate_index;  // [N], -1 = ungated; nullptr with gate_dir
  const float* gate_lo;       // [N]
  const float* gate_hi;       // [N]
  uint8_t* gate_open;         // [N] or nullptr
};

// Whether row `row`'s gate is open: a block-wide dot product on the unedited row. Every thread of the
// block returns the same value, and the branch on gi is uniform over the block (gi is per row).
template <typename T>
__device__ __forceinline__ bool row_gate_open(const RowParams& P, const T* in_row, int64_t row, float* smem) {
  if (P.gate_dir == nullptr) return true;
  const int64_t gi = P.gate_index[row];
  if (gi < 0) return true;
  const float* u = P.gate_dir + gi * P.width;
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < P.width; i += blockDim.x) dot = fmaf(load_f32(in_row + i), u[i], dot);
  float total[1] = {dot};
  block_sum<1>(total, smem);
  // Written as two comparisons so that a NaN projection is closed.
  return total[0] >= P.gate_lo[row] && total[0] <= P.gate_hi[row];
}

template <typename T, bool kHasMon>
__global__ void __launch_bounds__(kMaxThreads) steer_rows_kernel(RowParams P) {
  __shared__ float smem[32 * kMaxMonitor];
  const int64_t row = blockIdx.x;
  const T* in_row = static_cast<const T*>(P.hidden) + row * P.stride_in;
  T* out_row = static_cast<T*>(P.out) + row * P.stride_out;
  const int64_t D = P.width;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;

  const bool open = row_gate_open<T>(P, in_row, row, smem);
  if (P.gate_open != nullptr && tid == 0) P.gate_open[row] = open ? 1 : 0;
  const int64_t idx = P.index[row];
  const bool steered = idx >= 0 && open;
  const float* t = steered ? P.table + idx * D : nullptr;
  const float c = steered ? P.coef[row] : 0.f;
  const float lo = P.lo[row];
  const float hi = P.hi[row];
  const bool bounded = steered && P.has_cap && (lo > -INFINITY || hi < INFINITY);

  float cache[kCached];
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t i = tid + static_cast<int64_t>(j) * nt;
    float x = 0.f;
    if (i < D) {
      x = load_f32(in_row + i);
      if (steered) x = fmaf(c, t[i], x);
      if (bounded) dot = fmaf(x, t[i], dot);
    }
    cache[j] = x;
  }
  const int64_t tail = static_cast<int64_t>(kCached) * nt;
  if (bounded) {
    for (int64_t i = tail + tid; i < D; i += nt) {
      float x = load_f32(in_row + i);
      x = fmaf(c, t[i], x);
      dot = fmaf(x, t[i], dot);
    }
  }
  // Every thread of the block takes the same branch (bounded is per row), so the barrier is uniform.
  float scale = 0.f;
  if (bounded) {
    float total[1] = {dot};
    block_sum<1>(total, smem);
    const float p = total[0];
    scale = fminf(fmaxf(p, lo), hi) - p;
  }

  float acc[kMaxMonitor];
#pragma unroll
  for (int k = 0; k < kMaxMonitor; ++k) acc[k] = 0.f;
  auto finish = [&](int64_t i, float x) {
    if (bounded) x = fmaf(scale, t[i], x);
    store_f32(out_row + i, x);
    if (kHasMon) {
#pragma unroll
      for (int k = 0; k < kMaxMonitor; ++k) {
        if (k < P.n_mon) acc[k] = fmaf(x, __ldg(P.monitor + k * D + i), acc[k]);
      }
    }
  };
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t i = tid + static_cast<int64_t>(j) * nt;
    if (i < D) finish(i, cache[j]);
  }
  for (int64_t i = tail + tid; i < D; i += nt) {
    float x = load_f32(in_row + i);
    if (steered) x = fmaf(c, t[i], x);
    finish(i, x);
  }
  if (kHasMon) {
    block_sum<kMaxMonitor>(acc, smem);
    if (tid == 0) {
#pragma unroll
      for (int k = 0; k < kMaxMonitor; ++k) {
        if (k < P.n_mon) P.proj[row * P.n_mon + k] = acc[k];
      }
    }
  }
}

template <typename T>
cudaError_t launch_rows_typed(const RowParams& P, int64_t rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(rows));
  const dim3 block(threads_for_width(P.width));
  if (P.n_mon > 0) {
    steer_rows_kernel<T, true><<<grid, block, 0, stream>>>(P);
  } else {
    steer_rows_kernel<T, false><<<grid, block, 0, stream>>>(P);
  }
  return cudaGetLastError();
}

}  // namespace

// The block size the launcher uses for rows of `width` elements (exported so that tests and tools check the
// launch against the register budget without a GPU).
extern "C" int steer_rows_cuda_threads(int64_t width) { return threads_for_width(width); }

// Launches the per-row kernel (see RowParams). index/coef/lo/hi are [rows]; table is [V, width]
// fp32. gate_dir [G, width] with gate_index/gate_lo/gate_hi [rows] turn on the gate (all nullptr: none);
// gate_open [rows] (optional) receives 1 where the row's gate was open. Returns a cudaError_t value
// (0 = success).
extern "C" int steer_rows_cuda_launch(int dtype, const void* hidden, void* out, int64_t rows, int64_t width,
                                      int64_t stride_in, int64_t stride_out, const float* table,
                                      const int64_t* index, const float* coef, const float* lo,
                                      const float* hi, int has_cap, const float* monitor, int n_mon,
                                      float* proj, const float* gate_dir, const int64_t* gate_index,
                                      const float* gate_lo, const float* gate_hi, uint8_t* gate_open,
                                      void* stream) {
  if (rows < 0 || width < 0 || n_mon < 0 || n_mon > kMaxMonitor || rows > 0x7fffffffLL) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if ((monitor == nullptr) != (n_mon == 0) || (n_mon > 0 && proj == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0 || width == 0) return 0;
  if (index == nullptr || coef == nullptr || lo == nullptr || hi == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (gate_dir != nullptr && (gate_index == nullptr || gate_lo == nullptr || gate_hi == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  RowParams P;
  P.hidden = hidden;
  P.out = out;
  P.width = width;
  P.stride_in = stride_in;
  P.stride_out = stride_out;
  P.table = table;
  P.index = index;
  P.coef = coef;
  P.lo = lo;
  P.hi = hi;
  P.has_cap = has_cap;
  P.monitor = monitor;
  P.n_mon = n_mon;
  P.proj = proj;
  P.gate_dir = gate_dir;
  P.gate_index = gate_index;
  P.gate_lo = gate_lo;
  P.gate_hi = gate_hi;
  P.gate_open = gate_open;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return static_cast<int>(launch_rows_typed<float>(P, rows, s));
    case kFloat16:
      return static_cast<int>(launch_rows_typed<__half>(P, rows, s));
    case kBFloat16:
      return static_cast<int>(launch_rows_typed<__nv_bfloat16>(P, rows, s));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
