// Expert-parallel exchange: CPU (the group's gloo backend), CUDA (fastmoe's NCCL communicator, see
// csrc/runtime/communicator.h) and Meta kernels of exchange_counts, exchange and exchange_hierarchical (their
// autograd is in autograd/exchange.cpp). All are collectives over the ranks of the process group named group_name;
// every rank must call them in the same order, which the headers that travel ahead of them check
// (csrc/runtime/communicator.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <numeric>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "runtime/communicator.h"

namespace fastmoe {
namespace {

using namespace ops_detail;

// ------------------------------------------------------------------------------------------------ exchange_counts

void check_exchange_counts(const at::Tensor& counts, std::optional<int64_t> row_width, std::optional<int64_t> chunks) {
  check_int64(counts, "counts");
  check_dim(counts, 1, "counts", "[world_size * num_local_experts]");
  TORCH_CHECK(!row_width.has_value() || *row_width >= 0, "row_width must be >= 0, got ", *row_width);
  TORCH_CHECK(!chunks.has_value() || *chunks >= 1, "chunks must be >= 1, got ", *chunks);
}

at::Tensor exchange_counts_meta(const at::Tensor& counts, c10::string_view group_name,
                                std::optional<at::ScalarType> row_dtype, std::optional<int64_t> row_width,
                                std::optional<int64_t> chunks) {
  check_exchange_counts(counts, row_width, chunks);
  return at::empty_like(counts, at::MemoryFormat::Contiguous);
}

// The counts exchange of a forward. row_dtype, row_width and chunks say what the row exchanges after it will move;
// they travel in the exchange's header with the counts (csrc/runtime/communicator.h), so ranks whose layers
// disagree on them raise here, on every rank, before a row of a different size is sent.
at::Tensor exchange_counts_kernel(const at::Tensor& counts, c10::string_view group_name,
                                  std::optional<at::ScalarType> row_dtype, std::optional<int64_t> row_width,
                                  std::optional<int64_t> chunks) {
  check_exchange_counts(counts, row_width, chunks);
  const std::string group(group_name);
  const int64_t world = runtime::group_size(group);
  TORCH_CHECK(counts.size(0) >= world && counts.size(0) % world == 0, "counts has ", counts.size(0),
              " entries, which is not world_size=", world, " (the size of group '", group,
              "') times a local expert count");
  TORCH_CHECK(!chunks.has_value() || (counts.size(0) / world) % *chunks == 0, "counts has ", counts.size(0) / world,
              " entries per rank, which is not a multiple of chunks=", chunks.value_or(1));
  const c10::OptionalDeviceGuard guard(counts.device());
  const at::Tensor in = counts.contiguous().view({world, -1});
  at::Tensor out = at::empty_like(in);
  runtime::RowsInfo rows;
  rows.dtype = row_dtype.has_value() ? static_cast<int64_t>(*row_dtype) : -1;
  rows.width = row_width.value_or(-1);
  rows.chunks = chunks.value_or(-1);
  runtime::all_to_all_counts(in, out, rows, group);
  return out.view({-1});
}

// ------------------------------------------------------------------------------------------------ exchange

int64_t checked_sum(c10::IntArrayRef splits, const char* name) {
  int64_t total = 0;
  for (size_t p = 0; p < splits.size(); ++p) {
    TORCH_CHECK(splits[p] >= 0, name, "[", p, "] = ", splits[p], " is negative; ", name, " = ", splits);
    TORCH_CHECK(splits[p] <= std::numeric_limits<int64_t>::max() - total, name, " sums past 2^63 - 1 rows; ", name,
                " = ", splits);
    total += splits[p];
  }
  return total;
}

// Returns the number of output rows.
int64_t check_exchange(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                       std::optional<int64_t> out_rows) {
  check_defined(x, "x");
  TORCH_CHECK(is_supported_float(x.scalar_type()) || x.scalar_type() == at::kLong,
              "x must be float32, float64, float16, bfloat16 or int64, got ", x.scalar_type());
  check_dim(x, 2, "x", "[num_rows, d]");
  TORCH_CHECK(send_splits.size() == recv_splits.size() && !send_splits.empty(),
              "send_splits and recv_splits must have one entry per rank, got ", send_splits.size(), " and ",
              recv_splits.size());
  const int64_t sent = checked_sum(send_splits, "send_splits");
  const int64_t received = checked_sum(recv_splits, "recv_splits");
  TORCH_CHECK(x.sym_size(0) >= sent, "send_splits sum to ", sent, " rows but x has only ", x.sym_size(0),
              " (send_splits = ", send_splits, ")");
  if (out_rows.has_value()) {
    TORCH_CHECK(*out_rows >= received, "out_rows = ", *out_rows, " is smaller than the ", received,
                " rows recv_splits bring in (recv_splits = ", recv_splits, ")");
    return *out_rows;
  }
  return received;
}

at::Tensor exchange_meta(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                         c10::string_view group_name, std::optional<int64_t> out_rows) {
  const int64_t rows = check_exchange(x, send_splits, recv_splits, out_rows);
  return x.new_empty_symint({c10::SymInt(rows), x.sym_size(1)});
}

// What both exchanges share: rows [0, sum(send_splits)) of x go out, sum(recv_splits) rows come in through
// all_to_all(in, out), and the output is padded with zero rows up to `rows`.
template <typename AllToAll>
at::Tensor exchange_frame(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits, int64_t rows,
                          AllToAll&& all_to_all) {
  const int64_t sent = std::accumulate(send_splits.begin(), send_splits.end(), int64_t{0});
  const int64_t received = std::accumulate(recv_splits.begin(), recv_splits.end(), int64_t{0});
  const c10::OptionalDeviceGuard guard(x.device());
  const at::Tensor in = x.narrow(0, 0, sent).contiguous();
  at::Tensor out = at::empty({rows, x.size(1)}, x.options());
  if (rows > received) out.narrow(0, received, rows - received).zero_();
  all_to_all(in, out.narrow(0, 0, received));
  return out;
}

at::Tensor exchange_kernel(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                           c10::string_view group_name, std::optional<int64_t> out_rows) {
  const int64_t rows = check_exchange(x, send_splits, recv_splits, out_rows);
  const std::string group(group_name);
  const int64_t world = runtime::group_size(group);
  TORCH_CHECK(static_cast<int64_t>(send_splits.size()) == world, "send_splits and recv_splits must have one entry ",
              "per rank of group '", group, "' (world_size=", world, "), got ", send_splits.size());
  return exchange_frame(x, send_splits, recv_splits, rows, [&](const at::Tensor& in, const at::Tensor& out) {
    runtime::all_to_all_rows(in, out, send_splits.vec(), recv_splits.vec(), group);
  });
}

// ------------------------------------------------------------------------------------------------
// exchange_hierarchical

// The ranks of group_name laid out as nodes of node_group's size: rank r = node * L + local, with this rank at
// `local` in node_group and at `node` in rail_group.
void check_hierarchy(const std::string& group, const std::string& node_group, const std::string& rail_group,
                     int64_t splits) {
  TORCH_CHECK(!node_group.empty() && !rail_group.empty(), "exchange_hierarchical needs node_group and rail_group, ",
              "got node_group='", node_group, "' and rail_group='", rail_group, "'");
  const int64_t world = runtime::group_size(group), rank = runtime::group_rank(group);
  const int64_t local_size = runtime::group_size(node_group), nodes = runtime::group_size(rail_group);
  TORCH_CHECK(splits == world, "send_splits and recv_splits must have one entry per rank of group '", group,
              "' (world_size=", world, "), got ", splits);
  TORCH_CHECK(local_size * nodes == world, "node_group '", node_group, "' has ", local_size, " ranks and rail_group '",
              rail_group, "' ", nodes, ", but their product must be the ", world, " ranks of group '", group, "'");
  const int64_t local = runtime::group_rank(node_group), node = runtime::group_rank(rail_group);
  TORCH_CHECK(rank == node * local_size + local, "rank ", rank, " of group '", group, "' is rank ", local,
              " of node_group '", node_group, "' and rank ", node, " of rail_group '", rail_group,
              "', but the hierarchical exchange needs rank = node * ", local_size,
              " + local = ", node * local_size + local);
}

// peer_counts, when given: [2, L, N] int64 on the CPU (see library.cpp).
void check_peer_counts(const std::optional<at::Tensor>& peer_counts) {
  if (!peer_counts) return;
  const at::Tensor& p = *peer_counts;
  TORCH_CHECK(p.dim() == 3 && p.size(0) == 2 && p.scalar_type() == at::kLong && p.device().is_cpu(),
              "peer_counts must be [2, node peers, nodes] int64 on the CPU, got ", p.sizes(), " ", p.scalar_type(),
              " on ", p.device());
}

at::Tensor exchange_hierarchical_meta(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                                      c10::string_view group_name, c10::string_view node_group,
                                      c10::string_view rail_group, std::optional<int64_t> out_rows,
                                      const std::optional<at::Tensor>& peer_counts) {
  check_peer_counts(peer_counts);
  const int64_t rows = check_exchange(x, send_splits, recv_splits, out_rows);
  return x.new_empty_symint({c10::SymInt(rows), x.sym_size(1)});
}

at::Tensor exchange_hierarchical_kernel(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                                        c10::string_view group_name, c10::string_view node_group,
                                        c10::string_view rail_group, std::optional<int64_t> out_rows,
                                        const std::optional<at::Tensor>& peer_counts) {
  const int64_t rows = check_exchange(x, send_splits, recv_splits, out_rows);
  check_peer_counts(peer_counts);
  const std::string group(group_name), node(node_group), rail(rail_group);
  check_hierarchy(group, node, rail, static_cast<int64_t>(send_splits.size()));
  const at::Tensor theirs = peer_counts ? peer_counts->select(0, 0) : at::Tensor();
  return exchange_frame(x, send_splits, recv_splits, rows, [&](const at::Tensor& in, const at::Tensor& out) {
    runtime::all_to_all_rows_hierarchical(in, out, send_splits.vec(), recv_splits.vec(), node, rail, theirs);
  });
}

}  // namespace

namespace ops {

at::Tensor exchange_counts(const at::Tensor& counts, const std::string& group_name,
                           std::optional<at::ScalarType> row_dtype, std::optional<int64_t> row_width,
                           std::optional<int64_t> chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::exchange_counts", "")
                       .typed<at::Tensor(const at::Tensor&, c10::string_view, std::optional<at::ScalarType>,
                                         std::optional<int64_t>, std::optional<int64_t>)>();
  return op.call(counts, group_name, row_dtype, row_width, chunks);
}

at::Tensor exchange(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                    const std::vector<int64_t>& recv_splits, const std::string& group_name,
                    std::optional<int64_t> out_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::exchange", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::string_view,
                                         std::optional<int64_t>)>();
  return op.call(x, send_splits, recv_splits, group_name, out_rows);
}

at::Tensor exchange_hierarchical(const at::Tensor& x, const std::vector<int64_t>& send_splits,
                                 const std::vector<int64_t>& recv_splits, const std::string& group_name,
                                 const std::string& node_group, const std::string& rail_group,
                                 std::optional<int64_t> out_rows, const std::optional<at::Tensor>& peer_counts) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::exchange_hierarchical", "")
          .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::string_view, c10::string_view,
                            c10::string_view, std::optional<int64_t>, const std::optional<at::Tensor>&)>();
  return op.call(x, send_splits, recv_splits, group_name, node_group, rail_group, out_rows, peer_counts);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("exchange_counts", &exchange_counts_kernel);
  m.impl("exchange", &exchange_kernel);
  m.impl("exchange_hierarchical", &exchange_hierarchical_kernel);
}

#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("exchange_counts", &exchange_counts_kernel);
  m.impl("exchange", &exchange_kernel);
  m.impl("exchange_hierarchical", &exchange_hierarchical_kernel);
}
#endif

// No tensor arguments: one kernel for every backend.
TORCH_LIBRARY_IMPL(fastmoe, CompositeImplicitAutograd, m) {
  m.impl("check_same_config", [](c10::string_view group_name, const std::vector<std::string>& names,
                                 const std::vector<std::string>& values, c10::string_view what) {
    runtime::check_same_config(std::string(group_name), names, values, std::string(what));
  });
}

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("exchange_counts", &exchange_counts_meta);
  m.impl("exchange", &exchange_meta);
  m.impl("exchange_hierarchical", &exchange_hierarchical_meta);
}

}  // namespace fastmoe
