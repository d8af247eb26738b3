#include "ref/dispatch_ref.h"

#include <vector>

namespace fastmoe {

void make_plan_ref(const int64_t* topk_idx, int64_t num_pairs, int64_t num_experts, int64_t* expert_counts,
                   int64_t* expert_offsets, int64_t* sorted_pair, int64_t* pair_pos) {
  // 1. Validate and count pairs per expert.  2. Exclusive scan into offsets.
  // 3. Stable counting sort: walk the pairs in order, each takes the next free slot of its expert.
  // 4. Dropped pairs get pair_pos -1; the tail of sorted_pair past the routed pairs is -1.
  FMOE_CHECK(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  for (int64_t e = 0; e < num_experts; ++e) expert_counts[e] = 0;
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = topk_idx[p];
    FMOE_CHECK(id >= -1 && id < num_experts, "topk_idx holds expert id ", id, " at flat position ", p,
               ", outside [-1, num_experts=", num_experts, ")");
    if (id >= 0) ++expert_counts[id];
  }
  expert_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) expert_offsets[e + 1] = expert_offsets[e] + expert_counts[e];
  std::vector<int64_t> cursor(expert_offsets, expert_offsets + num_experts);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = topk_idx[p];
    if (id < 0) {
      pair_pos[p] = -1;
      continue;
    }
    const int64_t pos = cursor[id]++;
    sorted_pair[pos] = p;
    pair_pos[p] = pos;
  }
  for (int64_t r = expert_offsets[num_experts]; r < num_pairs; ++r) sorted_pair[r] = -1;
}

namespace {

template <typename T, typename S>
void permute_impl(const T* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair, int64_t num_rows, int64_t k,
                  const S* pair_scale, T* x_sorted) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t pair = sorted_pair[r];
    T* out = x_sorted + r * d;
    FMOE_CHECK(pair >= -1, "sorted_pair[", r, "] = ", pair, " is outside [-1, num_tokens*k=", num_tokens * k, ")");
    if (pair < 0) {
      for (int64_t c = 0; c < d; ++c) out[c] = from_acc<T>(acc_t<T>(0));
      continue;
    }
    FMOE_CHECK(pair < num_tokens * k, "sorted_pair[", r, "] = ", pair, " is outside [-1, num_tokens*k=", num_tokens * k,
               ")");
    const T* in = x + (pair / k) * d;
    if (pair_scale == nullptr) {
      for (int64_t c = 0; c < d; ++c) out[c] = in[c];  // pure data movement: bitwise copy
    } else {
      const acc_t<T> scale = static_cast<acc_t<T>>(to_acc(pair_scale[pair]));
      for (int64_t c = 0; c < d; ++c) out[c] = from_acc<T>(scale * to_acc(in[c]));
    }
  }
}

template <typename T, typename S>
void unpermute_combine_impl(const T* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos, int64_t num_tokens,
                            int64_t k, const S* topk_score, T* y) {
  // Per token: 1. validate its kept slots.  2. Unweighted with one kept slot: a bitwise row copy (so -0 and NaN
  // payloads survive, as data movement must).  3. Otherwise start from the first kept slot's term (not from +0,
  // which would turn a lone -0 into +0) and add the rest in slot order.  4. No kept slot: zeros.
  using A = acc_t<T>;
  std::vector<A> row(d);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t* pos = pair_pos + t * k;
    int64_t kept = 0, first = -1;
    for (int64_t j = 0; j < k; ++j) {
      FMOE_CHECK(pos[j] >= -1, "pair_pos[", t, ", ", j, "] = ", pos[j], " is outside [-1, num_rows=", num_rows, ")");
      if (pos[j] < 0) continue;
      FMOE_CHECK(pos[j] < num_rows, "pair_pos[", t, ", ", j, "] = ", pos[j], " is outside [-1, num_rows=", num_rows,
                 ")");
      if (kept++ == 0) first = j;
    }
    T* out = y + t * d;
    if (kept == 0) {
      for (int64_t c = 0; c < d; ++c) out[c] = from_acc<T>(A(0));
      continue;
    }
    if (topk_score == nullptr && kept == 1) {
      const T* in = y_sorted + pos[first] * d;
      for (int64_t c = 0; c < d; ++c) out[c] = in[c];
      continue;
    }
    for (int64_t j = first; j < k; ++j) {
      if (pos[j] < 0) continue;
      const T* in = y_sorted + pos[j] * d;
      const A weight = topk_score == nullptr ? A(1) : static_cast<A>(to_acc(topk_score[t * k + j]));
      for (int64_t c = 0; c < d; ++c) {
        const A term = topk_score == nullptr ? to_acc(in[c]) : weight * to_acc(in[c]);
        row[c] = j == first ? term : row[c] + term;
      }
    }
    for (int64_t c = 0; c < d; ++c) out[c] = from_acc<T>(row[c]);
  }
}

template <typename T, typename S>
void combine_score_grad_impl(const T* grad_y, const T* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                             int64_t num_tokens, int64_t k, S* grad_score) {
  using A = wide_acc_t<T>;  // a dot product over d: fp64 for fp32, see dtype.h
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t pos = pair_pos[t * k + j];
      A dot = 0;
      FMOE_CHECK(pos >= -1, "pair_pos[", t, ", ", j, "] = ", pos, " is outside [-1, num_rows=", num_rows, ")");
      if (pos >= 0) {
        FMOE_CHECK(pos < num_rows, "pair_pos[", t, ", ", j, "] = ", pos, " is outside [-1, num_rows=", num_rows, ")");
        for (int64_t c = 0; c < d; ++c) dot += to_acc(grad_y[t * d + c]) * to_acc(y_sorted[pos * d + c]);
      }
      grad_score[t * k + j] = from_acc<S>(static_cast<acc_t<S>>(dot));
    }
  }
}

}  // namespace

void check_plan_ref(const int64_t* sorted_pair, int64_t num_rows, const int64_t* pair_pos, int64_t num_pairs,
                    int64_t k) {
  FMOE_CHECK(num_pairs == 0 || (k >= 1 && num_pairs % k == 0), "num_pairs=", num_pairs, " is not a multiple of k=", k);
  FMOE_CHECK(num_rows >= 0 && num_rows <= num_pairs, "sorted_pair has ", num_rows, " entries but pair_pos has ",
             num_pairs);
  // 1. Pairs -> rows: each placed pair is the one its row names.
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t r = pair_pos[p];
    if (r == -1) continue;
    FMOE_CHECK(r >= 0 && r < num_rows, "pair_pos[", p / k, ", ", p % k, "] = ", r,
               " is outside [-1, num_rows=", num_rows, ")");
    FMOE_CHECK(sorted_pair[r] == p, "sorted_pair and pair_pos are not inverses: pair_pos[", p / k, ", ", p % k,
               "] = ", r, " but sorted_pair[", r, "] = ", sorted_pair[r], " (pair ", p,
               " expected); pass a plan made by make_plan");
  }
  // 2. Rows -> pairs: each named pair points back at its row (so no pair is named twice).
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t p = sorted_pair[r];
    if (p == -1) continue;
    FMOE_CHECK(p >= 0 && p < num_pairs, "sorted_pair[", r, "] = ", p, " is outside [-1, num_pairs=", num_pairs, ")");
    FMOE_CHECK(pair_pos[p] == r, "sorted_pair and pair_pos are not inverses: sorted_pair[", r, "] = ", p,
               " but pair_pos[", p / k, ", ", p % k, "] = ", pair_pos[p], "; pass a plan made by make_plan");
  }
}

void permute_ref(DType dtype, const void* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair,
                 int64_t num_rows, int64_t k, const void* pair_scale, DType scale_dtype, void* x_sorted) {
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "permute_ref", [&] {
    using value_t = scalar_t;
    FMOE_DISPATCH_FLOAT_TYPES(scale_dtype, "permute_ref", [&] {
      permute_impl(static_cast<const value_t*>(x), num_tokens, d, sorted_pair, num_rows, k,
                   static_cast<const scalar_t*>(pair_scale), static_cast<value_t*>(x_sorted));
    });
  });
}

void unpermute_combine_ref(DType dtype, const void* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                           int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype, void* y) {
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "unpermute_combine_ref", [&] {
    using value_t = scalar_t;
    FMOE_DISPATCH_FLOAT_TYPES(score_dtype, "unpermute_combine_ref", [&] {
      unpermute_combine_impl(static_cast<const value_t*>(y_sorted), num_rows, d, pair_pos, num_tokens, k,
                             static_cast<const scalar_t*>(topk_score), static_cast<value_t*>(y));
    });
  });
}

void combine_score_grad_ref(DType dtype, const void* grad_y, const void* y_sorted, int64_t num_rows, int64_t d,
                            const int64_t* pair_pos, int64_t num_tokens, int64_t k, DType score_dtype,
                            void* grad_score) {
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "combine_score_grad_ref", [&] {
    using value_t = scalar_t;
    FMOE_DISPATCH_FLOAT_TYPES(score_dtype, "combine_score_grad_ref", [&] {
      combine_score_grad_impl(static_cast<const value_t*>(grad_y), static_cast<const value_t*>(y_sorted), num_rows, d,
                              pair_pos, num_tokens, k, static_cast<scalar_t*>(grad_score));
    });
  });
}

void ep_route_ref(const int64_t* topk_idx, int64_t num_tokens, int64_t k, int64_t num_local, int64_t world,
                  int64_t* token_ranks, int64_t* dest_counts) {
  FMOE_CHECK(num_tokens >= 0 && k >= 0, "num_tokens and k must be >= 0, got ", num_tokens, " and ", k);
  FMOE_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  FMOE_CHECK(world >= 1, "world must be >= 1, got ", world);
  const int64_t num_experts = num_local * world;
  for (int64_t i = 0; i < world * (num_local + 1); ++i) dest_counts[i] = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    int64_t* row = token_ranks + t * world;
    for (int64_t p = 0; p < world; ++p) row[p] = -1;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = topk_idx[t * k + j];
      FMOE_CHECK(id >= -1 && id < num_experts, "topk_idx holds expert id ", id, " at [", t, ", ", j,
                 "], outside [-1, num_local * world=", num_experts, ")");
      if (id < 0) continue;
      const int64_t p = id / num_local;
      ++dest_counts[p * (num_local + 1) + id % num_local];
      if (row[p] < 0) {
        row[p] = p;
        ++dest_counts[p * (num_local + 1) + num_local];
      }
    }
  }
}

}  // namespace fastmoe
