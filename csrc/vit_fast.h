// vit_fast CUDA extension: what every translation unit shares.
//
// - argument checks that name the argument (TORCH_CHECK at the op boundary);
// - element types: the CUDA types behind at::Half / at::BFloat16, conversions, packed pairs, and a pointer
//   whose element type is chosen at run time (for the few loads/stores whose dtype varies: statistics-sized
//   vectors, epilogue extras), so kernels are templated only on the GEMM/attention element type;
// - warp reductions;
// - sm_80 tensor-core primitives: cp.async, ldmatrix, mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate), for the
//   attention kernels;
// - host launchers defined in one .cu and used by others (LayerNorm rows, column sums, the cuBLASLt GEMM).
//
// The kernels need sm_80 or newer (cp.async, bf16 mma). Built for an older architecture they compile to a trap,
// and the ops refuse such a device at the boundary (check_device_arch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define VF_OLD_ARCH 1
#endif

namespace vit_fast {

// ---------------------------------------------------------------------------------------------------------------
// Host-side checks

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the device of the first input); got ",
              t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16; got ", dtype_name(st));
}

inline void check_half(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, name,
              " must be float16 or bfloat16 (the tensor-core kernels); got ", dtype_name(st));
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D; got shape ", t.sizes());
}

inline void check_fp32_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32; got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",); got ", t.sizes());
}

// The kernels use sm_80 instructions. Cached per device: one attribute query per device and process.
void check_device_arch(const at::Device& device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The ATen calls inside an op (cuBLAS GEMMs, casts) must not be re-cast by an enclosing torch.autocast: the op
// was reached through autocast's fallthrough, so autocast is still active for whatever it calls.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Raise the dynamic shared-memory limit of a kernel (needed above 48 KiB), once per kernel and device.
inline void allow_smem_impl(const void* kernel, int bytes) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, dev}) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done.insert({kernel, dev});
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) allow_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Element types

template <typename T> struct CudaType;
template <> struct CudaType<float> { using type = float; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two 16-bit values in one 32-bit register, the first in the low half (the mma operand order).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Runtime dtype of an AnyPtr.
enum class Kind : int { F32 = 0, F16 = 1, BF16 = 2 };

inline Kind kind_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return Kind::F32;
    case at::kHalf: return Kind::F16;
    case at::kBFloat16: return Kind::BF16;
    default: TORCH_CHECK(false, "vit_fast: unsupported dtype ", dtype_name(st));
  }
  return Kind::F32;
}

// A pointer whose element type is known only at run time; loads and stores go through float. For the small
// tensors and epilogue extras whose dtype varies independently of the kernel's main element type.
struct AnyPtr {
  void* ptr = nullptr;
  Kind kind = Kind::F32;

  AnyPtr() = default;
  explicit AnyPtr(const at::Tensor& t) : ptr(t.defined() ? t.data_ptr() : nullptr), kind(kind_of(t.scalar_type())) {}

  __device__ __forceinline__ float load(int64_t i) const {
    switch (kind) {
      case Kind::F16: return __half2float(static_cast<const __half*>(ptr)[i]);
      case Kind::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[i]);
      default: return static_cast<const float*>(ptr)[i];
    }
  }
  __device__ __forceinline__ void store(int64_t i, float v) const {
    switch (kind) {
      case Kind::F16: static_cast<__half*>(ptr)[i] = __float2half_rn(v); break;
      case Kind::BF16: static_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(v); break;
      default: static_cast<float*>(ptr)[i] = v; break;
    }
  }
};

// Calls f(tag) with a value of the CUDA element type for a float16/bfloat16 dtype.
template <typename F>
void dispatch_half(at::ScalarType st, F&& f) {
  if (st == at::kHalf) {
    f(__half{});
  } else if (st == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    TORCH_CHECK(false, "vit_fast: expected float16 or bfloat16; got ", dtype_name(st));
  }
}

// Same for float32/float16/bfloat16.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  if (st == at::kFloat) {
    f(float{});
  } else {
    dispatch_half(st, f);
  }
}

// VEC elements of T, aligned to their size, for one vectorized load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ---------------------------------------------------------------------------------------------------------------
// Warp reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum / max over the 4 lanes of a quad (lanes sharing lane / 4): the lanes holding one row of an mma tile.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// sm_80 primitives

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global -> shared copy; when !valid the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef VF_OLD_ARCH
  __trap();
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef VF_OLD_ARCH
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef VF_OLD_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i:
// this lane holds (row lane / 4, columns 2 * (lane % 4) + {0, 1}), or with .trans the transposed element pair.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#ifdef VF_OLD_ARCH
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#endif
}

// The .trans twin of ldmatrix_x4: PTX spells the transposed load as its own instruction.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef VF_OLD_ARCH
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#endif
}

// c += a * b for one m16n8k16 tile, fp32 accumulation. Fragment layouts (g = lane / 4, t = lane % 4):
//   a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)  a[3]: (g+8, 2t+8..)      A is 16 x 16 (row, k)
//   b[0]: (k 2t..2t+1, n g)  b[1]: (k 2t+8.., n g)                                    B is 16 x 8 (k, n)
//   c[0], c[1]: (g, 2t..2t+1)  c[2], c[3]: (g+8, 2t..2t+1)                             C is 16 x 8 (row, n)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef VF_OLD_ARCH
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The bf16 twin: PTX names the operand type in the mma instruction, so each element type needs its own asm.
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#ifdef VF_OLD_ARCH
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Host launchers shared across translation units (defined in layer_norm.cu)

// LayerNorm rows of x (M, C) (unit column stride, row stride ldx) into y (M, C) contiguous, of y's dtype.
// When stats_given, mean/rstd are read instead of computed and written.
void layer_norm_rows(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     at::Tensor& y2, at::Tensor& mean, at::Tensor& rstd, bool stats_given, cudaStream_t stream);

// LayerNorm backward over rows: dy (M, C) (unit column stride), x (M, C) likewise, saved fp32 mean/rstd.
// Writes dx (M, C) contiguous in x's dtype and dweight/dbias (C,) in their tensors' dtypes. Deterministic.
void layer_norm_rows_backward(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight,
                              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx2, at::Tensor& dweight,
                              at::Tensor& dbias, cudaStream_t stream);

// out[c] = sum over the rows r of in[r, c]: in (rows, cols) with a unit column stride, out contiguous with cols
// elements; any of the three float dtypes each; fp32 accumulation in a fixed order (deterministic).
void column_sums(const at::Tensor& in, at::Tensor& out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// GEMMs (cublaslt.cu)

// Strided batches of a GEMM: `count` problems, each operand's next matrix `a`/`b`/`c`/`d` elements further on (0
// for an operand shared by every problem). The 2-D tensors handed to lt_matmul describe the first problem.
struct LtBatch {
  int64_t count = 1, a = 0, b = 0, c = 0, d = 0;
};

// d (M, N) = a (M, K) @ b^T [+ bias (N,)] [+ c (M, N)] on cuBLASLt, fp32 accumulation. a, b: fp16/bf16 of one
// dtype, each with a unit stride in one of its dimensions (copied otherwise); b is (N, K), nn.Linear's layout.
// d and c: a unit column stride, the operands' dtype or fp32; bias in d's dtype (CUBLASLT_EPILOGUE_BIAS); c is
// added with beta = 1. Returns false, having launched nothing, when cuBLASLt has no algorithm for the problem
// (or K == 0): the caller then computes it through ATen.
bool lt_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& c, at::Tensor& d,
               cudaStream_t stream, const LtBatch& batch = {});

// lt_matmul, or the same result through ATen when cuBLASLt has no algorithm for it.
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, const at::Tensor& c, at::Tensor& d,
            cudaStream_t stream);

}  // namespace vit_fast
