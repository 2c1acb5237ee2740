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

// |u| = |log p_T - log p_S| up to which a class takes the log-ratio forms (as in
// kd_kernels.reference.LOG_RATIO_LIMIT); beyond it the log-probability forms lose nothing.
constexpr double kLogRatioLimit = 0.5;

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

// Taylor polynomials on |x| <= 1/2, the only place the log-ratio forms are used (|u| <= 1/2,
// and for JSD |u - L|, |L| <= |u|): relative error below 4e-8, no cancellation near 0 and no
// transcendental call (the kernel is compute-bound on the CPU). Horner from the highest
// coefficient; c[i] multiplies x^i.
template <typename acc_t, int N>
Vec<acc_t> horner(const Vec<acc_t>& x, const acc_t (&c)[N]) {
  Vec<acc_t> result(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) result = at::vec::fmadd(result, x, Vec<acc_t>(c[i]));
  return result;
}

// expm1(x) = sum_n>=1 x^n / n!, to n = 8.
template <typename acc_t>
Vec<acc_t> expm1_near(const Vec<acc_t>& x) {
  static constexpr acc_t c[] = {1,        1. / 2,    1. / 6,     1. / 24,
                                1. / 120, 1. / 720,  1. / 5040,  1. / 40320};
  return x * horner(x, c);
}

// phi(x) = x e^x - expm1(x) = sum_n>=2 (n - 1) x^n / n! (>= 0), to n = 9: the KL term of a
// class over p_S (kd_kernels.reference.phi).
template <typename acc_t>
Vec<acc_t> phi(const Vec<acc_t>& x) {
  static constexpr acc_t c[] = {1. / 2,   2. / 6,    3. / 24,    4. / 120,
                                5. / 720, 6. / 5040, 7. / 40320, 8. / 362880};
  return x * x * horner(x, c);
}

// psi(x) = expm1(x) - x = sum_n>=2 x^n / n! (>= 0), to n = 8: the reverse-KL term of a class
// over p_S.
template <typename acc_t>
Vec<acc_t> psi(const Vec<acc_t>& x) {
  static constexpr acc_t c[] = {1. / 2, 1. / 6, 1. / 24, 1. / 120, 1. / 720, 1. / 5040,
                                1. / 40320};
  return x * x * horner(x, c);
}

// Lanes of a comparison mask: all set, none set.
template <typename acc_t>
bool all_lanes(const Vec<acc_t>& mask) {
  return mask.zero_mask() == 0;
}
template <typename acc_t>
bool no_lane(const Vec<acc_t>& mask) {
  return mask.zero_mask() == (1 << Vec<acc_t>::size()) - 1;
}

// JSD of a vector of classes: h = d term / d log p_S (before the row sum) and, when `term` is
// given, the loss term. Near (|u| <= 1/2), with E = expm1(u) and e^L = m / p_S = 1 + beta E:
// p_S e^L (beta phi(u - L) + (1 - beta) phi(-L)) and h = -(1 - beta) L; elsewhere the
// log-probability forms, guarded so that 0 log 0 = 0 (beta = 0 or 1 included). A vector whose
// lanes are all near (or all far) computes one side only.
template <typename acc_t>
void jsd_terms(const Vec<acc_t>& p_s, const Vec<acc_t>& log_p_s, const Vec<acc_t>& p_t,
               const Vec<acc_t>& log_p_t, const Vec<acc_t>& u, const Vec<acc_t>& em,
               const Vec<acc_t>& near, acc_t beta, Vec<acc_t>* term, Vec<acc_t>& h) {
  const Vec<acc_t> zero(0), beta_v(beta), one_minus_beta_v(acc_t(1) - beta);
  const bool all_near = all_lanes(near), any_near = !no_lane(near);
  Vec<acc_t> near_term, near_h, far_term, far_h;
  if (any_near) {
    const Vec<acc_t> beta_em = beta_v * em;
    const Vec<acc_t> log_mixed = beta_em.log1p();
    near_h = zero - one_minus_beta_v * log_mixed;
    if (term) {
      near_term = p_s * (Vec<acc_t>(1) + beta_em) *
                  (beta_v * phi(u - log_mixed) + one_minus_beta_v * phi(zero - log_mixed));
    }
  }
  if (!all_near) {
    const Vec<acc_t> weighted = one_minus_beta_v * p_s;
    const Vec<acc_t> log_m = (beta_v * p_t + weighted).log();
    // Weights inside the guard: beta = 0 must not turn 0 * inf into NaN.
    if (term) {
      far_term = p_log_ratio(beta_v * p_t, log_p_t, log_m) + p_log_ratio(weighted, log_p_s, log_m);
    }
    far_h = Vec<acc_t>::blendv(zero, one_minus_beta_v * (log_p_s - log_m), weighted > zero);
  }
  if (all_near) {
    h = near_h;
    if (term) *term = near_term;
  } else if (!any_near) {
    h = far_h;
    if (term) *term = far_term;
  } else {
    h = Vec<acc_t>::blendv(far_h, near_h, near);
    if (term) *term = Vec<acc_t>::blendv(far_term, near_term, near);
  }
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
    std::vector<acc_t> teacher_max(teachers), teacher_delta(teachers);
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
        teacher_max[k] = t_max;
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

      // delta_k = lse_k - lse_S as log1p(sum_c p_S expm1(d_c)), d = (t - s) / T, so that it
      // keeps its digits when student and teacher are close: e^a expm1(d) is e^b - e^a where
      // |d| >= 1/2 (no cancellation there, no overflow), and the plain difference of the
      // log-sum-exps is used where |delta| > 1 or the sum overflowed.
      const Vec<acc_t> inv_t_v(inv_t), zero(0), half(acc_t(0.5));
      for (int64_t k = 0; k < teachers; ++k) {
        const acc_t* t_row = t.data() + k * padded;
        const acc_t* exp_t_row = exp_t.data() + k * padded;
        const Vec<acc_t> rescale_v(std::exp((teacher_max[k] - s_max) * inv_t));
        Vec<acc_t> gap_v(0);
        for (int64_t c = 0; c < padded; c += kWidth) {
          const Vec<acc_t> e_s = Vec<acc_t>::loadu(exp_s.data() + c);
          const Vec<acc_t> d = (Vec<acc_t>::loadu(t_row + c) - Vec<acc_t>::loadu(s.data() + c)) * inv_t_v;
          const Vec<acc_t> close = d.abs() < half;
          const Vec<acc_t> far = Vec<acc_t>::loadu(exp_t_row + c) * rescale_v - e_s;
          if (no_lane(close)) {
            gap_v += far;
          } else {
            gap_v += Vec<acc_t>::blendv(far, e_s * expm1_near(Vec<acc_t>::blendv(zero, d, close)),
                                        close);
          }
        }
        const acc_t ratio = horizontal_sum(gap_v) / student_sum;
        const acc_t lse_gap = teacher_lse[k] - student_lse;
        const bool use_ratio = std::abs(lse_gap) <= acc_t(1) && ratio > acc_t(-1) && std::isfinite(ratio);
        teacher_delta[k] = use_ratio ? std::log1p(ratio) : lse_gap;
      }

      // p_S, p_T, log p_S, log p_T of one vector of classes, from the stored numerators.
      const Vec<acc_t> student_lse_v(student_lse);
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
      // u = log p_T - log p_S = d - delta in log-ratio form, E = expm1(u), and where they are
      // used (near: every |u_k| <= 1/2; u = E = 0 elsewhere). K teachers:
      // u = log1p(mean_k expm1(u_k)). One class: p_S = p_T = 1, u = 0 exactly.
      const Vec<acc_t> limit(kLogRatioLimit), inv_teachers_v(inv_teachers);
      const bool one_class = classes == 1;
      auto log_ratios = [&](int64_t c, Vec<acc_t>& u, Vec<acc_t>& em, Vec<acc_t>& near) {
        const Vec<acc_t> s_v = Vec<acc_t>::loadu(s.data() + c);
        if (teachers == 1) {
          u = (Vec<acc_t>::loadu(t.data() + c) - s_v) * inv_t_v - Vec<acc_t>(teacher_delta[0]);
          near = u.abs() <= limit;
          u = one_class ? zero : Vec<acc_t>::blendv(zero, u, near);
          em = expm1_near(u);
          return;
        }
        Vec<acc_t> mixed(0);
        near = limit == limit;  // all lanes set
        for (int64_t k = 0; k < teachers; ++k) {
          const Vec<acc_t> u_k = (Vec<acc_t>::loadu(t.data() + k * padded + c) - s_v) * inv_t_v -
                                 Vec<acc_t>(teacher_delta[k]);
          const Vec<acc_t> ok = u_k.abs() <= limit;
          near = near & ok;
          mixed += expm1_near(Vec<acc_t>::blendv(zero, u_k, ok));
        }
        em = one_class ? zero : Vec<acc_t>::blendv(zero, mixed * inv_teachers_v, near);
        u = em.log1p();
      };

      Vec<acc_t> p_s, p_t, log_p_s, log_p_t, u, em, near;
      // Reverse KL and JSD: their loss, and the row sum R = sum p_S h their gradient needs.
      Vec<acc_t> soft_v(0), row_sum_v(0);
      if (opt.kind == KDKind::ReverseKL || opt.kind == KDKind::JSD) {
        for (int64_t c = 0; c < padded; c += kWidth) {
          probs(c, p_s, p_t, log_p_s, log_p_t);
          log_ratios(c, u, em, near);
          if (opt.kind == KDKind::ReverseKL) {
            const Vec<acc_t> far = p_log_ratio(p_s, log_p_s, log_p_t) + p_t - p_s;
            soft_v += Vec<acc_t>::blendv(far, p_s * psi(u), near);
          } else {
            Vec<acc_t> term, h;
            jsd_terms(p_s, log_p_s, p_t, log_p_t, u, em, near, beta, &term, h);
            soft_v += term;
            row_sum_v += Vec<acc_t>::blendv(zero, p_s * h, p_s > zero);
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
        log_ratios(c, u, em, near);
        Vec<acc_t> g;
        if (opt.kind == KDKind::KL || opt.kind == KDKind::SoftCE) {
          if (all_lanes(near)) {
            soft_v += p_s * phi(u);
          } else {
            const Vec<acc_t> far = p_log_ratio(p_t, log_p_t, log_p_s) - p_t + p_s;
            soft_v += no_lane(near) ? far : Vec<acc_t>::blendv(far, p_s * phi(u), near);
          }
          if (opt.kind == KDKind::SoftCE) soft_v = soft_v - p_log_ratio(p_t, log_p_t, zero);
          // p_S - p_T, as -p_S expm1(u) where that keeps its digits.
          g = Vec<acc_t>::blendv(p_s - p_t, zero - p_s * em, near);
        } else {
          Vec<acc_t> h;
          if (opt.kind == KDKind::JSD) {
            jsd_terms(p_s, log_p_s, p_t, log_p_t, u, em, near, beta,
                      static_cast<Vec<acc_t>*>(nullptr), h);
          } else {
            h = Vec<acc_t>::blendv(log_p_s - log_p_t, zero - u, near);
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
