// Patch embedding: non-overlapping PH x PW patches of NCHW images projected to E channels, class token prepended,
// position embedding added, written once as the (B, [1+]N, E) token sequence.
//
// Notation: images (B, C, H, W) on a GH x GW patch grid, N = GH * GW patches per image, M = B * N patch rows,
// K = C * PH * PW, patch row m = (b, gy, gx), column k = (c, py, px) (nn.Conv2d's weight order).
//
// Forward: patch_copy_kernel gathers the patch matrix (M, Kp) from the images, K padded with zero columns to Kp, a
// multiple of 8 (16-byte rows: what cuBLASLt's fast kernels want, e.g. K = 588 for 14 x 14 patches), and cuBLASLt
// multiplies it by the (zero-padded) weight: one strided-batched GEMM, one problem per image, writing token rows
// [cls, cls + N) of image b directly, bias through the BIAS epilogue, the position embedding as C (beta = 1, batch
// stride 0: shared by the images). A small kernel writes the B class-token rows (class token + its position
// embedding). Channels-last images are gathered in (py, px, c) column order, the order their memory has, with the
// weight permuted to match, so both layouts copy contiguous runs (PW or PW * C elements).
// Backward: dimages: dpatches = dY_patches @ W on cuBLASLt, then the same copy kernel scattering the patch rows
// back into NCHW (patches do not overlap: each pixel is written once); dweight = dY_patches^T @ patches on
// cuBLASLt over the re-gathered patch matrix; dbias, dcls_token, dpos_embed are fixed-order column sums of dY
// (deterministic).

#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <type_traits>
#include <utility>

#include "vit_fast.h"

namespace vit_fast {
namespace {

// Where the patch matrix lives in an image tensor. Patch row m = (b, gy, gx) starts at b * sb + gy * sgy + gx * sgx;
// column k = (o1, o2, i) is at o1 * s1 + o2 * s2 + i from there, i in [0, L) a contiguous run of the image memory:
//   NCHW (unit W stride):           (o1, o2, i) = (c, py, px),  L = PW
//   NHWC (channels-last, contiguous) (o1, o2, i) = (0, py, px * C + c),  L = PW * C
struct PatchLayout {
  int64_t sb, sgy, sgx;
  int s1, s2;
  int N, GW, O2, L, K, Kp;
};

constexpr int kCopyThreads = 256;
constexpr int kCopyRows = 32;            // patch rows per block
constexpr int kCopyMaxVectors = 10240;   // entries of a block's column table (40 KiB of shared memory)

// SCATTER = false: patches[m, k] = images[...] (zero for k >= K). SCATTER = true: images[...] = patches[m, k] for
// k < K. V elements per access, with V dividing L, Kp and every stride (checked by the launcher): a vector never
// leaves a contiguous run. The (m, k) -> address arithmetic is done once per block and column (a shared-memory
// table), not per element: the copy loop has no division.
template <typename T, int V, bool SCATTER>
__global__ void __launch_bounds__(kCopyThreads)
    patch_copy_kernel(T* images, T* patches,  // images: the tensor described by g; patches: (M, Kp) contiguous
                      PatchLayout g, int64_t M) {
  using VT = Vec<T, V>;
  extern __shared__ int64_t copy_smem[];
  int64_t* row_off = copy_smem;                                    // [kCopyRows]
  int* col_off = reinterpret_cast<int*>(copy_smem + kCopyRows);    // [Kp / V], -1 for padding columns
  const int nv = g.Kp / V;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kCopyRows;
  for (int j = threadIdx.x; j < nv; j += kCopyThreads) {
    const int k0 = j * V;
    int off = -1;
    if (k0 < g.K) {
      const int o = k0 / g.L, i = k0 - o * g.L;
      const int o1 = o / g.O2, o2 = o - o1 * g.O2;
      off = o1 * g.s1 + o2 * g.s2 + i;
    }
    col_off[j] = off;
  }
  if (threadIdx.x < kCopyRows) {
    const int64_t m = m0 + threadIdx.x;
    int64_t off = 0;
    if (m < M) {
      const int64_t b = m / g.N;
      const int n = static_cast<int>(m - b * g.N);
      const int gy = n / g.GW, gx = n - gy * g.GW;
      off = b * g.sb + gy * g.sgy + gx * g.sgx;
    }
    row_off[threadIdx.x] = off;
  }
  __syncthreads();
  const int rows = static_cast<int>(min(static_cast<int64_t>(kCopyRows), M - m0));
  int r = threadIdx.x / nv;
  int j = threadIdx.x - r * nv;
  while (r < rows) {
    const int64_t m = m0 + r;
    VT* prow = reinterpret_cast<VT*>(patches + m * g.Kp);
    const int col = col_off[j];
    if constexpr (SCATTER) {
      if (col >= 0) *reinterpret_cast<VT*>(images + row_off[r] + col) = prow[j];
    } else {
      VT v;
      if (col >= 0) {
        v = *reinterpret_cast<const VT*>(images + row_off[r] + col);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = from_float<T>(0.f);
      }
      prow[j] = v;
    }
    j += kCopyThreads;
    while (j >= nv) {
      j -= nv;
      ++r;
    }
  }
}

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


int64_t round8(int64_t k) { return (k + 7) / 8 * 8; }

// Images in one of the two layouts patch_copy_kernel reads (a copy otherwise), and whether it is channels-last.
std::pair<at::Tensor, bool> image_layout(const at::Tensor& images) {
  if (images.size(1) > 1 && !images.is_contiguous() && images.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {images, true};
  }
  return {images.contiguous(), false};
}

PatchLayout layout_of(const at::Tensor& img, bool channels_last, const Geometry& g) {
  TORCH_CHECK(g.C * g.H * g.W < (int64_t{1} << 31), "patch_embed: an image of ", g.C, "x", g.H, "x", g.W,
              " elements is too large for the CUDA kernels");
  PatchLayout l{};
  l.sb = img.stride(0);
  l.sgy = g.PH * img.stride(2);
  l.sgx = g.PW * img.stride(3);
  l.N = static_cast<int>(g.N);
  l.GW = static_cast<int>(g.GW);
  l.s2 = static_cast<int>(img.stride(2));
  l.O2 = static_cast<int>(g.PH);
  if (channels_last) {
    l.s1 = 0;
    l.L = static_cast<int>(g.PW * g.C);
  } else {
    l.s1 = static_cast<int>(img.stride(1));
    l.L = static_cast<int>(g.PW);
  }
  l.K = static_cast<int>(g.K);
  l.Kp = static_cast<int>(round8(g.K));
  return l;
}

// patches (M, Kp) <-> the image tensor described by l, in the widest vectors the layout allows.
void patch_copy(const at::Tensor& img, const at::Tensor& patches, const PatchLayout& l, int64_t M, bool scatter,
                cudaStream_t stream) {
  if (M == 0) return;
  const int64_t es = img.element_size();
  int v = 8;
  while (v > 1 && (l.L % v || l.s1 % v || l.s2 % v || l.sb % v || l.sgy % v || l.sgx % v ||
                   reinterpret_cast<uintptr_t>(img.data_ptr()) % (v * es))) {
    v /= 2;
  }
  const int nv = l.Kp / v;
  TORCH_CHECK(nv <= kCopyMaxVectors, "patch_embed: patches of K = ", l.K, " elements are too large for the CUDA "
              "backend's patch copy (at most ", kCopyMaxVectors, " vectors of ", v, ")");
  const size_t smem = kCopyRows * sizeof(int64_t) + static_cast<size_t>(nv) * sizeof(int);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kCopyRows)));
  dispatch_half(img.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto* ip = static_cast<T*>(img.data_ptr());
    auto* pp = static_cast<T*>(patches.data_ptr());
    auto run = [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      if (scatter) {
        patch_copy_kernel<T, V, true><<<grid, kCopyThreads, smem, stream>>>(ip, pp, l, M);
      } else {
        patch_copy_kernel<T, V, false><<<grid, kCopyThreads, smem, stream>>>(ip, pp, l, M);
      }
    };
    switch (v) {
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{}); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The weight as an (E, Kp) GEMM operand in the column order of the patch matrix, zero columns for k >= K.
at::Tensor padded_weight(const at::Tensor& weight, bool channels_last, const Geometry& g) {
  const auto w = channels_last ? weight.permute({0, 2, 3, 1}).reshape({g.E, g.K}) : weight.reshape({g.E, g.K});
  const int64_t Kp = round8(g.K);
  if (Kp == g.K) return w.contiguous();
  auto wp = at::zeros({g.E, Kp}, weight.options());
  wp.narrow(1, 0, g.K).copy_(w);
  return wp;
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
  const int pos_skip = has_pos && pos_embed->size(1) == g.N + 1 ? 1 : 0;
  if (has_cls) {
    const auto cls_c = cls_token->contiguous();
    const auto pos_c = pos_skip ? pos_embed->contiguous() : at::Tensor();
    const int64_t n = g.B * g.E;
    class_rows_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(AnyPtr(cls_c), pos_skip ? AnyPtr(pos_c) : AnyPtr(),
                                                             AnyPtr(out), g.B, static_cast<int>(g.E),
                                                             (g.N + 1) * g.E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (g.M == 0) return out;

  const auto [img, channels_last] = image_layout(images);
  const PatchLayout l = layout_of(img, channels_last, g);
  auto patches = at::empty({g.M, l.Kp}, images.options());
  patch_copy(img, patches, l, g.M, false, stream);
  const auto wp = padded_weight(weight, channels_last, g);

  const auto b = has_bias ? bias->to(out_dtype) : at::Tensor();
  // the patch tokens' position embedding, (N, E) in the output dtype: C of every image's GEMM
  const auto pos = has_pos ? pos_embed->to(out_dtype).reshape({pos_embed->size(1), g.E}).narrow(0, pos_skip, g.N)
                           : at::Tensor();
  auto first_a = patches.narrow(0, 0, g.N);           // image 0's patch rows (N, Kp)
  auto first_d = out.select(0, 0).narrow(0, cls, g.N);  // image 0's patch tokens (N, E)
  const LtBatch batch{g.B, g.N * l.Kp, 0, 0, (g.N + cls) * g.E};
  if (!lt_matmul(first_a, wp, b, pos, first_d, stream, batch)) {
    // No cuBLASLt algorithm for this problem: the same sum through ATen, in fp32.
    auto y = at::mm(patches.to(at::kFloat), wp.to(at::kFloat).t());  // (M, E)
    if (has_bias) y.add_(b);
    auto y3 = y.view({g.B, g.N, g.E});
    if (has_pos) y3.add_(pos);
    out.narrow(1, cls, g.N).copy_(y3);
  }
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
  const int64_t Kp = round8(g.K);
  at::Tensor dy;  // (M, E) patch-token gradients in the GEMM dtype
  if ((images_grad || weight_grad) && g.M > 0) dy = go.narrow(1, cls, g.N).to(T_dtype).reshape({g.M, g.E});

  if (images_grad && dimages.numel() > 0) {
    if (g.M == 0 || g.E == 0) {
      dimages.zero_();
    } else {
      auto dpatches = at::empty({g.M, Kp}, images.options());
      const auto wp = padded_weight(weight, false, g);  // NCHW column order: the order dimages is written in
      matmul(dy, wp.t(), at::Tensor(), at::Tensor(), dpatches, stream);
      patch_copy(dimages, dpatches, layout_of(dimages, false, g), g.M, true, stream);
    }
  }
  if (weight_grad && dweight.numel() > 0) {
    if (g.M == 0) {
      dweight.zero_();
    } else {
      const auto [img, channels_last] = image_layout(images);
      const PatchLayout l = layout_of(img, channels_last, g);
      auto patches = at::empty({g.M, Kp}, images.options());
      patch_copy(img, patches, l, g.M, false, stream);
      if (!channels_last && Kp == g.K) {
        auto dw2 = dweight.view({g.E, g.K});
        matmul(dy.t(), patches.t(), at::Tensor(), at::Tensor(), dw2, stream);
      } else {
        auto dwp = at::empty({g.E, Kp}, weight.options());
        matmul(dy.t(), patches.t(), at::Tensor(), at::Tensor(), dwp, stream);
        const auto dwk = dwp.narrow(1, 0, g.K);
        if (channels_last) {
          dweight.copy_(dwk.reshape({g.E, g.PH, g.PW, g.C}).permute({0, 3, 1, 2}));
        } else {
          dweight.copy_(dwk.reshape({g.E, g.C, g.PH, g.PW}));
        }
      }
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
