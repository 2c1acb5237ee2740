// Fused temperature-softmax KD loss on the CPU: loss and d loss / d student in one call.
//
// Rows are independent and run in parallel (at::parallel_for). Each row is copied once into
// padded scratch buffers in the accumulation type (fp32; fp64 for fp64), padding with -inf so
// that every inner loop works on whole SIMD vectors: -inf gives probability 0, and every
// term is guarded so that 0 * log 0 = 0. A row of up to a few hundred thousand classes then
// stays in L2 while the 2-3 passes below run over it.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../kd_loss.h"
#include "simd.h"

namespace kd_kernels {
namespace {

// Writes exps_c = exp(x_c * scale - max * scale) over a padded row, given max_c x_c (finite),
// and returns their sum: the softmax numerators and denominator, computed once per row.
template <typename acc_t>
acc_t row_exp_sum(const acc_t* x, int64_t padded, acc_t scale, acc_t max_value, acc_t* exps) {
  const Vec<acc_t> scale_v(scale), shift_v(max_value * scale);
  Vec<acc_t> total(0);
  for (int64_t c = 0; c < padded; c += Vec<acc_t>::size()) {
    const Vec<acc_t> e = (Vec<acc_t>::loadu(x + c) * scale_v - shift_v).exp();
    e.store(exps + c);
    total += e;
  }
  return horizontal_sum(total);
}

// Guarded p * (log_p - log_q): 0 where p == 0 (including -inf - -inf = NaN there).
template <typename acc_t>
Vec<acc_t> p_log_ratio(const Vec<acc_t>& p, const Vec<acc_t>& log_p, const Vec<acc_t>& log_q) {
  const Vec<acc_t> zero(0);
  return Vec<acc_t>::blendv(zero, p * (log_p - log_q), p > zero);
}

template <typename scalar_t>
void kd_loss_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                  const bool* mask, const KDLossOptions& opt, at::Tensor& row_loss,
                  at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = Vec<acc_t>::size();
  const int64_t rows = student.size(0), classes = student.size(1);
  const int64_t teachers = teacher.size(0);
  const int64_t padded = (classes + kWidth - 1) / kWidth * kWidth;
  const scalar_t* student_data = student.const_data_ptr<scalar_t>();
  const scalar_t* teacher_data = teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = student.stride(0);
  const int64_t teacher_stride_k = teacher.stride(0), teacher_stride_row = teacher.stride(1);
  acc_t* loss_data = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_data = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;

  const acc_t inv_t = acc_t(1) / acc_t(opt.temperature);
  const acc_t t2 = opt.scale_t2 ? acc_t(opt.temperature * opt.temperature) : acc_t(1);
  const acc_t soft_loss_coef = acc_t(opt.soft_weight) * t2;
  const acc_t soft_grad_coef = soft_loss_coef * inv_t;
  const acc_t hard_weight = acc_t(opt.hard_weight);
  const bool hard = opt.hard_weight != 0.0;
  const acc_t beta = acc_t(opt.beta);
  const acc_t inv_teachers = acc_t(1) / acc_t(teachers);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // ~32K elements per task keeps the scheduling overhead small for short rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Per row: logits s and t (K teachers), softmax numerators exp_s, exp_t (and exp_hard for
    // the t = 1 softmax of the hard CE). The gradient is written over exp_s.
    std::vector<acc_t> s(padded), t(padded * teachers), exp_s(padded), exp_t(padded * teachers);
    std::vector<acc_t> exp_hard(hard ? padded : 0), teacher_lse(teachers), teacher_inv_sum(teachers);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* grad_row = grad_data ? grad_data + row * classes : nullptr;
      const bool counted = (!mask || mask[row]) && (!labels || labels[row] != opt.ignore_index);
      if (!counted) {
        loss_data[row] = 0;
        if (grad_row) std::fill(grad_row, grad_row + classes, scalar_t(0));
        continue;
      }
      const int64_t label = labels ? labels[row] : 0;
      bool bad = hard && (label < 0 || label >= classes);

      const scalar_t* s_src = student_data + row * student_stride;
      for (int64_t c = 0; c < classes; ++c) s[c] = acc_t(s_src[c]);
      std::fill(s.begin() + classes, s.end(), neg_inf);
      // A row with NaN or +inf, or with no finite maximum (all -inf), has no distribution.
      const acc_t s_max = row_max(s.data(), classes);
      bad = bad || !std::isfinite(s_max);
      for (int64_t k = 0; k < teachers && !bad; ++k) {
        acc_t* t_row = t.data() + k * padded;
        const scalar_t* t_src = teacher_data + k * teacher_stride_k + row * teacher_stride_row;
        for (int64_t c = 0; c < classes; ++c) t_row[c] = acc_t(t_src[c]);
        std::fill(t_row + classes, t_row + padded, neg_inf);
        const acc_t t_max = row_max(t_row, classes);
        bad = !std::isfinite(t_max);
        if (bad) break;
        const acc_t sum = row_exp_sum(t_row, padded, inv_t, t_max, exp_t.data() + k * padded);
        teacher_lse[k] = t_max * inv_t + std::log(sum);
        teacher_inv_sum[k] = inv_teachers / sum;
      }
      if (bad) {
        loss_data[row] = nan;
        if (grad_row) std::fill(grad_row, grad_row + classes, scalar_t(nan));
        continue;
      }
      const acc_t student_sum = row_exp_sum(s.data(), padded, inv_t, s_max, exp_s.data());
      const acc_t student_lse = s_max * inv_t + std::log(student_sum);
      acc_t hard_lse = 0;
      if (hard) hard_lse = s_max + std::log(row_exp_sum(s.data(), padded, acc_t(1), s_max,
                                                        exp_hard.data()));

      // p_S, p_T, log p_S, log p_T of one vector of classes, from the stored numerators.
      const Vec<acc_t> inv_t_v(inv_t), student_lse_v(student_lse);
      const Vec<acc_t> student_inv_sum_v(acc_t(1) / student_sum);
      auto probs = [&](int64_t c, Vec<acc_t>& p_s, Vec<acc_t>& p_t, Vec<acc_t>& log_p_s,
                       Vec<acc_t>& log_p_t) {
        p_s = Vec<acc_t>::loadu(exp_s.data() + c) * student_inv_sum_v;
        log_p_s = Vec<acc_t>::loadu(s.data() + c) * inv_t_v - student_lse_v;
        if (teachers == 1) {
          p_t = Vec<acc_t>::loadu(exp_t.data() + c) * Vec<acc_t>(teacher_inv_sum[0]);
          log_p_t = Vec<acc_t>::loadu(t.data() + c) * inv_t_v - Vec<acc_t>(teacher_lse[0]);
          return;
        }
        // MT-DNN-KD: average the teachers' probabilities, not their logits.
        p_t = Vec<acc_t>(0);
        for (int64_t k = 0; k < teachers; ++k) {
          p_t += Vec<acc_t>::loadu(exp_t.data() + k * padded + c) *
                 Vec<acc_t>(teacher_inv_sum[k]);
        }
        log_p_t = p_t.log();
      };

      const Vec<acc_t> zero(0), beta_v(beta), one_minus_beta_v(acc_t(1) - beta);
      Vec<acc_t> p_s, p_t, log_p_s, log_p_t;
      // Reverse KL and JSD: their gradient needs a row sum first (R, H in kd_loss.h's terms).
      Vec<acc_t> soft_v(0), row_sum_v(0);
      if (opt.kind == KDKind::ReverseKL || opt.kind == KDKind::JSD) {
        for (int64_t c = 0; c < padded; c += kWidth) {
          probs(c, p_s, p_t, log_p_s, log_p_t);
          if (opt.kind == KDKind::ReverseKL) {
            soft_v += p_log_ratio(p_s, log_p_s, log_p_t);
          } else {
            const Vec<acc_t> log_m = (beta_v * p_t + one_minus_beta_v * p_s).log();
            // Weights inside the guard: beta = 0 must not turn 0 * inf into NaN.
            const Vec<acc_t> student_side = p_log_ratio(one_minus_beta_v * p_s, log_p_s, log_m);
            soft_v += p_log_ratio(beta_v * p_t, log_p_t, log_m) + student_side;
            row_sum_v += student_side;
          }
        }
        row_sum_v = opt.kind == KDKind::ReverseKL ? soft_v : row_sum_v;
        if (!grad_row) {
          loss_data[row] = soft_loss_coef * horizontal_sum(soft_v) +
                           hard_weight * (hard_lse - (hard ? s[label] : acc_t(0)));
          continue;
        }
      }

      // The gradient wrt student / t per kind (and the KL / soft-CE loss in the same loop),
      // then the chain rule through 1 / t and the hard CE.
      const Vec<acc_t> row_sum_vec(horizontal_sum(row_sum_v)), soft_coef_v(soft_grad_coef);
      const Vec<acc_t> hard_weight_v(hard_weight), hard_inv_sum_v(std::exp(-hard_lse + s_max));
      for (int64_t c = 0; c < padded; c += kWidth) {
        probs(c, p_s, p_t, log_p_s, log_p_t);
        Vec<acc_t> g;
        if (opt.kind == KDKind::KL) {
          soft_v += p_log_ratio(p_t, log_p_t, log_p_s);
          g = p_s - p_t;
        } else if (opt.kind == KDKind::SoftCE) {
          soft_v += Vec<acc_t>::blendv(zero, zero - p_t * log_p_s, p_t > zero);
          g = p_s - p_t;
        } else {
          Vec<acc_t> h = log_p_s - log_p_t;
          if (opt.kind == KDKind::JSD) {
            // (1 - beta) p_S > 0 implies m > 0: outside it h is 0 (beta = 1), not 0 * inf.
            const Vec<acc_t> weighted = one_minus_beta_v * p_s;
            const Vec<acc_t> log_m = (beta_v * p_t + weighted).log();
            h = Vec<acc_t>::blendv(zero, one_minus_beta_v * (log_p_s - log_m), weighted > zero);
          }
          g = Vec<acc_t>::blendv(zero, p_s * (h - row_sum_vec), p_s > zero);
        }
        g = g * soft_coef_v;
        if (hard) g += hard_weight_v * Vec<acc_t>::loadu(exp_hard.data() + c) * hard_inv_sum_v;
        g.store(exp_s.data() + c);
      }
      loss_data[row] = soft_loss_coef * horizontal_sum(soft_v) +
                       hard_weight * (hard_lse - (hard ? s[label] : acc_t(0)));
      if (!grad_row) continue;
      if (hard) exp_s[label] -= hard_weight;
      for (int64_t c = 0; c < classes; ++c) grad_row[c] = scalar_t(exp_s[c]);
    }
  });
}

void kd_loss_forward_cpu_core(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& labels,
                              const std::optional<at::Tensor>& mask, const KDLossOptions& options,
                              at::Tensor& row_loss, at::Tensor& grad) {
  TORCH_CHECK_VALUE(student.device().is_cpu(), "kd_loss cpu kernel: tensors must be on the CPU");
  const int64_t* label_data = labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr;
  const bool* mask_data = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_forward_cpu", [&] {
        kd_loss_rows<scalar_t>(student, teacher, label_data, mask_data, options, row_loss, grad);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(kd_kernels, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward<kd_loss_forward_cpu_core>);
  m.impl("kd_loss_forward_out", &kd_loss_forward_out<kd_loss_forward_cpu_core>);
}

}  // namespace kd_kernels
