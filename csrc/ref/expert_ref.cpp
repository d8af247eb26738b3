#include "ref/expert_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace fastmoe {

void check_expert_offsets_ref(const int64_t* expert_offsets, int64_t num_experts, int64_t num_rows) {
  FMOE_CHECK(expert_offsets[0] == 0, "expert_offsets[0] must be 0, got ", expert_offsets[0]);
  for (int64_t e = 0; e < num_experts; ++e) {
    FMOE_CHECK(expert_offsets[e + 1] >= expert_offsets[e], "expert_offsets must be non-decreasing, got offsets[", e,
               "] = ", expert_offsets[e], " > offsets[", e + 1, "] = ", expert_offsets[e + 1]);
  }
  FMOE_CHECK(expert_offsets[num_experts] <= num_rows, "expert_offsets[", num_experts,
             "] = ", expert_offsets[num_experts], " exceeds the ", num_rows, " rows of x");
}

namespace {

template <typename T>
void grouped_linear_impl(const T* x, int64_t num_rows, int64_t in_features, const int64_t* offsets, int64_t num_experts,
                         const T* weight, int64_t out_features, const T* bias, T* y) {
  using A = wide_acc_t<T>;  // fp64 for fp32: see dtype.h
  // Widen each expert's weight once so the inner dot product runs in the accumulation type.
  std::vector<A> w(out_features * in_features), xr(in_features);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    const T* we = weight + e * out_features * in_features;
    for (int64_t i = 0; i < out_features * in_features; ++i) w[i] = to_acc(we[i]);
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      for (int64_t i = 0; i < in_features; ++i) xr[i] = to_acc(x[r * in_features + i]);
      for (int64_t o = 0; o < out_features; ++o) {
        const A* wo = w.data() + o * in_features;
        A acc = 0;
        for (int64_t i = 0; i < in_features; ++i) acc += wo[i] * xr[i];
        if (bias != nullptr) acc += to_acc(bias[e * out_features + o]);
        y[r * out_features + o] = from_acc<T>(acc);
      }
    }
  }
  for (int64_t r = offsets[num_experts]; r < num_rows; ++r) {
    for (int64_t o = 0; o < out_features; ++o) y[r * out_features + o] = from_acc<T>(A(0));
  }
}

template <typename T>
void grouped_linear_backward_impl(const T* grad_y, const T* x, int64_t num_rows, int64_t in_features,
                                  const int64_t* offsets, int64_t num_experts, const T* weight, int64_t out_features,
                                  T* grad_x, T* grad_weight, T* grad_bias) {
  // 1. grad_x[r] = W[e]^T grad_y[r] per row.  2. grad_W[e] = sum_r grad_y[r] x[r]^T and grad_b[e] = sum_r
  // grad_y[r], each summed over the expert's rows in row order.  3. Rows past offsets[E] get zero grad_x.
  using A = wide_acc_t<T>;  // fp64 for fp32: see dtype.h
  std::vector<A> w(out_features * in_features), gw(out_features * in_features), gb(out_features);
  std::vector<A> row(in_features), gy(out_features), xr(in_features);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = offsets[e], end = offsets[e + 1];
    if (grad_x != nullptr && end > begin) {
      const T* we = weight + e * out_features * in_features;
      for (int64_t i = 0; i < out_features * in_features; ++i) w[i] = to_acc(we[i]);
    }
    std::fill(gw.begin(), gw.end(), A(0));
    std::fill(gb.begin(), gb.end(), A(0));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t o = 0; o < out_features; ++o) gy[o] = to_acc(grad_y[r * out_features + o]);
      if (grad_x != nullptr) {
        std::fill(row.begin(), row.end(), A(0));
        for (int64_t o = 0; o < out_features; ++o) {
          const A* wo = w.data() + o * in_features;
          for (int64_t i = 0; i < in_features; ++i) row[i] += gy[o] * wo[i];
        }
        for (int64_t i = 0; i < in_features; ++i) grad_x[r * in_features + i] = from_acc<T>(row[i]);
      }
      if (grad_weight != nullptr) {  // x is read only here: a caller asking for grad_x alone may pass any x
        for (int64_t i = 0; i < in_features; ++i) xr[i] = to_acc(x[r * in_features + i]);
        for (int64_t o = 0; o < out_features; ++o) {
          A* gwo = gw.data() + o * in_features;
          for (int64_t i = 0; i < in_features; ++i) gwo[i] += gy[o] * xr[i];
        }
      }
      if (grad_bias != nullptr) {
        for (int64_t o = 0; o < out_features; ++o) gb[o] += gy[o];
      }
    }
    if (grad_weight != nullptr) {
      T* out = grad_weight + e * out_features * in_features;
      for (int64_t i = 0; i < out_features * in_features; ++i) out[i] = from_acc<T>(gw[i]);
    }
    if (grad_bias != nullptr) {
      for (int64_t o = 0; o < out_features; ++o) grad_bias[e * out_features + o] = from_acc<T>(gb[o]);
    }
  }
  if (grad_x != nullptr) {
    for (int64_t r = offsets[num_experts]; r < num_rows; ++r) {
      for (int64_t i = 0; i < in_features; ++i) grad_x[r * in_features + i] = from_acc<T>(A(0));
    }
  }
}

}  // namespace

void grouped_linear_ref(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                        const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                        const void* bias, void* y) {
  check_expert_offsets_ref(expert_offsets, num_experts, num_rows);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "grouped_linear_ref", [&] {
    grouped_linear_impl(static_cast<const scalar_t*>(x), num_rows, in_features, expert_offsets, num_experts,
                        static_cast<const scalar_t*>(weight), out_features, static_cast<const scalar_t*>(bias),
                        static_cast<scalar_t*>(y));
  });
}

void grouped_linear_backward_ref(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                                 const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                 int64_t out_features, void* grad_x, void* grad_weight, void* grad_bias) {
  check_expert_offsets_ref(expert_offsets, num_experts, num_rows);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "grouped_linear_backward_ref", [&] {
    grouped_linear_backward_impl(static_cast<const scalar_t*>(grad_y), static_cast<const scalar_t*>(x), num_rows,
                                 in_features, expert_offsets, num_experts, static_cast<const scalar_t*>(weight),
                                 out_features, static_cast<scalar_t*>(grad_x), static_cast<scalar_t*>(grad_weight),
                                 static_cast<scalar_t*>(grad_bias));
  });
}

void grouped_bias_epilogue_ref(DType dtype, void* y, int64_t num_rows, int64_t out_features,
                               const int64_t* expert_offsets, int64_t num_experts, const void* bias) {
  check_expert_offsets_ref(expert_offsets, num_experts, num_rows);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "grouped_bias_epilogue_ref", [&] {
    auto* rows = static_cast<scalar_t*>(y);
    const auto* b = static_cast<const scalar_t*>(bias);
    for (int64_t e = 0; e < num_experts && b != nullptr; ++e) {
      for (int64_t r = expert_offsets[e]; r < expert_offsets[e + 1]; ++r) {
        for (int64_t o = 0; o < out_features; ++o) {
          scalar_t& value = rows[r * out_features + o];
          value = from_acc<scalar_t>(to_acc(value) + to_acc(b[e * out_features + o]));
        }
      }
    }
    for (int64_t i = expert_offsets[num_experts] * out_features; i < num_rows * out_features; ++i) {
      rows[i] = from_acc<scalar_t>(acc_t<scalar_t>(0));
    }
  });
}

void zero_empty_groups_ref(void* groups, int64_t num_groups, int64_t group_bytes, const int64_t* expert_offsets) {
  for (int64_t g = 0; g < num_groups; ++g) {
    if (expert_offsets[g + 1] == expert_offsets[g])
      std::memset(static_cast<char*>(groups) + g * group_bytes, 0, group_bytes);
  }
}

void check_swiglu_sizes(const char* name, int64_t num_rows, int64_t hidden) {
  FMOE_CHECK(num_rows >= 0 && hidden >= 0, name, ": num_rows and hidden must be >= 0, got ", num_rows, " and ", hidden);
}

void swiglu_ref(DType dtype, const void* h, int64_t num_rows, int64_t hidden, void* out, const void* scale) {
  check_swiglu_sizes("swiglu_ref", num_rows, hidden);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "swiglu_ref", [&] {
    using A = acc_t<scalar_t>;
    const auto* in = static_cast<const scalar_t*>(h);
    const auto* sc = static_cast<const A*>(scale);
    auto* o = static_cast<scalar_t*>(out);
    for (int64_t r = 0; r < num_rows; ++r) {
      const scalar_t* row = in + r * 2 * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const A g = to_acc(row[j]), u = to_acc(row[hidden + j]);
        const A silu = g / (A(1) + std::exp(-g));
        const A value = silu * u;
        o[r * hidden + j] = from_acc<scalar_t>(sc == nullptr ? value : value * sc[r]);
      }
    }
  });
}

void swiglu_backward_ref(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden, void* grad_h,
                         const void* scale, void* grad_scale) {
  check_swiglu_sizes("swiglu_backward_ref", num_rows, hidden);
  FMOE_CHECK((scale == nullptr) == (grad_scale == nullptr),
             "swiglu_backward_ref: scale and grad_scale must be given together");
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "swiglu_backward_ref", [&] {
    using A = acc_t<scalar_t>;
    const auto* gy = static_cast<const scalar_t*>(grad);
    const auto* in = static_cast<const scalar_t*>(h);
    const auto* sc = static_cast<const A*>(scale);
    auto* gh = static_cast<scalar_t*>(grad_h);
    auto* gs = static_cast<A*>(grad_scale);
    for (int64_t r = 0; r < num_rows; ++r) {
      const scalar_t* row = in + r * 2 * hidden;
      scalar_t* grad_row = gh + r * 2 * hidden;
      double dot = 0;
      for (int64_t j = 0; j < hidden; ++j) {
        const A g = to_acc(row[j]), u = to_acc(row[hidden + j]), dy = to_acc(gy[r * hidden + j]);
        const A s = A(1) / (A(1) + std::exp(-g));
        const A d = sc == nullptr ? dy : dy * sc[r];
        grad_row[j] = from_acc<scalar_t>(d * u * (s * (A(1) + g * (A(1) - s))));
        grad_row[hidden + j] = from_acc<scalar_t>(d * (g * s));
        if (gs != nullptr) dot += static_cast<double>(dy) * (static_cast<double>(g) * s * u);
      }
      if (gs != nullptr) gs[r] = static_cast<A>(dot);
    }
  });
}

void gelu_backward_bias_ref(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden,
                            const int64_t* expert_offsets, int64_t num_experts, void* grad_h, void* grad_bias) {
  FMOE_CHECK(num_rows >= 0 && hidden >= 0 && num_experts >= 0, "gelu_backward_bias_ref: sizes must be >= 0, got ",
             "num_rows ", num_rows, ", hidden ", hidden, ", num_experts ", num_experts);
  check_expert_offsets_ref(expert_offsets, num_experts, num_rows);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "gelu_backward_bias_ref", [&] {
    using A = acc_t<scalar_t>;
    using W = wide_acc_t<scalar_t>;
    const A alpha = static_cast<A>(kGeluAlpha), beta = static_cast<A>(kGeluBeta);
    const auto* gy = static_cast<const scalar_t*>(grad);
    const auto* in = static_cast<const scalar_t*>(h);
    auto* gh = static_cast<scalar_t*>(grad_h);
    for (int64_t i = 0; i < num_rows * hidden; ++i) {
      const A x = to_acc(in[i]);
      const A cdf = A(0.5) * (A(1) + std::erf(x * alpha));
      const A pdf = std::exp(A(-0.5) * x * x) * beta;
      gh[i] = from_acc<scalar_t>(to_acc(gy[i]) * (cdf + x * pdf));
    }
    std::vector<W> sum(hidden);
    auto* gb = static_cast<scalar_t*>(grad_bias);
    for (int64_t e = 0; e < num_experts; ++e) {
      std::fill(sum.begin(), sum.end(), W(0));
      for (int64_t r = expert_offsets[e]; r < expert_offsets[e + 1]; ++r) {
        for (int64_t j = 0; j < hidden; ++j) sum[j] += static_cast<W>(to_acc(gh[r * hidden + j]));
      }
      for (int64_t j = 0; j < hidden; ++j) gb[e * hidden + j] = from_acc<scalar_t>(static_cast<A>(sum[j]));
    }
  });
}

}  // namespace fastmoe
