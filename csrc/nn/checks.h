// Argument checks shared by the fastmoe::nn modules: each error names the argument and the value it got.
#pragma once

#include <torch/types.h>

#include <string>

namespace fastmoe::nn::detail {

inline void check_positive(int64_t value, const char* name) {
  TORCH_CHECK(value >= 1, name, " must be >= 1, got ", value);
}

// x [..., d_model] viewed as [tokens, d_model].
inline torch::Tensor token_matrix(const torch::Tensor& x, int64_t d_model) {
  TORCH_CHECK(x.defined(), "x must be a defined tensor");
  TORCH_CHECK(x.is_floating_point(), "x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d_model, "x must have shape [..., d_model=", d_model, "], got ", x.sizes());
  return x.reshape({-1, d_model});
}

}  // namespace fastmoe::nn::detail
