// The references' softmax: one row in place, max-subtracted, with the denominator summed in W (wide_acc_t of the
// element type: wider than A for fp32, see core/dtype.h). Shared by the routing and balance references, so the
// gate's scores and its balance term see the same probabilities. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastmoe {

template <typename W, typename A>
void softmax_inplace(A* row, int64_t n) {
  A max_value = row[0];
  for (int64_t i = 1; i < n; ++i) max_value = row[i] > max_value ? row[i] : max_value;
  W total = 0;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - max_value);
    total += row[i];
  }
  for (int64_t i = 0; i < n; ++i) row[i] = static_cast<A>(row[i] / total);
}

}  // namespace fastmoe
