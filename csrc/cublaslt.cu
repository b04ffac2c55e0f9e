// The one cuBLASLt entry point of the extension: every GEMM of the CUDA backend runs here.
//
//   D (M, N) = A (M, K) @ B^T [+ bias (N,)] [+ C (M, N)]      B given as (N, K): nn.Linear's weight layout
//
// Row-major ATen matrices are handed to cuBLASLt as their column-major transposes, D^T = B A^T, so each operand
// only needs a unit stride in one of its two dimensions (a transposed view costs nothing). fp32 accumulation
// (CUBLAS_COMPUTE_32F), fp16/bf16 operands, D and C in the operands' dtype or fp32. The bias goes through
// CUBLASLT_EPILOGUE_BIAS, a residual through beta = 1 with C = the residual. The algorithm is chosen once per
// (device, shape, layouts, alignments, dtypes, epilogue) by cublasLtMatmulAlgoGetHeuristic and cached; the
// workspace comes from ATen's caching allocator on the current stream; the handle is the one ATen keeps for the
// current device and stream.

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <cublasLt.h>

#include <array>
#include <map>
#include <mutex>

#include "vit_fast.h"

namespace vit_fast {
namespace {

constexpr size_t kMaxWorkspace = 32u << 20;

#define VF_LT_CHECK(expr)                                                                                        \
  do {                                                                                                           \
    const cublasStatus_t st_ = (expr);                                                                           \
    TORCH_CHECK(st_ == CUBLAS_STATUS_SUCCESS, "vit_fast cuBLASLt: ", #expr, " failed with status ",             \
                static_cast<int>(st_));                                                                          \
  } while (0)

cudaDataType_t cuda_type(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "vit_fast cuBLASLt: unsupported dtype ", dtype_name(st));
  }
  return CUDA_R_32F;
}

// Largest power of two (<= 256 bytes) dividing the address and every stride (in bytes): what cuBLASLt may assume.
uint32_t alignment(const void* p, std::initializer_list<int64_t> strides_bytes) {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256;
  for (const int64_t s : strides_bytes) bits |= static_cast<uint64_t>(s);
  return static_cast<uint32_t>(bits & (~bits + 1));  // lowest set bit
}

// How a logical row-major (rows, cols) matrix is stored: unit column stride (row-major, ld = stride(0)) or unit
// row stride (column-major, ld = stride(1)). False when neither holds.
struct Storage {
  bool row_major = true;
  int64_t ld = 0;
};

bool storage_of(const at::Tensor& t, Storage& s) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if ((t.stride(1) == 1 || cols == 1) && (rows == 1 || t.stride(0) >= std::max<int64_t>(cols, 1))) {
    s = {true, rows == 1 ? std::max<int64_t>(cols, 1) : t.stride(0)};
    return true;
  }
  if ((t.stride(0) == 1 || rows == 1) && (cols == 1 || t.stride(1) >= std::max<int64_t>(rows, 1))) {
    s = {false, cols == 1 ? std::max<int64_t>(rows, 1) : t.stride(1)};
    return true;
  }
  return false;
}

struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  Descriptors() = default;
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

void make_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld,
                 const LtBatch& batch, int64_t batch_stride) {
  VF_LT_CHECK(cublasLtMatrixLayoutCreate(layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  if (batch.count > 1) {
    const int32_t count = static_cast<int32_t>(batch.count);
    VF_LT_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    VF_LT_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &batch_stride,
                                                 sizeof(batch_stride)));
  }
}

struct Choice {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

using Key = std::array<int64_t, 23>;

std::mutex cache_mutex;
std::map<Key, Choice> cache;

}  // namespace

bool lt_matmul(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& bias_in, const at::Tensor& c,
               at::Tensor& d, cudaStream_t stream, const LtBatch& batch) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && d.dim() == 2, "vit_fast cuBLASLt: expected 2-D operands");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  TORCH_CHECK(b_in.size(1) == K && d.size(0) == M && d.size(1) == N, "vit_fast cuBLASLt: shape mismatch A ",
              a_in.sizes(), " B ", b_in.sizes(), " D ", d.sizes());
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "vit_fast cuBLASLt: A and B dtypes differ");
  check_half(a_in, "GEMM operand");
  if (M == 0 || N == 0) return true;
  if (K == 0) return false;  // nothing for cuBLASLt to multiply: the caller's ATen path writes bias / C

  // Operands: any layout with a unit stride in one dimension; anything else is copied once.
  Storage sa, sb, sd, sc;
  const at::Tensor a = storage_of(a_in, sa) ? a_in : a_in.contiguous();
  if (!a.is_same(a_in)) storage_of(a, sa);
  const at::Tensor b = storage_of(b_in, sb) ? b_in : b_in.contiguous();
  if (!b.is_same(b_in)) storage_of(b, sb);
  TORCH_CHECK(storage_of(d, sd) && sd.row_major, "vit_fast cuBLASLt: D must have a unit column stride; got strides ",
              d.strides());
  const bool has_c = c.defined();
  if (has_c) {
    TORCH_CHECK(c.sizes() == d.sizes() && c.scalar_type() == d.scalar_type(),
                "vit_fast cuBLASLt: C must have D's shape and dtype");
    TORCH_CHECK(storage_of(c, sc) && sc.row_major, "vit_fast cuBLASLt: C must have a unit column stride");
  } else {
    sc = sd;
  }
  at::Tensor bias = bias_in;
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.scalar_type() == d.scalar_type(),
                "vit_fast cuBLASLt: bias must have shape (", N, ",) and D's dtype");
    if (!bias.is_contiguous() || !aligned16(bias.data_ptr())) bias = bias.clone(at::MemoryFormat::Contiguous);
  }
  if (batch.count > 1) {
    TORCH_CHECK(sa.row_major && sb.row_major, "vit_fast cuBLASLt: batched operands must be row-major");
  }

  const cudaDataType_t ab_type = cuda_type(a.scalar_type()), d_type = cuda_type(d.scalar_type());
  const int64_t es_ab = a.element_size(), es_d = d.element_size();
  const void* c_ptr = has_c ? c.data_ptr() : d.data_ptr();
  // cuBLASLt's A is op(B') (N x K), its B is op(A') (K x M), D^T is N x M column-major.
  const cublasOperation_t trans_a = sb.row_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t trans_b = sa.row_major ? CUBLAS_OP_N : CUBLAS_OP_T;
  const uint32_t al_a = alignment(b.data_ptr(), {sb.ld * es_ab, batch.b * es_ab});
  const uint32_t al_b = alignment(a.data_ptr(), {sa.ld * es_ab, batch.a * es_ab});
  const uint32_t al_c = alignment(c_ptr, {sc.ld * es_d, (has_c ? batch.c : batch.d) * es_d});
  const uint32_t al_d = alignment(d.data_ptr(), {sd.ld * es_d, batch.d * es_d});
  const int64_t c_batch_stride = has_c ? batch.c : batch.d;

  Descriptors r;
  VF_LT_CHECK(cublasLtMatmulDescCreate(&r.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  VF_LT_CHECK(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  VF_LT_CHECK(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  if (bias.defined()) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const void* bp = bias.data_ptr();
    VF_LT_CHECK(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    VF_LT_CHECK(cublasLtMatmulDescSetAttribute(r.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  if (sb.row_major) {
    make_layout(&r.a, ab_type, K, N, sb.ld, batch, batch.b);
  } else {
    make_layout(&r.a, ab_type, N, K, sb.ld, batch, batch.b);
  }
  if (sa.row_major) {
    make_layout(&r.b, ab_type, K, M, sa.ld, batch, batch.a);
  } else {
    make_layout(&r.b, ab_type, M, K, sa.ld, batch, batch.a);
  }
  make_layout(&r.c, d_type, N, M, sc.ld, batch, c_batch_stride);
  make_layout(&r.d, d_type, N, M, sd.ld, batch, batch.d);

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const Key key{d.get_device(), M, N, K, static_cast<int64_t>(ab_type), static_cast<int64_t>(d_type), trans_a,
                trans_b, sa.ld, sb.ld, sc.ld, sd.ld, al_a, al_b, al_c, al_d, bias.defined(), has_c, batch.count,
                batch.a, batch.b, c_batch_stride, batch.d};
  Choice choice;
  bool cached = false;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      choice = it->second;
      cached = true;
    }
  }
  if (!cached) {
    VF_LT_CHECK(cublasLtMatmulPreferenceCreate(&r.pref));
    const size_t ws = kMaxWorkspace;
    VF_LT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    VF_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, 4));
    VF_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, 4));
    VF_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, 4));
    VF_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(r.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, 4));
    cublasLtMatmulHeuristicResult_t heuristic = {};
    int found = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle, r.op, r.a, r.b, r.c, r.d, r.pref, 1, &heuristic, &found);
    // NOT_SUPPORTED: no algorithm for this layout/dtype combination; the caller falls back to ATen.
    TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS || st == CUBLAS_STATUS_NOT_SUPPORTED,
                "vit_fast cuBLASLt: cublasLtMatmulAlgoGetHeuristic failed with status ", static_cast<int>(st));
    if (st == CUBLAS_STATUS_SUCCESS && found > 0) choice = {true, heuristic.algo, heuristic.workspaceSize};
    const std::lock_guard<std::mutex> lock(cache_mutex);
    cache.emplace(key, choice);
  }
  if (!choice.found) return false;

  // The workspace lives on the current stream's pool: freed after the call, reused only by work ordered after it.
  at::Tensor workspace;
  void* ws_ptr = nullptr;
  if (choice.workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(choice.workspace)}, d.options().dtype(at::kByte));
    ws_ptr = workspace.data_ptr();
  }
  const float alpha = 1.f, beta = has_c ? 1.f : 0.f;
  VF_LT_CHECK(cublasLtMatmul(handle, r.op, &alpha, b.data_ptr(), r.a, a.data_ptr(), r.b, &beta, c_ptr, r.c,
                             d.data_ptr(), r.d, &choice.algo, ws_ptr, choice.workspace, stream));
  return true;
}

void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& c, at::Tensor& d,
            cudaStream_t stream) {
  if (lt_matmul(a, b, bias, c, d, stream)) return;
  // No cuBLASLt algorithm for this problem (or K == 0): the same sum through ATen, in fp32, then one cast.
  auto y = at::mm(a.to(at::kFloat), b.to(at::kFloat).t());
  if (bias.defined()) y.add_(bias);
  if (c.defined()) y.add_(c);
  d.copy_(y);
}

}  // namespace vit_fast
