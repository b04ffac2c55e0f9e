// Flash attention on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), non-causal, no mask:
// out = softmax(q k^T * scale) v for q, k, v (B, H, N, D), D in {64, 80, 128}, any N, any row strides.
//
// Forward: a block of 4 warps owns 64 query rows (16 per warp) of one (b, h) and streams 64-key blocks of K and
// V through double-buffered shared memory (cp.async, rows past N zero-filled). No work is spent on padding: a warp
// whose 16 rows lie wholly past N only loads and syncs, the last key tile computes only its 16-key chunks that
// hold a key < N, and only that tile (when N % 64 != 0) is masked. Scores stay in registers: online
// softmax in the log2 domain with fp32 running max and sum, P reused from the score registers as the A operand
// of P V. Saves the row logsumexp (natural log, fp32).
//
// Backward (recomputation, deterministic, no atomics), FA2-style:
//   dQ:     a block per 64-query block loops over all key blocks:     dQ += dS K
//           its prologue computes delta = rowsum(dO * O) of its rows (kept in registers, written for dK/dV)
//   dK, dV: a block per 64-key block loops over all query blocks:     S^T = K Q^T, P^T = exp(S^T - lse)
//           dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q
// dQ is launched first: the dK/dV kernel reads the delta it wrote (same stream). Each output element is
// accumulated by exactly one warp in a fixed order. Padding is skipped as in the forward.
//
// Shared-memory rows are padded to D + 8 elements: 8 consecutive rows then fall on distinct 16-byte bank groups,
// so ldmatrix is conflict-free without a swizzle for every D here (64, 80, 128).
//
// Outputs out, dq, dk, dv are (B, H, N, D) views of (B, N, H, D) memory, lse is (B, H, N) fp32, as the Triton
// backend returns them. The packed backward writes dq, dk, dv as the three slices of one (B, N, 3, H, D) dqkv:
// the kernels take their outputs as strided pointers, so only the strides differ.

#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <array>
#include <cmath>

#include "vit_fast.h"

namespace vit_fast {
namespace {

constexpr int kRows = 64;  // query rows per block (forward, dQ) and keys per block (dK/dV); also the tile height
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Operand {  // a (B, H, N, D) tensor with a unit D stride
  const void* ptr;
  int64_t sb, sh, sn;
};

struct Params {
  Operand q, k, v, o, dout;   // o: the forward output (backward) ; dout: its gradient (backward)
  void* out;                  // forward: out; backward: dq
  int64_t out_sb, out_sh, out_sn;
  void* out2;                 // backward dK/dV kernel: dk (out) and dv (out2), same strides
  float* lse;                 // (B, H, N) contiguous
  float* delta;               // (B, H, N) contiguous, backward: written by the dQ kernel, read by dK/dV
  int H, N;
  float scale, scale_log2;    // scale, scale * log2(e)
};

template <int D>
struct Shape {
  static constexpr int PITCH = D + 8;           // shared-memory row pitch in elements
  static constexpr int TILE = kRows * PITCH;    // one 64-row tile
  static constexpr int KD = D / 16;             // k16 steps over D
  static constexpr int ND = D / 8;              // n8 tiles over D
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
};

// Rows [n0, n0 + 64) of the (N, D) matrix at base (row stride sn) into a padded tile; rows >= N become zero.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t sn, int n0, int N, int tid) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int c = tid; c < kRows * CH; c += kThreads) {
    const int row = c / CH, ch = c % CH;
    const int n = n0 + row;
    const bool valid = n < N;
    const T* src = valid ? base + static_cast<int64_t>(n) * sn + ch * 8 : base;
    cp_async16(tile + row * Shape<D>::PITCH + ch * 8, src, valid);
  }
}

// The A fragments (16 rows from row0, all of D) of a tile.
template <typename T, int D>
__device__ __forceinline__ void load_a(uint32_t (&f)[Shape<D>::KD][4], const T* tile, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < Shape<D>::KD; ++kk) {
    ldmatrix_x4(f[kk], tile + (row0 + (lane & 15)) * Shape<D>::PITCH + kk * 16 + (lane >> 4) * 8);
  }
}

// acc (16 x 64) = A (16 x D, fragments) @ tile^T, the tile's 64 rows being the n dimension (rows x D in smem).
// Only the first n16 16-row chunks of the tile are computed (the others hold no row < N); their acc stays 0.
template <typename T, int D>
__device__ __forceinline__ void mma_a_tileT(float (&acc)[8][4], const uint32_t (&a)[Shape<D>::KD][4], const T* tile,
                                            int lane, int n16) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < Shape<D>::KD; ++kk) {
#pragma unroll
    for (int nj = 0; nj < 4; ++nj) {
      if (nj < n16) {
        uint32_t r[4];
        ldmatrix_x4(r, tile + (nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * Shape<D>::PITCH + kk * 16 +
                           ((lane >> 3) & 1) * 8);
        mma16816<T>(acc[2 * nj], a[kk], r[0], r[1]);
        mma16816<T>(acc[2 * nj + 1], a[kk], r[2], r[3]);
      }
    }
  }
}

// acc (16 x D) += P (16 x 64, fp32 in the C-fragment layout of mma_a_tileT) @ tile, the tile's 64 rows being the
// k dimension (rows x D in smem). P is rounded to T here. Only the first k16 16-row chunks are summed (P is 0 past N).
template <typename T, int D>
__device__ __forceinline__ void mma_p_tile(float (&acc)[Shape<D>::ND][4], const float (&p)[8][4], const T* tile,
                                           int lane, int k16) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (kk >= k16) break;
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dj = 0; dj < Shape<D>::KD; ++dj) {
      uint32_t r[4];
      ldmatrix_x4_trans(r, tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Shape<D>::PITCH + dj * 16 +
                               (lane >> 4) * 8);
      mma16816<T>(acc[2 * dj], a, r[0], r[1]);
      mma16816<T>(acc[2 * dj + 1], a, r[2], r[3]);
    }
  }
}

// Stores rows (row0 + g, row0 + g + 8) of a 16 x D accumulator, times `mul[h]`, for rows < N.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, int64_t sn, int row0, int N, const float (&acc)[Shape<D>::ND][4],
                                           const float (&mul)[2], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = row0 + g + 8 * h;
    if (n >= N) continue;
    T* row = base + static_cast<int64_t>(n) * sn;
#pragma unroll
    for (int dt = 0; dt < Shape<D>::ND; ++dt) {
      *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t) =
          pack2<T>(acc[dt][2 * h] * mul[h], acc[dt][2 * h + 1] * mul[h]);
    }
  }
}

// The 16-row chunks of the 64-row tile at n0 that hold a row < N (1 to 4).
__device__ __forceinline__ int chunks16(int n0, int N) { return min(4, (N - n0 + 15) >> 4); }

template <typename T>
__device__ __forceinline__ const T* head(const Operand& op, int b, int h) {
  return static_cast<const T*>(op.ptr) + b * op.sb + h * op.sh;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

// Blocks per SM for ptxas: two at D = 128 (all shared memory allows on sm_90; sm_80 fits one), three below (what
// the registers allow). Unsaid, ptxas capped D = 128 at 168 registers (three blocks) and spilled.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 128 ? 2 : 3) attention_fwd_kernel(Params p) {
  using S = Shape<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + S::TILE;      // [2][TILE]
  T* vs = ks + 2 * S::TILE;  // [2][TILE]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nqb = (p.N + kRows - 1) / kRows, nkb = nqb;
  const int bh = blockIdx.x / nqb, q0 = (blockIdx.x % nqb) * kRows;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = head<T>(p.q, b, h);
  const T* kg = head<T>(p.k, b, h);
  const T* vg = head<T>(p.v, b, h);

  load_tile<T, D>(qs, qg, p.q.sn, q0, p.N, tid);
  load_tile<T, D>(ks, kg, p.k.sn, 0, p.N, tid);
  load_tile<T, D>(vs, vg, p.v.sn, 0, p.N, tid);
  cp_async_commit();

  float o[S::ND][4];
#pragma unroll
  for (int i = 0; i < S::ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[S::KD][4];
  const bool active = q0 + warp * 16 < p.N;  // warp-uniform: this warp's rows are not all padding

  for (int j = 0; j < nkb; ++j) {
    const int buf = j & 1;
    if (j + 1 < nkb) {  // prefetch the next key block into the other buffer (freed by the last barrier)
      load_tile<T, D>(ks + (buf ^ 1) * S::TILE, kg, p.k.sn, (j + 1) * kRows, p.N, tid);
      load_tile<T, D>(vs + (buf ^ 1) * S::TILE, vg, p.v.sn, (j + 1) * kRows, p.N, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued
    __syncthreads();
    if (active) {  // an inactive warp still takes part in the loads and barriers
      if (j == 0) load_a<T, D>(qf, qs, warp * 16, lane);

      const int k0 = j * kRows, n16 = chunks16(k0, p.N);
      float s[8][4];
      mma_a_tileT<T, D>(s, qf, ks + buf * S::TILE, lane, n16);
      const bool partial = k0 + kRows > p.N;  // only the last key tile is masked
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + nt * 8 + 2 * t + (e & 1);
          s[nt][e] = partial && key >= p.N ? -INFINITY : s[nt][e] * p.scale_log2;
        }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {  // rows g (elements 0, 1) and g + 8 (elements 2, 3)
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
        const float m_new = fmaxf(m[hr], quad_max(mx));
        const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no valid key yet stays at zero
        const float alpha = exp2f(m[hr] - base);
        m[hr] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          s[nt][2 * hr] = exp2f(s[nt][2 * hr] - base);
          s[nt][2 * hr + 1] = exp2f(s[nt][2 * hr + 1] - base);
          rs += s[nt][2 * hr] + s[nt][2 * hr + 1];
        }
        l[hr] = l[hr] * alpha + rs;  // per-thread partial sum: alpha is uniform over the quad
#pragma unroll
        for (int dt = 0; dt < S::ND; ++dt) {
          o[dt][2 * hr] *= alpha;
          o[dt][2 * hr + 1] *= alpha;
        }
      }
      mma_p_tile<T, D>(o, s, vs + buf * S::TILE, lane, n16);
    }
    __syncthreads();  // all warps are done with this buffer before the next prefetch overwrites it
  }
  cp_async_wait<0>();
  if (!active) return;

  float inv[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float total = quad_sum(l[hr]);
    inv[hr] = 1.f / total;
    const int n = q0 + warp * 16 + g + 8 * hr;
    if (t == 0 && n < p.N) p.lse[static_cast<int64_t>(bh) * p.N + n] = m[hr] * kLn2 + logf(total);
  }
  T* og = static_cast<T*>(p.out) + b * p.out_sb + h * p.out_sh;
  store_rows<T, D>(og, p.out_sn, q0 + warp * 16, p.N, o, inv, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

// The dQ kernel runs first: per 64-query block, its prologue computes delta = rowsum(dO * O) of the block's rows
// (two lanes per row, O read from global, dO from the block's tile), keeps it in registers and writes it for the
// dK/dV kernel; the main loop accumulates dQ = dS K over all key tiles.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(Params p) {
  using S = Shape<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* dos = qs + S::TILE;
  T* ks = dos + S::TILE;     // [2][TILE]
  T* vs = ks + 2 * S::TILE;  // [2][TILE]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nb = (p.N + kRows - 1) / kRows;
  const int bh = blockIdx.x / nb, q0 = (blockIdx.x % nb) * kRows;
  const int b = bh / p.H, h = bh % p.H;
  const T* kg = head<T>(p.k, b, h);
  const T* vg = head<T>(p.v, b, h);

  load_tile<T, D>(qs, head<T>(p.q, b, h), p.q.sn, q0, p.N, tid);
  load_tile<T, D>(dos, head<T>(p.dout, b, h), p.dout.sn, q0, p.N, tid);
  load_tile<T, D>(ks, kg, p.k.sn, 0, p.N, tid);
  load_tile<T, D>(vs, vg, p.v.sn, 0, p.N, tid);
  cp_async_commit();

  const bool active = q0 + warp * 16 < p.N;  // warp-uniform: this warp's rows are not all padding
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int n = q0 + warp * 16 + g + 8 * hr;
    lse_r[hr] = n < p.N ? p.lse[static_cast<int64_t>(bh) * p.N + n] * kLog2e : INFINITY;
  }
  float dq[S::ND][4];
#pragma unroll
  for (int i = 0; i < S::ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[i][e] = 0.f;
  uint32_t qf[S::KD][4], dof[S::KD][4];

  for (int j = 0; j < nb; ++j) {
    const int buf = j & 1;
    if (j + 1 < nb) {
      load_tile<T, D>(ks + (buf ^ 1) * S::TILE, kg, p.k.sn, (j + 1) * kRows, p.N, tid);
      load_tile<T, D>(vs + (buf ^ 1) * S::TILE, vg, p.v.sn, (j + 1) * kRows, p.N, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (active) {  // an inactive warp still takes part in the loads and barriers
      if (j == 0) {
        load_a<T, D>(qf, qs, warp * 16, lane);
        load_a<T, D>(dof, dos, warp * 16, lane);
        // delta of row r = warp * 16 + (lane >> 1) of the block: lane & 1 takes every other 16-byte chunk
        const int r = warp * 16 + (lane >> 1), n = q0 + r;
        float acc = 0.f;
        if (n < p.N) {
          const T* orow = head<T>(p.o, b, h) + static_cast<int64_t>(n) * p.o.sn;
          const T* drow = dos + r * S::PITCH;
#pragma unroll
          for (int ch = lane & 1; ch < D / 8; ch += 2) {
            const uint4 ov = *reinterpret_cast<const uint4*>(orow + ch * 8);
            const uint4 dv = *reinterpret_cast<const uint4*>(drow + ch * 8);
            const T* oe = reinterpret_cast<const T*>(&ov);
            const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc += to_float(oe[e]) * to_float(de[e]);
          }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if ((lane & 1) == 0 && n < p.N) p.delta[static_cast<int64_t>(bh) * p.N + n] = acc;
        // this thread's rows g and g + 8 are held by lanes 2 g and 2 g + 16
        delta_r[0] = __shfl_sync(0xffffffffu, acc, 2 * g);
        delta_r[1] = __shfl_sync(0xffffffffu, acc, 2 * g + 16);
      }
      const int k0 = j * kRows, n16 = chunks16(k0, p.N);
      const bool partial = k0 + kRows > p.N;
      const T* kt = ks + buf * S::TILE;
      float s[8][4], dp[8][4];
      mma_a_tileT<T, D>(s, qf, kt, lane, n16);
      mma_a_tileT<T, D>(dp, dof, vs + buf * S::TILE, lane, n16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + nt * 8 + 2 * t + (e & 1);
          const int hr = e >> 1;
          const float pr = partial && key >= p.N ? 0.f : exp2f(s[nt][e] * p.scale_log2 - lse_r[hr]);
          s[nt][e] = pr * (dp[nt][e] - delta_r[hr]);  // dS
        }
      mma_p_tile<T, D>(dq, s, kt, lane, n16);  // dQ += dS K
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  if (!active) return;
  const float scale[2] = {p.scale, p.scale};
  T* dqg = static_cast<T*>(p.out) + b * p.out_sb + h * p.out_sh;
  store_rows<T, D>(dqg, p.out_sn, q0 + warp * 16, p.N, dq, scale, lane);
}

// The prologue repeats the dQ kernel's in shape (shared-memory carving, thread indices); the tiles differ.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(Params p) {
  using S = Shape<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + S::TILE;
  T* qs = vs + S::TILE;       // [2][TILE]
  T* dos = qs + 2 * S::TILE;  // [2][TILE]
  float* lse_s = reinterpret_cast<float*>(dos + 2 * S::TILE);  // [2][64], times log2(e); +inf past N
  float* delta_s = lse_s + 2 * kRows;                          // [2][64]; 0 past N
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = lane & 3;
  const int nb = (p.N + kRows - 1) / kRows;
  const int bh = blockIdx.x / nb, k0 = (blockIdx.x % nb) * kRows;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = head<T>(p.q, b, h);
  const T* dog = head<T>(p.dout, b, h);
  const float* lse_g = p.lse + static_cast<int64_t>(bh) * p.N;
  const float* delta_g = p.delta + static_cast<int64_t>(bh) * p.N;

  auto load_query_block = [&](int i, int buf) {
    load_tile<T, D>(qs + buf * S::TILE, qg, p.q.sn, i * kRows, p.N, tid);
    load_tile<T, D>(dos + buf * S::TILE, dog, p.dout.sn, i * kRows, p.N, tid);
    if (tid < kRows) {
      const int n = i * kRows + tid;
      lse_s[buf * kRows + tid] = n < p.N ? lse_g[n] * kLog2e : INFINITY;
      delta_s[buf * kRows + tid] = n < p.N ? delta_g[n] : 0.f;
    }
  };
  load_tile<T, D>(ks, head<T>(p.k, b, h), p.k.sn, k0, p.N, tid);
  load_tile<T, D>(vs, head<T>(p.v, b, h), p.v.sn, k0, p.N, tid);
  load_query_block(0, 0);
  cp_async_commit();

  const bool active = k0 + warp * 16 < p.N;  // warp-uniform: this warp's keys are not all padding
  float dk[S::ND][4], dv[S::ND][4];
#pragma unroll
  for (int i = 0; i < S::ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int i = 0; i < nb; ++i) {
    const int buf = i & 1;
    if (i + 1 < nb) load_query_block(i + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (active) {  // an inactive warp still takes part in the loads and barriers
      const T* qt = qs + buf * S::TILE;
      const T* dot = dos + buf * S::TILE;
      const float* lse_b = lse_s + buf * kRows;
      const float* delta_b = delta_s + buf * kRows;
      const int n16 = chunks16(i * kRows, p.N);  // query chunks holding a row < N (lse = +inf past N: P^T = 0)

      uint32_t af[S::KD][4];
      float pt[8][4];  // P^T: this warp's 16 keys x 64 queries
      load_a<T, D>(af, ks, warp * 16, lane);
      mma_a_tileT<T, D>(pt, af, qt, lane, n16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) pt[nt][e] = exp2f(pt[nt][e] * p.scale_log2 - lse_b[nt * 8 + 2 * t + (e & 1)]);
      mma_p_tile<T, D>(dv, pt, dot, lane, n16);  // dV += P^T dO

      float dpt[8][4];  // dP^T = V dO^T, then dS^T = P^T (dP^T - delta)
      load_a<T, D>(af, vs, warp * 16, lane);
      mma_a_tileT<T, D>(dpt, af, dot, lane, n16);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = pt[nt][e] * (dpt[nt][e] - delta_b[nt * 8 + 2 * t + (e & 1)]);
      mma_p_tile<T, D>(dk, dpt, qt, lane, n16);  // dK += dS^T Q
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  if (!active) return;

  const float scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  T* dkg = static_cast<T*>(p.out) + b * p.out_sb + h * p.out_sh;
  T* dvg = static_cast<T*>(p.out2) + b * p.out_sb + h * p.out_sh;
  store_rows<T, D>(dkg, p.out_sn, k0 + warp * 16, p.N, dk, scale, lane);
  store_rows<T, D>(dvg, p.out_sn, k0 + warp * 16, p.N, dv, one, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

// t read in place when the kernels can (unit D stride, 16-byte aligned rows), else a contiguous copy.
at::Tensor readable(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && aligned16(t.data_ptr()) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0;
  return ok ? t : t.contiguous();
}

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// An empty (B, H, N, D) tensor laid out as (B, N, H, D).
at::Tensor bhnd_over_bnhd(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.defined() && q.is_cuda(), "q must be a CUDA tensor");
  check_dim(q, 4, "q");
  check_half(q, "q");
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_cuda(*t, name, q.device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", dtype_name(q.scalar_type()),
                "; got ", dtype_name(t->scalar_type()));
    TORCH_CHECK(t->sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), " (B, H, N, D); got ",
                t->sizes());
  }
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 80 || D == 128, "q: head dim D = ", D, " not supported (64, 80 or 128)");
  TORCH_CHECK(q.size(0) * q.size(1) * ceil_div(q.size(2), kRows) < (int64_t{1} << 31) && q.size(2) < (1 << 30),
              "q: B * H * N too large");
}

template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 80: f(std::integral_constant<int, 80>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "head dim ", D, " not supported");
  }
}

template <int D>
constexpr int fwd_smem() { return 5 * Shape<D>::TILE * 2; }
template <int D>
constexpr int dkdv_smem() { return 6 * Shape<D>::TILE * 2 + 4 * kRows * 4; }
template <int D>
constexpr int dq_smem() { return 6 * Shape<D>::TILE * 2; }

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale) {
  check_qkv(q_in, k_in, v_in);
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "scale must be a positive finite number; got ", scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_device_arch(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  auto out = bhnd_over_bnhd(q_in);
  auto lse = at::empty({B, H, N}, q_in.options().dtype(at::kFloat));
  if (B * H * N == 0) return {out, lse};
  const auto q = readable(q_in), k = readable(k_in), v = readable(v_in);
  Params p{};
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.out = out.data_ptr();
  p.out_sb = out.stride(0);
  p.out_sh = out.stride(1);
  p.out_sn = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.H = static_cast<int>(H);
  p.N = static_cast<int>(N);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = B * H * ceil_div(N, kRows);
  dispatch_half(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(D, [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      auto kernel = attention_fwd_kernel<T, DD>;
      allow_smem(kernel, fwd_smem<DD>());
      kernel<<<blocks, kThreads, fwd_smem<DD>(), stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

// The backward into dq, dk, dv: (B, H, N, D) views with one shared set of strides and a unit D stride (three
// (B, N, H, D) buffers, or the three slices of one packed (B, N, 3, H, D) dqkv).
void attention_bwd_into(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dout_in,
                        const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_qkv(q_in, k_in, v_in);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    check_cuda(*t, name, q_in.device());
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), name, " must have q's dtype ",
                dtype_name(q_in.scalar_type()), "; got ", dtype_name(t->scalar_type()));
    TORCH_CHECK(t->sizes() == q_in.sizes(), name, " must have q's shape ", q_in.sizes(), "; got ", t->sizes());
  }
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  check_cuda(lse_in, "lse", q_in.device());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "lse must be float32; got ", dtype_name(lse_in.scalar_type()));
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == N,
              "lse must have shape (", B, ", ", H, ", ", N, "); got ", lse_in.sizes());
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "scale must be a positive finite number; got ", scale);
  TORCH_INTERNAL_ASSERT(dq.strides() == dk.strides() && dq.strides() == dv.strides() && dq.stride(3) == 1);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_device_arch(q_in.device());
  if (B * H * N == 0) return;
  const auto q = readable(q_in), k = readable(k_in), v = readable(v_in), o = readable(out_in),
             dout = readable(dout_in);
  const auto lse = lse_in.contiguous();
  auto delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));  // written by the dQ kernel
  Params p{};
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.o = operand(o);
  p.dout = operand(dout);
  p.out_sb = dq.stride(0);  // dq, dk, dv share one layout
  p.out_sh = dq.stride(1);
  p.out_sn = dq.stride(2);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.H = static_cast<int>(H);
  p.N = static_cast<int>(N);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = B * H * ceil_div(N, kRows);
  dispatch_half(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(D, [&](auto dim) {
      constexpr int DD = decltype(dim)::value;
      Params pq = p;  // dQ first: it writes delta, which the dK/dV kernel reads
      pq.out = dq.data_ptr();
      auto dqk = attention_bwd_dq_kernel<T, DD>;
      allow_smem(dqk, dq_smem<DD>());
      dqk<<<blocks, kThreads, dq_smem<DD>(), stream>>>(pq);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Params pk = p;
      pk.out = dk.data_ptr();
      pk.out2 = dv.data_ptr();
      auto dkdv = attention_bwd_dkdv_kernel<T, DD>;
      allow_smem(dkdv, dkdv_smem<DD>());
      dkdv<<<blocks, kThreads, dkdv_smem<DD>(), stream>>>(pk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double scale) {
  check_qkv(q, k, v);
  auto dq = bhnd_over_bnhd(q), dk = bhnd_over_bnhd(q), dv = bhnd_over_bnhd(q);
  attention_bwd_into(dq, dk, dv, dout, q, k, v, out, lse, scale);
  return {dq, dk, dv};
}

// q, k, v as (B, H, N, D) views of a packed (B, N, 3, H, D) tensor: no copy.
std::array<at::Tensor, 3> unpack_qkv(const at::Tensor& qkv, const char* name) {
  TORCH_CHECK(qkv.defined() && qkv.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, name, " must be (B, N, 3, H, D); got ", qkv.sizes());
  const auto views = qkv.permute({2, 0, 3, 1, 4});  // (3, B, H, N, D)
  return {views.select(0, 0), views.select(0, 1), views.select(0, 2)};
}

std::tuple<at::Tensor, at::Tensor> attention_packed_fwd(const at::Tensor& qkv, double scale) {
  const auto [q, k, v] = unpack_qkv(qkv, "qkv");
  return attention_fwd(q, k, v, scale);
}

// One (B, N, 3, H, D) gradient, contiguous: the dQ and dK/dV kernels write its three slices.
at::Tensor attention_packed_bwd(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                                const at::Tensor& lse, double scale) {
  const auto [q, k, v] = unpack_qkv(qkv, "qkv");
  auto dqkv = at::empty(qkv.sizes(), qkv.options());  // (B, N, 3, H, D)
  const auto [dq, dk, dv] = unpack_qkv(dqkv, "dqkv");
  attention_bwd_into(dq, dk, dv, dout, q, k, v, out, lse, scale);
  return dqkv;
}

}  // namespace
}  // namespace vit_fast

// Every op's .cu ends with this registration block, the form TORCH_LIBRARY_IMPL requires (same shape in each).
TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("attention_fwd_cuda", &vit_fast::attention_fwd);
  m.impl("attention_bwd_cuda", &vit_fast::attention_bwd);
  m.impl("attention_packed_fwd_cuda", &vit_fast::attention_packed_fwd);
  m.impl("attention_packed_bwd_cuda", &vit_fast::attention_packed_bwd);
}
