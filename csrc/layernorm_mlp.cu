// The transformer MLP branch: out = fc2(gelu(fc1(layer_norm(x)))) (+ residual), GELU exact (erf).
//
// Every GEMM runs on cuBLASLt (cublaslt.cu): fp32 accumulation, the bias through its BIAS epilogue, the residual
// through beta = 1. cuBLASLt's GELU epilogues (GELU, GELU_AUX, DGELU_BGRAD) implement the tanh approximation
// (PyTorch's test_linalg checks torch._addmm_activation(use_gelu=True) against F.gelu(approximate="tanh")), and
// this op's contract is nn.GELU's exact erf: the GELU and its derivative are two small fused elementwise kernels
// here, 16-byte vectorized, one pass each over the hidden activation.
//
// Forward:
//   LN(x)                      LayerNorm row kernel, GEMM dtype, fp32 statistics
//   pre = LN(x) @ fc1^T + b1   cuBLASLt (BIAS); kept as the op's `pre` output when save_pre
//   h   = GELU(pre)            gelu_fwd_kernel (in place when pre is not kept)
//   out = h @ fc2^T + b2 (+ residual)   cuBLASLt (BIAS, beta = 1 on the residual)
// Backward (only the gradients asked for):
//   pre  = the saved pre-activation, or recomputed (LN apply + fc1 on cuBLASLt)
//   dh   = dout @ fc2_weight                 cuBLASLt
//   da1  = dh * GELU'(pre)                   dgelu_kernel, in place over dh; also GELU(pre) for fc2's weight gradient
//                                            and per-chunk partial column sums of da1 (fc1's bias gradient)
//   dy   = da1 @ fc1_weight                  cuBLASLt, fp32 output, into the LayerNorm backward kernel
//   dfc2_weight = dout^T @ GELU(pre), dfc1_weight = da1^T @ LN(x): cuBLASLt (transposed views, no copies)
// Bias gradients come from fixed-order column sums (per-block partials, then column_sums): deterministic.

#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "vit_fast.h"

namespace vit_fast {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float gelu_cdf(float p) { return 0.5f * (1.f + erff(p * kSqrtHalf)); }

// h[i] = GELU(pre[i]) over n elements, V per thread and step. h may be pre (in place).
template <typename T, int V>
__global__ void __launch_bounds__(256) gelu_fwd_kernel(const T* pre, T* h, int64_t n) {
  using VT = Vec<T, V>;
  const int64_t nv = n / V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nv;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    VT v = reinterpret_cast<const VT*>(pre)[i];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float p = to_float(v.v[j]);
      v.v[j] = from_float<T>(p * gelu_cdf(p));
    }
    reinterpret_cast<VT*>(h)[i] = v;
  }
}

constexpr int kDgeluCols = 32;      // threads across a block's columns (V columns each)
constexpr int kDgeluRows = 8;       // threads down a block's rows
constexpr int kDgeluChunk = 64;     // rows per block: one partial row of column sums each

// da = dh * GELU'(pre) (da may be dh: in place), h = GELU(pre) when h != nullptr, and
// part[blockIdx.y, c] = sum of da[r, c] over the block's kDgeluChunk rows, in a fixed order. All (M, N) contiguous.
template <typename T, int V>
__global__ void __launch_bounds__(kDgeluCols * kDgeluRows)
    dgelu_kernel(const T* dh, const T* __restrict__ pre, T* da, T* __restrict__ h, float* __restrict__ part,
                 int64_t M, int N) {
  using VT = Vec<T, V>;
  __shared__ float red[kDgeluRows][kDgeluCols * V + 1];
  const int c0 = (blockIdx.x * kDgeluCols + threadIdx.x) * V;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kDgeluChunk;
  const int64_t last = min(first + kDgeluChunk, M);
  float sum[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sum[j] = 0.f;
  if (c0 < N) {
    for (int64_t r = first + threadIdx.y; r < last; r += kDgeluRows) {
      const int64_t off = (r * N + c0) / V;
      const VT g = reinterpret_cast<const VT*>(dh)[off];
      const VT p = reinterpret_cast<const VT*>(pre)[off];
      VT d, a;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float pv = to_float(p.v[j]);
        const float cdf = gelu_cdf(pv);
        const T dv = from_float<T>(to_float(g.v[j]) * (cdf + pv * __expf(-0.5f * pv * pv) * kInvSqrt2Pi));
        d.v[j] = dv;
        a.v[j] = from_float<T>(pv * cdf);
        sum[j] += to_float(dv);  // the stored (rounded) value: the bias gradient of what the GEMMs see
      }
      reinterpret_cast<VT*>(da)[off] = d;
      if (h != nullptr) reinterpret_cast<VT*>(h)[off] = a;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) red[threadIdx.y][threadIdx.x * V + j] = sum[j];
  __syncthreads();
  const int tid = threadIdx.y * kDgeluCols + threadIdx.x;
  for (int col = tid; col < kDgeluCols * V; col += kDgeluCols * kDgeluRows) {
    const int c = blockIdx.x * kDgeluCols * V + col;
    if (c < N) {
      float t = 0.f;
#pragma unroll
      for (int r = 0; r < kDgeluRows; ++r) t += red[r][col];
      part[static_cast<int64_t>(blockIdx.y) * N + c] = t;
    }
  }
}

// 16-byte vectors when every pointer and the row width allow them.
template <typename T>
bool can_vec(int64_t width, std::initializer_list<const void*> ptrs) {
  if (width % (16 / sizeof(T))) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

void gelu_fwd(const at::Tensor& pre, at::Tensor& h, cudaStream_t stream) {
  const int64_t n = pre.numel();
  if (n == 0) return;
  dispatch_half(pre.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto* pp = static_cast<const T*>(pre.data_ptr());
    auto* hp = static_cast<T*>(h.data_ptr());
    const bool vec = can_vec<T>(n, {pp, hp});
    const int v = vec ? 8 : 1;
    const int64_t blocks = std::min<int64_t>(ceil_div(n / v, 256), 65535);
    if (vec) {
      gelu_fwd_kernel<T, 8><<<blocks, 256, 0, stream>>>(pp, hp, n);
    } else {
      gelu_fwd_kernel<T, 1><<<blocks, 256, 0, stream>>>(pp, hp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// da (may be dh) = dh * GELU'(pre); h = GELU(pre) when defined; dbias = column sums of da (deterministic).
void dgelu(const at::Tensor& dh, const at::Tensor& pre, at::Tensor& da, at::Tensor& h, at::Tensor& dbias,
           bool want_dbias, cudaStream_t stream) {
  const int64_t M = dh.size(0);
  const int N = static_cast<int>(dh.size(1));
  if (M == 0 || N == 0) {
    if (want_dbias) dbias.zero_();
    return;
  }
  const int64_t chunks = ceil_div(M, kDgeluChunk);
  auto part = at::empty({chunks, N}, dh.options().dtype(at::kFloat));
  dispatch_half(dh.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto* gp = static_cast<const T*>(dh.data_ptr());
    const auto* pp = static_cast<const T*>(pre.data_ptr());
    auto* dp = static_cast<T*>(da.data_ptr());
    T* hp = h.defined() ? static_cast<T*>(h.data_ptr()) : nullptr;
    const bool vec = can_vec<T>(N, {gp, pp, dp, hp});
    const int v = vec ? 8 : 1;
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kDgeluCols * v)), static_cast<unsigned>(chunks));
    const dim3 block(kDgeluCols, kDgeluRows);
    if (vec) {
      dgelu_kernel<T, 8><<<grid, block, 0, stream>>>(gp, pp, dp, hp, part.data_ptr<float>(), M, N);
    } else {
      dgelu_kernel<T, 1><<<grid, block, 0, stream>>>(gp, pp, dp, hp, part.data_ptr<float>(), M, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (want_dbias) column_sums(part, dbias, stream);
}

// (M, C) view of t with a unit column stride: a view when possible, else a contiguous copy.
at::Tensor rows_of(const at::Tensor& t) {
  auto t2 = t.reshape({-1, t.size(-1)});
  return (t2.size(1) <= 1 || t2.stride(1) == 1) ? t2 : t2.contiguous();
}

struct Shapes {
  int64_t M, C, hidden, c_out;
};

Shapes check_common(const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                    const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight) {
  TORCH_CHECK(x.defined() && x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension (..., C); got a scalar");
  check_float(x, "x");
  const auto dev = x.device();
  const int64_t C = x.size(-1);
  for (const auto& [t, name] : {std::pair{&ln_weight, "ln_weight"}, std::pair{&ln_bias, "ln_bias"}}) {
    check_cuda(*t, name, dev);
    check_float(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, " must have shape (", C, ",) (the last dimension of x); got ",
                t->sizes());
  }
  check_cuda(fc1_weight, "fc1_weight", dev);
  check_half(fc1_weight, "fc1_weight");
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == C, "fc1_weight must have shape (hidden, ", C,
              ") (nn.Linear layout); got ", fc1_weight.sizes());
  const int64_t hidden = fc1_weight.size(0);
  const auto cdt = fc1_weight.scalar_type();
  check_cuda(fc1_bias, "fc1_bias", dev);
  TORCH_CHECK(fc1_bias.scalar_type() == cdt, "fc1_bias must have fc1_weight's dtype ", dtype_name(cdt), "; got ",
              dtype_name(fc1_bias.scalar_type()));
  TORCH_CHECK(fc1_bias.dim() == 1 && fc1_bias.size(0) == hidden, "fc1_bias must have shape (", hidden, ",); got ",
              fc1_bias.sizes());
  check_cuda(fc2_weight, "fc2_weight", dev);
  TORCH_CHECK(fc2_weight.scalar_type() == cdt, "fc2_weight must have fc1_weight's dtype ", dtype_name(cdt),
              "; got ", dtype_name(fc2_weight.scalar_type()));
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(1) == hidden, "fc2_weight must have shape (C_out, ", hidden,
              "); got ", fc2_weight.sizes());
  TORCH_CHECK(C <= 6144, "x: width C = ", C, " > 6144 is not supported by the CUDA LayerNorm");
  return {C ? x.numel() / C : 0, C, hidden, fc2_weight.size(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& fc1_weight,
    const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
    const std::optional<at::Tensor>& residual, double eps, bool save_pre) {
  const Shapes s = check_common(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight);
  const auto cdt = fc1_weight.scalar_type();
  check_cuda(fc2_bias, "fc2_bias", x.device());
  TORCH_CHECK(fc2_bias.scalar_type() == cdt, "fc2_bias must have fc1_weight's dtype ", dtype_name(cdt), "; got ",
              dtype_name(fc2_bias.scalar_type()));
  TORCH_CHECK(fc2_bias.dim() == 1 && fc2_bias.size(0) == s.c_out, "fc2_bias must have shape (", s.c_out, ",); got ",
              fc2_bias.sizes());
  TORCH_CHECK(eps > 0, "eps must be positive; got ", eps);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.c_out;
  at::ScalarType out_dtype = cdt;
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_cuda(*residual, "residual", x.device());
    check_float(*residual, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "residual must have the output's shape ",
                at::IntArrayRef(out_shape), "; got ", residual->sizes());
    out_dtype = c10::promoteTypes(cdt, residual->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  check_device_arch(x.device());
  const auto opts = x.options();
  auto out = at::empty(out_shape, opts.dtype(out_dtype));
  auto mean = at::empty({s.M}, opts.dtype(at::kFloat));
  auto rstd = at::empty({s.M}, opts.dtype(at::kFloat));
  auto pre = at::empty(save_pre ? std::vector<int64_t>{s.M, s.hidden} : std::vector<int64_t>{0}, opts.dtype(cdt));
  if (s.M == 0 || s.C == 0 || s.hidden == 0 || s.c_out == 0) {
    TORCH_CHECK(s.M == 0, "layernorm_mlp: zero-sized C, hidden or C_out is not supported");
    return {out, mean, rstd, pre};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto ln_out = at::empty({s.M, s.C}, opts.dtype(cdt));
  layer_norm_rows(rows_of(x), ln_weight.contiguous(), ln_bias.contiguous(), eps, ln_out, mean, rstd, false, stream);

  // pre-activation, kept as the op's output when save_pre; otherwise GELU overwrites it in place
  auto h = at::empty({s.M, s.hidden}, opts.dtype(cdt));
  at::Tensor pre_buf = save_pre ? pre : h;
  matmul(ln_out, fc1_weight, fc1_bias, at::Tensor(), pre_buf, stream);
  gelu_fwd(pre_buf, h, stream);

  auto out2 = out.view({s.M, s.c_out});
  const auto bias2 = fc2_bias.to(out_dtype);
  at::Tensor res2;
  if (has_res) {
    res2 = residual->to(out_dtype).reshape({s.M, s.c_out});
    if (res2.stride(1) != 1 || res2.stride(0) < s.c_out) res2 = res2.contiguous();  // C of the GEMM: row-major
  }
  matmul(h, fc2_weight, bias2, res2, out2, stream);
  return {out, mean, rstd, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& pre, bool grad_ln, bool grad_fc1, bool grad_fc2) {
  const Shapes s = check_common(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight);
  const auto cdt = fc1_weight.scalar_type();
  const auto dev = x.device();
  check_cuda(dout, "dout", dev);
  check_float(dout, "dout");
  TORCH_CHECK(dout.dim() == x.dim() && dout.numel() == s.M * s.c_out && dout.size(-1) == s.c_out,
              "dout must have the output's shape (..., ", s.c_out, "); got ", dout.sizes());
  check_cuda(mean, "mean", dev);
  check_cuda(rstd, "rstd", dev);
  check_fp32_vector(mean, s.M, "mean");
  check_fp32_vector(rstd, s.M, "rstd");
  check_cuda(pre, "pre", dev);
  TORCH_CHECK(pre.scalar_type() == cdt, "pre must have fc1_weight's dtype ", dtype_name(cdt), "; got ",
              dtype_name(pre.scalar_type()));
  const bool have_pre = pre.numel() != 0;
  TORCH_CHECK(!have_pre || (pre.dim() == 2 && pre.size(0) == s.M && pre.size(1) == s.hidden),
              "pre must have shape (", s.M, ", ", s.hidden, ") or (0,); got ", pre.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  const NoAutocast no_autocast;
  check_device_arch(dev);
  const auto opts = x.options();
  auto nothing = [&](at::ScalarType dt) { return at::empty({0}, opts.dtype(dt)); };
  at::Tensor dx = nothing(x.scalar_type()), dln_w = nothing(ln_weight.scalar_type()),
             dln_b = nothing(ln_bias.scalar_type()), dw1 = nothing(cdt), db1 = nothing(fc1_bias.scalar_type()),
             dw2 = nothing(cdt), db2 = nothing(cdt);
  if (!(grad_ln || grad_fc1 || grad_fc2)) return {dx, dln_w, dln_b, dw1, db1, dw2, db2};
  if (grad_ln) {
    dx = at::empty(x.sizes(), opts.memory_format(at::MemoryFormat::Contiguous));
    dln_w = at::empty({s.C}, ln_weight.options());
    dln_b = at::empty({s.C}, ln_bias.options());
  }
  if (grad_fc1) {
    dw1 = at::empty({s.hidden, s.C}, opts.dtype(cdt));
    db1 = at::empty({s.hidden}, fc1_bias.options());
  }
  if (grad_fc2) {
    dw2 = at::empty({s.c_out, s.hidden}, opts.dtype(cdt));
    db2 = at::empty({s.c_out}, opts.dtype(cdt));
  }
  if (s.M == 0) {
    for (auto* t : {&dln_w, &dln_b, &dw1, &db1, &dw2, &db2}) t->zero_();
    return {dx, dln_w, dln_b, dw1, db1, dw2, db2};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto x2 = rows_of(x);
  const auto lnw = ln_weight.contiguous(), lnb = ln_bias.contiguous();
  const auto dout2 = dout.reshape({s.M, s.c_out});
  const auto dout_c = dout2.to(cdt).contiguous();  // the GEMM operand

  at::Tensor ln_out;  // LN(x) in the GEMM dtype: fc1's input, for its weight gradient or the recomputation
  if (grad_fc1 || !have_pre) {
    ln_out = at::empty({s.M, s.C}, opts.dtype(cdt));
    auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    layer_norm_rows(x2, lnw, lnb, 1.0, ln_out, mean_c, rstd_c, true, stream);
  }
  at::Tensor pre_c = have_pre ? pre.contiguous() : at::empty({s.M, s.hidden}, opts.dtype(cdt));
  if (!have_pre) matmul(ln_out, fc1_weight, fc1_bias, at::Tensor(), pre_c, stream);  // fc1 again, bias, no GELU

  at::Tensor h;  // GELU(pre), fc2's input
  if (grad_fc2) h = at::empty({s.M, s.hidden}, opts.dtype(cdt));
  if (grad_ln || grad_fc1) {
    auto da1 = at::empty({s.M, s.hidden}, opts.dtype(cdt));  // dh, then da1 in place
    matmul(dout_c, fc2_weight.t(), at::Tensor(), at::Tensor(), da1, stream);
    dgelu(da1, pre_c, da1, h, db1, grad_fc1, stream);
    if (grad_fc1) matmul(da1.t(), ln_out.t(), at::Tensor(), at::Tensor(), dw1, stream);  // (hidden, C)
    if (grad_ln) {
      auto dy = at::empty({s.M, s.C}, opts.dtype(at::kFloat));  // d LN(x), fp32 into the LayerNorm backward
      matmul(da1, fc1_weight.t(), at::Tensor(), at::Tensor(), dy, stream);
      auto dx2 = dx.view({s.M, s.C});
      layer_norm_rows_backward(dy, x2, lnw, mean.contiguous(), rstd.contiguous(), dx2, dln_w, dln_b, stream);
    }
  } else if (grad_fc2) {
    gelu_fwd(pre_c, h, stream);
  }
  if (grad_fc2) {
    matmul(dout_c.t(), h.t(), at::Tensor(), at::Tensor(), dw2, stream);  // (C_out, hidden)
    column_sums(dout2.stride(1) == 1 ? dout2 : dout2.contiguous(), db2, stream);
  }
  return {dx, dln_w, dln_b, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace vit_fast

TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("layernorm_mlp_fwd_cuda", &vit_fast::layernorm_mlp_fwd);
  m.impl("layernorm_mlp_bwd_cuda", &vit_fast::layernorm_mlp_bwd);
}
