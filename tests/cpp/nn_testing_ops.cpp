// A test-only op library (libfastmoe_nn_testing.so, never installed) that lets the Python distributed tests drive
// the C++ fastmoe::nn modules on process groups made in Python: torch.ops.fastmoe_testing.*.
#include <torch/library.h>
#include <torch/torch.h>

#include "fastmoe/nn/moe.h"

namespace {

// Builds fastmoe::nn::TransformerMLP (num_experts = weights' local count) with the given parameters (by name),
// runs forward and backward with grad_y, and returns [y, grad_x, grad of each parameter in `names` order].
std::vector<at::Tensor> transformer_mlp(const at::Tensor& x, const at::Tensor& grad_y,
                                        const std::vector<std::string>& names, const std::vector<at::Tensor>& params,
                                        int64_t num_experts, int64_t d_hidden, int64_t top_k, int64_t world_size,
                                        const std::string& group_name) {
  auto options = fastmoe::nn::TransformerMLPOptions(num_experts, x.size(-1), d_hidden)
                     .top_k(top_k)
                     .world_size(world_size)
                     .group_name(group_name);
  fastmoe::nn::TransformerMLP layer(options);
  layer->to(x.device(), x.scalar_type());
  auto named = layer->named_parameters();
  TORCH_CHECK(names.size() == params.size(), "one name per parameter");
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < names.size(); ++i) {
      TORCH_CHECK(named.contains(names[i]), "TransformerMLP has no parameter ", names[i]);
      named[names[i]].copy_(params[i]);
    }
  }
  const at::Tensor input = x.detach().requires_grad_(true);
  const at::Tensor y = layer->forward(input);
  y.backward(grad_y);
  std::vector<at::Tensor> out{y.detach(), input.grad()};
  for (const auto& name : names) {
    const at::Tensor g = named[name].grad();
    out.push_back(g.defined() ? g : torch::zeros_like(named[name]));
  }
  return out;
}

// Linear(d, h) -> GELU -> Linear(h, d), its linears registered as "0" and "2" like the children of the Python
// experts' nn.Sequential (an nn::Sequential cannot be stored in an AnyModule).
struct MlpExpertImpl : torch::nn::Module {
  MlpExpertImpl(int64_t d, int64_t h)
      : first(register_module("0", torch::nn::Linear(d, h))), second(register_module("2", torch::nn::Linear(h, d))) {}
  torch::Tensor forward(const torch::Tensor& x) { return second->forward(torch::gelu(first->forward(x))); }
  torch::nn::Linear first, second;
};
TORCH_MODULE(MlpExpert);

// A C++ layer built as it is, with world_size experts parallel on group_name: its parameters in named_parameters()
// order. layer: "transformer_mlp" (GELU), "transformer_mlp_swiglu", or "moe" (the factory constructor; every expert
// Linear(d_model, d_hidden) -> GELU -> Linear(d_hidden, d_model)).
std::vector<at::Tensor> initial_parameters(const std::string& layer, int64_t num_experts, int64_t d_model,
                                           int64_t d_hidden, int64_t world_size, const std::string& group_name) {
  std::shared_ptr<torch::nn::Module> module;
  if (layer == "moe") {
    auto options = fastmoe::nn::MoEOptions(num_experts, d_model).world_size(world_size).group_name(group_name);
    module =
        fastmoe::nn::MoE(options, [d_hidden](int64_t d) { return torch::nn::AnyModule(MlpExpert(d, d_hidden)); }).ptr();
  } else {
    TORCH_CHECK(layer == "transformer_mlp" || layer == "transformer_mlp_swiglu", "unknown layer ", layer);
    auto options =
        fastmoe::nn::TransformerMLPOptions(num_experts, d_model, d_hidden)
            .activation(layer == "transformer_mlp" ? fastmoe::nn::Activation::kGELU : fastmoe::nn::Activation::kSwiGLU)
            .world_size(world_size)
            .group_name(group_name);
    module = fastmoe::nn::TransformerMLP(options).ptr();
  }
  std::vector<at::Tensor> out;
  for (const auto& p : module->parameters()) out.push_back(p.detach());
  return out;
}

TORCH_LIBRARY(fastmoe_testing, m) {
  m.def(
      "initial_parameters(str layer, int num_experts, int d_model, int d_hidden, int world_size, str group_name) -> "
      "Tensor[]",
      initial_parameters);
  m.def(
      "transformer_mlp(Tensor x, Tensor grad_y, str[] names, Tensor[] params, int num_experts, int d_hidden, "
      "int top_k, int world_size, str group_name) -> Tensor[]");
}

// Implicit autograd: the body runs above the autograd key, so the modules inside record their graph as usual.
TORCH_LIBRARY_IMPL(fastmoe_testing, CompositeImplicitAutograd, m) {
  m.impl("transformer_mlp", [](const at::Tensor& x, const at::Tensor& grad_y, std::vector<std::string> names,
                               std::vector<at::Tensor> params, int64_t num_experts, int64_t d_hidden, int64_t top_k,
                               int64_t world_size, std::string group_name) {
    return transformer_mlp(x, grad_y, names, params, num_experts, d_hidden, top_k, world_size, group_name);
  });
}

}  // namespace
