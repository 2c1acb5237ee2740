// Shared declarations of the fused layer MSE (TinyBERT attention-map and hidden-state MSE):
// the per-layer input checks and the device-independent wrapper that allocates the outputs
// and calls a device's core.
//
// Semantics (see kd_kernels/reference.py, the spec). Layer l holds student and teacher views of
// shape (B, H, R, C): attention scores (B, heads, Lq, Lk) or hidden states (B, 1, L, D).
//   s' = (s <= threshold ? 0 : s), t' likewise (no replacement when threshold is None)
//   counted(b, h, r, c) = mask is None or (mask[b, r] and (!mask_columns or mask[b, c]))
//   row_sq_sum[(l, b, h, r)] = sum_c counted * (s' - t')^2                 (accumulation type)
//   half_grad[l][b, h, r, c] = counted ? (s <= threshold ? 0 : s' - t') : 0  (student dtype)
// half_grad is (1/2) d row_sq_sum / d s. Uncounted elements are never read into the sums, so
// NaN padding does not leak; a counted NaN gives a NaN row sum and a NaN half_grad there.
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

// A device core fills row_sq_sum and, when need_grad, every half_grad[l] (contiguous, like
// student[l]). It runs every layer in one launch (or one parallel region).
using LayerMSECore = void (*)(const at::TensorList& student, const at::TensorList& teacher,
                              const std::optional<at::Tensor>& mask,
                              const LayerMSEOptions& options, at::Tensor& row_sq_sum,
                              std::vector<at::Tensor>& half_grad);

// kd_kernels::layer_mse_forward: returns (row_sq_sum, half_grad per layer, or an empty list).
template <LayerMSECore core>
std::tuple<at::Tensor, std::vector<at::Tensor>> layer_mse_forward(
    at::TensorList student, at::TensorList teacher, const std::optional<at::Tensor>& mask,
    std::optional<double> threshold, bool mask_columns, bool need_grad) {
  check_layer_mse_inputs(student, teacher, mask, mask_columns);
  const auto sum_dtype = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row_sq_sum =
      at::empty({layer_mse_total_rows(student)}, student[0].options().dtype(sum_dtype));
  std::vector<at::Tensor> half_grad;
  if (need_grad) {
    for (const auto& s : student) half_grad.push_back(at::empty(s.sizes(), s.options()));
  }
  const LayerMSEOptions options{threshold.has_value(), threshold.value_or(0.0), mask_columns};
  if (row_sq_sum.numel() > 0) core(student, teacher, mask, options, row_sq_sum, half_grad);
  return {row_sq_sum, half_grad};
}

}  // namespace kd_kernels
