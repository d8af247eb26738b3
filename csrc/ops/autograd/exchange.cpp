// Autograd of the expert-parallel row exchanges, flat (exchange) and hierarchical (exchange_hierarchical): one
// Function for both. The backward is the same exchange with the splits swapped, back to the input's row count: it
// moves rows without arithmetic, so the gradient rows arrive bit for bit.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "runtime/communicator.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// groups: {group_name} for the flat exchange, {group_name, node_group, rail_group} for the hierarchical one, with
// its node peers' counts when known ([2, L, N]: this direction, then the reverse).
at::Tensor move_rows(const at::Tensor& x, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                     const std::vector<std::string>& groups, std::optional<int64_t> out_rows,
                     const std::optional<at::Tensor>& peer_counts) {
  if (groups.size() == 1) return ops::exchange(x, send, recv, groups[0], out_rows);
  return ops::exchange_hierarchical(x, send, recv, groups[0], groups[1], groups[2], out_rows, peer_counts);
}

class RowExchangeFunction : public torch::autograd::Function<RowExchangeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IntArrayRef send_splits,
                            c10::IntArrayRef recv_splits, std::vector<std::string> groups,
                            std::optional<int64_t> out_rows, const std::optional<at::Tensor>& peer_counts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["send"] = send_splits.vec();
    ctx->saved_data["recv"] = recv_splits.vec();
    ctx->saved_data["rows"] = x.size(0);
    // the backward is the reverse exchange: the reverse's counts first
    if (peer_counts) ctx->saved_data["peer_counts"] = peer_counts->flip(0);
    at::Tensor y = move_rows(x, send_splits.vec(), recv_splits.vec(), groups, out_rows, peer_counts);
    ctx->saved_data["groups"] = std::move(groups);
    ctx->saved_data["out_like"] = at::empty({0, y.size(1)}, y.options());
    ctx->saved_data["out_rows"] = y.size(0);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Every rank must join the reverse exchange, so an undefined gradient is sent as zeros.
    at::Tensor grad = grads[0];
    if (!grad.defined()) {
      const at::Tensor like = ctx->saved_data["out_like"].toTensor();
      grad = at::zeros({ctx->saved_data["out_rows"].toInt(), like.size(1)}, like.options());
    }
    std::vector<std::string> groups;
    for (const c10::IValue& name : ctx->saved_data["groups"].toList()) groups.push_back(name.toStringRef());
    // Marked as a backward exchange, so a peer still in a forward (it skipped this backward) raises on both ranks.
    const runtime::ExchangePhaseGuard phase(runtime::ExchangePhase::kBackwardRows);
    std::optional<at::Tensor> peer_counts;
    if (ctx->saved_data.count("peer_counts")) peer_counts = ctx->saved_data["peer_counts"].toTensor();
    at::Tensor dx =
        move_rows(grad.contiguous(), ctx->saved_data["recv"].toIntVector(), ctx->saved_data["send"].toIntVector(),
                  groups, ctx->saved_data["rows"].toInt(), peer_counts);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor exchange_autograd(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                             c10::string_view group_name, std::optional<int64_t> out_rows) {
  return RowExchangeFunction::apply(x, send_splits, recv_splits, std::vector<std::string>{std::string(group_name)},
                                    out_rows, std::nullopt);
}

at::Tensor exchange_hierarchical_autograd(const at::Tensor& x, c10::IntArrayRef send_splits,
                                          c10::IntArrayRef recv_splits, c10::string_view group_name,
                                          c10::string_view node_group, c10::string_view rail_group,
                                          std::optional<int64_t> out_rows,
                                          const std::optional<at::Tensor>& peer_counts) {
  return RowExchangeFunction::apply(
      x, send_splits, recv_splits,
      std::vector<std::string>{std::string(group_name), std::string(node_group), std::string(rail_group)}, out_rows,
      peer_counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("exchange", &exchange_autograd);
  m.impl("exchange_hierarchical", &exchange_hierarchical_autograd);
}

}  // namespace fastmoe
