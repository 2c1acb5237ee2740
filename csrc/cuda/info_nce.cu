// CUDA block kernels of kd_kernels::info_nce_{forward,backward}; cuBLAS (at::mm in the shared
// driver, csrc/info_nce.h) makes each (R, M) block of raw dot products, these kernels do the rest.
// The driver runs with InfoNCEGemm::kInputType: fp16/bf16 inputs go to the tensor cores as they
// are (fp32 accumulation and output), never through fp32 copies (see csrc/info_nce.h).
//   * stats: a team owns a row and streams it once with an online (max, sum-exp), so M is
//     unbounded and nothing is staged in shared memory. Rows of up to kWarpRowMaxCols columns
//     take a power-of-two slice of a warp (the smallest that gives every lane a pack: in-batch
//     M is often a few hundred) and reduce by shuffles alone; longer rows (M up to ~1e6) take a
//     256-thread block, whose 8 warp results meet once in shared memory.
//   * grad: elementwise and memory-bound, so a 2-D grid of (column packs) x (rows), each thread
//     rewriting its own packs in place; its per-row scalars load once per row, with no 64-bit
//     division of a flat index. Narrow rows put several rows in a block (blockDim.y).
// Both take 16-byte packs when M is a multiple of the pack and dots and col_scale are 16-byte
// aligned (dots is contiguous, so every row start then is), else scalar accesses.
// ATen/cuda/CUDAContext.h is deliberately not included (see kd_loss.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "info_nce.h"

namespace kd_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWarpRowMaxCols = 1024;  // up to this, a row never crosses a warp
// 2^26 fp32 dots are 256 MiB: cuBLAS runs at full speed, and it is small against an 80 GB GPU.
constexpr int64_t kBlockElements = int64_t(1) << 26;
// Symmetric loss: a single block of up to 2^26 similarities is kept between its two passes.
constexpr int64_t kKeptElements = kBlockElements;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
// z = (d rs) c, in the cpu backend's order. The _rn products are never fused into a following
// add, so the lse loop, the label logit and the grad's z - lse all see one rounded z: a certain
// row gets loss = log(sum) >= 0, not an FMA rounding residual of either sign.
__device__ __forceinline__ float logit(float d, float rs, float c) {
  return __fmul_rn(__fmul_rn(d, rs), c);
}
__device__ __forceinline__ double logit(double d, double rs, double c) {
  return __dmul_rn(__dmul_rn(d, rs), c);
}

// Folds (m2, s2) into the running (max, sum of exp(z - max)) with one exp. -inf terms add
// nothing and are skipped, so -inf - -inf never happens; equal maxima (+inf twice) rescale by 1
// rather than exp(inf - inf). A NaN m2 wins the `grows` test and turns the sum NaN, and a NaN
// sum survives every later merge, so the row's lse is NaN.
template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 == -std::numeric_limits<T>::infinity()) return;
  const bool grows = !(m2 <= m);
  const T e = dev_exp(m2 == m ? T(0) : grows ? m - m2 : m2 - m);
  s = grows ? s * e + s2 : s + s2 * e;
  m = grows ? m2 : m;
}

// Both kernels' arguments: the (R, M) block and its per-row and per-column vectors.
template <typename T>
struct BlockParams {
  T* dots;  // grad: overwritten with W
  const T *row_scale, *col_scale;
  const int64_t* labels;
  T* lse;      // stats: written; grad: read
  T* per_row;  // stats: loss, written; grad: grad_loss, read
  int64_t rows;
  int cols, team_width;  // team_width: lanes per row of a stats warp team
};

template <typename T, int VEC, bool kBlockTeam>
__global__ void __launch_bounds__(kThreads) info_nce_stats_kernel(const BlockParams<T> p) {
  const int team = kBlockTeam ? kThreads : p.team_width;
  const int width = kBlockTeam ? 32 : team;  // lanes of the shuffle stage
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int teams_per_block = kThreads / team;
  const unsigned lane_mask =
      width == 32 ? 0xffffffffu : ((1u << width) - 1u) << (threadIdx.x % 32 / width * width);
  const int packs = p.cols / VEC;
  const int64_t row_step = int64_t{gridDim.x} * teams_per_block;
  // The row loop is uniform over a team (a block team: the whole block, as the barriers need).
  for (int64_t row = int64_t{blockIdx.x} * teams_per_block + threadIdx.x / team; row < p.rows;
       row += row_step) {
    const T* d_row = p.dots + row * p.cols;
    const T rs = p.row_scale[row];
    T m = -std::numeric_limits<T>::infinity(), s = 0;
    for (int64_t pk = lane; pk < packs; pk += team) {
      const auto d = load_pack<VEC>(d_row + pk * VEC);
      const auto c = load_pack<VEC>(p.col_scale + pk * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) lse_merge(m, s, logit(d.v[j], rs, c.v[j]), T(1));
    }
    for (int offset = width / 2; offset > 0; offset /= 2) {
      const T m2 = __shfl_xor_sync(lane_mask, m, offset);
      const T s2 = __shfl_xor_sync(lane_mask, s, offset);
      lse_merge(m, s, m2, s2);
    }
    if constexpr (kBlockTeam) {
      __shared__ T partial[kThreads / 32][2];
      if (threadIdx.x % 32 == 0) {
        partial[threadIdx.x / 32][0] = m;
        partial[threadIdx.x / 32][1] = s;
      }
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 1; w < kThreads / 32; ++w) lse_merge(m, s, partial[w][0], partial[w][1]);
      __syncthreads();  // thread 0 reads partial before the next row overwrites it
    }
    if (lane == 0) {
      const int64_t y = p.labels[row];
      const T lse = m + dev_log(s);  // all -inf: -inf + log(0) = -inf
      p.lse[row] = lse;
      p.per_row[row] = lse - logit(d_row[y], rs, p.col_scale[y]);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) info_nce_grad_kernel(const BlockParams<T> p) {
  const int packs = p.cols / VEC;
  const int64_t pack_step = int64_t{gridDim.x} * blockDim.x;
  const int64_t row_step = int64_t{gridDim.y} * blockDim.y;
  for (int64_t row = int64_t{blockIdx.y} * blockDim.y + threadIdx.y; row < p.rows;
       row += row_step) {
    T* w_row = p.dots + row * p.cols;
    const T rs = p.row_scale[row], lse = p.lse[row], g = p.per_row[row];
    const int64_t y = p.labels[row];
    for (int64_t pk = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; pk < packs;
         pk += pack_step) {
      auto w = load_pack<VEC>(w_row + pk * VEC);
      const auto c = load_pack<VEC>(p.col_scale + pk * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const T z = logit(w.v[j], rs, c.v[j]);
        const T target = pk * VEC + j == y ? T(1) : T(0);
        w.v[j] = g * (dev_exp(z - lse) - target) * rs * c.v[j];
      }
      *reinterpret_cast<Pack<T, VEC>*>(w_row + pk * VEC) = w;
    }
  }
}

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Smallest power of two >= packs, at most `cap`: short rows do not leave most lanes idle.
int team_for(int64_t packs, int cap) {
  int team = 1;
  while (team < cap && team < packs) team *= 2;
  return team;
}

template <bool kGrad, typename T, int VEC>
void launch(BlockParams<T> p, cudaStream_t stream) {
  const int64_t packs = p.cols / VEC;
  if constexpr (kGrad) {
    const int tx = team_for(packs, kThreads), ty = kThreads / tx;
    // gridDim.y stops at 65535 (R reaches 65536); both loops are grid-stride.
    const dim3 grid(static_cast<unsigned>((packs + tx - 1) / tx),
                    static_cast<unsigned>(std::min<int64_t>((p.rows + ty - 1) / ty, 65535)));
    info_nce_grad_kernel<T, VEC><<<grid, dim3(tx, ty), 0, stream>>>(p);
  } else if (p.cols > kWarpRowMaxCols) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(p.rows, INT32_MAX));
    info_nce_stats_kernel<T, VEC, true><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    p.team_width = team_for(packs, 32);
    const int64_t per_block = kThreads / p.team_width;
    const auto blocks =
        static_cast<unsigned>(std::min<int64_t>((p.rows + per_block - 1) / per_block, INT32_MAX));
    info_nce_stats_kernel<T, VEC, false><<<blocks, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The driver hands contiguous dots and stride-1 vectors, which the kernels index through bare
// pointers. per_row: loss (stats) or grad_loss (grad).
template <bool kGrad>
void run_block(const at::Tensor& dots, const at::Tensor& row_scale, const at::Tensor& col_scale,
               const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& per_row) {
  TORCH_INTERNAL_ASSERT(dots.dim() == 2 && dots.is_contiguous());
  for (const at::Tensor* v : {&row_scale, &col_scale, &labels, &lse, &per_row})
    TORCH_INTERNAL_ASSERT(v->dim() == 1 && v->is_contiguous());
  const int64_t rows = dots.size(0), cols = dots.size(1);
  TORCH_CHECK_VALUE(cols <= INT32_MAX, "info_nce (CUDA): at most 2^31 - 1 keys, got ", cols);
  if (rows == 0) return;
  TORCH_CHECK_VALUE(cols > 0, "info_nce (CUDA): labels need at least one key");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "info_nce_block_cuda", [&] {
    const BlockParams<scalar_t> p{
        dots.data_ptr<scalar_t>(), row_scale.data_ptr<scalar_t>(), col_scale.data_ptr<scalar_t>(),
        labels.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(), per_row.data_ptr<scalar_t>(),
        rows, static_cast<int>(cols), 32};
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (cols % kVec == 0 && aligned_16(p.dots) && aligned_16(p.col_scale)) {
      launch<kGrad, scalar_t, kVec>(p, stream);
    } else {
      launch<kGrad, scalar_t, 1>(p, stream);
    }
  });
}

}  // namespace

void info_nce_block_stats_cuda(const at::Tensor& dots, const at::Tensor& row_scale,
                               const at::Tensor& col_scale, const at::Tensor& labels,
                               at::Tensor& lse, at::Tensor& loss) {
  run_block<false>(dots, row_scale, col_scale, labels, lse, loss);
}

void info_nce_block_grad_cuda(at::Tensor& dots, const at::Tensor& row_scale,
                              const at::Tensor& col_scale, const at::Tensor& labels,
                              const at::Tensor& lse, const at::Tensor& grad_loss) {
  run_block<true>(dots, row_scale, col_scale, labels, lse, grad_loss);
}

std::tuple<at::Tensor, at::Tensor> info_nce_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& labels,
    const at::Tensor& temperature, bool cosine) {
  c10::cuda::CUDAGuard device_guard(query.device());
  return info_nce_forward<info_nce_block_stats_cuda>(query, key, labels, temperature, cosine,
                                                     kBlockElements, InfoNCEGemm::kInputType);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& labels, const at::Tensor& temperature, const at::Tensor& lse, bool cosine) {
  c10::cuda::CUDAGuard device_guard(query.device());
  return info_nce_backward<info_nce_block_grad_cuda>(grad_loss, query, key, labels, temperature,
                                                     lse, cosine, kBlockElements,
                                                     InfoNCEGemm::kInputType);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fused_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& labels,
    const at::Tensor& temperature, bool cosine, const at::Tensor& row_weight, bool symmetric) {
  c10::cuda::CUDAGuard device_guard(query.device());
  return info_nce_fused<info_nce_block_stats_cuda, info_nce_block_grad_cuda>(
      query, key, labels, temperature, cosine, row_weight, symmetric, kBlockElements,
      kKeptElements, InfoNCEGemm::kInputType);
}

TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m) {
  m.impl("info_nce_forward", TORCH_FN(info_nce_forward_cuda));
  m.impl("info_nce_backward", TORCH_FN(info_nce_backward_cuda));
  m.impl("info_nce_fused", TORCH_FN(info_nce_fused_cuda));
}

}  // namespace kd_kernels
