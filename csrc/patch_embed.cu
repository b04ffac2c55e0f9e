// Patch embedding: non-overlapping PH x PW patches of NCHW images projected to E channels, class token prepended,
// position embedding added, written once as the (B, [1+]N, E) token sequence.
//
// Notation: images (B, C, H, W) on a GH x GW patch grid, N = GH * GW patches per image, M = B * N patch rows,
// K = C * PH * PW, patch row m = (b, gy, gx), column k = (c, py, px) (nn.Conv2d's weight order). Element (m, k)
// of the virtual patch matrix is images[b, c, gy * PH + py, gx * PW + px]; its address is a row part plus a
// column part.
//
// Forward: the tensor-core GEMM of gemm.cuh reads the patch matrix straight from NCHW memory (16-byte cp.async
// when 8 consecutive k are 8 contiguous, aligned pixels, e.g. PW = 16; element loads otherwise, e.g. PW = 14) and
// its epilogue adds the bias and the position embedding and stores into token row 1 + n (or n) of image b. A
// small kernel writes the B class-token rows (class token + its position embedding).
// Backward: dimages = dY_patches @ W on the same GEMM, its epilogue scattering into NCHW (patches do not overlap:
// each pixel written once); dweight = dY_patches^T @ patches through cuBLAS (ATen) on a gathered patch matrix;
// dbias, dcls_token, dpos_embed are fixed-order column sums of dY (deterministic).

#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "gemm.cuh"
#include "vit_fast.h"

namespace vit_fast {
namespace {

// Where patch element (m, k) lives in an NCHW tensor with strides (sb, sc, sh, sw).
struct PatchGeometry {
  int64_t sb, sc, sh, sw;
  int N, GW, PH, PW;
  __device__ __forceinline__ int64_t row_off(int m) const {
    const int b = m / N, n = m % N;
    return b * sb + static_cast<int64_t>(n / GW) * PH * sh + static_cast<int64_t>(n % GW) * PW * sw;
  }
  __device__ __forceinline__ int64_t col_off(int k) const {
    const int c = k / (PH * PW), r = k % (PH * PW);
    return c * sc + static_cast<int64_t>(r / PW) * sh + static_cast<int64_t>(r % PW) * sw;
  }
};

// GEMM source: the patch matrix gathered from the images. Same members and chunk() as gemm.cuh's RowMajor: the
// interface every GEMM source implements.
template <typename T>
struct PatchRows {
  const T* ptr;
  PatchGeometry geo;
  int rows, K;
  __device__ __forceinline__ const T* chunk(int r, int k0) const {
    if (geo.sw != 1 || k0 + 8 > K || (k0 % geo.PW) + 8 > geo.PW) return nullptr;
    const T* p = ptr + geo.row_off(r) + geo.col_off(k0);
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0 ? p : nullptr;
  }
  __device__ __forceinline__ T at(int r, int k) const { return ptr[geo.row_off(r) + geo.col_off(k)]; }
};

// GEMM source: the patch-token rows of a contiguous (B, cls + N, E) gradient.
template <typename T>
struct TokenRows {
  const T* ptr;
  int N, cls;
  int rows, K;  // K = E
  __device__ __forceinline__ const T* row(int r) const {
    return ptr + (static_cast<int64_t>(r / N) * (N + cls) + cls + r % N) * K;
  }
  __device__ __forceinline__ const T* chunk(int r, int k0) const {
    const T* p = row(r) + k0;
    return (k0 + 8 <= K && (reinterpret_cast<uintptr_t>(p) & 15) == 0) ? p : nullptr;
  }
  __device__ __forceinline__ T at(int r, int k) const { return row(r)[k]; }
};

// Forward epilogue: + bias + pos_embed, stored into the token sequence.
template <typename T>
struct TokensEpilogue {
  static constexpr bool kColSum = false;
  const T* bias;  // (E,) or nullptr
  AnyPtr pos;     // (cls_in_pos + N, E) or null
  AnyPtr out;     // (B, cls + N, E) contiguous
  int N, E, cls, pos_skip;
  __device__ __forceinline__ void operator()(int r, int c, float v0, float v1, float&, float&) const {
    const int b = r / N, n = r % N;
    const int64_t row = (static_cast<int64_t>(b) * (N + cls) + cls + n) * E;
    const float v[2] = {v0, v1};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int cc = c + i;
      if (cc >= E) break;
      float x = v[i];
      if (bias != nullptr) x += to_float(bias[cc]);
      if (pos.ptr != nullptr) x += pos.load(static_cast<int64_t>(n + pos_skip) * E + cc);
      out.store(row + cc, x);
    }
  }
};

// dimages epilogue: scatter into contiguous NCHW.
template <typename T>
struct ImagesEpilogue {
  static constexpr bool kColSum = false;
  T* dimages;
  PatchGeometry geo;
  int K;
  __device__ __forceinline__ void operator()(int r, int c, float v0, float v1, float&, float&) const {
    const int64_t row = geo.row_off(r);
    dimages[row + geo.col_off(c)] = from_float<T>(v0);
    if (c + 1 < K) dimages[row + geo.col_off(c + 1)] = from_float<T>(v1);
  }
};

// out[b, 0, e] = cls[e] (+ pos[0, e]).
__global__ void class_rows_kernel(AnyPtr cls, AnyPtr pos, AnyPtr out, int64_t B, int E, int64_t row_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * E) return;
  const int64_t b = i / E;
  const int e = static_cast<int>(i % E);
  float v = cls.load(e);
  if (pos.ptr != nullptr) v += pos.load(e);
  out.store(b * row_stride + e, v);
}

// patches[m, k] (M x K contiguous) gathered from the images.
template <typename T>
__global__ void gather_patches_kernel(const T* __restrict__ images, PatchGeometry geo, T* __restrict__ patches,
                                      int64_t M, int K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * K) return;
  const int m = static_cast<int>(i / K), k = static_cast<int>(i % K);
  patches[i] = images[geo.row_off(m) + geo.col_off(k)];
}

struct Geometry {
  int64_t B, C, H, W, E, PH, PW, GH, GW, N, M, K;
};

Geometry check_inputs(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(images.defined() && images.is_cuda(), "images must be a CUDA tensor");
  check_dim(images, 4, "images");
  check_half(images, "images");
  const auto dev = images.device();
  check_cuda(weight, "weight", dev);
  check_dim(weight, 4, "weight");
  TORCH_CHECK(weight.scalar_type() == images.scalar_type(), "weight must have images' dtype ",
              dtype_name(images.scalar_type()), "; got ", dtype_name(weight.scalar_type()));
  Geometry g{};
  g.B = images.size(0);
  g.C = images.size(1);
  g.H = images.size(2);
  g.W = images.size(3);
  g.E = weight.size(0);
  g.PH = weight.size(2);
  g.PW = weight.size(3);
  TORCH_CHECK(weight.size(1) == g.C, "weight must have shape (E, ", g.C, ", PH, PW) (C = the channels of images); got ",
              weight.sizes());
  TORCH_CHECK(g.PH > 0 && g.PW > 0 && g.H % g.PH == 0 && g.W % g.PW == 0, "images height and width ", g.H, "x", g.W,
              " must be divisible by the patch size ", g.PH, "x", g.PW);
  g.GH = g.H / g.PH;
  g.GW = g.W / g.PW;
  g.N = g.GH * g.GW;
  g.M = g.B * g.N;
  g.K = g.C * g.PH * g.PW;
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, "bias", dev);
    TORCH_CHECK(bias->scalar_type() == images.scalar_type(), "bias must have images' dtype ",
                dtype_name(images.scalar_type()), "; got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.E, "bias must have shape (", g.E, ",); got ", bias->sizes());
  }
  const bool has_cls = cls_token.has_value() && cls_token->defined();
  if (has_cls) {
    check_cuda(*cls_token, "cls_token", dev);
    check_float(*cls_token, "cls_token");
    TORCH_CHECK(cls_token->dim() == 3 && cls_token->numel() == g.E && cls_token->size(2) == g.E,
                "cls_token must have shape (1, 1, ", g.E, "); got ", cls_token->sizes());
  }
  if (pos_embed.has_value() && pos_embed->defined()) {
    check_cuda(*pos_embed, "pos_embed", dev);
    check_float(*pos_embed, "pos_embed");
    const bool ok = pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(2) == g.E &&
                    (pos_embed->size(1) == g.N || (has_cls && pos_embed->size(1) == g.N + 1));
    TORCH_CHECK(ok, "pos_embed must have shape (1, ", g.N, ", ", g.E, ")", has_cls ? " or (1, N + 1, E)" : "",
                " for these images and patches; got ", pos_embed->sizes());
  }
  TORCH_CHECK(g.M < (int64_t{1} << 31) && g.K < (int64_t{1} << 31) && g.E < (int64_t{1} << 31),
              "patch_embed: problem too large");
  return g;
}

PatchGeometry geometry_of(const at::Tensor& t, const Geometry& g) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), static_cast<int>(g.N), static_cast<int>(g.GW),
          static_cast<int>(g.PH), static_cast<int>(g.PW)};
}

at::Tensor patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed) {
  const Geometry g = check_inputs(images, weight, bias, cls_token, pos_embed);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_cls = cls_token.has_value() && cls_token->defined();
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  const int cls = has_cls ? 1 : 0;
  const auto out_dtype = has_pos ? c10::promoteTypes(images.scalar_type(), pos_embed->scalar_type())
                                 : images.scalar_type();
  const c10::cuda::CUDAGuard guard(images.device());
  const NoAutocast no_autocast;
  check_device_arch(images.device());
  auto out = at::empty({g.B, g.N + cls, g.E}, images.options().dtype(out_dtype));
  if (g.B == 0 || g.E == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto pos = has_pos ? pos_embed->contiguous() : at::Tensor();
  const int pos_skip = has_pos && pos_embed->size(1) == g.N + 1 ? 1 : 0;
  if (has_cls) {
    const auto cls_c = cls_token->contiguous();
    const int64_t n = g.B * g.E;
    class_rows_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(AnyPtr(cls_c), pos_skip ? AnyPtr(pos) : AnyPtr(),
                                                             AnyPtr(out), g.B, static_cast<int>(g.E),
                                                             (g.N + 1) * g.E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (g.M == 0) return out;
  const auto w2 = weight.reshape({g.E, g.K}).contiguous();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  dispatch_half(images.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    PatchRows<T> a{static_cast<const T*>(images.data_ptr()), geometry_of(images, g), static_cast<int>(g.M),
                   static_cast<int>(g.K)};
    gemm::RowMajor<T> wb{static_cast<const T*>(w2.data_ptr()), g.K, static_cast<int>(g.E), static_cast<int>(g.K)};
    TokensEpilogue<T> epi{has_bias ? static_cast<const T*>(b.data_ptr()) : nullptr,
                          has_pos ? AnyPtr(pos) : AnyPtr(),
                          AnyPtr(out),
                          static_cast<int>(g.N),
                          static_cast<int>(g.E),
                          cls,
                          pos_skip};
    gemm::launch<T>(a, wb, epi, g.M, g.E, g.K, nullptr, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cls_token,
    const std::optional<at::Tensor>& pos_embed, bool images_grad, bool weight_grad) {
  const Geometry g = check_inputs(images, weight, bias, cls_token, pos_embed);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_cls = cls_token.has_value() && cls_token->defined();
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  const int cls = has_cls ? 1 : 0;
  check_cuda(grad_out, "grad_out", images.device());
  check_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.B && grad_out.size(1) == g.N + cls &&
                  grad_out.size(2) == g.E,
              "grad_out must have shape (", g.B, ", ", g.N + cls, ", ", g.E, "); got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(images.device());
  const NoAutocast no_autocast;
  check_device_arch(images.device());
  const auto T_dtype = images.scalar_type();
  auto nothing = [&] { return at::empty({0}, grad_out.options()); };
  at::Tensor dimages = images_grad ? at::empty(images.sizes(), images.options().memory_format(
                                                                    at::MemoryFormat::Contiguous))
                                   : nothing();
  at::Tensor dweight = weight_grad ? at::empty(weight.sizes(), weight.options()) : nothing();
  at::Tensor dbias = has_bias ? at::empty({g.E}, bias->options()) : nothing();
  at::Tensor dcls = has_cls ? at::empty(cls_token->sizes(), cls_token->options()) : nothing();
  at::Tensor dpos = has_pos ? at::empty(pos_embed->sizes(), pos_embed->options()) : nothing();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto go = grad_out.contiguous();  // (B, cls + N, E)

  if (images_grad && dimages.numel() > 0) {
    if (g.M == 0 || g.E == 0) {
      dimages.zero_();
    } else {
      const auto gt = go.to(T_dtype);
      const auto wt = weight.reshape({g.E, g.K}).t().contiguous();  // (K, E): the GEMM's "B rows"
      dispatch_half(T_dtype, [&](auto tag) {
        using T = decltype(tag);
        TokenRows<T> a{static_cast<const T*>(gt.data_ptr()), static_cast<int>(g.N), cls, static_cast<int>(g.M),
                       static_cast<int>(g.E)};
        gemm::RowMajor<T> wb{static_cast<const T*>(wt.data_ptr()), g.E, static_cast<int>(g.K),
                             static_cast<int>(g.E)};
        ImagesEpilogue<T> epi{static_cast<T*>(dimages.data_ptr()), geometry_of(dimages, g), static_cast<int>(g.K)};
        gemm::launch<T>(a, wb, epi, g.M, g.K, g.E, nullptr, stream);
      });
    }
  }
  if (weight_grad && dweight.numel() > 0) {
    if (g.M == 0) {
      dweight.zero_();
    } else {
      auto patches = at::empty({g.M, g.K}, images.options());
      dispatch_half(T_dtype, [&](auto tag) {
        using T = decltype(tag);
        const int64_t n = g.M * g.K;
        gather_patches_kernel<T><<<ceil_div(n, 256), 256, 0, stream>>>(
            static_cast<const T*>(images.data_ptr()), geometry_of(images, g), static_cast<T*>(patches.data_ptr()),
            g.M, static_cast<int>(g.K));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      const auto dy = go.narrow(1, cls, g.N).reshape({g.M, g.E}).to(T_dtype);  // (M, E) patch-token gradients
      auto dw2 = dweight.view({g.E, g.K});
      at::mm_out(dw2, dy.t(), patches);
    }
  }
  if (has_bias || has_cls || has_pos) {
    const int64_t L = g.N + cls;
    auto per_token = at::empty({L * g.E}, grad_out.options().dtype(at::kFloat));  // summed over the batch
    column_sums(go.view({g.B, L * g.E}), per_token, stream);
    const auto tokens = per_token.view({L, g.E});
    if (has_bias) column_sums(tokens.narrow(0, cls, g.N), dbias, stream);
    if (has_cls) column_sums(per_token.narrow(0, 0, g.E).view({1, g.E}), dcls, stream);
    if (has_pos) {
      const int64_t rows = pos_embed->size(1);
      column_sums(per_token.narrow(0, (L - rows) * g.E, rows * g.E).view({1, rows * g.E}), dpos, stream);
    }
  }
  return {dimages, dweight, dbias, dcls, dpos};
}

}  // namespace
}  // namespace vit_fast

TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("patch_embed_fwd_cuda", &vit_fast::patch_embed_fwd);
  m.impl("patch_embed_bwd_cuda", &vit_fast::patch_embed_bwd);
}
