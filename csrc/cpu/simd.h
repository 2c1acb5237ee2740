// SIMD helpers shared by the CPU kernels (at::vec, AVX2 when the build enables it).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace kd_kernels {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// The sum of a vector's lanes.
template <typename acc_t>
acc_t horizontal_sum(const Vec<acc_t>& v) {
  alignas(64) acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < Vec<acc_t>::size(); ++i) total += lanes[i];
  return total;
}

// Max of x[0, count): NaN if any entry is NaN (at::vec::maximum propagates NaN), -inf for
// count == 0. Whole vectors first, the tail one by one.
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t count) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t c = 0;
  if (count >= kWidth) {
    Vec<acc_t> best_lanes = Vec<acc_t>::loadu(x);
    for (c = kWidth; c + kWidth <= count; c += kWidth) {
      best_lanes = at::vec::maximum(best_lanes, Vec<acc_t>::loadu(x + c));
    }
    alignas(64) acc_t lanes[kWidth];
    best_lanes.store(lanes);
    for (int64_t i = 0; i < kWidth; ++i) {
      if (std::isnan(lanes[i])) return lanes[i];
      best = lanes[i] > best ? lanes[i] : best;
    }
  }
  for (; c < count; ++c) {
    if (std::isnan(x[c])) return x[c];
    best = x[c] > best ? x[c] : best;
  }
  return best;
}

}  // namespace kd_kernels
