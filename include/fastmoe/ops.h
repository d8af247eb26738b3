// fastmoe's registered ops, callable from C++. Each function calls the op through the dispatcher
// (torch.ops.fastmoe.<name> in Python), so C++ and Python get the same kernels and the same C++ autograd.
// docs/ops.md lists the schemas, shapes and dtypes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastmoe::ops {

// logits [T, E] -> (topk_idx [T, k] int64, topk_score [T, k] logits.dtype).
// score_fn: "topk_softmax" (softmax over the k selected logits, FastMoE's NaiveGate) or "softmax_topk"
// (softmax over all E, then top-k). Differentiable with respect to logits.
std::tuple<at::Tensor, at::Tensor> route_topk(const at::Tensor& logits, int64_t k,
                                              const std::string& score_fn = "topk_softmax");

// The routing plan of topk_idx [T, k] (-1 = dropped) over num_experts experts.
struct Plan {
  at::Tensor expert_counts;   // [E] int64
  at::Tensor expert_offsets;  // [E + 1] int64, exclusive prefix sum of expert_counts
  at::Tensor sorted_pair;     // [T * k] int64: pair ids (token * k + slot) ordered by expert, -1 at the tail
  at::Tensor pair_pos;        // [T, k] int64: row of each pair in sorted order, -1 if dropped
};
Plan make_plan(const at::Tensor& topk_idx, int64_t num_experts);

// Drops the overflow of each expert by score: of the (token, slot) pairs routed to expert e, the
// expert_capacity[e] with the highest topk_score are kept (ties: lower token*k+slot first) and the others become
// -1. topk_idx [T, k] int64 (-1 = already dropped), topk_score [T, k] float, expert_capacity [E] int64 (>= 0; a
// per-rank allowance, so expert parallelism can pass its share of a global capacity). Returns (kept_idx [T, k],
// num_dropped [] int64: pairs this call dropped). Deterministic; no host sync on CUDA. Not differentiable.
std::tuple<at::Tensor, at::Tensor> capacity_limit(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                  const at::Tensor& expert_capacity);

// The load-balancing term of the GShard, Switch and naive gates, coef * E * sum_e f_e P_e: f_e = expert_counts[e] /
// num_pairs, the share of the routed (token, slot) pairs on expert e, and P_e the mean over the T tokens of
// softmax(logits[t])_e. logits [T, E] float, expert_counts [E] int64. Returns a 0-dim tensor in the accumulation
// type of the logits (float32, or float64 for float64 logits); 1 * coef when routing and probabilities are uniform,
// 0 for T = 0. Differentiable with respect to the logits (also twice). One deterministic kernel on CUDA.
at::Tensor balance_loss(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs, double coef);
// Its gradient with respect to the logits, [T, E] in the logits' dtype, for grad, the loss's 0-dim gradient.
at::Tensor balance_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                 int64_t num_pairs, double coef);

// SwiGLU of a gated expert: h [..., 2 * hidden] holds [gate | up] -> silu(gate) * up, [..., hidden], in h's dtype
// (computed in fp32, fp64 for fp64, and rounded once). Differentiable (also twice); its backward recomputes the
// sigmoid from h, so only h is saved. One elementwise kernel each way on CUDA. With scale (h's leading shape
// [...], any float dtype, h's device) each row is multiplied by its scale before the rounding: an MoE layer applies
// its routing scores there (TokenDispatch::row_scores) instead of in the combine, which then no longer reads the
// experts' output in its backward. Differentiable with respect to the scale too.
at::Tensor swiglu(const at::Tensor& h, const std::optional<at::Tensor>& scale = std::nullopt);
// Its gradient with respect to h, [..., 2 * hidden], for grad [..., hidden] (no scale).
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& h);
// The gradients of swiglu(h, scale): (grad_h [..., 2 * hidden] in h's dtype, grad_scale [...] in the scale's dtype,
// each row's sum of grad * silu(gate) * up in the accumulation type). One kernel on CUDA.
std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward(const at::Tensor& grad, const at::Tensor& h,
                                                          const at::Tensor& scale);

// GELU's gradient (erf form) for grad and h [N, hidden], h an expert layer's first GEMM output with its rows grouped by
// expert_offsets [E + 1], and that GEMM's bias gradient: (grad_h [N, hidden] = gelu_backward(grad, h), grad_bias
// [E, hidden], expert e's column sums of grad_h). On CUDA one kernel, which sums grad_h as it writes it instead of
// reading it back: grad_h has the bits of torch's gelu_backward and grad_bias those of grouped_linear's bias
// gradient from grad_h. On the CPU the reference (csrc/ref/expert_ref.h). Not differentiable.
std::tuple<at::Tensor, at::Tensor> gelu_backward_bias(const at::Tensor& grad, const at::Tensor& h,
                                                      const at::Tensor& expert_offsets);

// x [T, d] -> x_sorted [T * k, d]; row r holds x[sorted_pair[r] / k], zero where sorted_pair[r] == -1.
at::Tensor permute(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos);

// y_sorted [T * k, d] -> y [T, d] = sum_j topk_score[t, j] * y_sorted[pair_pos[t, j]] (dropped slots add
// nothing; weights of 1 when topk_score is empty). Differentiable with respect to y_sorted and topk_score.
at::Tensor unpermute_combine(const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                             const std::optional<at::Tensor>& topk_score);

// x [N, in] with expert_offsets [E + 1], weight [E, out, in], bias [E, out] -> [N, out]; rows past
// expert_offsets[E] are zero. Differentiable with respect to x, weight and bias.
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias);

// ---- the training layer in one op

// What moe_ffn returns: y [T, d_out]; the gate's balance_loss and z_loss as naive_gate returns them (0-dim, or [0]
// where the coefficient is 0); expert_counts [E] int64 (the rows each expert got, not differentiable).
struct MoEFFN {
  at::Tensor y;
  at::Tensor balance_loss;
  at::Tensor z_loss;
  at::Tensor expert_counts;
};

// The single-process MoE FFN layer with FastMoE's NaiveGate: logits = x gate_weight^T + gate_bias, naive_gate(logits,
// top_k, balance_coef, z_loss_coef), then each token's k rows through act(x w1[e]^T + b1[e]) w2[e]^T + b2[e], weighted
// by the scores and summed. x [T, d], gate_weight [E, d], w1 [E, h1, d] (h1 = 2 * hidden for "swiglu": [gate | up]),
// w2 [E, d_out, hidden]; activation "gelu", "relu", "silu" or "swiglu". The same values as composing the ops
// (naive_gate, make_plan, permute, grouped_linear, unpermute_combine) bit for bit, as one autograd node; follows
// autocast like the composed layer. Differentiable to any order with respect to x, the weights and the biases.
// The activation between the GEMMs (T * k * hidden values) is kept for the backward, and freed there once the second
// GEMM's backward has read it; recompute_activation = true recomputes it there instead (one more elementwise pass;
// an activation under 32 MiB is kept all the same), so that it is not held between the forward and the backward.
MoEFFN moe_ffn(const at::Tensor& x, const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
               const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, int64_t top_k, const std::string& activation = "gelu",
               double balance_coef = 0.0, double z_loss_coef = 0.0, bool recompute_activation = false);

// ---- expert parallelism (the ranks of the torch.distributed process group named group_name)

// Where this rank's tokens go over W ranks of num_local experts (global expert g on rank g / num_local):
// topk_idx [T, k] -> (token_ranks [T, W] int64: p when one of the token's slots goes to rank p, else -1;
// dest_counts [W * (num_local + 1)] int64: per rank p, the slots for each of its local experts, then the number of
// tokens sent to p). Deterministic, no host sync. Not differentiable.
std::tuple<at::Tensor, at::Tensor> ep_route(const at::Tensor& topk_idx, int64_t num_local, int64_t world);

// counts [W * E_local] int64, the rows this rank sends to each global expert -> [W * E_local]: entry
// s * E_local + e is the number of rows rank s sends to this rank's local expert e. A collective. row_dtype,
// row_width and chunks (how many chunks the counts describe) say what the row exchanges after it will move: ranks
// that disagree on them raise on every rank instead of exchanging rows of different sizes.
at::Tensor exchange_counts(const at::Tensor& counts, const std::string& group_name,
                           std::optional<at::ScalarType> row_dtype = std::nullopt,
                           std::optional<int64_t> row_width = std::nullopt,
                           std::optional<int64_t> chunks = std::nullopt);

// All-to-all of rows: rows [0, sum(send_splits)) of x [N, d] go out in order, send_splits[p] to rank p; the
// result stacks recv_splits[p] rows from each rank p in rank order, then zero rows up to out_rows (default
// sum(recv_splits)). A collective; every rank's splits must mirror its peers'. Differentiable with respect to x
// (the backward is the reverse exchange).
at::Tensor exchange(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                    const std::vector<int64_t>& recv_splits, const std::string& group_name,
                    std::optional<int64_t> out_rows = std::nullopt);

// exchange in two levels for W = N * L ranks on N nodes of L ranks, rank r = node * L + local (docs/distributed.md,
// "Hierarchical exchange"): node_group holds this node's L ranks (this rank at `local`), rail_group the N ranks of
// this local index (this rank at `node`). Rows first move within the node to the rank on their destination's rail,
// then across nodes over the rail. The result equals exchange(x, send_splits, recv_splits, group_name, out_rows)
// bit for bit. A collective over both groups. Differentiable with respect to x (the backward is the reverse
// exchange, hierarchical too).
// peer_counts [2, L, N] int64 on the CPU: what node peer j sends through this rank to node m, in this exchange ([0])
// and in its reverse ([1]); without them each exchange (and its backward) asks the node peers.
at::Tensor exchange_hierarchical(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                                 const std::vector<int64_t>& recv_splits, const std::string& group_name,
                                 const std::string& node_group, const std::string& rail_group,
                                 std::optional<int64_t> out_rows = std::nullopt,
                                 const std::optional<at::Tensor>& peer_counts = std::nullopt);

// Hot-expert replication (docs/distributed.md): the weights of the experts `experts` (ascending global ids, expert
// g owned by rank g / num_local of group_name, as row g % num_local of its weight [num_local, ...]) on every rank,
// stacked in that order: [experts.size(), ...]. A collective (a binomial-tree broadcast: ceil(log2 W) exchanges; "" =
// one process, where it is an index_select). Differentiable: each copy's gradient is summed back into its owner's
// weight.
at::Tensor replicate_experts(const at::Tensor& weight, const std::vector<int64_t>& experts, int64_t num_local,
                             const std::string& group_name);

// ---- gates: each gate's routing and loss terms from its logits (docs/gates.md has the formulas)

// What a gate op returns. balance_loss and z_loss are 0-dim (at least fp32, coefficients applied, with gradients
// into the logits), or [0] where the gate records no such term; num_dropped is [] int64 on the device, or [0] for a
// gate that never drops. expert_bias_update is sigmoid_gate's alone (undefined for the others).
struct GateRouting {
  at::Tensor topk_idx;    // [T, k] int64, -1 = empty slot
  at::Tensor topk_score;  // [T, k] in the logits' dtype, 0 in an empty slot
  at::Tensor balance_loss;
  at::Tensor z_loss;
  at::Tensor num_dropped;
  at::Tensor expert_bias_update;
};

// FastMoE's NaiveGate: top-k logits, softmax over those k; Switch's balance term over every slot when
// balance_coef > 0; ST-MoE's z-loss when z_loss_coef > 0.
GateRouting naive_gate(const at::Tensor& logits, int64_t k, double balance_coef = 0.0, double z_loss_coef = 0.0);
// Noisy top-k gating (Shazeer et al. 2017); noise_logits [T, E] (x w_noise) given means training: noise from
// randn_like(clean_logits) and the smooth load estimator.
GateRouting noisy_gate(const at::Tensor& clean_logits, const std::optional<at::Tensor>& noise_logits, int64_t k,
                       double noise_epsilon = 1e-2, double w_importance = 1.0, double w_load = 1.0,
                       double z_loss_coef = 0.0);
// GShard's top-2 gate: random routing (training && random_routing, one torch::rand(T)) and capacity (no limit for
// std::nullopt).
GateRouting gshard_gate(const at::Tensor& logits, bool training, std::optional<double> capacity_factor,
                        bool random_routing = true, double aux_loss_coef = 1.0, double z_loss_coef = 0.0);
// The Switch Transformer's top-1 gate on the logits of the (jittered) router input.
GateRouting switch_gate(const at::Tensor& logits, std::optional<double> capacity_factor, double aux_loss_coef = 1e-2,
                        double z_loss_coef = 0.0);
// x * U[1 - eps, 1 + eps] (one uniform_ draw of x's shape): the Switch router's input in training.
at::Tensor switch_jitter(const at::Tensor& x, double eps);
// The balanced assignment of SwipeGate in training, top-k with softmax over the k in eval.
GateRouting swipe_gate(const at::Tensor& logits, int64_t k, bool training, double z_loss_coef = 0.0);
// Expert-choice routing: each expert takes min(T, ceil(capacity_factor * T * k / E)) tokens; slots_per_token slots.
GateRouting expert_choice_gate(const at::Tensor& logits, int64_t k, double capacity_factor, int64_t slots_per_token,
                               double z_loss_coef = 0.0);
// DeepSeek-V3's gate. expert_bias [E] steers the selection only; in training with bias_update_rate > 0,
// expert_bias_update [E] fp32 is the update to add to it (else [0]).
GateRouting sigmoid_gate(const at::Tensor& logits, const at::Tensor& expert_bias, int64_t k, int64_t n_groups = 1,
                         int64_t topk_groups = 1, bool normalize = true, double routed_scaling_factor = 1.0,
                         double aux_loss_coef = 0.0, bool training = false, double bias_update_rate = 0.0);
// Capacity ceil(capacity_factor * T * k / E) per expert through capacity_limit, empty slots' scores zeroed; T counts
// group_idx's rows when given (an expert-parallel group's routing, topk_idx at rows [group_offset, group_offset + T)).
// Returns (kept_idx [T, k], kept_score [T, k], num_dropped [] int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_capacity(
    const at::Tensor& topk_idx, const at::Tensor& topk_score, std::optional<double> capacity_factor,
    int64_t num_experts, const std::optional<at::Tensor>& group_idx = std::nullopt,
    const std::optional<at::Tensor>& group_score = std::nullopt, int64_t group_offset = 0);

}  // namespace fastmoe::ops
