// CUDA core of kd_kernels::kd_loss_forward[_out]. A team of threads owns a row (a power-of-two
// slice of a warp for short rows, a whole block for long ones) and streams it at most 3 times:
//   A  online (max, sum-exp) of z_S, of each teacher and of the raw student; bad-value flag
//   B  reverse_kl / jsd only: the row sums R or (J, H) their gradients need
//   C  the kl / soft_ce loss and the gradient store
// No row is ever held in registers or shared memory, so C is unbounded.
// ATen/cuda/CUDAContext.h is deliberately not included: it pulls cuBLAS/cuSPARSE headers that
// the CPU torch wheel, used for the compile check in CI, does not ship.
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
#include <type_traits>

#include "kd_loss.h"

namespace kd_kernels {
namespace {

// Teacher statistics live in registers, so the ensemble size has a compile-time bound; a
// single-teacher instantiation keeps the common case at half the register count.
constexpr int kMaxTeachers = 8;
constexpr int kMaxBlockThreads = 512;
constexpr int kMaxWarps = kMaxBlockThreads / 32;
constexpr int kWarpBlockThreads = 256;
constexpr int64_t kWarpRowMaxCols = 1024;  // up to this, a row never crosses a warp

// Pass-A statistics of one thread, flat so that one reduction handles them all:
// [bad flag, label logit, (max, sum) of z_S, of the raw student, (max, sum, gap) of teacher
// 0..K-1], gap = sum_c e^(z_S,c - max_S) expm1(d_c), carried with the student's max.
constexpr int kSlotBad = 0, kSlotLabel = 1, kSlotStudent = 2, kSlotRaw = 4, kSlotTeacher = 6;
constexpr int kTeacherSlots = 3;
// |u| = |log p_T - log p_S| up to which a class takes the log-ratio forms (as in
// kd_kernels.reference.LOG_RATIO_LIMIT); beyond it the log-probability forms lose nothing.
constexpr double kLogRatioLimit = 0.5;

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

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double dev_abs(double x) { return fabs(x); }
__device__ __forceinline__ float dev_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double dev_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }

// x e^x - expm1(x) (>= 0) given em = expm1(x): the KL term of a class over p_S; its Taylor
// series below |x| = 0.1, where the closed form cancels (kd_kernels.reference.phi).
template <typename acc_t>
__device__ __forceinline__ acc_t phi(acc_t x, acc_t em) {
  if (dev_abs(x) >= acc_t(0.1)) return x * em + x - em;
  return x * x *
         (acc_t(1) / 2 +
          x * (acc_t(1) / 3 +
               x * (acc_t(1) / 8 + x * (acc_t(1) / 30 + x * (acc_t(1) / 144 + x / 840)))));
}

// expm1(x) - x (>= 0) given em = expm1(x): the reverse-KL term of a class over p_S.
template <typename acc_t>
__device__ __forceinline__ acc_t psi(acc_t x, acc_t em) {
  if (dev_abs(x) >= acc_t(0.1)) return em - x;
  return x * x *
         (acc_t(1) / 2 +
          x * (acc_t(1) / 6 +
               x * (acc_t(1) / 24 + x * (acc_t(1) / 120 + x * (acc_t(1) / 720 + x / 5040)))));
}

// Folds (other_max, other_sum) into a running (max, sum) of exp. One exp per call:
// exp(-|other - max|) is either the rescale of the old sum or of the new one. Empty or NaN
// input adds nothing (NaN is reported by the bad flag), which also keeps exp(-inf - -inf)
// out of legal rows that contain -inf.
template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& run_max, acc_t& run_sum, acc_t other_max,
                                          acc_t other_sum) {
  if (!(other_max > -std::numeric_limits<acc_t>::infinity())) return;
  const acc_t e = dev_exp(-dev_abs(other_max - run_max));
  const bool grows = other_max > run_max;
  run_sum = grows ? run_sum * e + other_sum : run_sum + other_sum * e;
  run_max = grows ? other_max : run_max;
}

// lse_merge of the student's statistics that also reports how each side's sums were scaled,
// for the gap sums carried with the same maximum. A side that saw no student mass (max -inf)
// has gaps 0 or non-finite (teacher mass there): scaled by 0 they stay 0 or become NaN, which
// sends the row to the plain lse difference.
template <typename acc_t>
__device__ __forceinline__ void lse_merge_scaled(acc_t& run_max, acc_t& run_sum, acc_t other_max,
                                                 acc_t other_sum, acc_t& mine_scale,
                                                 acc_t& other_scale) {
  mine_scale = 1;
  other_scale = 1;
  if (!(other_max > -std::numeric_limits<acc_t>::infinity())) return;
  const acc_t e = dev_exp(-dev_abs(other_max - run_max));  // 0 when run_max is -inf
  const bool grows = other_max > run_max;
  mine_scale = grows ? e : acc_t(1);
  other_scale = grows ? acc_t(1) : e;
  run_sum = run_sum * mine_scale + other_sum * other_scale;
  run_max = grows ? other_max : run_max;
}

// One class's share of a teacher's gap sum: e^(z - max) expm1(d), d = b - z, as
// e^(b - max) - e^(z - max) where |d| >= 1/2 (no cancellation, no 0 * inf); inf where the
// student has no mass yet but the teacher has (the row then uses the plain lse difference).
template <typename acc_t>
__device__ __forceinline__ acc_t gap_term(acc_t z, acc_t b, acc_t d, acc_t student_max) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (!(student_max > -kInf)) return b > -kInf ? kInf : acc_t(0);
  const acc_t e_z = dev_exp(z - student_max);
  if (dev_abs(d) < acc_t(0.5)) return e_z * dev_expm1(d);
  return dev_exp(b - student_max) - e_z;
}

// -inf for an empty distribution (max -inf, sum 0); the caller reports that row as NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t lse_final(acc_t run_max, acc_t run_sum) {
  return run_max + dev_log(run_sum);
}

// Combines the first `count` slots of vals over the row's team; every thread gets the result.
// Warp teams use a butterfly restricted to their lanes (no barrier, so the teams of one warp
// may be on different rows or have left early); block teams add a pass through shared memory.
template <bool kBlockTeam, typename acc_t, int N, typename Combine>
__device__ __forceinline__ void team_allreduce(acc_t (&vals)[N], int count, int width,
                                               unsigned lane_mask, Combine combine) {
  acc_t other[N];
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < count) other[i] = __shfl_xor_sync(lane_mask, vals[i], offset);
    combine(vals, other);
  }
  if constexpr (kBlockTeam) {
    __shared__ acc_t partials[kMaxWarps][N];
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (i < count) partials[threadIdx.x / 32][i] = vals[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < count) vals[i] = partials[0][i];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (i < count) other[i] = partials[w][i];
      combine(vals, other);
    }
    __syncthreads();  // partials is reused by the next reduction
  }
}

template <bool kBlockTeam, typename acc_t, int N>
__device__ __forceinline__ void team_sum(acc_t (&vals)[N], int width, unsigned lane_mask) {
  auto add = [](acc_t(&mine)[N], const acc_t(&other)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) mine[i] += other[i];
  };
  team_allreduce<kBlockTeam>(vals, N, width, lane_mask, add);
}

// JSD of one column: the loss term and h = d term / d log p_S. Near (|u| <= 1/2), with
// E = expm1(u) and e^L = m / p_S = 1 + beta E: p_S e^L (beta phi(u - L) + (1 - beta) phi(-L))
// and h = -(1 - beta) L (expm1 of u - L and -L follow from E). Elsewhere log m comes from the
// exact side when beta is 0 or 1, so J and h vanish exactly there; the guards implement
// 0 log 0 = 0.
template <typename acc_t>
__device__ __forceinline__ void jsd_column(acc_t p_s, acc_t log_p_s, acc_t p_t, acc_t log_p_t,
                                           acc_t u, acc_t em, bool near, acc_t beta,
                                           acc_t& loss_term, acc_t& h) {
  const acc_t one_minus_beta = acc_t(1) - beta;
  if (near) {
    const acc_t mixed = acc_t(1) + beta * em;
    const acc_t log_mixed = dev_log1p(beta * em);
    loss_term = p_s * mixed *
                (beta * phi(u - log_mixed, one_minus_beta * em / mixed) +
                 one_minus_beta * phi(-log_mixed, -beta * em / mixed));
    h = -one_minus_beta * log_mixed;
    return;
  }
  const acc_t log_m = beta == acc_t(0)   ? log_p_s
                      : beta == acc_t(1) ? log_p_t
                                         : dev_log(beta * p_t + one_minus_beta * p_s);
  loss_term = 0;
  h = 0;
  if (beta != acc_t(0) && p_t > acc_t(0)) loss_term += beta * p_t * (log_p_t - log_m);
  if (one_minus_beta != acc_t(0) && p_s > acc_t(0)) {
    h = one_minus_beta * (log_p_s - log_m);
    loss_term += p_s * h;
  }
}

template <typename scalar_t>
struct KDParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_row_stride, teacher_stride, teacher_row_stride;
  const int64_t* labels;  // nullptr when absent
  const bool* mask;       // nullptr when absent
  float* row_loss;
  scalar_t* grad;  // nullptr: loss only; may alias student (both then have row stride cols)
  int64_t rows, ignore_index;
  int cols, num_teachers, team_width;  // team_width: lanes per row of a warp team
  KDKind kind;
  bool use_hard;
  acc_t inv_temperature, soft_loss_scale, soft_grad_scale, hard_weight, beta;
};

// Block size bound: an ensemble's per-teacher statistics (max, sum, gap, delta, lse) need up
// to 255 registers, so its blocks stop at 256 threads.
constexpr int max_block_threads(int max_teachers) {
  return max_teachers == 1 ? kMaxBlockThreads : kMaxBlockThreads / 2;
}

// VEC: elements per 16-byte access (1 unless every row start is aligned, checked at launch).
// kBlockTeam: one block per row instead of p.team_width lanes per row. Two resident blocks
// (<= 64 registers) where that costs no spills, per ptxas: single teacher, VEC == 1 (the
// log-ratio statistics of issue 17 made the vectorised instantiations need more).
template <typename scalar_t, int VEC, bool kBlockTeam, int kMaxK>
__global__ void __launch_bounds__(max_block_threads(kMaxK), (kMaxK == 1 && VEC == 1) ? 2 : 1)
    kd_loss_kernel(const KDParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr int kNumSlots = kSlotTeacher + kTeacherSlots * kMaxK;
  const acc_t not_a_number = std::numeric_limits<acc_t>::quiet_NaN();

  const int width = kBlockTeam ? 32 : p.team_width;  // lanes of the shuffle stage
  const int team_size = kBlockTeam ? static_cast<int>(blockDim.x) : width;
  const int lane = static_cast<int>(threadIdx.x) % team_size;
  const int teams_per_block = blockDim.x / team_size;
  const unsigned lane_mask =
      width == 32 ? 0xffffffffu : ((1u << width) - 1u) << (threadIdx.x % 32 / width * width);

  const int packs = p.cols / VEC;
  const int num_teachers = p.num_teachers;
  // z = x * (1/T), as torch's CUDA `logits / temperature` computes it (one bit off a true
  // division at worst, and far cheaper).
  const acc_t inv_temperature = p.inv_temperature;
  // At T == 1 the raw-student statistics are those of z_S: skip the duplicate exps.
  const bool raw_stats = p.use_hard && inv_temperature != acc_t(1);
  const int used_slots = kSlotTeacher + kTeacherSlots * num_teachers;
  const bool one_class = p.cols == 1;  // p_S = p_T = 1: u = 0 exactly
  const acc_t log_k = dev_log(static_cast<acc_t>(num_teachers));
  const bool has_row_sums = p.kind == KDKind::ReverseKL || p.kind == KDKind::JSD;

  const int64_t row_step = static_cast<int64_t>(gridDim.x) * teams_per_block;
  for (int64_t row = int64_t{blockIdx.x} * teams_per_block + threadIdx.x / team_size;
       row < p.rows; row += row_step) {
    const scalar_t* student_row = p.student + row * p.student_row_stride;
    const scalar_t* teacher_row = p.teacher + row * p.teacher_row_stride;
    scalar_t* grad_row = p.grad != nullptr ? p.grad + row * p.cols : nullptr;
    // The whole team takes the same branches below, so early exits keep it together.
    auto write_constant_row = [&](acc_t value) {
      if (grad_row != nullptr) {
        Pack<scalar_t, VEC> pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) pack.v[j] = static_cast<scalar_t>(value);
        for (int pk = lane; pk < packs; pk += team_size)
          store_pack<VEC>(grad_row + pk * VEC, pack);
      }
      if (lane == 0) p.row_loss[row] = static_cast<float>(value);
    };

    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    const bool counts =
        (p.mask == nullptr || p.mask[row]) && (p.labels == nullptr || label != p.ignore_index);
    if (!counts) {
      write_constant_row(acc_t(0));
      continue;
    }
    if (p.use_hard && (label < 0 || label >= p.cols)) {  // never dereference student[label]
      write_constant_row(not_a_number);
      continue;
    }

    // ---- pass A: row statistics ----
    acc_t stats[kNumSlots];
    stats[kSlotBad] = 0;
    stats[kSlotLabel] = 0;  // a sum over the team in which only column `label` is non-zero
#pragma unroll
    for (int slot = kSlotStudent; slot < kSlotTeacher; slot += 2) {
      stats[slot] = -kInf;
      stats[slot + 1] = 0;
    }
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      stats[kSlotTeacher + kTeacherSlots * k] = -kInf;
      stats[kSlotTeacher + kTeacherSlots * k + 1] = 0;
      stats[kSlotTeacher + kTeacherSlots * k + 2] = 0;
    }
    for (int pk = lane; pk < packs; pk += team_size) {
      const auto student_pack = load_pack<VEC>(student_row + pk * VEC);
      acc_t xs[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t x = static_cast<acc_t>(student_pack.v[j]);
        xs[j] = x;
        if (!(x < kInf)) stats[kSlotBad] = 1;  // NaN or +inf
        // The student's (max, sum); the teachers' gap sums are carried with the same max.
        acc_t mine_scale, other_scale;
        lse_merge_scaled(stats[kSlotStudent], stats[kSlotStudent + 1], x * inv_temperature,
                         acc_t(1), mine_scale, other_scale);
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          if (k >= num_teachers) break;
          stats[kSlotTeacher + kTeacherSlots * k + 2] *= mine_scale;
        }
        if (raw_stats) lse_merge(stats[kSlotRaw], stats[kSlotRaw + 1], x, acc_t(1));
        if (pk * VEC + j == label) stats[kSlotLabel] = x;
      }
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        if (k >= num_teachers) break;
        const auto teacher_pack = load_pack<VEC>(teacher_row + k * p.teacher_stride + pk * VEC);
        acc_t* teacher_stats = stats + kSlotTeacher + kTeacherSlots * k;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t y = static_cast<acc_t>(teacher_pack.v[j]);
          if (!(y < kInf)) stats[kSlotBad] = 1;
          lse_merge(teacher_stats[0], teacher_stats[1], y * inv_temperature, acc_t(1));
          teacher_stats[2] += gap_term(xs[j] * inv_temperature, y * inv_temperature,
                                       (y - xs[j]) * inv_temperature, stats[kSlotStudent]);
        }
      }
    }
    team_allreduce<kBlockTeam>(
        stats, used_slots, width, lane_mask,
        [&](acc_t(&mine)[kNumSlots], const acc_t(&other)[kNumSlots]) {
          mine[kSlotBad] += other[kSlotBad];
          mine[kSlotLabel] += other[kSlotLabel];
          acc_t mine_scale, other_scale;
          lse_merge_scaled(mine[kSlotStudent], mine[kSlotStudent + 1], other[kSlotStudent],
                           other[kSlotStudent + 1], mine_scale, other_scale);
          lse_merge(mine[kSlotRaw], mine[kSlotRaw + 1], other[kSlotRaw], other[kSlotRaw + 1]);
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) {
            const int slot = kSlotTeacher + kTeacherSlots * k;
            if (slot >= used_slots) break;
            lse_merge(mine[slot], mine[slot + 1], other[slot], other[slot + 1]);
            mine[slot + 2] = mine[slot + 2] * mine_scale + other[slot + 2] * other_scale;
          }
        });

    const acc_t lse_student = lse_final(stats[kSlotStudent], stats[kSlotStudent + 1]);
    const acc_t lse_raw =
        raw_stats ? lse_final(stats[kSlotRaw], stats[kSlotRaw + 1]) : lse_student;
    // A row that is all -inf has no distribution: NaN, like a NaN or +inf logit.
    bool bad = stats[kSlotBad] != acc_t(0) || !(lse_student > -kInf) || !(lse_raw > -kInf);
    acc_t lse_teacher[kMaxK];
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      lse_teacher[k] = k < num_teachers
                           ? lse_final(stats[kSlotTeacher + kTeacherSlots * k],
                                       stats[kSlotTeacher + kTeacherSlots * k + 1])
                           : acc_t(0);
      bad = bad || (k < num_teachers && !(lse_teacher[k] > -kInf));
    }
    if (bad) {
      write_constant_row(not_a_number);
      continue;
    }

    // delta_k = lse_k - lse_S as log1p(gap_k / sum_S), which keeps its digits when student
    // and teacher are close; the plain difference where |delta| > 1 or the gap is unusable.
    acc_t delta[kMaxK];
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      const acc_t ratio = stats[kSlotTeacher + kTeacherSlots * k + 2] / stats[kSlotStudent + 1];
      const acc_t lse_gap = lse_teacher[k] - lse_student;
      const bool usable = dev_abs(lse_gap) <= acc_t(1) && ratio > acc_t(-1) && ratio < kInf;
      delta[k] = usable ? dev_log1p(ratio) : lse_gap;
    }

    // Calls visit(pk, x, log_p_s, p_s, log_p_t, p_t, u, em, near) on each of this thread's
    // packs (arrays over the pack's VEC columns, x the raw student logits). One teacher keeps
    // log p_T = z - lse exact; an ensemble takes a logsumexp over the teachers, so that
    // log p_T stays finite where p_T underflows. u = log p_T - log p_S in log-ratio form:
    // (y - x) / T - delta (logits subtracted first), K teachers u = log1p(mean_k expm1(u_k));
    // used where near (every |u_k| <= 1/2), u = em = 0 elsewhere.
    auto sweep = [&](auto&& visit) {
      for (int pk = lane; pk < packs; pk += team_size) {
        const auto student_pack = load_pack<VEC>(student_row + pk * VEC);
        acc_t x[VEC], log_p_s[VEC], p_s[VEC], log_p_t[VEC], p_t[VEC], u[VEC], em[VEC];
        acc_t mix_max[VEC], mix_sum[VEC];
        bool near[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          x[j] = static_cast<acc_t>(student_pack.v[j]);
          log_p_s[j] = x[j] * inv_temperature - lse_student;
          p_s[j] = dev_exp(log_p_s[j]);
          mix_max[j] = -kInf;
          mix_sum[j] = 0;
          near[j] = true;
          em[j] = 0;
        }
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          if (k >= num_teachers) break;
          const auto teacher_pack = load_pack<VEC>(teacher_row + k * p.teacher_stride + pk * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t y = static_cast<acc_t>(teacher_pack.v[j]);
            log_p_t[j] = y * inv_temperature - lse_teacher[k];
            if (kMaxK > 1) lse_merge(mix_max[j], mix_sum[j], log_p_t[j], acc_t(1));
            u[j] = (y - x[j]) * inv_temperature - delta[k];
            const bool ok = dev_abs(u[j]) <= acc_t(kLogRatioLimit);
            near[j] = near[j] && ok;
            if (kMaxK > 1) em[j] += ok ? dev_expm1(u[j]) : acc_t(0);
          }
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (kMaxK > 1 && num_teachers > 1) {
            log_p_t[j] = lse_final(mix_max[j], mix_sum[j]) - log_k;
            em[j] = near[j] && !one_class ? em[j] / static_cast<acc_t>(num_teachers) : acc_t(0);
            u[j] = dev_log1p(em[j]);
          } else {
            u[j] = near[j] && !one_class ? u[j] : acc_t(0);
            em[j] = dev_expm1(u[j]);
          }
          p_t[j] = dev_exp(log_p_t[j]);
        }
        visit(pk, x, log_p_s, p_s, log_p_t, p_t, u, em, near);
      }
    };

    // ---- pass B: reverse_kl {R, -} or jsd {J, H} ----
    acc_t row_sums[2] = {0, 0};
    if (has_row_sums) {
      sweep([&](int, const auto& x, const auto& log_p_s, const auto& p_s, const auto& log_p_t,
                const auto& p_t, const auto& u, const auto& em, const auto& near) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (p.kind == KDKind::ReverseKL) {
            if (near[j]) {
              row_sums[0] += p_s[j] * psi(u[j], em[j]);
            } else {
              // p_S log(p_S / p_T) + p_T - p_S: the same term as above, per class.
              if (p_s[j] > acc_t(0)) row_sums[0] += p_s[j] * (log_p_s[j] - log_p_t[j]);
              row_sums[0] += p_t[j] - p_s[j];
            }
          } else {
            acc_t loss_term, h;
            jsd_column(p_s[j], log_p_s[j], p_t[j], log_p_t[j], u[j], em[j], near[j], p.beta,
                       loss_term, h);
            row_sums[0] += loss_term;
            row_sums[1] += p_s[j] * h;
          }
        }
      });
      team_sum<kBlockTeam>(row_sums, width, lane_mask);
    }

    // ---- pass C: kl / soft_ce loss and the gradient, stored last ----
    // A thread loads its pack of student and teachers before storing the same pack of grad,
    // and no other thread touches those columns, so an in-place grad reads every logit first.
    acc_t soft = row_sums[0];
    if (!has_row_sums || grad_row != nullptr) {
      acc_t loss_sum[1] = {0};
      sweep([&](int pk, const auto& x, const auto& log_p_s, const auto& p_s, const auto& log_p_t,
                const auto& p_t, const auto& u, const auto& em, const auto& near) {
        Pack<scalar_t, VEC> grad_pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // d soft / d z_S for kl and soft_ce: p_S - p_T, as -p_S expm1(u) where near.
          acc_t g = near[j] ? -p_s[j] * em[j] : p_s[j] - p_t[j];
          if (p.kind == KDKind::KL || p.kind == KDKind::SoftCE) {
            if (near[j]) {
              loss_sum[0] += p_s[j] * phi(u[j], em[j]);
            } else {
              // p_T log(p_T / p_S) - p_T + p_S: the same term as above, per class.
              if (p_t[j] > acc_t(0)) loss_sum[0] += p_t[j] * (log_p_t[j] - log_p_s[j]);
              loss_sum[0] += p_s[j] - p_t[j];
            }
            // soft CE = KL + H(p_T)
            if (p.kind == KDKind::SoftCE && p_t[j] > acc_t(0))
              loss_sum[0] -= p_t[j] * log_p_t[j];
          } else if (p.kind == KDKind::ReverseKL) {
            const acc_t h = near[j] ? -u[j] : log_p_s[j] - log_p_t[j];
            g = p_s[j] > acc_t(0) ? p_s[j] * (h - row_sums[0]) : acc_t(0);
          } else {
            acc_t loss_term, h;
            jsd_column(p_s[j], log_p_s[j], p_t[j], log_p_t[j], u[j], em[j], near[j], p.beta,
                       loss_term, h);
            g = p_s[j] > acc_t(0) ? p_s[j] * (h - row_sums[1]) : acc_t(0);
          }
          if (grad_row == nullptr) continue;  // loss only
          acc_t total = p.soft_grad_scale * g;
          if (p.use_hard) {
            const acc_t p_raw = raw_stats ? dev_exp(x[j] - lse_raw) : p_s[j];
            total += p.hard_weight * (p_raw - (pk * VEC + j == label ? acc_t(1) : acc_t(0)));
          }
          grad_pack.v[j] = static_cast<scalar_t>(total);
        }
        if (grad_row != nullptr) store_pack<VEC>(grad_row + pk * VEC, grad_pack);
      });
      if (!has_row_sums) {
        team_sum<kBlockTeam>(loss_sum, width, lane_mask);
        soft = loss_sum[0];
      }
    }

    if (lane == 0) {
      acc_t loss = p.soft_loss_scale * soft;
      if (p.use_hard) loss += p.hard_weight * (lse_raw - stats[kSlotLabel]);
      p.row_loss[row] = static_cast<float>(loss);
    }
  }
}

template <typename scalar_t, int VEC, int kMaxK>
void launch_kd_loss(KDParams<scalar_t> params, cudaStream_t stream) {
  const int64_t packs = params.cols / VEC;
  const bool block_team = params.cols > kWarpRowMaxCols;
  int threads = kWarpBlockThreads;
  int64_t rows_per_block = 1;
  if (block_team) {
    // About four packs per thread per pass keeps enough loads in flight, while medium rows do
    // not pay block-wide reductions for mostly idle threads.
    threads = 128;
    while (threads < max_block_threads(kMaxK) && threads * 4 < packs) threads *= 2;
  } else {
    // Smallest power-of-two slice of a warp that gives every lane at least one pack, so tiny
    // rows do not leave most of a warp idle.
    params.team_width = 1;
    while (params.team_width < 32 && params.team_width < packs) params.team_width *= 2;
    rows_per_block = threads / params.team_width;
  }
  // The grid-stride loop in the kernel picks up rows beyond the grid.
  const int64_t blocks = std::min<int64_t>((params.rows + rows_per_block - 1) / rows_per_block,
                                           std::numeric_limits<int32_t>::max());
  if (block_team) {
    kd_loss_kernel<scalar_t, VEC, true, kMaxK>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params);
  } else {
    kd_loss_kernel<scalar_t, VEC, false, kMaxK>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void kd_loss_forward_cuda_core(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& mask, const KDLossOptions& options,
                               at::Tensor& row_loss, at::Tensor& grad) {
  const int64_t rows = student.size(0), cols = student.size(1), num_teachers = teacher.size(0);
  TORCH_CHECK_VALUE(num_teachers <= kMaxTeachers, "kd_loss (CUDA): at most ", kMaxTeachers,
                    " teachers are supported, got ", num_teachers);
  TORCH_CHECK_VALUE(cols <= std::numeric_limits<int32_t>::max(),
                    "kd_loss (CUDA): at most 2^31 - 1 classes are supported, got ", cols);
  TORCH_CHECK_VALUE(options.hard_weight == 0 || labels.has_value(),
                    "kd_loss (CUDA): hard_weight != 0 needs labels");
  TORCH_CHECK_VALUE(!grad.defined() || !grad.is_alias_of(student) || student.is_contiguous(),
                    "kd_loss (CUDA): an in-place grad needs a contiguous student");

  c10::cuda::CUDAGuard device_guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        KDParams<scalar_t> params{};
        params.student = student.data_ptr<scalar_t>();
        params.teacher = teacher.data_ptr<scalar_t>();
        params.student_row_stride = student.stride(0);
        params.teacher_stride = teacher.stride(0);
        params.teacher_row_stride = teacher.stride(1);
        params.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
        params.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
        params.row_loss = row_loss.data_ptr<float>();
        params.grad = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
        params.rows = rows;
        params.ignore_index = options.ignore_index;
        params.cols = static_cast<int>(cols);
        params.num_teachers = static_cast<int>(num_teachers);
        params.kind = options.kind;
        params.use_hard = options.hard_weight != 0;
        const double t2 = options.scale_t2 ? options.temperature * options.temperature : 1.0;
        params.inv_temperature = acc_t(1) / static_cast<acc_t>(options.temperature);
        params.soft_loss_scale = static_cast<acc_t>(options.soft_weight * t2);
        params.soft_grad_scale = static_cast<acc_t>(options.soft_weight * t2 / options.temperature);
        params.hard_weight = static_cast<acc_t>(options.hard_weight);
        params.beta = static_cast<acc_t>(options.beta);

        // float64 is the reference / gradcheck dtype: one generic scalar instantiation.
        if constexpr (std::is_same_v<scalar_t, double>) {
          launch_kd_loss<scalar_t, 1, kMaxTeachers>(params, stream);
        } else {
          // 16-byte accesses need every row start aligned (strides of size-1 dims are unused).
          constexpr int kVec = 16 / sizeof(scalar_t);
          const bool vectorize =
              cols % kVec == 0 && aligned_16(params.student) && aligned_16(params.teacher) &&
              (params.grad == nullptr || aligned_16(params.grad)) &&
              (rows == 1 || (student.stride(0) % kVec == 0 && teacher.stride(1) % kVec == 0)) &&
              (num_teachers == 1 || teacher.stride(0) % kVec == 0);
          if (vectorize && num_teachers == 1) {
            launch_kd_loss<scalar_t, kVec, 1>(params, stream);
          } else if (vectorize) {
            launch_kd_loss<scalar_t, kVec, kMaxTeachers>(params, stream);
          } else if (num_teachers == 1) {
            launch_kd_loss<scalar_t, 1, 1>(params, stream);
          } else {
            launch_kd_loss<scalar_t, 1, kMaxTeachers>(params, stream);
          }
        }
      });
}

TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m) {
  m.impl("kd_loss_forward", TORCH_FN(kd_loss_forward<kd_loss_forward_cuda_core>));
  m.impl("kd_loss_forward_out", TORCH_FN(kd_loss_forward_out<kd_loss_forward_cuda_core>));
}

}  // namespace kd_kernels
