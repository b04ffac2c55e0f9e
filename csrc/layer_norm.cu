// LayerNorm over the last dimension: forward (fp32 statistics) and backward (deterministic parameter gradients).
//
// Forward: one warp per row. The row is read with 16-byte vector loads (when the width and the pointers allow
// it; element loads otherwise) in three sweeps, mean, centered variance, normalize: the first comes from DRAM, the
// other two from L1, and the two-pass variance stays exact when |mean| >> std. weight and bias are read as fp32
// (converted once per call when they are 16-bit) with vector loads, VEC columns at a time, next to x's vector.
//
// Backward: blocks of 4 to 32 consecutive rows (fewer rows per block for small M, so that there are always a few
// hundred blocks; the count depends only on M), one warp per row at a time. Each warp accumulates its rows'
// dweight/dbias contributions in its own shared-memory slice (lane-owned columns, no atomics); the block adds its
// warps' slices in a fixed order into one partial row, and column_sums adds the partial rows in a fixed order.
// The result does not depend on scheduling or on the GPU model.
//
// Also here: column_sums (used by every op for bias-like gradients) and the device-architecture check.

#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <algorithm>

#include "vit_fast.h"

namespace vit_fast {

// Only a floor: a GPU newer than the built SASS runs the PTX that setup.py embeds for the newest listed arch
// ("9.0+PTX"), which the driver JIT-compiles at first load.
void check_device_arch(const at::Device& device) {
  static int major[64] = {};
  const int dev = device.index();
  int m = dev >= 0 && dev < 64 ? major[dev] : 0;
  if (m == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev));
    if (dev >= 0 && dev < 64) major[dev] = m;
  }
  TORCH_CHECK(m >= 8, "vit_fast CUDA kernels need compute capability 8.0 or newer (Ampere, Hopper); device ", dev,
              " has ", m, ".x. Use the triton or reference backend.");
}

namespace {

constexpr int kRowsPerBlockFwd = 4;  // warps (rows) per forward block
constexpr int kBwdMaxRows = 32;      // rows per backward block (one partial row each), at most
constexpr int64_t kBwdBlocks = 512;  // backward blocks aimed for: rows per block = clamp(M / 512, 4, 32)

template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kRowsPerBlockFwd * 32)
    layer_norm_fwd_kernel(const Tin* __restrict__ x,  // (M, C), row stride ldx
                          int64_t ldx, const float* __restrict__ weight,  // (C,), 32-byte aligned
                          const float* __restrict__ bias,                 // (C,), 32-byte aligned
                          Tout* __restrict__ y,  // (M, C) contiguous
                          float* __restrict__ mean_out,  // (M,)
                          float* __restrict__ rstd_out,  // (M,)
                          int64_t M, int C, float eps, bool stats_given) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlockFwd + (threadIdx.x >> 5);
  if (row >= M) return;
  const Tin* xr = x + row * ldx;
  Tout* yr = y + row * static_cast<int64_t>(C);
  const int nvec = C / VEC;
  using VIn = Vec<Tin, VEC>;
  using VOut = Vec<Tout, VEC>;
  using VF = Vec<float, VEC>;

  float mean, rstd;
  if (stats_given) {
    mean = mean_out[row];
    rstd = rstd_out[row];
  } else {
    float s = 0.f;
    for (int v = lane; v < nvec; v += 32) {
      const VIn in = reinterpret_cast<const VIn*>(xr)[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += to_float(in.v[j]);
    }
    mean = warp_sum(s) / C;
    float ss = 0.f;
    for (int v = lane; v < nvec; v += 32) {
      const VIn in = reinterpret_cast<const VIn*>(xr)[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = to_float(in.v[j]) - mean;
        ss += d * d;
      }
    }
    rstd = rsqrtf(warp_sum(ss) / C + eps);
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
  for (int v = lane; v < nvec; v += 32) {
    const VIn in = reinterpret_cast<const VIn*>(xr)[v];
    const VF w = reinterpret_cast<const VF*>(weight)[v];
    const VF b = reinterpret_cast<const VF*>(bias)[v];
    VOut out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<Tout>((to_float(in.v[j]) - mean) * rstd * w.v[j] + b.v[j]);
    reinterpret_cast<VOut*>(yr)[v] = out;
  }
}

// Dynamic shared memory: warps * 2 * C floats (each warp's dweight and dbias slices).
template <typename Tx, typename Tdy, int VEC>
__global__ void layer_norm_bwd_kernel(const Tdy* __restrict__ dy,  // (M, C), row stride lddy
                                      int64_t lddy,
                                      const Tx* __restrict__ x,  // (M, C), row stride ldx
                                      int64_t ldx,
                                      const float* __restrict__ weight,  // (C,) fp32, 32-byte aligned
                                      const float* __restrict__ mean,  // (M,)
                                      const float* __restrict__ rstd,  // (M,)
                                      Tx* __restrict__ dx,  // (M, C) contiguous
                                      float* __restrict__ dw_part,  // (gridDim.x, C)
                                      float* __restrict__ db_part,  // (gridDim.x, C)
                                      int64_t M, int C, int rows_per_block) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  float* dw_s = smem + static_cast<size_t>(warp) * 2 * C;
  float* db_s = dw_s + C;
  const int nvec = C / VEC;
  using VX = Vec<Tx, VEC>;
  using VDY = Vec<Tdy, VEC>;
  using VF = Vec<float, VEC>;

  for (int c = lane; c < C; c += 32) {
    dw_s[c] = 0.f;
    db_s[c] = 0.f;
  }
  __syncwarp();  // the slots zeroed by one lane are accumulated by another
  // From here on each lane touches only its own slots of its warp's slice, until the merge.
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = min(first + rows_per_block, M);
  for (int64_t row = first + warp; row < last; row += warps) {
    const Tx* xr = x + row * ldx;
    const Tdy* dyr = dy + row * lddy;
    const float mu = mean[row];
    const float rs = rstd[row];
    float c1 = 0.f, c2 = 0.f;
    for (int v = lane; v < nvec; v += 32) {
      const VX xv = reinterpret_cast<const VX*>(xr)[v];
      const VDY dv = reinterpret_cast<const VDY*>(dyr)[v];
      const VF w = reinterpret_cast<const VF*>(weight)[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (to_float(xv.v[j]) - mu) * rs;
        const float g = to_float(dv.v[j]);
        const float wdy = w.v[j] * g;
        c1 += xhat * wdy;
        c2 += wdy;
        dw_s[j * nvec + v] += g * xhat;  // slot (c % VEC) * nvec + c / VEC: lanes hit consecutive banks
        db_s[j * nvec + v] += g;
      }
    }
    c1 = warp_sum(c1) / C;
    c2 = warp_sum(c2) / C;
    // The row walk repeats the forward's vector loop: x, dy and w load as VEC-wide vectors of their own types.
    Tx* dxr = dx + row * static_cast<int64_t>(C);
    for (int v = lane; v < nvec; v += 32) {
      const VX xv = reinterpret_cast<const VX*>(xr)[v];
      const VDY dv = reinterpret_cast<const VDY*>(dyr)[v];
      const VF w = reinterpret_cast<const VF*>(weight)[v];
      VX out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (to_float(xv.v[j]) - mu) * rs;
        const float wdy = w.v[j] * to_float(dv.v[j]);
        out.v[j] = from_float<Tx>((wdy - (xhat * c1 + c2)) * rs);
      }
      reinterpret_cast<VX*>(dxr)[v] = out;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int slot = (c % VEC) * nvec + c / VEC;
    float sw = 0.f, sb = 0.f;
    for (int w = 0; w < warps; ++w) {
      sw += smem[static_cast<size_t>(w) * 2 * C + slot];
      sb += smem[static_cast<size_t>(w) * 2 * C + C + slot];
    }
    dw_part[static_cast<int64_t>(blockIdx.x) * C + c] = sw;
    db_part[static_cast<int64_t>(blockIdx.x) * C + c] = sb;
  }
}

constexpr int kSumCols = 32;
constexpr int kSumRows = 8;
constexpr int64_t kSumBlocks = 512;    // blocks aimed for: the rows are split into chunks until there are this many
constexpr int64_t kSumMinChunk = 32;  // rows per chunk, at least

// out[blockIdx.y * cols + c] = sum of in[r * ld + c] over the rows of chunk blockIdx.y, in a fixed order.
__global__ void __launch_bounds__(kSumCols * kSumRows)
    column_sums_kernel(AnyPtr in, int64_t rows, int64_t cols, int64_t ld, int64_t rows_per_chunk, AnyPtr out) {
  __shared__ float part[kSumRows][kSumCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = min(first + rows_per_chunk, rows);
  float s = 0.f;
  if (col < cols) {
    for (int64_t r = first + threadIdx.y; r < last; r += kSumRows) s += in.load(r * ld + col);
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t = 0.f;
#pragma unroll
    for (int r = 0; r < kSumRows; ++r) t += part[r][threadIdx.x];
    out.store(static_cast<int64_t>(blockIdx.y) * cols + col, t);
  }
}

// Vector width in elements for 16-byte loads of T, or 1 when the width or the pointers do not allow it.
template <typename T>
int vec_width(int64_t C, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  constexpr int v = 16 / sizeof(T);
  if (C % v) return 1;
  for (const auto& [p, ld] : rows) {
    if (!aligned16(p) || ld % v) return 1;
  }
  return v;
}

// weight / bias as the row kernels read them: fp32, contiguous, 32-byte aligned (one Vec<float, 8>).
at::Tensor fp32_param(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  if ((reinterpret_cast<uintptr_t>(f.data_ptr()) & 31) != 0) f = f.clone();
  return f;
}

}  // namespace

void column_sums(const at::Tensor& in, at::Tensor& out, cudaStream_t stream) {
  TORCH_CHECK(in.dim() == 2 && (in.size(1) <= 1 || in.stride(1) == 1), "column_sums: expected rows with a unit "
              "column stride; got shape ", in.sizes(), " strides ", in.strides());
  TORCH_CHECK(out.is_contiguous() && out.numel() == in.size(1), "column_sums: out must be contiguous with ",
              in.size(1), " elements");
  const int64_t rows = in.size(0), cols = in.size(1);
  if (cols == 0) return;
  if (rows == 0) {
    out.zero_();
    return;
  }
  const dim3 block(kSumCols, kSumRows);
  // Split the rows into chunks (partial sums, then a second pass over them) until about kSumBlocks blocks run: the
  // chunking depends only on the shape, so the summation order, and the result, are fixed.
  const int64_t col_blocks = ceil_div(cols, kSumCols);
  const int64_t chunks = std::min(ceil_div(kSumBlocks, col_blocks), ceil_div(rows, kSumMinChunk));
  if (chunks > 1) {
    const int64_t chunk_rows = ceil_div(ceil_div(rows, chunks), kSumRows) * kSumRows;
    const int64_t used = ceil_div(rows, chunk_rows);
    auto part = at::empty({used, cols}, in.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(used));
    column_sums_kernel<<<grid, block, 0, stream>>>(AnyPtr(in), rows, cols, in.stride(0), chunk_rows, AnyPtr(part));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_sums(part, out, stream);
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kSumCols)), 1);
  column_sums_kernel<<<grid, block, 0, stream>>>(AnyPtr(in), rows, cols, in.stride(0), rows, AnyPtr(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void layer_norm_rows(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     at::Tensor& y2, at::Tensor& mean, at::Tensor& rstd, bool stats_given, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  const int C = static_cast<int>(x2.size(1));
  if (M == 0 || C == 0) return;
  const int64_t blocks = ceil_div(M, kRowsPerBlockFwd);
  const at::Tensor w32 = fp32_param(weight), b32 = fp32_param(bias);
  dispatch_float(x2.scalar_type(), [&](auto tin) {
    using Tin = decltype(tin);
    dispatch_float(y2.scalar_type(), [&](auto tout) {
      using Tout = decltype(tout);
      const auto* xp = static_cast<const Tin*>(x2.data_ptr());
      auto* yp = static_cast<Tout*>(y2.data_ptr());
      const int vec = vec_width<Tin>(C, {{xp, x2.stride(0)}}) > 1 && vec_width<Tout>(C, {{yp, C}}) > 1
                          ? 16 / static_cast<int>(sizeof(Tin))
                          : 1;
      auto launch = [&](auto kernel) {
        kernel<<<blocks, kRowsPerBlockFwd * 32, 0, stream>>>(xp, x2.stride(0), w32.data_ptr<float>(),
                                                             b32.data_ptr<float>(), yp,
                                                             mean.data_ptr<float>(), rstd.data_ptr<float>(), M, C,
                                                             static_cast<float>(eps), stats_given);
      };
      if (vec == 1) {
        launch(layer_norm_fwd_kernel<Tin, Tout, 1>);
      } else {
        launch(layer_norm_fwd_kernel<Tin, Tout, 16 / sizeof(Tin)>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void layer_norm_rows_backward(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight,
                              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx2, at::Tensor& dweight,
                              at::Tensor& dbias, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  const int C = static_cast<int>(x2.size(1));
  if (C == 0) return;
  if (M == 0) {
    dweight.zero_();
    dbias.zero_();
    return;
  }
  // Shared memory per warp: 2 * C floats; as many warps (up to 4) as fit in 48 KiB.
  const int warps = static_cast<int>(std::min<int64_t>(4, (48 * 1024) / (8 * static_cast<int64_t>(C))));
  TORCH_CHECK(warps >= 1, "layer_norm backward: width C = ", C, " exceeds 6144");
  const int rows_per_block =
      static_cast<int>(std::clamp<int64_t>(ceil_div(M, kBwdBlocks), kRowsPerBlockFwd, kBwdMaxRows));
  const int64_t blocks = ceil_div(M, rows_per_block);
  const at::Tensor w32 = fp32_param(weight);
  auto dw_part = at::empty({blocks, C}, x2.options().dtype(at::kFloat));
  auto db_part = at::empty({blocks, C}, x2.options().dtype(at::kFloat));
  const size_t smem = static_cast<size_t>(warps) * 2 * C * sizeof(float);
  dispatch_float(x2.scalar_type(), [&](auto tx) {
    using Tx = decltype(tx);
    auto run = [&](auto tdy) {
      using Tdy = decltype(tdy);
      const auto* xp = static_cast<const Tx*>(x2.data_ptr());
      const auto* dyp = static_cast<const Tdy*>(dy2.data_ptr());
      auto* dxp = static_cast<Tx*>(dx2.data_ptr());
      constexpr int V = 16 / sizeof(Tx) < 16 / sizeof(Tdy) ? 16 / sizeof(Tx) : 16 / sizeof(Tdy);
      const bool vec = vec_width<Tx>(C, {{xp, x2.stride(0)}, {dxp, C}}) > 1 &&
                       vec_width<Tdy>(C, {{dyp, dy2.stride(0)}}) > 1 && C % V == 0;
      auto launch = [&](auto kernel) {
        kernel<<<blocks, warps * 32, smem, stream>>>(dyp, dy2.stride(0), xp, x2.stride(0), w32.data_ptr<float>(),
                                                     mean.data_ptr<float>(), rstd.data_ptr<float>(), dxp,
                                                     dw_part.data_ptr<float>(), db_part.data_ptr<float>(), M, C,
                                                     rows_per_block);
      };
      if (vec) {
        launch(layer_norm_bwd_kernel<Tx, Tdy, V>);
      } else {
        launch(layer_norm_bwd_kernel<Tx, Tdy, 1>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dy2.scalar_type() == at::kFloat) {
      run(float{});
    } else {
      TORCH_CHECK(dy2.scalar_type() == x2.scalar_type(), "layer_norm backward: grad_out dtype ",
                  dtype_name(dy2.scalar_type()), " must be float32 or x's dtype ", dtype_name(x2.scalar_type()));
      run(Tx{});
    }
  });
  column_sums(dw_part, dweight, stream);
  column_sums(db_part, dbias, stream);
}

namespace {

// (M, C) view of t with a unit column stride: a view when possible, else a contiguous copy.
at::Tensor rows_of(const at::Tensor& t) {
  auto t2 = t.reshape({-1, t.size(-1)});
  return (t2.size(1) <= 1 || t2.stride(1) == 1) ? t2 : t2.contiguous();
}

void check_ln_params(const at::Tensor& x, const at::Tensor& weight, const char* wname) {
  check_cuda(weight, wname, x.device());
  check_float(weight, wname);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), wname, " must have shape (", x.size(-1),
              ",) (the last dimension of x); got ", weight.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension (..., C); got a scalar");
  check_float(x, "x");
  check_ln_params(x, weight, "weight");
  check_ln_params(x, bias, "bias");
  TORCH_CHECK(eps > 0, "eps must be positive; got ", eps);
  TORCH_CHECK(x.size(-1) <= 6144, "x: width C = ", x.size(-1), " > 6144 is not supported by the CUDA LayerNorm");
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  const int64_t C = x.size(-1);
  const int64_t M = C ? x.numel() / C : 0;
  auto y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto mean = at::empty({M}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0 || C == 0) return {y, mean, rstd};
  auto y2 = y.view({M, C});
  layer_norm_rows(rows_of(x), weight.contiguous(), bias.contiguous(), eps, y2, mean, rstd, false,
                  c10::cuda::getCurrentCUDAStream());
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension (..., C); got a scalar");
  check_float(x, "x");
  check_cuda(grad_out, "grad_out", x.device());
  check_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), "; got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() || grad_out.scalar_type() == at::kFloat,
              "grad_out must be float32 or x's dtype ", dtype_name(x.scalar_type()), "; got ",
              dtype_name(grad_out.scalar_type()));
  check_ln_params(x, weight, "weight");
  TORCH_CHECK(x.size(-1) <= 6144, "x: width C = ", x.size(-1), " > 6144 is not supported by the CUDA LayerNorm");
  const int64_t C = x.size(-1);
  const int64_t M = C ? x.numel() / C : 0;
  check_cuda(mean, "mean", x.device());
  check_cuda(rstd, "rstd", x.device());
  check_fp32_vector(mean, M, "mean");
  check_fp32_vector(rstd, M, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  auto dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto dweight = at::empty({C}, weight.options());
  auto dbias = at::empty({C}, weight.options());
  if (C == 0) return {dx, dweight, dbias};
  auto dx2 = dx.view({M, C});
  layer_norm_rows_backward(rows_of(grad_out), rows_of(x), weight.contiguous(), mean.contiguous(),
                           rstd.contiguous(), dx2, dweight, dbias, c10::cuda::getCurrentCUDAStream());
  return {dx, dweight, dbias};
}

}  // namespace

}  // namespace vit_fast

// Every op's .cu ends with this registration block, the form TORCH_LIBRARY_IMPL requires (same shape in each).
TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("layer_norm_fwd_cuda", &vit_fast::layer_norm_fwd);
  m.impl("layer_norm_bwd_cuda", &vit_fast::layer_norm_bwd);
}
