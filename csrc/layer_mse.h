// Shared declarations of the fused layer MSE (TinyBERT attention-map and hidden-state MSE):
// the per-layer input checks and the device-independent wrappers that allocate the outputs
// and call a device's core.
//
// Semantics (see kd_kernels/reference.py, the spec). Layer l holds student and teacher views of
// shape (B, H, R, C): attention scores (B, heads, Lq, Lk) or hidden states (B, 1, L, D).
//   s' = (s <= threshold ? 0 : s), t' likewise (no replacement when threshold is None)
//   counted(b, h, r, c) = mask is None or (mask[b, r] and (!mask_columns or mask[b, c]))
//   forward:  row_sq_sum[(l, b, h, r)] = sum_c counted * (s' - t')^2        (accumulation type)
//   backward: grad[l][b, h, r, c] = 2 g[(l, b, h, r)] (counted ? (s <= threshold ? 0 : s' - t')
//             : 0), with g = d out / d row_sq_sum                             (student dtype)
// The gradient is recomputed from s and t in backward rather than written in forward: one
// gradient-sized buffer at the peak instead of two (forward's and its scaled copy), for the
// same traffic. Uncounted elements are never read, so NaN padding does not leak; a counted NaN
// gives a NaN row sum and a NaN gradient there.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace kd_kernels {

struct LayerMSEOptions {
  bool use_threshold;
  double threshold;
  bool mask_columns;
};

inline void check_layer_mse_inputs(const at::TensorList& student, const at::TensorList& teacher,
                                   const std::optional<at::Tensor>& mask, bool mask_columns) {
  TORCH_CHECK_VALUE(student.size() == teacher.size() && !student.empty(),
                    "layer_mse op: need equally many (>= 1) student and teacher layers, got ",
                    student.size(), " and ", teacher.size());
  const auto dtype = student[0].scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "layer_mse op: float inputs needed, got ", dtype);
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor &s = student[l], &t = teacher[l];
    TORCH_CHECK_VALUE(s.dim() == 4 && s.sizes() == t.sizes(), "layer_mse op: layer ", l,
                      " needs equal (B, H, R, C) shapes, got ", s.sizes(), " and ", t.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == dtype && t.scalar_type() == dtype,
                     "layer_mse op: every layer must share one dtype, layer ", l, " has ",
                     s.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK_VALUE(s.device() == student[0].device() && t.device() == s.device(),
                      "layer_mse op: all layers must be on one device");
    TORCH_CHECK_VALUE((s.stride(3) == 1 || s.size(3) <= 1) && (t.stride(3) == 1 || t.size(3) <= 1),
                      "layer_mse op: layer ", l, " needs a unit last-dim stride");
    if (mask.has_value()) {
      TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == s.size(0) &&
                            mask->size(1) == s.size(2),
                        "layer_mse op: mask must be (B, R) = (", s.size(0), ", ", s.size(2),
                        "), got ", mask->sizes());
      TORCH_CHECK_VALUE(!mask_columns || s.size(2) == s.size(3),
                        "layer_mse op: column masking needs R == C, got ", s.sizes());
    }
  }
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                          mask->device() == student[0].device(),
                      "layer_mse op: mask must be a contiguous bool tensor on the inputs' device");
  }
}

// Rows (b, h, r) of every layer, laid end to end: the length of row_sq_sum.
inline int64_t layer_mse_total_rows(const at::TensorList& student) {
  int64_t rows = 0;
  for (const auto& s : student) rows += s.size(0) * s.size(1) * s.size(2);
  return rows;
}

// A device core runs every layer in one launch (or one parallel region). Forward (grad_rows
// undefined): fills row_sq_sum. Backward (grad_rows defined, contiguous, the sums' dtype):
// fills every grad[l] (contiguous, like student[l]).
using LayerMSECore = void (*)(const at::TensorList& student, const at::TensorList& teacher,
                              const std::optional<at::Tensor>& mask,
                              const LayerMSEOptions& options, const at::Tensor& grad_rows,
                              at::Tensor& row_sq_sum, std::vector<at::Tensor>& grad);

inline at::ScalarType layer_mse_sum_dtype(const at::TensorList& student) {
  return student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// kd_kernels::layer_mse_forward: the per-row sums of squared differences of all layers.
template <LayerMSECore core>
at::Tensor layer_mse_forward(at::TensorList student, at::TensorList teacher,
                             const std::optional<at::Tensor>& mask,
                             std::optional<double> threshold, bool mask_columns) {
  check_layer_mse_inputs(student, teacher, mask, mask_columns);
  auto row_sq_sum = at::empty({layer_mse_total_rows(student)},
                              student[0].options().dtype(layer_mse_sum_dtype(student)));
  const LayerMSEOptions options{threshold.has_value(), threshold.value_or(0.0), mask_columns};
  std::vector<at::Tensor> no_grad;
  if (row_sq_sum.numel() > 0) core(student, teacher, mask, options, {}, row_sq_sum, no_grad);
  return row_sq_sum;
}

// kd_kernels::layer_mse_backward: d (grad_rows . row_sq_sum) / d student[l] for every layer.
template <LayerMSECore core>
std::vector<at::Tensor> layer_mse_backward(const at::Tensor& grad_rows, at::TensorList student,
                                           at::TensorList teacher,
                                           const std::optional<at::Tensor>& mask,
                                           std::optional<double> threshold, bool mask_columns) {
  check_layer_mse_inputs(student, teacher, mask, mask_columns);
  const int64_t rows = layer_mse_total_rows(student);
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == rows,
                    "layer_mse op: grad_rows must be (", rows, ",), got ", grad_rows.sizes());
  const auto grad_c =
      grad_rows.to(student[0].device(), layer_mse_sum_dtype(student)).contiguous();
  std::vector<at::Tensor> grad;
  for (const auto& s : student) grad.push_back(at::empty(s.sizes(), s.options()));
  const LayerMSEOptions options{threshold.has_value(), threshold.value_or(0.0), mask_columns};
  at::Tensor no_sums;
  if (rows > 0) core(student, teacher, mask, options, grad_c, no_sums, grad);
  return grad;
}

}  // namespace kd_kernels
