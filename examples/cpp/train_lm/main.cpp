// Trains a small byte-level language model whose feed-forward blocks are fastmoe::nn::TransformerMLP layers,
// with the libtorch C++ API and the installed fastmoe package only (find_package(fastmoe)).
//
//   train_lm [--steps N] [--data FILE] [--experts E] [--top-k K] [--seed S]   (train_lm --help: the flags)
//
// The text is FILE, else Debian's fortunes file when it is installed, else a paragraph built in. Every 4 KiB
// block whose index is a multiple of 20 is held out for validation. Prints the training loss as it goes and
// the validation loss before and after; exits non-zero unless the validation loss fell.
#include <fastmoe/fastmoe.h>
#include <torch/torch.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char* kBuiltInText =
    "A mixture of experts layer keeps many feed forward networks and sends every token to a few of them. A small "
    "gate looks at the token and scores each expert; the best k experts process the token, and their outputs are "
    "added together, weighted by the scores. Because each token visits only k experts, the model can hold many "
    "more parameters than it spends compute on. The experts see different tokens, so they learn different "
    "things, and the gate learns which expert suits which token.\n";

struct Options {
  int64_t steps = 100, experts = 4, top_k = 2, seed = 0;
  int64_t d_model = 64, layers = 2, heads = 4, seq_len = 64, batch = 16;
  double lr = 3e-3;
  std::string data;
};

const char* kUsage =
    "usage: train_lm [--steps N] [--data FILE] [--experts E] [--top-k K] [--seed S]\n"
    "\n"
    "Trains a byte-level language model whose feed-forward blocks are fastmoe::nn::TransformerMLP layers, then\n"
    "prints the validation loss before and after; exits non-zero unless it fell.\n"
    "\n"
    "  --steps N      optimizer steps (default 100)\n"
    "  --data FILE    the text to train on (default: Debian's fortunes file when installed, else a built-in\n"
    "                 paragraph); every 20th 4 KiB block is held out for validation\n"
    "  --experts E    experts per MoE layer (default 4)\n"
    "  --top-k K      experts per token, at most E (default 2)\n"
    "  --seed S       seed of the weights and the batches, >= 0 (default 0)\n"
    "  -h, --help     this text\n";

// A usage error: exits with status 2 and a message that names the flag and its value.
[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "train_lm: " << message << " (train_lm --help lists the flags)\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--data") {
      o.data = value;
      continue;
    }
    int64_t* target = flag == "--steps"     ? &o.steps
                      : flag == "--experts" ? &o.experts
                      : flag == "--top-k"   ? &o.top_k
                      : flag == "--seed"    ? &o.seed
                                            : nullptr;
    if (target == nullptr) usage_error("unknown flag " + flag);
    // The whole value must be an integer: atoll would read "5x" as 5 and "x" as 0.
    char* end = nullptr;
    errno = 0;
    *target = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || errno == ERANGE) usage_error(flag + " must be an integer, got " + value);
    if (*target < (target == &o.seed ? 0 : 1)) {
      usage_error(flag + (target == &o.seed ? " must be >= 0" : " must be positive") + ", got " + value);
    }
  }
  if (o.top_k > o.experts) {
    usage_error("--top-k must be at most --experts=" + std::to_string(o.experts) + ", got " + std::to_string(o.top_k));
  }
  return o;
}

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream buffer;
  buffer << file.rdbuf();
  return buffer.str();
}

// One pre-norm decoder block: causal self-attention, then the MoE feed-forward layer.
struct BlockImpl : torch::nn::Module {
  BlockImpl(const Options& o)
      : norm1(register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model})))),
        attn(register_module("attn",
                             torch::nn::MultiheadAttention(torch::nn::MultiheadAttentionOptions(o.d_model, o.heads)))),
        norm2(register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model})))),
        moe(register_module(
            "moe",
            fastmoe::nn::TransformerMLP(
                fastmoe::nn::TransformerMLPOptions(o.experts, o.d_model, 2 * o.d_model / o.top_k).top_k(o.top_k)))) {}

  // x [seq, batch, d_model] (MultiheadAttention's layout), mask [seq, seq] with -inf above the diagonal.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask) {
    const torch::Tensor h = norm1(x);
    x = x + std::get<0>(attn->forward(h, h, h, /*key_padding_mask=*/torch::Tensor(), /*need_weights=*/false, mask));
    return x + moe(norm2(x));
  }

  torch::nn::LayerNorm norm1{nullptr};
  torch::nn::MultiheadAttention attn{nullptr};
  torch::nn::LayerNorm norm2{nullptr};
  fastmoe::nn::TransformerMLP moe{nullptr};
};
TORCH_MODULE(Block);

struct ByteLMImpl : torch::nn::Module {
  explicit ByteLMImpl(const Options& o)
      : embed(register_module("embed", torch::nn::Embedding(256, o.d_model))),
        pos(register_parameter("pos", torch::randn({o.seq_len, 1, o.d_model}) * 0.02)),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.d_model})))),
        head(register_module("head", torch::nn::Linear(o.d_model, 256))) {
    for (int64_t i = 0; i < o.layers; ++i) blocks.push_back(register_module("block" + std::to_string(i), Block(o)));
  }

  // tokens [batch, seq] int64 -> logits [batch, seq, 256]
  torch::Tensor forward(const torch::Tensor& tokens) {
    const int64_t seq = tokens.size(1);
    const torch::Tensor mask = torch::full({seq, seq}, -INFINITY).triu(1);
    torch::Tensor x = embed(tokens.t()) + pos.slice(0, 0, seq);
    for (auto& block : blocks) x = block->forward(x, mask);
    return head(norm(x)).transpose(0, 1);
  }

  torch::Tensor balance_loss() {
    torch::Tensor total = torch::zeros({});
    for (auto& block : blocks) total = total + block->moe->loss();
    return total;
  }

  torch::nn::Embedding embed{nullptr};
  torch::Tensor pos;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  std::vector<Block> blocks;
};
TORCH_MODULE(ByteLM);

torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.reshape({-1, 256}), targets.reshape({-1}));
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  torch::manual_seed(o.seed);
  std::string text, source = o.data;
  if (source.empty()) source = "/usr/share/games/fortunes/fortunes";
  if (std::ifstream(source).good()) {
    text = read_text(source);
  } else if (!o.data.empty()) {
    std::cerr << "train_lm: cannot read --data " << o.data << "\n";
    return 2;
  }
  if (text.size() < 16 * 1024) {  // too short for a 4 KiB-block split: repeat the built-in paragraph
    source = "built-in text";
    while (text.size() < 64 * 1024) text += kBuiltInText;
  }
  std::vector<uint8_t> train_bytes, val_bytes;
  for (size_t start = 0, block = 0; start < text.size(); start += 4096, ++block) {
    auto& part = block % 20 == 0 ? val_bytes : train_bytes;
    part.insert(part.end(), text.begin() + start, text.begin() + std::min(text.size(), start + 4096));
  }
  const torch::Tensor train = torch::tensor(std::vector<int64_t>(train_bytes.begin(), train_bytes.end()));
  const torch::Tensor val = torch::tensor(std::vector<int64_t>(val_bytes.begin(), val_bytes.end()));
  const torch::Tensor offsets = torch::arange(o.seq_len + 1);
  const auto windows = [&](const torch::Tensor& starts, const torch::Tensor& tokens) {
    return tokens.index({starts.unsqueeze(1) + offsets});  // [n, seq_len + 1]
  };
  // A fixed validation set: 16 windows spread over the held-out bytes.
  const torch::Tensor val_windows = windows(torch::linspace(0, val.size(0) - o.seq_len - 1, 16).to(torch::kInt64), val);

  ByteLM model(o);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(0.01));
  const auto evaluate = [&] {
    torch::NoGradGuard no_grad;
    model->eval();
    const torch::Tensor logits = model->forward(val_windows.slice(1, 0, o.seq_len));
    model->train();
    return lm_loss(logits, val_windows.slice(1, 1)).item<double>();
  };
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  std::cout << "train_lm: " << o.layers << " blocks, " << o.experts << " experts top-" << o.top_k << ", " << params
            << " parameters, " << source << ": " << train.size(0) << " train / " << val.size(0)
            << " validation bytes\n";
  const double val_before = evaluate();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= o.steps; ++step) {
    const torch::Tensor batch = windows(torch::randint(train.size(0) - o.seq_len - 1, {o.batch}, torch::kInt64), train);
    const torch::Tensor loss = lm_loss(model->forward(batch.slice(1, 0, o.seq_len)), batch.slice(1, 1));
    optimizer.zero_grad();
    (loss + model->balance_loss()).backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    optimizer.step();
    if (step % std::max<int64_t>(1, o.steps / 10) == 0 || step == o.steps) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::cout << "step " << step << "/" << o.steps << "  loss " << loss.item<double>() << "  " << seconds << " s\n";
    }
  }
  const double val_after = evaluate();
  std::cout << "validation loss " << val_before << " -> " << val_after << " (uniform: " << std::log(256.0) << ")\n";
  if (!(val_after < val_before)) {
    std::cerr << "train_lm: the validation loss did not fall\n";
    return 1;
  }
  return 0;
}
