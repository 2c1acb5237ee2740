// Fused layer MSE on the CPU (TinyBERT attention maps and hidden states): every row of every
// matched layer in one parallel region. Forward reads student and teacher once and writes one
// sum per row; backward reads them again and writes the gradient once. Semantics in
// csrc/layer_mse.h.
//
// Rows (b, h, r) of all layers are numbered end to end; a task takes a range of them and finds
// each row's layer from the layers' first-row table. Within a row the columns run in whole SIMD
// vectors of the accumulation type (fp32; fp64 for fp64); the tail is a partial load that fills
// with zeros, which add nothing to the sum.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../layer_mse.h"
#include "simd.h"

namespace kd_kernels {
namespace {

// Loads `count` (<= one vector) elements as the accumulation type; the rest of the vector is 0.
template <typename acc_t, typename scalar_t>
Vec<acc_t> load_acc(const scalar_t* src, int64_t count) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return count == kWidth ? Vec<acc_t>::loadu(src) : Vec<acc_t>::loadu(src, count);
  } else {
    alignas(64) acc_t lanes[kWidth] = {};
    for (int64_t i = 0; i < count; ++i) lanes[i] = acc_t(src[i]);
    return Vec<acc_t>::loadu(lanes);
  }
}

template <typename acc_t, typename scalar_t>
void store_as(const Vec<acc_t>& value, scalar_t* dst, int64_t count) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    value.store(dst, count);
  } else {
    alignas(64) acc_t lanes[kWidth];
    value.store(lanes);
    for (int64_t i = 0; i < count; ++i) dst[i] = scalar_t(lanes[i]);
  }
  (void)kWidth;
}

template <typename scalar_t>
struct LayerView {
  const scalar_t* student;
  const scalar_t* teacher;
  scalar_t* grad;  // backward only
  int64_t heads, rows_per_head, columns;
  int64_t student_strides[3], teacher_strides[3];
  int64_t first_row;  // of this layer in row_sq_sum
};

// Forward (grad_rows == nullptr): sums[row]. Backward: grad = 2 grad_rows[row] * (s' - t').
template <typename scalar_t>
void layer_mse_rows(const at::TensorList& student, const at::TensorList& teacher,
                    const bool* mask, const LayerMSEOptions& options,
                    const at::opmath_type<scalar_t>* grad_rows, at::opmath_type<scalar_t>* sums,
                    std::vector<at::Tensor>& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = Vec<acc_t>::size();
  std::vector<LayerView<scalar_t>> layers;
  int64_t total_rows = 0, widest = 0;
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor &s = student[l], &t = teacher[l];
    LayerView<scalar_t> view{s.const_data_ptr<scalar_t>(),
                             t.const_data_ptr<scalar_t>(),
                             grad.empty() ? nullptr : grad[l].mutable_data_ptr<scalar_t>(),
                             s.size(1),
                             s.size(2),
                             s.size(3),
                             {s.stride(0), s.stride(1), s.stride(2)},
                             {t.stride(0), t.stride(1), t.stride(2)},
                             total_rows};
    layers.push_back(view);
    total_rows += s.size(0) * s.size(1) * s.size(2);
    widest = std::max(widest, s.size(3));
  }

  // Column masks as whole vectors of 0/1 per sequence (attention: R == C, one mask row per b),
  // so that the inner loop selects with a vector compare instead of per-element branches.
  const int64_t mask_length = student[0].size(2);
  const int64_t padded = (widest + kWidth - 1) / kWidth * kWidth;
  std::vector<acc_t> column_mask;
  if (mask && options.mask_columns) {
    const int64_t batch = student[0].size(0);
    column_mask.assign(batch * padded, acc_t(0));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t c = 0; c < mask_length; ++c) column_mask[b * padded + c] = mask[b * mask_length + c];
    }
  }
  const bool use_column_mask = !column_mask.empty();
  const bool use_threshold = options.use_threshold;
  const Vec<acc_t> threshold(acc_t(options.threshold)), zero(acc_t(0));

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(widest, 1));
  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const auto* layer = &layers[0];
      for (const auto& candidate : layers) {
        if (candidate.first_row <= row) layer = &candidate;
      }
      const int64_t local = row - layer->first_row;
      const int64_t r = local % layer->rows_per_head;
      const int64_t h = (local / layer->rows_per_head) % layer->heads;
      const int64_t b = local / (layer->rows_per_head * layer->heads);
      const int64_t columns = layer->columns;
      scalar_t* grad_row = grad_rows ? layer->grad + local * columns : nullptr;
      if (mask && !mask[b * mask_length + r]) {
        if (grad_row) std::fill(grad_row, grad_row + columns, scalar_t(0));
        else sums[row] = 0;
        continue;
      }
      const auto* st = layer->student_strides;
      const auto* tt = layer->teacher_strides;
      const scalar_t* s_row = layer->student + b * st[0] + h * st[1] + r * st[2];
      const scalar_t* t_row = layer->teacher + b * tt[0] + h * tt[1] + r * tt[2];
      const acc_t* mask_row = use_column_mask ? column_mask.data() + b * padded : nullptr;
      const Vec<acc_t> grad_scale(grad_rows ? 2 * grad_rows[row] : acc_t(0));
      Vec<acc_t> total(acc_t(0));
      for (int64_t c = 0; c < columns; c += kWidth) {
        const int64_t count = std::min<int64_t>(kWidth, columns - c);
        Vec<acc_t> s = load_acc<acc_t>(s_row + c, count);
        Vec<acc_t> t = load_acc<acc_t>(t_row + c, count);
        Vec<acc_t> diff, grad;
        if (use_threshold) {
          const Vec<acc_t> s_replaced = s <= threshold;  // false for NaN: NaN propagates
          diff = Vec<acc_t>::blendv(s, zero, s_replaced) - Vec<acc_t>::blendv(t, zero, t <= threshold);
          grad = Vec<acc_t>::blendv(diff, zero, s_replaced);
        } else {
          diff = s - t;
          grad = diff;
        }
        // Select rather than multiply, so that NaN in an uncounted entry stays out.
        const Vec<acc_t> counted =
            mask_row ? Vec<acc_t>::loadu(mask_row + c) != zero : Vec<acc_t>(acc_t(0)) == zero;
        if (grad_row) {
          store_as(Vec<acc_t>::blendv(zero, grad * grad_scale, counted), grad_row + c, count);
        } else {
          total += Vec<acc_t>::blendv(zero, diff * diff, counted);
        }
      }
      if (!grad_row) sums[row] = horizontal_sum(total);
    }
  });
}

void layer_mse_cpu_core(const at::TensorList& student, const at::TensorList& teacher,
                        const std::optional<at::Tensor>& mask, const LayerMSEOptions& options,
                        const at::Tensor& grad_rows, at::Tensor& row_sq_sum,
                        std::vector<at::Tensor>& grad) {
  TORCH_CHECK_VALUE(student[0].device().is_cpu(), "layer_mse cpu kernel: tensors must be on the CPU");
  const bool* mask_data = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student[0].scalar_type(), "layer_mse_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* grad_data = grad_rows.defined() ? grad_rows.const_data_ptr<acc_t>() : nullptr;
        acc_t* sums = row_sq_sum.defined() ? row_sq_sum.mutable_data_ptr<acc_t>() : nullptr;
        layer_mse_rows<scalar_t>(student, teacher, mask_data, options, grad_data, sums, grad);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(kd_kernels, CPU, m) {
  m.impl("layer_mse_forward", &layer_mse_forward<layer_mse_cpu_core>);
  m.impl("layer_mse_backward", &layer_mse_backward<layer_mse_cpu_core>);
}

}  // namespace kd_kernels
