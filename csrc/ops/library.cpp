// The fastmoe op library: every schema in one place (docs/ops.md mirrors this list). Kernels are registered
// per stage (routing.cpp, dispatch.cpp, expert.cpp, balance.cpp, exchange.cpp) for CPU and Meta, and autograd in
// ops/autograd/.
//
// Contract: output sizes are functions of the arguments' sizes and int arguments only, never of tensor data,
// so every op works under torch.compile (Meta kernels) and inside CUDA graphs.
#include <torch/library.h>

TORCH_LIBRARY(fastmoe, m) {
  // Routing: logits [T, E] -> top-k ids [T, k] int64 and scores [T, k].
  m.def("route_topk(Tensor logits, int k, str score_fn=\"topk_softmax\") -> (Tensor topk_idx, Tensor topk_score)");
  m.def(
      "route_topk_backward(Tensor grad_score, Tensor logits, Tensor topk_idx, Tensor topk_score, "
      "str score_fn) -> Tensor");

  // Plan: topk_idx [T, k] -> counts [E], offsets [E+1], sorted_pair [T*k], pair_pos [T, k].
  m.def(
      "make_plan(Tensor topk_idx, int num_experts) -> "
      "(Tensor expert_counts, Tensor expert_offsets, Tensor sorted_pair, Tensor pair_pos)");

  // Permute x [T, d] -> [T*k, d] in plan order; combine back with weights -> [T, d].
  m.def("permute(Tensor x, Tensor sorted_pair, Tensor pair_pos) -> Tensor");
  m.def("unpermute_combine(Tensor y_sorted, Tensor sorted_pair, Tensor pair_pos, Tensor? topk_score) -> Tensor");
  m.def(
      "unpermute_combine_backward(Tensor grad_y, Tensor y_sorted, Tensor sorted_pair, Tensor pair_pos, "
      "Tensor? topk_score, bool need_score_grad) -> (Tensor grad_y_sorted, Tensor grad_score)");

  // Capacity: keep at most expert_capacity[e] assignments per expert, the highest-scored; the rest become -1.
  m.def(
      "capacity_limit(Tensor topk_idx, Tensor topk_score, Tensor expert_capacity) -> "
      "(Tensor kept_idx, Tensor num_dropped)");

  // Balance term of the gates: coef * E * sum_e f_e P_e from logits [T, E] and the per-expert counts [E] int64 of
  // num_pairs routed pairs -> a 0-dim loss (float32, float64 for float64 logits); and its gradient for the logits.
  m.def("balance_loss(Tensor logits, Tensor expert_counts, int num_pairs, float coef) -> Tensor");
  m.def(
      "balance_loss_backward(Tensor grad, Tensor logits, Tensor expert_counts, int num_pairs, float coef) -> "
      "Tensor");

  // Grouped linear: x [N, in], offsets [E+1], weight [E, out, in], bias [E, out] -> [N, out].
  m.def("grouped_linear(Tensor x, Tensor expert_offsets, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "grouped_linear_backward(Tensor grad_y, Tensor x, Tensor expert_offsets, Tensor weight, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // SwiGLU of gated experts: h [..., 2 * hidden] = [gate | up] -> silu(gate) * up [..., hidden]; and its gradient.
  m.def("swiglu(Tensor h, Tensor? scale=None) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("swiglu_scaled_backward(Tensor grad, Tensor h, Tensor scale) -> (Tensor, Tensor)");
  // GELU's gradient for grad, h [N, hidden] (the first GEMM's output, rows grouped by expert_offsets [E+1]), with
  // that GEMM's bias gradient [E, hidden] summed in the same pass: (grad_h, grad_bias).
  m.def("gelu_backward_bias(Tensor grad, Tensor h, Tensor expert_offsets) -> (Tensor grad_h, Tensor grad_bias)");

  // The single-process MoE FFN layer with NaiveGate as one op (include/fastmoe/ops.h): x [T, d], gate_weight [E, d],
  // w1 [E, h1, d], w2 [E, d_out, h] -> y [T, d_out], the gate's balance_loss and z_loss, expert_counts [E].
  // recompute_activation: the backward recomputes the activation between the GEMMs instead of keeping it.
  m.def(
      "moe_ffn(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "int top_k, str activation=\"gelu\", float balance_coef=0.0, float z_loss_coef=0.0, "
      "bool recompute_activation=False) -> (Tensor y, "
      "Tensor balance_loss, Tensor z_loss, Tensor expert_counts)");

  // Expert parallelism over the ranks of the process group named group_name (torch's group_name).
  // counts [W * E_local] int64 (rows this rank sends to each global expert) -> [W * E_local]: row s * E_local + e
  // holds what rank s sends to this rank's local expert e. row_dtype, row_width and chunks describe the row
  // exchanges that follow; ranks that disagree on them raise (csrc/runtime/communicator.h).
  m.def(
      "exchange_counts(Tensor counts, str group_name, ScalarType? row_dtype=None, int? row_width=None, "
      "int? chunks=None) -> Tensor");
  // Where a rank's tokens go: topk_idx [T, k] global ids -> token_ranks [T, W] (rank p once if a slot goes to p,
  // else -1) and dest_counts [W * (E_local + 1)] (per rank p: slots per local expert, then token rows).
  m.def("ep_route(Tensor topk_idx, int num_local, int world) -> (Tensor token_ranks, Tensor dest_counts)");
  // Rows [0, sum(send_splits)) of x go out, send_splits[p] of them to rank p, in order; recv_splits[p] rows come
  // in from rank p, stacked in rank order, then zero rows up to out_rows (default sum(recv_splits)). Its
  // backward is the same exchange with the splits swapped.
  m.def("exchange(Tensor x, int[] send_splits, int[] recv_splits, str group_name, int? out_rows=None) -> Tensor");
  // The same exchange in two levels over nodes of node_group's size (rank = node * L + local): within the node to
  // the rank on the destination's rail, then across nodes over rail_group. Bit for bit the result of exchange.
  // peer_counts [2, L, N] int64 on the CPU, when the caller knows them: [0][j, m] the rows node peer j sends through
  // this rank to node m in this exchange, [1] the same for the reverse one (the backward); without them each
  // exchange asks its node peers (a small collective over node_group).
  m.def(
      "exchange_hierarchical(Tensor x, int[] send_splits, int[] recv_splits, str group_name, str node_group, "
      "str rail_group, int? out_rows=None, Tensor? peer_counts=None) -> Tensor");
  // Hot-expert replication (docs/distributed.md): weight [num_local, ...] -> the weights of the global experts
  // `experts` (ascending) on every rank, [len(experts), ...], each from its owner (rank id // num_local of the
  // group; "" = one process). A collective; the backward sums each copy's gradient back into the owner's weight.
  m.def("replicate_experts(Tensor weight, int[] experts, int num_local, str group_name) -> Tensor");
  // The replication policy (csrc/ref/replication.h) on load [W, W * num_local] (slots per source rank and global
  // expert) with its three costs in seconds: the experts to copy, ascending.
  m.def(
      "plan_replication(Tensor load, int num_local, float slot_cost, float row_cost, float expert_cost, "
      "int max_experts) -> int[]");
  // Raises ValueError on every rank of the group when the configuration (values named by names) differs between
  // ranks, naming each difference (csrc/runtime/communicator.h). A collective, bounded by FASTMOE_COMM_TIMEOUT.
  m.def("check_same_config(str group_name, str[] names, str[] values, str what) -> ()");
  // Debug mode's check (include/fastmoe/token_dispatch.h): raises when t holds NaN or Inf, naming owner and what.
  m.def("check_finite(Tensor t, str owner, str what) -> ()");

  // Gates: each gate's routing and loss terms from its logits [T, E] (csrc/ops/gates.cpp, docs/gates.md). They
  // return (topk_idx [T, k] int64, -1 = empty slot; topk_score [T, k]; balance_loss, z_loss: 0-dim, or [0] where the
  // gate records no such term; num_dropped: [] int64, or [0] for a gate that never drops). Composites of route_topk,
  // capacity_limit and ATen ops; random draws use the default generator.
  m.def(
      "naive_gate(Tensor logits, int k, float balance_coef=0.0, float z_loss_coef=0.0) -> (Tensor topk_idx, "
      "Tensor topk_score, Tensor balance_loss, Tensor z_loss, Tensor num_dropped)");
  // Noise (and the smooth load estimator) when noise_logits, the pre-softplus noise scale [T, E], is given.
  m.def(
      "noisy_gate(Tensor clean_logits, Tensor? noise_logits, int k, float noise_epsilon=0.01, float w_importance=1.0, "
      "float w_load=1.0, float z_loss_coef=0.0) -> (Tensor topk_idx, Tensor topk_score, Tensor balance_loss, "
      "Tensor z_loss, Tensor num_dropped)");
  m.def(
      "gshard_gate(Tensor logits, bool training, float? capacity_factor=None, bool random_routing=True, "
      "float aux_loss_coef=1.0, float z_loss_coef=0.0) -> (Tensor topk_idx, Tensor topk_score, Tensor balance_loss, "
      "Tensor z_loss, Tensor num_dropped)");
  m.def(
      "switch_gate(Tensor logits, float? capacity_factor=None, float aux_loss_coef=0.01, float z_loss_coef=0.0) -> "
      "(Tensor topk_idx, Tensor topk_score, Tensor balance_loss, Tensor z_loss, Tensor num_dropped)");
  // The Switch Transformer's router input in training: x * U[1 - eps, 1 + eps], one draw per element.
  m.def("switch_jitter(Tensor x, float eps) -> Tensor");
  m.def(
      "swipe_gate(Tensor logits, int k, bool training, float z_loss_coef=0.0) -> (Tensor topk_idx, "
      "Tensor topk_score, Tensor balance_loss, Tensor z_loss, Tensor num_dropped)");
  m.def(
      "expert_choice_gate(Tensor logits, int k, float capacity_factor, int slots_per_token, float z_loss_coef=0.0) "
      "-> (Tensor topk_idx, Tensor topk_score, Tensor balance_loss, Tensor z_loss, Tensor num_dropped)");
  // expert_bias_update [E] fp32 (training with bias_update_rate > 0, else [0]) is for the caller to add to its bias.
  m.def(
      "sigmoid_gate(Tensor logits, Tensor expert_bias, int k, int n_groups=1, int topk_groups=1, bool normalize=True, "
      "float routed_scaling_factor=1.0, float aux_loss_coef=0.0, bool training=False, float bias_update_rate=0.0) -> "
      "(Tensor topk_idx, Tensor topk_score, Tensor balance_loss, Tensor z_loss, Tensor num_dropped, "
      "Tensor expert_bias_update)");
  // Capacity ceil(capacity_factor * T * k / E) per expert, the highest-scored kept; T counts group_idx's rows when
  // given (the expert-parallel group's routing, with topk_idx at rows [group_offset, group_offset + T)).
  m.def(
      "gate_capacity(Tensor topk_idx, Tensor topk_score, float? capacity_factor, int num_experts, "
      "Tensor? group_idx=None, Tensor? group_score=None, int group_offset=0) -> (Tensor kept_idx, Tensor kept_score, "
      "Tensor num_dropped)");
}
