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
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace kd_kernels {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's default

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

// a_i (cosine: 1 / max(|x_i|, eps); dot: 1) of x in the accumulation type.
inline at::Tensor inverse_norms(const at::Tensor& x, bool cosine) {
  if (!cosine) return at::ones({x.size(0)}, x.options());
  return at::linalg_vector_norm(x, 2, {1}).clamp_min(kNormalizeEps).reciprocal();
}

// The inputs as every walk over the blocks needs them (checked): query and key contiguous in
// the accumulation type, the contiguous labels, the inverse norms a_i, b_j, and a_i / t.
struct InfoNCEOperands {
  at::Tensor q, k, labels, inv_q, inv_k, row_scale;
};

inline InfoNCEOperands info_nce_operands(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& labels, const at::Tensor& temperature,
                                         bool cosine) {
  check_info_nce_inputs(query, key, labels, temperature);
  const auto acc = info_nce_acc_dtype(query);
  auto q = query.to(acc).contiguous(), k = key.to(acc).contiguous();
  auto inv_q = inverse_norms(q, cosine), inv_k = inverse_norms(k, cosine);
  auto row_scale = inv_q / temperature.to(acc);
  return {q, k, labels.contiguous(), inv_q, inv_k, row_scale};
}

inline int64_t info_nce_block_rows(int64_t rows, int64_t keys, int64_t block_elements) {
  return std::clamp<int64_t>(block_elements / std::max<int64_t>(keys, 1), 1, std::max<int64_t>(rows, 1));
}

template <InfoNCEBlockStats block_stats>
std::tuple<at::Tensor, at::Tensor> info_nce_forward(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& temperature, bool cosine,
                                                    int64_t block_elements) {
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &row_scale = operands.row_scale, &col_scale = operands.inv_k;
  const int64_t rows = q.size(0);
  auto lse = at::empty({rows}, q.options()), loss = at::empty({rows}, q.options());
  const int64_t step = info_nce_block_rows(rows, k.size(0), block_elements);
  const auto key_t = k.t();
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    const auto dots = at::mm(q.slice(0, begin, end), key_t);
    auto lse_block = lse.slice(0, begin, end), loss_block = loss.slice(0, begin, end);
    block_stats(dots, row_scale.slice(0, begin, end), col_scale, labels_c.slice(0, begin, end),
                lse_block, loss_block);
  }
  return {loss, lse};
}

// The chain rule from u = W k and v = W^T q (W of the objective, see above) to the inputs:
// d query, d key in their dtypes and d temperature (0-dim, in its dtype).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_input_grads(
    at::Tensor u, at::Tensor v, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& inv_q, const at::Tensor& inv_k, const at::Tensor& temperature,
    bool cosine, at::ScalarType query_dtype) {
  const auto acc = q.scalar_type();
  const auto q_dot_u = (q * u).sum(1), k_dot_v = (k * v).sum(1);
  auto grad_temperature = (-q_dot_u.sum() / temperature.to(acc)).to(temperature.scalar_type());
  if (cosine) {
    // Through x / max(|x|, eps): project out the x direction where |x| > eps.
    const auto q_live = (at::linalg_vector_norm(q, 2, {1}) > kNormalizeEps).to(acc);
    const auto k_live = (at::linalg_vector_norm(k, 2, {1}) > kNormalizeEps).to(acc);
    u.sub_(q * (inv_q.square() * q_dot_u * q_live).unsqueeze(1));
    v.sub_(k * (inv_k.square() * k_dot_v * k_live).unsqueeze(1));
  }
  return {u.to(query_dtype), v.to(query_dtype), grad_temperature};
}

template <InfoNCEBlockGrad block_grad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& labels, const at::Tensor& temperature, const at::Tensor& lse, bool cosine,
    int64_t block_elements) {
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &inv_q = operands.inv_q, &inv_k = operands.inv_k, &row_scale = operands.row_scale;
  const auto acc = q.scalar_type();
  const auto grad_c = grad_loss.to(acc).contiguous(), lse_c = lse.to(acc).contiguous();
  const int64_t rows = q.size(0);
  auto u = at::empty_like(q), v = at::zeros_like(k);
  const int64_t step = info_nce_block_rows(rows, k.size(0), block_elements);
  const auto key_t = k.t();
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    const auto q_block = q.slice(0, begin, end);
    auto weights = at::mm(q_block, key_t);
    block_grad(weights, row_scale.slice(0, begin, end), inv_k, labels_c.slice(0, begin, end),
               lse_c.slice(0, begin, end), grad_c.slice(0, begin, end));
    auto u_block = u.slice(0, begin, end);
    at::mm_out(u_block, weights, k);
    v.addmm_(weights.t(), q_block);
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
    int64_t block_elements, int64_t keep_elements) {
  const int64_t rows = query.size(0), keys = key.size(0);
  TORCH_CHECK_VALUE(row_weight.dim() == 1 && row_weight.size(0) == rows &&
                        row_weight.device() == query.device(),
                    "info_nce_fused: row_weight must be (N,) on the inputs' device");
  TORCH_CHECK_VALUE(!symmetric || keys >= rows,
                    "info_nce_fused: symmetric needs M >= N, got N=", rows, " M=", keys);
  const auto operands = info_nce_operands(query, key, labels, temperature, cosine);
  const auto &q = operands.q, &k = operands.k, &labels_c = operands.labels;
  const auto &inv_q = operands.inv_q, &inv_k = operands.inv_k, &row_scale = operands.row_scale;
  const auto weight = row_weight.to(q.scalar_type()).contiguous();
  auto lse = at::empty({rows}, q.options()), loss = at::empty({rows}, q.options());
  auto u = at::empty_like(q), v = at::zeros_like(k);
  const auto key_t = k.t();
  const bool keep = symmetric && rows * keys <= keep_elements;
  const int64_t step = keep ? rows : info_nce_block_rows(rows, keys, block_elements);

  // Row block [begin, end) of z restricted to the first N keys (the column direction's part).
  const auto paired_z = [&](const at::Tensor& dots, int64_t begin, int64_t end) {
    return dots.narrow(1, 0, rows) * row_scale.slice(0, begin, end).unsqueeze(1) *
           inv_k.narrow(0, 0, rows).unsqueeze(0);
  };
  // The block's raw dot products, with its rows' log-sum-exps and losses filled in.
  const auto row_stats_block = [&](int64_t begin, int64_t end) {
    auto dots = at::mm(q.slice(0, begin, end), key_t);
    auto lse_block = lse.slice(0, begin, end), loss_block = loss.slice(0, begin, end);
    block_stats(dots, row_scale.slice(0, begin, end), inv_k, labels_c.slice(0, begin, end),
                lse_block, loss_block);
    return dots;
  };
  // Overwrites the block's z with the row direction's W (plus extra over the first N keys,
  // the column direction's share) and adds W k to u and W^T q to v.
  const auto gradient_block = [&](at::Tensor& dots, const at::Tensor& row_weight_block,
                                  int64_t begin, int64_t end, const at::Tensor& extra) {
    block_grad(dots, row_scale.slice(0, begin, end), inv_k, labels_c.slice(0, begin, end),
               lse.slice(0, begin, end), row_weight_block);
    if (extra.defined()) dots.narrow(1, 0, rows).add_(extra);
    auto u_block = u.slice(0, begin, end);
    at::mm_out(u_block, dots, k);
    v.addmm_(dots.t(), q.slice(0, begin, end));
  };

  if (!symmetric) {
    for (int64_t begin = 0; begin < rows; begin += step) {
      const int64_t end = std::min(rows, begin + step);
      auto dots = row_stats_block(begin, end);
      gradient_block(dots, weight.slice(0, begin, end), begin, end, at::Tensor());
    }
    auto [grad_query, grad_key, grad_temperature] = info_nce_input_grads(
        u, v, q, k, inv_q, inv_k, temperature, cosine, query.scalar_type());
    return {loss, grad_query, grad_key, grad_temperature};
  }

  auto column_lse = at::full({rows}, -std::numeric_limits<double>::infinity(), q.options());
  auto diagonal_z = at::empty({rows}, q.options());
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
  for (int64_t begin = 0; begin < rows; begin += step) {
    const int64_t end = std::min(rows, begin + step);
    auto dots = keep ? kept : at::mm(q.slice(0, begin, end), key_t);
    // The column part first, from z, before the row kernel overwrites the block.
    auto column_part = (paired_z(dots, begin, end) - column_lse.unsqueeze(0)).exp_();
    column_part.diagonal(begin).sub_(1);
    column_part.mul_(row_scale.slice(0, begin, end).unsqueeze(1)).mul_(column_factor);
    gradient_block(dots, half_weight.slice(0, begin, end), begin, end, column_part);
  }
  auto [grad_query, grad_key, grad_temperature] = info_nce_input_grads(
      u, v, q, k, inv_q, inv_k, temperature, cosine, query.scalar_type());
  return {(loss + reverse) / 2, grad_query, grad_key, grad_temperature};
}

}  // namespace kd_kernels
