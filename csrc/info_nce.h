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

inline int64_t info_nce_block_rows(int64_t rows, int64_t keys, int64_t block_elements) {
  return std::clamp<int64_t>(block_elements / std::max<int64_t>(keys, 1), 1, std::max<int64_t>(rows, 1));
}

template <InfoNCEBlockStats block_stats>
std::tuple<at::Tensor, at::Tensor> info_nce_forward(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& temperature, bool cosine,
                                                    int64_t block_elements) {
  check_info_nce_inputs(query, key, labels, temperature);
  const auto acc = info_nce_acc_dtype(query);
  const auto q = query.to(acc).contiguous(), k = key.to(acc).contiguous();
  const auto labels_c = labels.contiguous();
  const auto row_scale = inverse_norms(q, cosine) / temperature.to(acc);
  const auto col_scale = inverse_norms(k, cosine);
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

template <InfoNCEBlockGrad block_grad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& labels, const at::Tensor& temperature, const at::Tensor& lse, bool cosine,
    int64_t block_elements) {
  check_info_nce_inputs(query, key, labels, temperature);
  const auto acc = info_nce_acc_dtype(query);
  const auto q = query.to(acc).contiguous(), k = key.to(acc).contiguous();
  const auto labels_c = labels.contiguous();
  const auto grad_c = grad_loss.to(acc).contiguous(), lse_c = lse.to(acc).contiguous();
  const auto inv_q = inverse_norms(q, cosine), inv_k = inverse_norms(k, cosine);
  const auto row_scale = inv_q / temperature.to(acc);
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
  const auto q_dot_u = (q * u).sum(1), k_dot_v = (k * v).sum(1);
  auto grad_temperature = (-q_dot_u.sum() / temperature.to(acc)).to(temperature.scalar_type());
  if (cosine) {
    // Through x / max(|x|, eps): project out the x direction where |x| > eps.
    const auto q_live = (at::linalg_vector_norm(q, 2, {1}) > kNormalizeEps).to(acc);
    const auto k_live = (at::linalg_vector_norm(k, 2, {1}) > kNormalizeEps).to(acc);
    u.sub_(q * (inv_q.square() * q_dot_u * q_live).unsqueeze(1));
    v.sub_(k * (inv_k.square() * k_dot_v * k_live).unsqueeze(1));
  }
  return {u.to(query.scalar_type()), v.to(key.scalar_type()), grad_temperature};
}

}  // namespace kd_kernels
