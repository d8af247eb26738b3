// A test-only op library (libfastmoe_nn_testing.so, never installed) that lets the Python tests drive the C++
// fastmoe::nn modules, on one process or on process groups made in Python: torch.ops.fastmoe_testing.*.
#include <torch/library.h>
#include <torch/torch.h>

#include <functional>
#include <memory>

#include "fastmoe/nn/moe.h"

namespace {

// Linear(d, h) -> GELU -> Linear(h, d), its linears registered as "0" and "2" like the children of the Python
// experts' nn.Sequential (an nn::Sequential cannot be stored in an AnyModule).
struct MlpExpertImpl : torch::nn::Module {
  MlpExpertImpl(int64_t d, int64_t h)
      : first(register_module("0", torch::nn::Linear(d, h))), second(register_module("2", torch::nn::Linear(h, d))) {}
  torch::Tensor forward(const torch::Tensor& x) { return second->forward(torch::gelu(first->forward(x))); }
  torch::nn::Linear first, second;
};
TORCH_MODULE(MlpExpert);

// A C++ layer and its forward.
struct Layer {
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
};

// How an expert-parallel layer moves its rows beyond the group and the chunks: the hierarchical exchange's
// sub-groups and hot-expert replication (TransformerMLP only).
struct Travel {
  std::string node_group, rail_group;
  int64_t ep_replicate = 0;
  double ep_gemm_flops = 0.0, ep_link_bytes = 0.0;
};

// layer: "transformer_mlp" (GELU), "transformer_mlp_swiglu", "transformer_mlp_swiglu_nobias" (no expert biases:
// the experts apply the routing scores in the activation), or "moe" (the factory constructor; every expert
// Linear(d_model, d_hidden) -> GELU -> Linear(d_hidden, d_model)); each with the default NaiveGate (with bias) and
// world_size experts parallel on group_name, cut into ep_chunks chunks.
Layer build_layer(const std::string& layer, int64_t num_experts, int64_t d_model, int64_t d_hidden, int64_t top_k,
                  int64_t world_size, const std::string& group_name, int64_t ep_chunks, const Travel& travel = {}) {
  if (layer == "moe") {
    TORCH_CHECK(travel.ep_replicate == 0,
                "the C++ MoE has no hot-expert replication, got ep_replicate=", travel.ep_replicate);
    auto options = fastmoe::nn::MoEOptions(num_experts, d_model)
                       .top_k(top_k)
                       .world_size(world_size)
                       .group_name(group_name)
                       .ep_chunks(ep_chunks)
                       .node_group(travel.node_group)
                       .rail_group(travel.rail_group);
    fastmoe::nn::MoE moe(options, [d_hidden](int64_t d) { return torch::nn::AnyModule(MlpExpert(d, d_hidden)); });
    return {moe.ptr(), [impl = moe.ptr()](const torch::Tensor& x) { return impl->forward(x); }};
  }
  TORCH_CHECK(
      layer == "transformer_mlp" || layer == "transformer_mlp_swiglu" || layer == "transformer_mlp_swiglu_nobias",
      "layer must be 'transformer_mlp', 'transformer_mlp_swiglu', 'transformer_mlp_swiglu_nobias' or 'moe', "
      "got '",
      layer, "'");
  auto options =
      fastmoe::nn::TransformerMLPOptions(num_experts, d_model, d_hidden)
          .activation(layer == "transformer_mlp" ? fastmoe::nn::Activation::kGELU : fastmoe::nn::Activation::kSwiGLU)
          .bias(layer != "transformer_mlp_swiglu_nobias")
          .top_k(top_k)
          .world_size(world_size)
          .group_name(group_name)
          .ep_chunks(ep_chunks)
          .node_group(travel.node_group)
          .rail_group(travel.rail_group)
          .ep_replicate(travel.ep_replicate)
          .ep_gemm_flops(travel.ep_gemm_flops)
          .ep_link_bytes(travel.ep_link_bytes);
  fastmoe::nn::TransformerMLP mlp(options);
  return {mlp.ptr(), [impl = mlp.ptr()](const torch::Tensor& x) { return impl->forward(x); }};
}

// Builds the C++ layer (see build_layer; d_model = x.size(-1)) on x's device and dtype, sets every parameter from
// `params` by name, runs forward on x and backward with grad_y (under the caller's autocast state, as a Python
// forward and backward in the same context would run), and returns [y, grad_x, grad of each parameter in `names`
// order (zeros for a parameter the backward did not reach)].
std::vector<at::Tensor> run_layer(const std::string& layer, const at::Tensor& x, const at::Tensor& grad_y,
                                  const std::vector<std::string>& names, const std::vector<at::Tensor>& params,
                                  int64_t num_experts, int64_t d_hidden, int64_t top_k, int64_t world_size,
                                  const std::string& group_name, int64_t ep_chunks, const Travel& travel = {}) {
  TORCH_CHECK(x.dim() >= 1, "x must have shape [..., d_model], got ", x.sizes());
  Layer built = build_layer(layer, num_experts, x.size(-1), d_hidden, top_k, world_size, group_name, ep_chunks, travel);
  built.module->to(x.device(), x.scalar_type());
  auto named = built.module->named_parameters();
  TORCH_CHECK(names.size() == params.size(), "run_layer got ", names.size(), " names but ", params.size(),
              " parameters; give one name per parameter");
  TORCH_CHECK(names.size() == named.size(), "the C++ ", layer, " has ", named.size(), " parameters but run_layer got ",
              names.size(), "; give every one of them");
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < names.size(); ++i) {
      TORCH_CHECK(named.contains(names[i]), "the C++ ", layer, " has no parameter named ", names[i]);
      TORCH_CHECK(named[names[i]].sizes() == params[i].sizes(), "parameter ", names[i], " of the C++ ", layer,
                  " has shape ", named[names[i]].sizes(), " but the given one has ", params[i].sizes());
      named[names[i]].copy_(params[i]);
    }
  }
  const at::Tensor input = x.detach().requires_grad_(true);
  const at::Tensor y = built.forward(input);
  y.backward(grad_y);
  std::vector<at::Tensor> out{y.detach(), input.grad()};
  for (const auto& name : names) {
    const at::Tensor g = named[name].grad();
    out.push_back(g.defined() ? g : torch::zeros_like(named[name]));
  }
  return out;
}

// A C++ layer built as it is (top_k 2, one chunk): its parameters in named_parameters() order.
std::vector<at::Tensor> initial_parameters(const std::string& layer, int64_t num_experts, int64_t d_model,
                                           int64_t d_hidden, int64_t world_size, const std::string& group_name) {
  Layer built = build_layer(layer, num_experts, d_model, d_hidden, /*top_k=*/2, world_size, group_name,
                            /*ep_chunks=*/1);
  std::vector<at::Tensor> out;
  for (const auto& p : built.module->parameters()) out.push_back(p.detach());
  return out;
}

TORCH_LIBRARY(fastmoe_testing, m) {
  m.def(
      "initial_parameters(str layer, int num_experts, int d_model, int d_hidden, int world_size, str group_name) -> "
      "Tensor[]",
      initial_parameters);
  m.def(
      "run_layer(str layer, Tensor x, Tensor grad_y, str[] names, Tensor[] params, int num_experts, int d_hidden, "
      "int top_k, int world_size, str group_name, int ep_chunks, str node_group=\"\", str rail_group=\"\", "
      "int ep_replicate=0, float ep_gemm_flops=0.0, float ep_link_bytes=0.0) -> Tensor[]");
  m.def(
      "transformer_mlp(Tensor x, Tensor grad_y, str[] names, Tensor[] params, int num_experts, int d_hidden, "
      "int top_k, int world_size, str group_name) -> Tensor[]");
}

// Implicit autograd: the bodies run above the autograd key, so the modules inside record their graph as usual
// (and under autocast, which has no kernel here, the ops inside see the caller's autocast state).
TORCH_LIBRARY_IMPL(fastmoe_testing, CompositeImplicitAutograd, m) {
  m.impl("run_layer",
         [](std::string layer, const at::Tensor& x, const at::Tensor& grad_y, std::vector<std::string> names,
            std::vector<at::Tensor> params, int64_t num_experts, int64_t d_hidden, int64_t top_k, int64_t world_size,
            std::string group_name, int64_t ep_chunks, std::string node_group, std::string rail_group,
            int64_t ep_replicate, double ep_gemm_flops, double ep_link_bytes) {
           return run_layer(layer, x, grad_y, names, params, num_experts, d_hidden, top_k, world_size, group_name,
                            ep_chunks, Travel{node_group, rail_group, ep_replicate, ep_gemm_flops, ep_link_bytes});
         });
  // run_layer("transformer_mlp", ...) with one chunk.
  m.impl("transformer_mlp", [](const at::Tensor& x, const at::Tensor& grad_y, std::vector<std::string> names,
                               std::vector<at::Tensor> params, int64_t num_experts, int64_t d_hidden, int64_t top_k,
                               int64_t world_size, std::string group_name) {
    return run_layer("transformer_mlp", x, grad_y, names, params, num_experts, d_hidden, top_k, world_size, group_name,
                     /*ep_chunks=*/1);
  });
}

}  // namespace
