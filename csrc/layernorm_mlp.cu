// The transformer MLP branch: out = fc2(gelu(fc1(layer_norm(x)))) (+ residual), GELU exact (erf).
//
// Forward: the LayerNorm row kernel writes LN(x) once in the GEMM dtype (M x C, a quarter of the hidden
// activation) with fp32 statistics; fc1 runs on the tensor-core GEMM of gemm.cuh whose epilogue adds the bias,
// stores the pre-activation (training) and applies exact GELU; fc2 runs on cuBLASLt with its BIAS epilogue and
// beta = 1 on the residual, so no pass over memory adds a bias, a GELU or a residual on its own.
//
// Why fc1 is not a cuBLASLt GEMM: cuBLASLt's GELU epilogues implement the tanh approximation (PyTorch's
// test_linalg checks torch._addmm_activation(use_gelu=True), the cuBLASLt GELU-epilogue path, against
// F.gelu(approximate="tanh") on CUDA); the op's contract is nn.GELU's exact erf. The same holds for the
// DGELU_BGRAD backward epilogue. Both GELU GEMMs therefore run on the hand-written GEMM.
//
// Backward (only the gradients asked for):
//   pre  = the saved pre-activation, or recomputed (LN apply + fc1 GEMM with a bias-only epilogue)
//   da1  = (dout @ fc2_weight) * GELU'(pre)    hand GEMM; its epilogue also stores GELU(pre) for fc2's weight
//                                              gradient and per-128-row partial column sums for fc1's bias grad
//   dy   = da1 @ fc1_weight                    cuBLASLt, fp32 output, into the LayerNorm backward kernel
//   dfc2_weight = dout^T @ GELU(pre), dfc1_weight = da1^T @ LN(x): cuBLAS through ATen (plain GEMMs)
// Bias gradients come from fixed-order column sums: deterministic.

#include <torch/library.h>

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>

#include "gemm.cuh"
#include "vit_fast.h"

namespace vit_fast {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// fc1: v + bias, optionally stored as the pre-activation, then exact GELU (or not) into out.
template <typename T>
struct Fc1Epilogue {
  static constexpr bool kColSum = false;
  const T* bias;  // (N,)
  T* out;         // (M, N) contiguous: GELU(v + bias), or v + bias when !gelu
  T* pre;         // (M, N) contiguous or nullptr: v + bias
  int N;
  bool gelu;
  __device__ __forceinline__ void operator()(int r, int c, float v0, float v1, float&, float&) const {
    const bool two = c + 1 < N;
    v0 += to_float(bias[c]);
    if (two) v1 += to_float(bias[c + 1]);
    const int64_t off = static_cast<int64_t>(r) * N;
    if (pre != nullptr) gemm::store_pair(pre + off, c, N, v0, v1);
    if (gelu) {
      v0 = 0.5f * v0 * (1.f + erff(v0 * kSqrtHalf));
      v1 = 0.5f * v1 * (1.f + erff(v1 * kSqrtHalf));
    }
    gemm::store_pair(out + off, c, N, v0, v1);
  }
};

// dH = dout @ fc2_weight -> d(pre-activation) = dH * GELU'(pre); also GELU(pre) (for fc2's weight gradient) and
// the values summed per column for fc1's bias gradient.
template <typename T>
struct DgeluEpilogue {
  static constexpr bool kColSum = true;
  const T* pre;  // (M, N) contiguous
  T* da;         // (M, N) contiguous
  T* h;          // (M, N) contiguous or nullptr
  int N;
  __device__ __forceinline__ void operator()(int r, int c, float v0, float v1, float& s0, float& s1) const {
    const bool two = c + 1 < N;
    const int64_t off = static_cast<int64_t>(r) * N + c;
    const float p0 = to_float(pre[off]);
    const float p1 = two ? to_float(pre[off + 1]) : 0.f;
    const float cdf0 = 0.5f * (1.f + erff(p0 * kSqrtHalf));
    const float cdf1 = 0.5f * (1.f + erff(p1 * kSqrtHalf));
    const float d0 = v0 * (cdf0 + p0 * __expf(-0.5f * p0 * p0) * kInvSqrt2Pi);
    const float d1 = v1 * (cdf1 + p1 * __expf(-0.5f * p1 * p1) * kInvSqrt2Pi);
    gemm::store_pair(da + static_cast<int64_t>(r) * N, c, N, d0, d1);
    if (h != nullptr) gemm::store_pair(h + static_cast<int64_t>(r) * N, c, N, p0 * cdf0, p1 * cdf1);
    s0 = d0;
    s1 = two ? d1 : 0.f;
  }
};

cudaDataType_t cuda_type(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// Largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al)) al >>= 1;
  return al;
}

struct LtResources {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtResources() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

constexpr size_t kLtWorkspace = 32u << 20;

// d (M, N) = a (M, K) @ w^T [+ bias (N,)] [+ c (M, N)] through cuBLASLt, fp32 accumulation.
// a: unit column stride; w: (N, K) with a unit stride in either dimension; c, d: unit column stride, d's dtype
// (bias and c in d's dtype). Returns false, having launched nothing, when cuBLASLt has no algorithm for it.
bool lt_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& c, at::Tensor& d,
               cudaStream_t stream) {
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  const cudaDataType_t ab = cuda_type(a.scalar_type()), dt = cuda_type(d.scalar_type());
  const bool w_rows = w.stride(1) == 1;  // w row-major (N, K)
  LtResources r;
#define VF_LT(call)                                   \
  do {                                                \
    if ((call) != CUBLAS_STATUS_SUCCESS) return false; \
  } while (0)
  VF_LT(cublasLtMatmulDescCreate(&r.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major view: D^T (N x M) = op(W) (N x K) @ A^T (K x M).
  const cublasOperation_t ta = w_rows ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  VF_LT(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  VF_LT(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (bias.defined()) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const void* bp = bias.data_ptr();
    VF_LT(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    VF_LT(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  if (w_rows) {
    VF_LT(cublasLtMatrixLayoutCreate(&r.a, ab, K, N, w.stride(0)));
  } else {
    VF_LT(cublasLtMatrixLayoutCreate(&r.a, ab, N, K, w.stride(1)));
  }
  VF_LT(cublasLtMatrixLayoutCreate(&r.b, ab, K, M, a.stride(0)));
  VF_LT(cublasLtMatrixLayoutCreate(&r.d, dt, N, M, d.stride(0)));
  VF_LT(cublasLtMatrixLayoutCreate(&r.c, dt, N, M, c.defined() ? c.stride(0) : d.stride(0)));

  auto workspace = at::empty({static_cast<int64_t>(kLtWorkspace)}, a.options().dtype(at::kByte));
  VF_LT(cublasLtMatmulPreferenceCreate(&r.pref));
  const size_t ws = kLtWorkspace;
  VF_LT(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const void* cp = c.defined() ? c.data_ptr() : d.data_ptr();
  const uint32_t al_a = alignment(w.data_ptr()), al_b = alignment(a.data_ptr()), al_c = alignment(cp),
                 al_d = alignment(d.data_ptr());
  VF_LT(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, 4));
  VF_LT(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, 4));
  VF_LT(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, 4));
  VF_LT(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, 4));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  VF_LT(cublasLtMatmulAlgoGetHeuristic(handle, r.op, r.a, r.b, r.c, r.d, r.pref, 1, &heuristic, &found));
  if (found == 0) return false;
  const float alpha = 1.f, beta = c.defined() ? 1.f : 0.f;
  VF_LT(cublasLtMatmul(handle, r.op, &alpha, w.data_ptr(), r.a, a.data_ptr(), r.b, &beta, cp, r.c, d.data_ptr(), r.d,
                       &heuristic.algo, workspace.data_ptr(), ws, stream));
#undef VF_LT
  return true;
}

// w as lt_linear takes it: a unit stride in one of its two dimensions.
at::Tensor lt_weight(const at::Tensor& w) { return w.stride(1) == 1 || w.stride(0) == 1 ? w : w.contiguous(); }

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

  auto h = at::empty({s.M, s.hidden}, opts.dtype(cdt));
  const auto w1 = fc1_weight.contiguous();
  const auto b1 = fc1_bias.contiguous();
  dispatch_half(cdt, [&](auto tag) {
    using T = decltype(tag);
    gemm::RowMajor<T> a{static_cast<const T*>(ln_out.data_ptr()), s.C, static_cast<int>(s.M), static_cast<int>(s.C)};
    gemm::RowMajor<T> b{static_cast<const T*>(w1.data_ptr()), s.C, static_cast<int>(s.hidden), static_cast<int>(s.C)};
    Fc1Epilogue<T> epi{static_cast<const T*>(b1.data_ptr()), static_cast<T*>(h.data_ptr()),
                       save_pre ? static_cast<T*>(pre.data_ptr()) : nullptr, static_cast<int>(s.hidden), true};
    gemm::launch<T>(a, b, epi, s.M, s.hidden, s.C, nullptr, stream);
  });

  auto out2 = out.view({s.M, s.c_out});
  const auto bias2 = fc2_bias.to(out_dtype).contiguous();
  at::Tensor res2;
  if (has_res) {
    res2 = residual->to(out_dtype).reshape({s.M, s.c_out});
    if (res2.stride(1) != 1) res2 = res2.contiguous();
  }
  if (!lt_linear(h, lt_weight(fc2_weight), bias2, res2, out2, stream)) {
    // No cuBLASLt algorithm for this case: the same result through ATen (cuBLAS) and one extra pass.
    auto y = at::addmm(fc2_bias, h, fc2_weight.t());
    out2.copy_(has_res ? y.to(out_dtype).add_(res2) : y);
  }
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
  const auto w1 = fc1_weight.contiguous(), b1 = fc1_bias.contiguous();
  const auto dout2 = dout.reshape({s.M, s.c_out});
  const auto dout_c = dout2.to(cdt).contiguous();  // the GEMM operand

  at::Tensor ln_out;  // LN(x) in the GEMM dtype: fc1's input, for its weight gradient or the recomputation
  if (grad_fc1 || !have_pre) {
    ln_out = at::empty({s.M, s.C}, opts.dtype(cdt));
    auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    layer_norm_rows(x2, lnw, lnb, 1.0, ln_out, mean_c, rstd_c, true, stream);
  }
  at::Tensor pre_c = have_pre ? pre.contiguous() : at::empty({s.M, s.hidden}, opts.dtype(cdt));
  dispatch_half(cdt, [&](auto tag) {
    using T = decltype(tag);
    if (!have_pre) {  // the forward ran without saving it: fc1 again, bias but no GELU
      gemm::RowMajor<T> a{static_cast<const T*>(ln_out.data_ptr()), s.C, static_cast<int>(s.M),
                          static_cast<int>(s.C)};
      gemm::RowMajor<T> b{static_cast<const T*>(w1.data_ptr()), s.C, static_cast<int>(s.hidden),
                          static_cast<int>(s.C)};
      Fc1Epilogue<T> epi{static_cast<const T*>(b1.data_ptr()), static_cast<T*>(pre_c.data_ptr()), nullptr,
                         static_cast<int>(s.hidden), false};
      gemm::launch<T>(a, b, epi, s.M, s.hidden, s.C, nullptr, stream);
    }
  });

  at::Tensor h;  // GELU(pre), fc2's input
  if (grad_ln || grad_fc1) {
    auto da1 = at::empty({s.M, s.hidden}, opts.dtype(cdt));
    if (grad_fc2) h = at::empty({s.M, s.hidden}, opts.dtype(cdt));
    const int64_t row_blocks = ceil_div(s.M, gemm::BM);
    auto db1_part = at::empty({row_blocks, s.hidden}, opts.dtype(at::kFloat));
    const auto w2t = fc2_weight.t().contiguous();  // (hidden, C_out): the GEMM's "B rows"
    dispatch_half(cdt, [&](auto tag) {
      using T = decltype(tag);
      gemm::RowMajor<T> a{static_cast<const T*>(dout_c.data_ptr()), s.c_out, static_cast<int>(s.M),
                          static_cast<int>(s.c_out)};
      gemm::RowMajor<T> b{static_cast<const T*>(w2t.data_ptr()), s.c_out, static_cast<int>(s.hidden),
                          static_cast<int>(s.c_out)};
      DgeluEpilogue<T> epi{static_cast<const T*>(pre_c.data_ptr()), static_cast<T*>(da1.data_ptr()),
                           grad_fc2 ? static_cast<T*>(h.data_ptr()) : nullptr, static_cast<int>(s.hidden)};
      gemm::launch<T>(a, b, epi, s.M, s.hidden, s.c_out, db1_part.data_ptr<float>(), stream);
    });
    if (grad_fc1) {
      column_sums(db1_part, db1, stream);
      at::mm_out(dw1, da1.t(), ln_out);  // (hidden, C)
    }
    if (grad_ln) {
      auto dy = at::empty({s.M, s.C}, opts.dtype(at::kFloat));  // d LN(x), fp32 into the LayerNorm backward
      if (!lt_linear(da1, lt_weight(fc1_weight.t()), at::Tensor(), at::Tensor(), dy, stream)) {
        at::mm_out(dy, da1.to(at::kFloat), fc1_weight.to(at::kFloat));
      }
      auto dx2 = dx.view({s.M, s.C});
      layer_norm_rows_backward(dy, x2, lnw, mean.contiguous(), rstd.contiguous(), dx2, dln_w, dln_b, stream);
    }
  }
  if (grad_fc2) {
    if (!h.defined()) h = at::gelu(pre_c);
    at::mm_out(dw2, dout_c.t(), h);  // (C_out, hidden)
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
