// Shared part of the blocked InfoNCE of the cpu and cuda backends: the checks, and the driver
// that walks query blocks with the device's matmul (MKL / cuBLAS through at::mm) and hands
// each (R, M) block of raw dot products to two device kernels.
//
// Semantics (see kd_kernels/reference.py, the spec). query (N, D), key (M, D), labels (N,)
// int64 in [0, M), temperature a 0-dim float32 (float64) tensor > 0 on the inputs' device:
//   a_i = cosine ? 1 / max(|q_i|, 1e-12) : 1,  b_j likewise for keys   (F.normalize)
//   z_ij = a_i b_j (q_i . k_j) / temperature
//   lse_i = logsumexp_j z_ij,  loss_i = lse_i - z_{i, labels_i}
// Backward with g_i = d out / d loss_i: G_ij = g_i (softmax_j(z_i)_j - [j == labels_i]) and
//   W_ij = G_ij a_i b_j / temperature,  u = W k,  v = W^T q
//   d q_i = u_i - a_i^2 (q_i . u_i) q_i   (cosine, |q_i| > eps; else u_i), d k_j likewise
//   d temperature = -sum_i (q_i . u_i) / temperature      (sum_i q_i . u_i = sum_ij G_ij z_ij)
// Memory: one (R, M) block in the accumulation type plus O((N + M) D); never N x M.
//
// Matmul precision (InfoNCEGemm). cpu: fp16/bf16 query and key are upcast once to fp32 and every
// matmul is fp32 (CPU half GEMMs are slow and round their output). cuda: the three matmuls read
// the fp16/bf16 tensors as they are, on tensor cores with fp32 accumulation:
//   * dots = q k^T: fp32 output (aten::mm.dtype). Products of half inputs are exact in fp32 and
//     accumulate in fp32, so the similarities match the fp32 path up to summation order.
//   * u = W k, v = W^T q: W (fp32, from the row kernels) is rounded to the input dtype, the one
//     new rounding. W_ij = g_i rs_i (P_ij - [j = y_i]) c_j spans many orders of magnitude (g = 1/N
//     underflows fp16 at large N; rows the model is sure of have 1 - P_iy ~ 1e-6), so each row is
//     first divided by a power of two s_i near its bound |g_i| rs_i (1 - P_iy) max_j c_j (every
//     |P_ij - [j = y_i]| <= 1 - P_iy): the half operand holds O(1) values, and the factor comes
//     back in fp32 after the GEMM, exactly: u_i = s_i (H k)_i and v = S H^T (q diag(s / S)), S the
//     block's largest s_i (q_i s_i / S is a power-of-two rescale, exact in the input dtype).
//   Measured with this code on the CPU (a build asking for kInputType: the GEMMs then take fp32
//   copies of the half operands, which is exact products and fp32 sums, as on the GPU), cosine,
//   N = M = 4096, D = 768, tau = 0.05, mean, bf16 inputs, relative norm against float64: d query
//   and d key 2.3e-3 (the fp32 path: 1.66e-3, which is the float64 gradient's own rounding to
//   bf16), d temperature 2.6e-5 (fp32 path 2.7e-6; it sums q_i . u_i, which cancel), the loss
//   6.4e-5 either way. The rounding of W adds about as much as the final rounding to bf16: a
//   row of u is dominated by a few large terms (the label's P - 1 and the hardest negatives).
//   fp16 (rows of norm ~1, sum): d query 3.0e-4 (fp32 path 2.2e-4, its rounding 2.1e-4), d
//   temperature 4.0e-6 (1.9e-6).
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace kd_kernels {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's default

// aten::mm.dtype (fp16/bf16 inputs, fp32 output; CUDA only) is there from torch 2.8 on; without
// it the cuda backend falls back to fp32 copies, as the cpu one does.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
constexpr bool kHaveFloatOutputHalfGemm = true;
#else
constexpr bool kHaveFloatOutputHalfGemm = false;
#endif

// Where a backend runs the matmuls of fp16/bf16 inputs (see the header comment).
enum class InfoNCEGemm {
  kAccumulationType,  // fp32 copies of query and key, fp32 matmuls (cpu)
  kInputType,         // the half tensors themselves, fp32 accumulation (cuda)
};

// z_ij = dots_ij * row_scale_i * col_scale_j; writes lse_i and loss_i = lse_i - z_{i, y_i}.
// dots (R, M) contiguous, accumulation type; row_scale (R,), col_scale (M,) that type too.
using InfoNCEBlockStats = void (*)(const at::Tensor& dots, const at::Tensor& row_scale,
                                   const at::Tensor& col_scale, const at::Tensor& labels,
                                   at::Tensor& lse, at::Tensor& loss);
// Overwrites dots with W_ij = g_i (exp(z_ij - lse_i) - [j == y_i]) row_scale_i col_scale_j.
using InfoNCEBlockGrad = void (*)(at::Tensor& dots, const at::Tensor& row_scale,
                                  const at::Tensor& col_scale, const at::Tensor& labels,
                                  const at::Tensor& lse, const at::Tensor& grad_loss);

inline void check_info_nce_inputs(const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& labels, const at::Tensor& temperature) {
  TORCH_CHECK_VALUE(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
                    "info_nce op: query (N, D) and key (M, D) needed, got ", query.sizes(),
                    " and ", key.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(query.scalar_type()) &&
                       query.scalar_type() == key.scalar_type(),
                   "info_nce op: query and key must share a float dtype");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == query.size(0) &&
                        labels.scalar_type() == at::kLong,
                    "info_nce op: labels must be int64 (N,)");
  TORCH_CHECK_VALUE(temperature.dim() == 0 && (temperature.scalar_type() == at::kFloat ||
                                                temperature.scalar_type() == at::kDouble),
                    "info_nce op: temperature must be a 0-dim float32 (or float64) tensor");
  const auto device = query.device();
  TORCH_CHECK_VALUE(key.device() == device && labels.device() == device &&
                        temperature.device() == device,
                    "info_nce op: all inputs must be on one device");
}

inline at::ScalarType info_nce_acc_dtype(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// |x_i| in the accumulation type acc (x may be in a half dtype).
inline at::Tensor row_norms(const at::Tensor& x, at::ScalarType acc) {
  return at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/false, acc);
}

// a_i (cosine: 1 / max(|x_i|, eps); dot: 1) of x in the accumulation type acc.
inline at::Tensor inverse_norms(const at::Tensor& x, bool cosine, at::ScalarType acc) {
  if (!cosine) return at::ones({x.size(0)}, x.options().dtype(acc));
  return row_norms(x, acc).clamp_min(kNormalizeEps).reciprocal();
}

// The inputs as every walk over the blocks needs them (checked): query and key contiguous (in
// the accumulation type acc, or in their fp16/bf16 dtype when the matmuls read that: half_gemm),
// the contiguous labels, the inverse norms a_i, b_j, and a_i / t, in acc.
struct InfoNCEOperands {
  at::Tensor q, k, labels, inv_q, inv_k, row_scale;
  at::ScalarType acc;
  bool half_gemm;
};

inline InfoNCEOperands info_nce_operands(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& labels, const at::Tensor& temperature,
                                         bool cosine, InfoNCEGemm gemm) {
  check_info_nce_inputs(query, key, labels, temperature);
  const auto acc = info_nce_acc_dtype(query);
  const bool half_gemm = gemm == InfoNCEGemm::kInputType && kHaveFloatOutputHalfGemm &&
                         (query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16);
  const auto gemm_dtype = half_gemm ? query.scalar_type() : acc;
  auto q = query.to(gemm_dtype).contiguous(), k = key.to(gemm_dtype).contiguous();
  auto inv_q = inverse_norms(q, cosine, acc), inv_k = inverse_norms(k, cosine, acc);
  auto row_scale = inv_q / temperature.to(acc);
  return {q, k, labels.contiguous(), inv_q, inv_k, row_scale, acc, half_gemm};
}

// a b of half a and b with fp32 accumulation and output. aten::mm.dtype has CUDA kernels only;
// elsewhere (a cpu build that asks for InfoNCEGemm::kInputType, to test this path) the same
// exact products come from fp32 copies.
inline at::Tensor float_output_mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.is_cuda()) return at::mm(a, b, acc);
  return at::mm(a.to(acc), b.to(acc));
}

// The (R, M) raw dot products q_block k^T in the accumulation type, contiguous.
inline at::Tensor block_dots(const InfoNCEOperands& operands, const at::Tensor& q_block) {
  const auto key_t = operands.k.t();
  return operands.half_gemm ? float_output_mm(q_block, key_t, operands.acc)
                            : at::mm(q_block, key_t);
}

// 1 - P_{i y_i} = -expm1(-loss_i) in [0, 1]: it bounds every |P_ij - [j = y_i]| of row i.
inline at::Tensor label_complement(const at::Tensor& loss) {
  return at::neg(at::expm1(-loss)).clamp_(0, 1);
}

// u_block = W k and v += W^T q_block for the (R, M) block W (acc) of the objective.
// row_bound (R,): >= max_j |W_ij| up to a small factor; read only when the matmuls are in the
// half dtype, where W is rounded to it as H = W / s with s_i = 2^floor(log2 row_bound_i) (see the
// header comment), so the half operand holds O(1) values and the scales return exactly in fp32.
inline void add_block_input_grads(const InfoNCEOperands& operands, const at::Tensor& weights,
                                  const at::Tensor& row_bound, const at::Tensor& q_block,
                                  at::Tensor& u_block, at::Tensor& v) {
  const auto& k = operands.k;
  if (!operands.half_gemm) {
    at::mm_out(u_block, weights, k);
    v.addmm_(weights.t(), q_block);
    return;
  }
  // A zero, inf or NaN bound (a row of zero weight, a NaN loss) scales by 1: W passes as it is.
  const auto live = at::isfinite(row_bound).logical_and_(row_bound > 0);
  const auto row_pow2 =
      at::where(live, at::exp2(at::floor(at::log2(row_bound))), at::ones_like(row_bound));
  const auto block_pow2 = row_pow2.max();
  auto scaled_weights = at::empty(weights.sizes(), weights.options().dtype(k.scalar_type()));
  at::div_out(scaled_weights, weights, row_pow2.unsqueeze(1));
  if (k.is_cuda()) {
    at::mm_out(u_block, scaled_weights, k, operands.acc);
  } else {
    u_block.copy_(float_output_mm(scaled_weights, k, operands.acc));
  }
  u_block.mul_(row_pow2.unsqueeze(1));
  auto scaled_q = at::empty_like(q_block);
  at::mul_out(scaled_q, q_block, (row_pow2 / block_pow2).unsqueeze(1));
  v.add_(float_output_mm(scaled_weights.t(), scaled_q, operands.acc).mul_(block_pow2));
}

inline int64_t info_nce_block_rows(int64_t rows, int64_t keys, int64_t block_elements) {
  return std::clamp<int64_t>(block_elements / std::max<int64_t>(keys, 1), 1, std::max<int64_t>(rows, 1));
}

template <InfoNCEBlockStats block_stats>
std::tuple<at::Tensor, at::Tensor> info_nce_forward(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& temperature, bool cosine,
                                                    int64_t block_elements, InfoNCEGemm gemm) {
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine, gemm);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &row_scale = operands.row_scale, &col_scale = operands.inv_k;
  const int64_t rows = q.size(0);
  const auto acc_options = q.options().dtype(operands.acc);
  auto lse = at::empty({rows}, acc_options), loss = at::empty({rows}, acc_options);
  const int64_t step = info_nce_block_rows(rows, k.size(0), block_elements);
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    const auto dots = block_dots(operands, q.slice(0, begin, end));
    auto lse_block = lse.slice(0, begin, end), loss_block = loss.slice(0, begin, end);
    block_stats(dots, row_scale.slice(0, begin, end), col_scale, labels_c.slice(0, begin, end),
                lse_block, loss_block);
  }
  return {loss, lse};
}

// The chain rule from u = W k and v = W^T q (W of the objective, see above; u, v in acc) to the
// inputs: d query, d key in their dtypes and d temperature (0-dim, in its dtype). q and k may be
// in a half dtype: every product with u, v or a vector in acc promotes to acc.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_input_grads(
    at::Tensor u, at::Tensor v, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& inv_q, const at::Tensor& inv_k, const at::Tensor& temperature,
    bool cosine, at::ScalarType query_dtype) {
  const auto acc = u.scalar_type();
  const auto q_dot_u = (q * u).sum(1), k_dot_v = (k * v).sum(1);
  auto grad_temperature = (-q_dot_u.sum() / temperature.to(acc)).to(temperature.scalar_type());
  if (cosine) {
    // Through x / max(|x|, eps): project out the x direction where |x| > eps.
    const auto q_live = (row_norms(q, acc) > kNormalizeEps).to(acc);
    const auto k_live = (row_norms(k, acc) > kNormalizeEps).to(acc);
    u.sub_(q * (inv_q.square() * q_dot_u * q_live).unsqueeze(1));
    v.sub_(k * (inv_k.square() * k_dot_v * k_live).unsqueeze(1));
  }
  return {u.to(query_dtype), v.to(query_dtype), grad_temperature};
}

template <InfoNCEBlockGrad block_grad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& labels, const at::Tensor& temperature, const at::Tensor& lse, bool cosine,
    int64_t block_elements, InfoNCEGemm gemm) {
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine, gemm);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &inv_q = operands.inv_q, &inv_k = operands.inv_k, &row_scale = operands.row_scale;
  const auto acc = operands.acc;
  const auto grad_c = grad_loss.to(acc).contiguous(), lse_c = lse.to(acc).contiguous();
  const int64_t rows = q.size(0);
  const auto acc_options = q.options().dtype(acc);
  auto u = at::empty(q.sizes(), acc_options), v = at::zeros(k.sizes(), acc_options);
  const int64_t step = info_nce_block_rows(rows, k.size(0), block_elements);
  const auto max_col_scale = operands.half_gemm ? inv_k.max() : at::Tensor();
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    const auto q_block = q.slice(0, begin, end);
    const auto rs = row_scale.slice(0, begin, end), labels_block = labels_c.slice(0, begin, end);
    const auto lse_block = lse_c.slice(0, begin, end), grad_block = grad_c.slice(0, begin, end);
    auto weights = block_dots(operands, q_block);
    at::Tensor row_bound;
    if (operands.half_gemm) {  // |g_i| rs_i (1 - P_iy) max c, from z_iy before W overwrites it
      const auto label_dots = weights.gather(1, labels_block.unsqueeze(1)).squeeze(1);
      const auto label_z = label_dots * rs * inv_k.index_select(0, labels_block);
      row_bound = grad_block.abs() * rs * label_complement(lse_block - label_z) * max_col_scale;
    }
    block_grad(weights, rs, inv_k, labels_block, lse_block, grad_block);
    auto u_block = u.slice(0, begin, end);
    add_block_input_grads(operands, weights, row_bound, q_block, u_block, v);
  }
  return info_nce_input_grads(u, v, q, k, inv_q, inv_k, temperature, cosine,
                              query.scalar_type());
}

// Loss and gradient in one walk, for an objective whose row weights are known in forward
// (mean: 1/N, sum: 1): returns (loss (N,), d query, d key, d temperature) of
// sum_i row_weight_i loss_i. Each block of query rows holds every key, so its softmax is final
// as soon as its row log-sum-exps are: three matmuls in all, where forward + backward take four.
//
// symmetric (labels must be arange(N), M >= N): loss_i = (fwd_i + rev_i) / 2 with
// rev_j = logsumexp_i z_ij - z_jj over the N queries, the column direction of the same z.
// Its log-sum-exps need every row first: pass 1 forms them online over row blocks, pass 2
// forms the gradient, G_ij = w_i/2 (P_ij - [j = y_i]) + w_j/2 (Pc_ij - [i = j]) for j < N,
// with Pc_ij = exp(z_ij - clse_j). When N x M fits in keep_elements the one block of pass 1
// is kept for pass 2 (three matmuls); else pass 2 recomputes it (four).
template <InfoNCEBlockStats block_stats, InfoNCEBlockGrad block_grad>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fused(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& labels,
    const at::Tensor& temperature, bool cosine, const at::Tensor& row_weight, bool symmetric,
    int64_t block_elements, int64_t keep_elements, InfoNCEGemm gemm) {
  const int64_t rows = query.size(0), keys = key.size(0);
  TORCH_CHECK_VALUE(row_weight.dim() == 1 && row_weight.size(0) == rows &&
                        row_weight.device() == query.device(),
                    "info_nce_fused: row_weight must be (N,) on the inputs' device");
  TORCH_CHECK_VALUE(!symmetric || keys >= rows,
                    "info_nce_fused: symmetric needs M >= N, got N=", rows, " M=", keys);
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine, gemm);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &inv_q = operands.inv_q, &inv_k = operands.inv_k, &row_scale = operands.row_scale;
  const auto acc_options = q.options().dtype(operands.acc);
  const auto weight = row_weight.to(operands.acc).contiguous();
  auto lse = at::empty({rows}, acc_options), loss = at::empty({rows}, acc_options);
  auto u = at::empty(q.sizes(), acc_options), v = at::zeros(k.sizes(), acc_options);
  const auto max_col_scale = operands.half_gemm ? inv_k.max() : at::Tensor();
  const bool keep = symmetric && rows * keys <= keep_elements;
  const int64_t step = keep ? rows : info_nce_block_rows(rows, keys, block_elements);

  // Row block [begin, end) of z restricted to the first N keys (the column direction's part).
  const auto paired_z = [&](const at::Tensor& dots, int64_t begin, int64_t end) {
    return dots.narrow(1, 0, rows) * row_scale.slice(0, begin, end).unsqueeze(1) *
           inv_k.narrow(0, 0, rows).unsqueeze(0);
  };
  // The block's raw dot products, with its rows' log-sum-exps and losses filled in.
  const auto row_stats_block = [&](int64_t begin, int64_t end) {
    auto dots = block_dots(operands, q.slice(0, begin, end));
    auto lse_block = lse.slice(0, begin, end), loss_block = loss.slice(0, begin, end);
    block_stats(dots, row_scale.slice(0, begin, end), inv_k, labels_c.slice(0, begin, end),
                lse_block, loss_block);
    return dots;
  };
  // Overwrites the block's z with the row direction's W (plus extra over the first N keys,
  // the column direction's share, whose rows are bounded by extra_bound) and adds W k to u and
  // W^T q to v.
  const auto gradient_block = [&](at::Tensor& dots, const at::Tensor& row_weight_block,
                                  int64_t begin, int64_t end, const at::Tensor& extra,
                                  const at::Tensor& extra_bound) {
    const auto rs = row_scale.slice(0, begin, end);
    block_grad(dots, rs, inv_k, labels_c.slice(0, begin, end), lse.slice(0, begin, end),
               row_weight_block);
    if (extra.defined()) dots.narrow(1, 0, rows).add_(extra);
    at::Tensor row_bound;
    if (operands.half_gemm) {
      row_bound = row_weight_block.abs() * rs * label_complement(loss.slice(0, begin, end)) *
                  max_col_scale;
      if (extra_bound.defined()) row_bound = row_bound + extra_bound;
    }
    auto u_block = u.slice(0, begin, end);
    add_block_input_grads(operands, dots, row_bound, q.slice(0, begin, end), u_block, v);
  };

  if (!symmetric) {
    for (int64_t begin = 0; begin < rows; begin += step) {
      const int64_t end = std::min(rows, begin + step);
      auto dots = row_stats_block(begin, end);
      gradient_block(dots, weight.slice(0, begin, end), begin, end, at::Tensor(), at::Tensor());
    }
    auto [grad_query, grad_key, grad_temperature] = info_nce_input_grads(
        u, v, q, k, inv_q, inv_k, temperature, cosine, query.scalar_type());
    return {loss, grad_query, grad_key, grad_temperature};
  }

  auto column_lse = at::full({rows}, -std::numeric_limits<double>::infinity(), acc_options);
  auto diagonal_z = at::empty({rows}, acc_options);
  at::Tensor kept;
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    auto dots = row_stats_block(begin, end);
    const auto z = paired_z(dots, begin, end);
    column_lse = at::logaddexp(column_lse, at::logsumexp(z, {0}));
    diagonal_z.slice(0, begin, end).copy_(z.diagonal(begin));
    if (keep) kept = dots;
  }
  const auto reverse = column_lse - diagonal_z;
  const auto half_weight = weight * 0.5;
  const auto column_factor = (half_weight * inv_k.narrow(0, 0, rows)).unsqueeze(0);
  // |Pc_ij - [i = j]| <= 1: the column part of row i is at most rs_i max_j |column_factor_j|.
  const auto max_column_factor = operands.half_gemm ? column_factor.abs().max() : at::Tensor();
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    auto dots = keep ? kept : block_dots(operands, q.slice(0, begin, end));
    // The column part first, from z, before the row kernel overwrites the block.
    const auto rs = row_scale.slice(0, begin, end);
    auto column_part = (paired_z(dots, begin, end) - column_lse.unsqueeze(0)).exp_();
    column_part.diagonal(begin).sub_(1);
    column_part.mul_(rs.unsqueeze(1)).mul_(column_factor);
    const auto column_bound = operands.half_gemm ? rs * max_column_factor : at::Tensor();
    gradient_block(dots, half_weight.slice(0, begin, end), begin, end, column_part, column_bound);
  }
  auto [grad_query, grad_key, grad_temperature] = info_nce_input_grads(
      u, v, q, k, inv_q, inv_k, temperature, cosine, query.scalar_type());
  return {(loss + reverse) / 2, grad_query, grad_key, grad_temperature};
}

}  // namespace kd_kernels
