// InfoNCE on the CPU: the blocked driver of csrc/info_nce.h (query-row blocks, similarities
// from at::mm, i.e. MKL/oneDNN) with the two per-block row kernels below, in at::vec.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../info_nce.h"
#include "simd.h"

namespace kd_kernels {
namespace {

// ~4M entries (16 MiB in fp32) per block: the matmul stays efficient, memory stays bounded.
constexpr int64_t kBlockElements = int64_t(1) << 22;
// Symmetric loss: up to ~16M similarities (64 MiB) are kept from its first pass to its second
// instead of recomputed, a quarter of the matmul work, in less memory than the N x N eager loss.
constexpr int64_t kKeptElements = int64_t(1) << 24;

// z_ij = dots_ij * row_scale_i * col_scale_j for one row, written into z (length padded).
template <typename acc_t>
void scaled_row(const acc_t* dots, acc_t row_scale, const acc_t* col_scale, int64_t columns,
                acc_t* z) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  const Vec<acc_t> scale(row_scale);
  int64_t c = 0;
  for (; c + kWidth <= columns; c += kWidth) {
    (Vec<acc_t>::loadu(dots + c) * scale * Vec<acc_t>::loadu(col_scale + c)).store(z + c);
  }
  for (; c < columns; ++c) z[c] = dots[c] * row_scale * col_scale[c];
}

// logsumexp of z[0, columns): NaN if any entry is NaN, +-inf when the maximum is.
template <typename acc_t>
acc_t row_logsumexp(const acc_t* z, int64_t columns) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  const acc_t max_value = row_max(z, columns);
  if (!std::isfinite(max_value)) return max_value;
  const Vec<acc_t> shift(max_value);
  Vec<acc_t> total(0);
  int64_t c = 0;
  for (; c + kWidth <= columns; c += kWidth) total += (Vec<acc_t>::loadu(z + c) - shift).exp();
  acc_t sum = horizontal_sum(total);
  for (; c < columns; ++c) sum += std::exp(z[c] - max_value);
  return max_value + std::log(sum);
}

void info_nce_block_stats_cpu(const at::Tensor& dots, const at::Tensor& row_scale,
                              const at::Tensor& col_scale, const at::Tensor& labels,
                              at::Tensor& lse, at::Tensor& loss) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "info_nce_block_stats_cpu", [&] {
    using acc_t = scalar_t;
    const int64_t rows = dots.size(0), columns = dots.size(1);
    const acc_t* dots_data = dots.const_data_ptr<acc_t>();
    const acc_t* rs = row_scale.const_data_ptr<acc_t>();
    const acc_t* cs = col_scale.const_data_ptr<acc_t>();
    const int64_t* label = labels.const_data_ptr<int64_t>();
    acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(columns, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(columns);
      for (int64_t i = begin; i < end; ++i) {
        scaled_row(dots_data + i * columns, rs[i], cs, columns, z.data());
        lse_data[i] = row_logsumexp(z.data(), columns);
        loss_data[i] = lse_data[i] - z[label[i]];
      }
    });
  });
}

void info_nce_block_grad_cpu(at::Tensor& dots, const at::Tensor& row_scale,
                             const at::Tensor& col_scale, const at::Tensor& labels,
                             const at::Tensor& lse, const at::Tensor& grad_loss) {
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "info_nce_block_grad_cpu", [&] {
    using acc_t = scalar_t;
    constexpr int64_t kWidth = Vec<acc_t>::size();
    const int64_t rows = dots.size(0), columns = dots.size(1);
    acc_t* w = dots.mutable_data_ptr<acc_t>();
    const acc_t* rs = row_scale.const_data_ptr<acc_t>();
    const acc_t* cs = col_scale.const_data_ptr<acc_t>();
    const int64_t* label = labels.const_data_ptr<int64_t>();
    const acc_t* lse_data = lse.const_data_ptr<acc_t>();
    const acc_t* grad = grad_loss.const_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(columns, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* row = w + i * columns;
        // z first, exactly as the forward formed it (a fused z - lse would round differently
        // and give exp(z_pos - lse) != 1 for a certain row); then W = g rs cs exp(z - lse).
        scaled_row(row, rs[i], cs, columns, row);
        const Vec<acc_t> lse_v(lse_data[i]), g_scale(grad[i] * rs[i]);
        int64_t c = 0;
        for (; c + kWidth <= columns; c += kWidth) {
          const Vec<acc_t> col = Vec<acc_t>::loadu(cs + c);
          const Vec<acc_t> p = (Vec<acc_t>::loadu(row + c) - lse_v).exp();
          (p * g_scale * col).store(row + c);
        }
        for (; c < columns; ++c) {
          const acc_t z_minus_lse = row[c] - lse_data[i];
          row[c] = grad[i] * rs[i] * cs[c] * std::exp(z_minus_lse);
        }
        row[label[i]] -= grad[i] * rs[i] * cs[label[i]];
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> info_nce_forward_cpu(const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& labels,
                                                        const at::Tensor& temperature,
                                                        bool cosine) {
  return info_nce_forward<info_nce_block_stats_cpu>(
      query, key, labels, temperature, cosine, kBlockElements, InfoNCEGemm::kAccumulationType);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& labels, const at::Tensor& temperature, const at::Tensor& lse,
    bool cosine) {
  return info_nce_backward<info_nce_block_grad_cpu>(grad_loss, query, key, labels, temperature,
                                                    lse, cosine, kBlockElements,
                                                    InfoNCEGemm::kAccumulationType);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fused_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& labels,
    const at::Tensor& temperature, bool cosine, const at::Tensor& row_weight, bool symmetric) {
  return info_nce_fused<info_nce_block_stats_cpu, info_nce_block_grad_cpu>(
      query, key, labels, temperature, cosine, row_weight, symmetric, kBlockElements,
      kKeptElements, InfoNCEGemm::kAccumulationType);
}

}  // namespace

TORCH_LIBRARY_IMPL(kd_kernels, CPU, m) {
  m.impl("info_nce_forward", &info_nce_forward_cpu);
  m.impl("info_nce_backward", &info_nce_backward_cpu);
  m.impl("info_nce_fused", &info_nce_fused_cpu);
}

}  // namespace kd_kernels
