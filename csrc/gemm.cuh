// A tensor-core GEMM with pluggable operand sources and epilogues, for the GEMMs whose epilogue cuBLASLt cannot
// express (exact erf GELU and its derivative, scatter stores into NCHW images, patch tokens around a class token)
// or whose operand is gathered (image patches read straight from NCHW memory).
//
//   C[m, n] = sum_k A[m, k] * B[n, k]          A: M x K, B: N x K (both "K-contiguous"), fp16/bf16, fp32 accumulate
//
// Tiles: 128 x 128 x 32 per block of 8 warps (2 x 4, each warp 64 x 32 = 4 x 4 mma.m16n8k16 tiles), a 4-stage
// cp.async pipeline (64 KiB of shared memory), 16-byte chunks XOR-swizzled so that both the cp.async stores and
// the ldmatrix loads are free of bank conflicts.
//
// A source describes an operand as rows of K elements: `chunk(r, k0)` returns the address of elements
// k0..k0+7 of row r when they are contiguous, 16-byte aligned and all inside K (one cp.async), or nullptr, and
// `at(r, k)` reads one element (the fallback for tails, odd widths and unaligned gathers). Rows >= rows and
// k >= K read as zero.
//
// The epilogue is called once per pair of adjacent columns: epi(r, c, v0, v1, s0, s1) with r < M and c < N
// (c + 1 may be == N: the functor stores what is in range). With Epi::kColSum the values it leaves in s0, s1
// (zero for columns out of range) are summed per column over the block's rows, in a fixed order, into
// colsum[blockIdx.y * N + c]: deterministic partial column sums.
#pragma once

#include "vit_fast.h"

namespace vit_fast::gemm {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int WARPS_M = 2, WARPS_N = 4;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 x 32 per warp
constexpr int MI = WM / 16, NI = WN / 8;              // 4 x 4 mma tiles per warp
constexpr int TILE = BM * BK;                         // elements of one operand tile (BM == BN)
constexpr int SMEM_BYTES = STAGES * 2 * TILE * 2;     // 64 KiB
static_assert(BM == BN, "the loaders share one tile shape");

// Element offset of 16-byte chunk `chunk` (0..3) of row `row` in a (rows x BK) tile.
__device__ __forceinline__ int swizzle(int row, int chunk) { return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3); }

// Rows of a row-major matrix: element (r, k) at ptr[r * ld + k].
template <typename T>
struct RowMajor {
  const T* ptr;
  int64_t ld;
  int rows, K;
  __device__ __forceinline__ const T* chunk(int r, int k0) const {
    const T* p = ptr + static_cast<int64_t>(r) * ld + k0;
    return (k0 + 8 <= K && aligned(p)) ? p : nullptr;
  }
  __device__ __forceinline__ T at(int r, int k) const { return ptr[static_cast<int64_t>(r) * ld + k]; }
  __device__ static __forceinline__ bool aligned(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  }
};

template <typename T>
__device__ __forceinline__ void zero_chunk(T* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
}

// Loads k-tile `kt` of rows [row0, row0 + BM) of a source into one swizzled stage.
template <typename T, typename Src>
__device__ __forceinline__ void load_tile(T* stage, const Src& src, int row0, int kt, int tid) {
#pragma unroll
  for (int i = 0; i < TILE / 8 / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c >> 2, ch = c & 3;
    const int r = row0 + row, k0 = kt * BK + ch * 8;
    T* dst = stage + swizzle(row, ch);
    if (r < src.rows && k0 < src.K) {
      const T* p = src.chunk(r, k0);
      if (p != nullptr) {
        cp_async16(dst, p, true);
      } else {
        Vec<T, 8> v;
#pragma unroll
        for (int j = 0; j < 8; ++j) v.v[j] = k0 + j < src.K ? src.at(r, k0 + j) : from_float<T>(0.f);
        *reinterpret_cast<Vec<T, 8>*>(dst) = v;
      }
    } else {
      zero_chunk(dst);
    }
  }
}

template <typename T, typename SrcA, typename SrcB, typename Epi>
__global__ void __launch_bounds__(THREADS)
    gemm_kernel(SrcA a, SrcB b, Epi epi, int M, int N, int K, float* __restrict__ colsum) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  auto a_stage = [&](int s) { return smem + s * 2 * TILE; };
  auto b_stage = [&](int s) { return smem + s * 2 * TILE + TILE; };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int ktiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      load_tile<T>(a_stage(s), a, row0, s, tid);
      load_tile<T>(b_stage(s), b, col0, s, tid);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // Group kt has landed for this thread; the barrier makes every thread's copies visible and guarantees that
    // all warps are done with the stage the next load overwrites (the one computed on in iteration kt - 1).
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < ktiles) {
      load_tile<T>(a_stage(next % STAGES), a, row0, next, tid);
      load_tile<T>(b_stage(next % STAGES), b, col0, next, tid);
    }
    cp_async_commit();

    const T* as = a_stage(kt % STAGES);
    const T* bs = b_stage(kt % STAGES);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        // matrices: rows 0-7 / 8-15 of the m16 tile at chunk 2ks, then the same at chunk 2ks + 1
        ldmatrix_x4(af[i], as + swizzle(wm * WM + i * 16 + (lane & 15), ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int j = 0; j < NI; j += 2) {
        // matrices: n rows 0-7 at chunk 2ks, 2ks + 1 (b0, b1 of tile j), n rows 8-15 likewise (tile j + 1)
        uint32_t r[4];
        ldmatrix_x4(r, bs + swizzle(wn * WN + j * 8 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma16816<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  float sums[NI][2];
#pragma unroll
  for (int j = 0; j < NI; ++j) sums[j][0] = sums[j][1] = 0.f;
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + wm * WM + i * 16 + g + h * 8;
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int c = col0 + wn * WN + j * 8 + 2 * t;
        float s0 = 0.f, s1 = 0.f;
        if (r < M && c < N) epi(r, c, acc[i][j][2 * h], acc[i][j][2 * h + 1], s0, s1);
        sums[j][0] += s0;
        sums[j][1] += s1;
      }
    }
  }

  if constexpr (Epi::kColSum) {
    // Sum over the 8 lanes sharing a column pair (same t), then over the WARPS_M warps of a column, in order.
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = sums[j][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        sums[j][e] = v;
      }
    __syncthreads();  // every warp is past its last ldmatrix: the tile memory is free
    float* red = reinterpret_cast<float*>(smem_raw);  // [WARPS_M][BN]
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        red[wm * BN + wn * WN + j * 8 + 2 * t] = sums[j][0];
        red[wm * BN + wn * WN + j * 8 + 2 * t + 1] = sums[j][1];
      }
    }
    __syncthreads();
    if (tid < BN && col0 + tid < N) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS_M; ++w) total += red[w * BN + tid];
      colsum[static_cast<int64_t>(blockIdx.y) * N + col0 + tid] = total;
    }
  }
}

// Launches C = A B^T with the given epilogue on `stream`. colsum: (ceil(M / BM), N) fp32 when Epi::kColSum.
template <typename T, typename SrcA, typename SrcB, typename Epi>
void launch(const SrcA& a, const SrcB& b, const Epi& epi, int64_t M, int64_t N, int64_t K, float* colsum,
            cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  TORCH_CHECK(M <= static_cast<int64_t>(BM) * 65535, "vit_fast GEMM: M = ", M, " rows exceed the grid limit");
  TORCH_CHECK(N < (int64_t{1} << 31) && K < (int64_t{1} << 31), "vit_fast GEMM: N or K too large");
  auto kernel = gemm_kernel<T, SrcA, SrcB, Epi>;
  allow_smem(kernel, SMEM_BYTES);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, BM)));
  kernel<<<grid, THREADS, SMEM_BYTES, stream>>>(a, b, epi, static_cast<int>(M), static_cast<int>(N),
                                                static_cast<int>(K), colsum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stores v0 (column c) and v1 (column c + 1, when c + 1 < N) of one row: one 4-byte store when aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* row_ptr, int c, int N, float v0, float v1) {
  T* p = row_ptr + c;
  if (c + 1 < N && (reinterpret_cast<uintptr_t>(p) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(p) = pack2<T>(v0, v1);
  } else {
    p[0] = from_float<T>(v0);
    if (c + 1 < N) p[1] = from_float<T>(v1);
  }
}

}  // namespace vit_fast::gemm
