// SIMD helpers shared by the CPU kernels (at::vec, AVX2 when the build enables it).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

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

}  // namespace kd_kernels
