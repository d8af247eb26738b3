// Trains a fastmoe::nn::TransformerMLP for a few steps from a program that only knows the installed package.
// Exits non-zero unless the forward has the input's shape, every parameter gets a finite non-zero gradient,
// and the loss goes down.
#include <fastmoe/fastmoe.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(/*num_experts=*/4, /*d_model=*/16,
                                                                     /*d_hidden=*/32)
                                      .top_k(2));
  torch::optim::Adam optimizer(moe->parameters(), torch::optim::AdamOptions(1e-2));
  const torch::Tensor x = torch::randn({2, 24, 16});
  const torch::Tensor target = torch::tanh(x.flip(-1));
  double first_loss = 0.0, last_loss = 0.0;
  for (int step = 0; step < 20; ++step) {
    optimizer.zero_grad();
    const torch::Tensor y = moe->forward(x);
    if (y.sizes() != x.sizes()) {
      std::cerr << "consumer: output shape " << y.sizes() << " != input shape " << x.sizes() << "\n";
      return 1;
    }
    const torch::Tensor loss = torch::mse_loss(y, target);
    loss.backward();
    if (step == 0) {
      for (const auto& item : moe->named_parameters()) {
        const torch::Tensor& grad = item.value().grad();
        if (!grad.defined() || !torch::isfinite(grad).all().item<bool>() || grad.abs().sum().item<double>() == 0) {
          std::cerr << "consumer: parameter " << item.key() << " has no usable gradient\n";
          return 1;
        }
      }
      first_loss = loss.item<double>();
    }
    last_loss = loss.item<double>();
    optimizer.step();
  }
  std::cout << "consumer: loss " << first_loss << " -> " << last_loss << "\n";
  if (!(last_loss < first_loss)) {
    std::cerr << "consumer: the loss did not decrease\n";
    return 1;
  }
  std::cout << "consumer: find_package(fastmoe) forward+backward OK\n";
  return 0;
}
