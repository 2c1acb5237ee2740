// CUDA core of kd_kernels::layer_mse_forward and _backward (semantics in csrc/layer_mse.h).
// Forward reads student and teacher once and writes only the per-row sums; backward reads them
// again and recomputes the gradient from s and t: one gradient-sized buffer at the peak.
// One launch layout for both, apex multi_tensor_apply style:
//   * every layer's pointers, sizes and outer strides travel by value in one kernel-argument
//     table of up to kMaxLayersPerLaunch layers: one launch per list (per chunk beyond that);
//   * the table's rows (l, b, h, r) are numbered end to end, as in row_sq_sum and grad_rows, and
//     a team of team_width lanes (a power-of-two slice of a warp) owns one row at a time, finding
//     its layer by scanning the table's row offsets (only onward, as a team's rows only grow);
//   * rows are short (128..1024 columns) and the op is memory-bound, so a team streams its row
//     once in coalesced (16-byte where possible) accesses; forward reduces by shuffles alone and
//     backward needs no reduction: no shared memory, barriers or atomics, each row has one writer.
// A layer takes 16-byte packs when C is a multiple of the pack and every row start is aligned
// to it (student, teacher, grad; under column masking the mask row too), else scalar accesses:
// chosen per layer at run time, uniform over a row's team. No ATen/cuda/CUDAContext.h (kd_loss.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "layer_mse.h"

namespace kd_kernels {
namespace {

// 32 layers (a 24-layer teacher plus embeddings) keep the table under the 4 KB parameter limit.
constexpr int kMaxLayersPerLaunch = 32;
constexpr int kBlockThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

template <typename scalar_t>
struct LayerArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  scalar_t* grad;       // backward: the layer's contiguous gradient; forward: nullptr
  int64_t row_begin;    // first row of the layer, counted from the launch's first row
  int64_t heads, seq;   // H and R: all a row index needs to be split into (b, h, r)
  int64_t student_stride[3], teacher_stride[3];
  int cols;
  bool vectorized;  // 16-byte packs: every row start aligned and cols a multiple of the pack
};

template <typename scalar_t>
struct LayerMSEParams {
  using acc_t = at::opmath_type<scalar_t>;
  LayerArgs<scalar_t> layers[kMaxLayersPerLaunch];
  const uint8_t* mask;     // (B, R) bool as bytes; nullptr when absent
  acc_t* row_sq_sum;       // forward: already offset to the launch's first row
  const acc_t* grad_rows;  // backward: d out / d row_sq_sum, offset likewise
  int64_t rows;
  acc_t threshold;  // compared in the accumulation type, as the reference compares in fp32
  int num_layers, team_width;
  bool use_threshold, mask_columns;
};
static_assert(sizeof(LayerMSEParams<float>) <= 4096 && sizeof(LayerMSEParams<double>) <= 4096,
              "the layer table must fit in the 4 KB kernel-parameter space");

// One row's share of this lane. Forward: returns its sum of counted (s' - t')^2. Backward:
// stores every element of 2 g (counted && s not cut ? s' - t' : 0), rounded once from acc_t;
// two_g meets only counted, uncut entries. col_mask: the batch's mask row under column masking,
// else nullptr. Packs with nothing counted (padding rows or columns) are never read: that saves
// their traffic, and NaN padding cannot leak; in a read pack, uncounted entries only see selects.
template <int VEC, bool BACKWARD, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_partial(const scalar_t* __restrict__ s_row,
                                             const scalar_t* __restrict__ t_row,
                                             scalar_t* __restrict__ g_row,
                                             const uint8_t* __restrict__ col_mask,
                                             bool row_counted, acc_t two_g, int cols, int lane,
                                             int team, bool use_threshold, acc_t threshold) {
  acc_t sum = 0;
  if (!BACKWARD && !row_counted) return sum;
  const int packs = cols / VEC;
  for (int pk = lane; pk < packs; pk += team) {
    Pack<uint8_t, VEC> counted{};
    bool any = row_counted;
    if (any && col_mask != nullptr) {
      counted = load_pack<VEC>(col_mask + pk * VEC);
      any = false;
#pragma unroll
      for (int j = 0; j < VEC; ++j) any = any || counted.v[j] != 0;
    }
    if (!any) {
      if constexpr (BACKWARD) store_pack<VEC>(g_row + pk * VEC, Pack<scalar_t, VEC>{});
      continue;
    }
    const auto s = load_pack<VEC>(s_row + pk * VEC);
    const auto t = load_pack<VEC>(t_row + pk * VEC);
    // Each lane's result is built and stored in one straight-line block: a pack assigned in
    // two branches and stored after them was kept in local memory (ptxas spill stores).
    Pack<scalar_t, VEC> grad;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t x = static_cast<acc_t>(s.v[j]), y = static_cast<acc_t>(t.v[j]);
      const bool x_cut = use_threshold && x <= threshold;  // false for NaN: NaN propagates
      const bool y_cut = use_threshold && y <= threshold;
      const acc_t d = (x_cut ? acc_t(0) : x) - (y_cut ? acc_t(0) : y);
      const bool is_counted = col_mask == nullptr || counted.v[j] != 0;
      if constexpr (BACKWARD)
        grad.v[j] = static_cast<scalar_t>(is_counted && !x_cut ? two_g * d : acc_t(0));
      else
        sum += is_counted ? d * d : acc_t(0);
    }
    if constexpr (BACKWARD) store_pack<VEC>(g_row + pk * VEC, grad);
  }
  return sum;
}

template <typename scalar_t, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kBlockThreads)
    layer_mse_kernel(const LayerMSEParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int team = p.team_width;
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int teams_per_block = kBlockThreads / team;

  int l = 0;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * teams_per_block;
  for (int64_t row = int64_t{blockIdx.x} * teams_per_block + threadIdx.x / team; row < p.rows;
       row += row_step) {
    // `>=` also steps over empty layers, whose row_begin equals their successor's.
    while (l + 1 < p.num_layers && row >= p.layers[l + 1].row_begin) ++l;
    const LayerArgs<scalar_t>& layer = p.layers[l];
    const int64_t local = row - layer.row_begin;
    int64_t b, h, r;
    if (((local | layer.seq | layer.heads) >> 32) == 0) {
      // 32-bit division costs a fraction of 64-bit, which matters per short row.
      const auto local32 = static_cast<uint32_t>(local), seq32 = static_cast<uint32_t>(layer.seq);
      r = local32 % seq32;
      h = local32 / seq32 % static_cast<uint32_t>(layer.heads);
      b = local32 / seq32 / static_cast<uint32_t>(layer.heads);
    } else {
      r = local % layer.seq;
      h = local / layer.seq % layer.heads;
      b = local / layer.seq / layer.heads;
    }
    const scalar_t* s_row = layer.student + b * layer.student_stride[0] +
                            h * layer.student_stride[1] + r * layer.student_stride[2];
    const scalar_t* t_row = layer.teacher + b * layer.teacher_stride[0] +
                            h * layer.teacher_stride[1] + r * layer.teacher_stride[2];
    const bool row_counted = p.mask == nullptr || p.mask[b * layer.seq + r] != 0;
    // Column masking implies R == C, so the mask row b has exactly `cols` entries.
    const uint8_t* col_mask =
        p.mask != nullptr && p.mask_columns ? p.mask + b * layer.seq : nullptr;
    // Backward: g loads once per row (one address for the team), not at all for a padding row.
    scalar_t* g_row = BACKWARD ? layer.grad + local * layer.cols : nullptr;
    const acc_t two_g = BACKWARD && row_counted ? acc_t(2) * p.grad_rows[row] : acc_t(0);
    // Layer and row_counted are uniform over the team, so it stays converged for the shuffles.
    acc_t sum = layer.vectorized
                    ? row_partial<VEC, BACKWARD>(s_row, t_row, g_row, col_mask, row_counted,
                                                 two_g, layer.cols, lane, team, p.use_threshold,
                                                 p.threshold)
                    : row_partial<1, BACKWARD>(s_row, t_row, g_row, col_mask, row_counted, two_g,
                                               layer.cols, lane, team, p.use_threshold,
                                               p.threshold);
    if constexpr (!BACKWARD) {
      const unsigned lane_mask =
          team == 32 ? 0xffffffffu : ((1u << team) - 1u) << (threadIdx.x % 32 / team * team);
      for (int offset = team / 2; offset > 0; offset /= 2)
        sum += __shfl_xor_sync(lane_mask, sum, offset);
      if (lane == 0) p.row_sq_sum[row] = sum;
    }
  }
}

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A row start is a multiple of `vec` elements past an aligned base when every outer stride is;
// strides of size-1 dims never move the pointer, so they may be anything.
bool rows_aligned(const at::Tensor& x, int vec) {
  if (!aligned_16(x.data_ptr())) return false;
  for (int d = 0; d < 3; ++d)
    if (x.size(d) > 1 && x.stride(d) % vec != 0) return false;
  return true;
}

template <typename scalar_t, int VEC, bool BACKWARD>
void launch_layer_mse(const LayerMSEParams<scalar_t>& params, cudaStream_t stream) {
  const int64_t rows_per_block = kBlockThreads / params.team_width;
  // Enough blocks for one row per team; the grid-stride loop covers any rows beyond 2^31 blocks.
  const int64_t blocks = std::min<int64_t>((params.rows + rows_per_block - 1) / rows_per_block,
                                           std::numeric_limits<int32_t>::max());
  layer_mse_kernel<scalar_t, VEC, BACKWARD>
      <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Forward (grad_rows undefined): fills all of row_sq_sum, no gradient. Backward (grad_rows
// contiguous, rows numbered as row_sq_sum): fills all of every grad[l]; row_sq_sum is unused.
void layer_mse_cuda_core(const at::TensorList& student, const at::TensorList& teacher,
                         const std::optional<at::Tensor>& mask, const LayerMSEOptions& options,
                         const at::Tensor& grad_rows, at::Tensor& row_sq_sum,
                         std::vector<at::Tensor>& grad) {
  c10::cuda::CUDAGuard device_guard(student[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool backward = grad_rows.defined();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student[0].scalar_type(), "layer_mse_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = 16 / sizeof(scalar_t);
        LayerMSEParams<scalar_t> params{};
        params.mask = mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>())
                                       : nullptr;
        params.threshold = static_cast<acc_t>(options.threshold);
        params.use_threshold = options.use_threshold;
        params.mask_columns = options.mask_columns;
        // A mask pack (kVec bytes) of a row needs the mask base aligned to it (R == C then).
        const bool mask_packs = params.mask == nullptr || !params.mask_columns ||
                                reinterpret_cast<uintptr_t>(params.mask) % kVec == 0;

        int64_t first_row = 0, next_row = 0;  // end-to-end rows: launch start, next layer
        int max_packs = 0;
        auto flush = [&] {
          if (params.num_layers == 0) return;
          params.rows = next_row - first_row;
          params.row_sq_sum = backward ? nullptr : row_sq_sum.data_ptr<acc_t>() + first_row;
          params.grad_rows = backward ? grad_rows.const_data_ptr<acc_t>() + first_row : nullptr;
          // Smallest power-of-two slice of a warp that gives every lane a pack of the widest
          // row, so that short rows do not leave most of a warp idle.
          params.team_width = 1;
          while (params.team_width < 32 && params.team_width < max_packs) params.team_width *= 2;
          backward ? launch_layer_mse<scalar_t, kVec, true>(params, stream)
                   : launch_layer_mse<scalar_t, kVec, false>(params, stream);
          params.num_layers = 0;
          max_packs = 0;
        };
        for (size_t i = 0; i < student.size(); ++i) {
          const at::Tensor &s = student[i], &t = teacher[i];
          const int64_t rows = s.size(0) * s.size(1) * s.size(2), cols = s.size(3);
          if (rows == 0) continue;  // nothing to write, and its data pointers may be null
          TORCH_CHECK_VALUE(cols <= std::numeric_limits<int32_t>::max(),
                            "layer_mse (CUDA): rows of at most 2^31 - 1 elements, got ", cols);
          if (params.num_layers == 0) first_row = next_row;
          LayerArgs<scalar_t>& layer = params.layers[params.num_layers++];
          layer.student = s.data_ptr<scalar_t>();
          layer.teacher = t.data_ptr<scalar_t>();
          layer.grad = backward ? grad[i].data_ptr<scalar_t>() : nullptr;
          layer.row_begin = next_row - first_row;
          layer.heads = s.size(1);
          layer.seq = s.size(2);
          for (int d = 0; d < 3; ++d) {
            layer.student_stride[d] = s.stride(d);
            layer.teacher_stride[d] = t.stride(d);
          }
          layer.cols = static_cast<int>(cols);
          layer.vectorized = kVec > 1 && cols % kVec == 0 && mask_packs &&
                             rows_aligned(s, kVec) && rows_aligned(t, kVec) &&
                             (!backward || aligned_16(layer.grad));
          const int64_t packs = layer.vectorized ? cols / kVec : cols;
          max_packs = static_cast<int>(std::min<int64_t>(std::max<int64_t>(max_packs, packs), 32));
          next_row += rows;
          if (params.num_layers == kMaxLayersPerLaunch) flush();
        }
        flush();
      });
}

TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m) {
  m.impl("layer_mse_forward", TORCH_FN(layer_mse_forward<layer_mse_cuda_core>));
  m.impl("layer_mse_backward", TORCH_FN(layer_mse_backward<layer_mse_cuda_core>));
}

}  // namespace kd_kernels
