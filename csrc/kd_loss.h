// Shared declarations of the fused KD loss: the options every backend receives and the
// device-independent wrappers that allocate outputs and call a device's core.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace kd_kernels {

enum class KDKind : int { KL = 0, SoftCE = 1, ReverseKL = 2, JSD = 3 };

inline KDKind parse_kd_kind(std::string_view kind) {
  if (kind == "kl") return KDKind::KL;
  if (kind == "soft_ce") return KDKind::SoftCE;
  if (kind == "reverse_kl") return KDKind::ReverseKL;
  if (kind == "jsd") return KDKind::JSD;
  TORCH_CHECK_VALUE(false, "kd_loss: kind must be one of kl, soft_ce, reverse_kl, jsd; got '",
                    std::string(kind), "'");
}

// Per-row semantics (see kd_kernels/reference.py, the spec):
//   z_S = student / T, p_S = softmax(z_S); p_T = mean_k softmax(teacher_k / T)
//   soft = kl | soft_ce | reverse_kl | jsd(beta)  (times T^2 when scale_t2)
//   row_loss = soft_weight * soft + hard_weight * (logsumexp(student) - student[label])
//   grad     = d row_loss / d student   (unreduced; the caller applies the reduction)
// Rows with mask == false or label == ignore_index get row_loss 0 and grad 0.
// Rows holding NaN or +inf in student or teacher get row_loss NaN and grad NaN.
struct KDLossOptions {
  double temperature;
  KDKind kind;
  double soft_weight;
  double hard_weight;
  double beta;
  bool scale_t2;
  int64_t ignore_index;
};

// Checks shared by every device: student (N, C), teacher (K, N, C), unit column stride.
inline void check_kd_loss_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_loss op: student must be (N, C), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(teacher.dim() == 3 && teacher.size(1) == student.size(0) &&
                        teacher.size(2) == student.size(1),
                    "kd_loss op: teacher must be (K, N, C) with student (N, C) = ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.size(0) >= 1, "kd_loss op: need at least one teacher");
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(2) == 1,
                    "kd_loss op: logits need a unit column stride");
  TORCH_CHECK_VALUE(teacher.stride(0) == teacher.size(1) * teacher.stride(1) ||
                        teacher.size(0) == 1,
                    "kd_loss op: teacher must be a stacked (K, N, C) view");
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()) &&
                       student.scalar_type() == teacher.scalar_type(),
                   "kd_loss op: student and teacher must share a float dtype, got ",
                   student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "kd_loss op: student and teacher on different devices");
  const int64_t rows = student.size(0);
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == rows &&
                          labels->scalar_type() == at::kLong && labels->is_contiguous() &&
                          labels->device() == student.device(),
                      "kd_loss op: labels must be contiguous int64 (N,) on the logits' device");
  }
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == rows &&
                          mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                          mask->device() == student.device(),
                      "kd_loss op: mask must be contiguous bool (N,) on the logits' device");
  }
}

// A device core fills row_loss (N,) (row_loss_dtype) and, when grad is defined, grad (N, C) in the
// student's dtype (grad may alias student: every element is read before it is written).
using KDLossCore = void (*)(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& mask, const KDLossOptions& options,
                            at::Tensor& row_loss, at::Tensor& grad);

// The loss is float32, or float64 for float64 logits (so that gradcheck can run on the CPU).
inline at::ScalarType row_loss_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline KDLossOptions make_kd_options(double temperature, std::string_view kind,
                                     double soft_weight, double hard_weight, double beta,
                                     bool scale_t2, int64_t ignore_index) {
  TORCH_CHECK_VALUE(temperature > 0, "kd_loss op: temperature must be > 0, got ", temperature);
  return KDLossOptions{temperature, parse_kd_kind(kind), soft_weight, hard_weight,
                       beta,        scale_t2,            ignore_index};
}

// kd_kernels::kd_loss_forward: functional form, returns (row_loss, grad or empty).
template <KDLossCore core>
std::tuple<at::Tensor, at::Tensor> kd_loss_forward(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& mask, double temperature, c10::string_view kind,
    double soft_weight, double hard_weight, double beta, bool scale_t2, int64_t ignore_index,
    bool need_grad) {
  check_kd_loss_inputs(student, teacher, labels, mask);
  const auto options = make_kd_options(temperature, std::string_view(kind.data(), kind.size()),
                                       soft_weight, hard_weight, beta, scale_t2, ignore_index);
  auto row_loss = at::empty({student.size(0)}, student.options().dtype(row_loss_dtype(student)));
  auto grad = need_grad ? at::empty_like(student, at::MemoryFormat::Contiguous) : at::Tensor();
  if (student.numel() > 0) core(student, teacher, labels, mask, options, row_loss, grad);
  else row_loss.zero_();
  return {row_loss, need_grad ? grad : at::empty({0}, student.options())};
}

// kd_kernels::kd_loss_forward_out: writes the gradient into `grad` (which may be the student
// itself, for inplace_grad) and returns row_loss.
template <KDLossCore core>
at::Tensor kd_loss_forward_out(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& mask, double temperature,
                               c10::string_view kind, double soft_weight, double hard_weight,
                               double beta, bool scale_t2, int64_t ignore_index,
                               at::Tensor& grad) {
  check_kd_loss_inputs(student, teacher, labels, mask);
  TORCH_CHECK_VALUE(grad.sizes() == student.sizes() && grad.is_contiguous() &&
                        grad.scalar_type() == student.scalar_type() &&
                        grad.device() == student.device(),
                    "kd_loss op: grad must be a contiguous tensor like student");
  const auto options = make_kd_options(temperature, std::string_view(kind.data(), kind.size()),
                                       soft_weight, hard_weight, beta, scale_t2, ignore_index);
  auto row_loss = at::empty({student.size(0)}, student.options().dtype(row_loss_dtype(student)));
  if (student.numel() > 0) core(student, teacher, labels, mask, options, row_loss, grad);
  else row_loss.zero_();
  return row_loss;
}

}  // namespace kd_kernels
