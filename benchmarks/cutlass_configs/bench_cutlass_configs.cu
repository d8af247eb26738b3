// Measures every candidate configuration of the CUTLASS grouped GEMM (candidate.cu) on the grouped linear layers
// of fastmoe's benchmark shapes: the forward, grad_x and grad_weight GEMMs, each timed alone through the library's
// entry points (the setup launch included), with CUDA events. Prints microseconds and TFLOP/s per candidate, the
// best candidate per GEMM, and whether each candidate's output has the bits of candidate 0 (the shipped
// configuration); a candidate whose output differs by more than the rounding of the output dtype is marked WRONG.
//
//   build:  cmake -DFASTMOE_BUILD_CUTLASS_BENCH=ON ... && cmake --build <build> --target bench_cutlass_configs
//   run:    <build>/benchmarks/bench_cutlass_configs [--shapes qwen3.up,qwen3.down] [--dtype bf16|fp16]
//                                                    [--reps 20] [--warmup 3] [--json out.jsonl]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "benchmarks/cutlass_configs/candidates.h"
#include "core/check.h"
#include "core/cuda_check.h"

namespace fastmoe::bench {

std::vector<Candidate>& candidates() {
  static std::vector<Candidate> all;
  return all;
}

namespace {

// One grouped linear layer: num_experts experts of [out, in] weights; tokens routed to top_k distinct experts
// each, so the layer has tokens * top_k rows.
struct Shape {
  const char* name;
  int64_t num_experts, tokens, top_k, in_features, out_features;
};

// The layers of bench_moe_layer.py's configurations (up: d -> h, or d -> 2h for SwiGLU; down: h -> d) and of
// bench_hf_moe.py's models (SwiGLU experts, 16384 tokens a step).
const Shape kShapes[] = {
    {"qwen3.up", 128, 16384, 8, 2048, 1536},        {"qwen3.down", 128, 16384, 8, 768, 2048},
    {"mixtral_hf.up", 8, 16384, 2, 2048, 14336},    {"mixtral_hf.down", 8, 16384, 2, 7168, 2048},
    {"mixtral_swiglu.up", 8, 8192, 2, 4096, 28672}, {"mixtral.up", 8, 8192, 2, 4096, 14336},
    {"mixtral.down", 8, 8192, 2, 14336, 4096},      {"fine.up", 64, 16384, 6, 2048, 1408},
    {"fine.down", 64, 16384, 6, 1408, 2048},        {"paper.up", 64, 4096, 2, 1024, 4096},
    {"paper.down", 64, 4096, 2, 4096, 1024},        {"train.up", 8, 16384, 2, 1024, 2048},
    {"train.down", 8, 16384, 2, 2048, 1024},        {"e128.up", 128, 8192, 2, 1024, 4096},
    {"e128.down", 128, 8192, 2, 4096, 1024},        {"e32.up", 32, 8192, 2, 1024, 4096},
    {"e32.down", 32, 8192, 2, 4096, 1024},
};

struct Options {
  std::vector<std::string> shapes;
  DType dtype = DType::kBFloat16;
  int reps = 20;
  int warmup = 3;
  std::string json;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (begin <= s.size()) {
    const size_t end = std::min(s.find(',', begin), s.size());
    if (end > begin) parts.push_back(s.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}

const Shape& find_shape(const std::string& name) {
  for (const Shape& s : kShapes) {
    if (name == s.name) return s;
  }
  FMOE_CHECK(false, "bench_cutlass_configs: --shapes names an unknown shape: ", name, " (--help lists them)");
  return kShapes[0];
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    FMOE_CHECK(arg == "--help" || has_value, "bench_cutlass_configs: ", arg, " needs a value");
    if (arg == "--shapes") {
      options.shapes = split(argv[++i]);
    } else if (arg == "--dtype") {
      const std::string d = argv[++i];
      FMOE_CHECK(d == "bf16" || d == "fp16", "bench_cutlass_configs: --dtype must be bf16 or fp16, got ", d);
      options.dtype = d == "bf16" ? DType::kBFloat16 : DType::kFloat16;
    } else if (arg == "--reps") {
      options.reps = std::atoi(argv[++i]);
      FMOE_CHECK(options.reps >= 1, "bench_cutlass_configs: --reps must be at least 1, got ", argv[i]);
    } else if (arg == "--warmup") {
      options.warmup = std::atoi(argv[++i]);
      FMOE_CHECK(options.warmup >= 0, "bench_cutlass_configs: --warmup must be at least 0, got ", argv[i]);
    } else if (arg == "--json") {
      options.json = argv[++i];
    } else {
      std::printf(
          "usage: bench_cutlass_configs [--shapes a,b] [--dtype bf16|fp16] [--reps N] [--warmup N] "
          "[--json FILE]\nshapes:");
      for (const Shape& s : kShapes) std::printf(" %s", s.name);
      std::printf("\n");
      std::exit(arg == "--help" ? 0 : 2);
    }
  }
  if (options.shapes.empty()) {
    for (const Shape& s : kShapes) options.shapes.push_back(s.name);
  }
  for (const std::string& name : options.shapes) find_shape(name);  // every name known before any GPU work
  return options;
}

// Rows per expert of a uniform random top-k routing (each token picks top_k distinct experts), as offsets[E + 1].
std::vector<int64_t> route(const Shape& s, uint64_t seed) {
  std::vector<int64_t> counts(s.num_experts, 0), order(s.num_experts);
  uint64_t state = seed;
  auto next = [&state]() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 33;
  };
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t e = 0; e < s.num_experts; ++e) order[e] = e;
    for (int64_t j = 0; j < s.top_k; ++j) {  // partial Fisher-Yates: top_k distinct experts
      const int64_t pick = j + static_cast<int64_t>(next() % static_cast<uint64_t>(s.num_experts - j));
      std::swap(order[j], order[pick]);
      ++counts[order[j]];
    }
  }
  std::vector<int64_t> offsets(s.num_experts + 1, 0);
  for (int64_t e = 0; e < s.num_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  return offsets;
}

// Uniform values in [-scale, scale) as 16-bit floats, from a hash of the index (no host copy of the data).
__global__ void fill_kernel(uint16_t* out, int64_t n, uint64_t seed, float scale, bool bf16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 29;
    const float v = (static_cast<float>(h >> 40) / 16777216.0f * 2.0f - 1.0f) * scale;
    if (bf16) {
      const __nv_bfloat16 b = __float2bfloat16(v);
      std::memcpy(&out[i], &b, 2);
    } else {
      const __half b = __float2half(v);
      std::memcpy(&out[i], &b, 2);
    }
  }
}

// |a - b| over n elements: the largest difference, relative to the largest |b|, and whether all bits agree.
__global__ void compare_kernel(const uint16_t* a, const uint16_t* b, int64_t n, bool bf16, float* max_diff,
                               float* max_ref, unsigned int* differing) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x, y;
    if (bf16) {
      __nv_bfloat16 p, q;
      std::memcpy(&p, &a[i], 2);
      std::memcpy(&q, &b[i], 2);
      x = __bfloat162float(p);
      y = __bfloat162float(q);
    } else {
      __half p, q;
      std::memcpy(&p, &a[i], 2);
      std::memcpy(&q, &b[i], 2);
      x = __half2float(p);
      y = __half2float(q);
    }
    // Non-negative floats order as their bits: atomicMax on the bits is a float max.
    atomicMax(reinterpret_cast<unsigned int*>(max_diff), __float_as_uint(fabsf(x - y)));
    atomicMax(reinterpret_cast<unsigned int*>(max_ref), __float_as_uint(fabsf(y)));
    if (a[i] != b[i]) atomicAdd(differing, 1u);
  }
}

struct Buffer {
  uint16_t* data = nullptr;
  int64_t count = 0;
  explicit Buffer(int64_t n) : count(n) { FMOE_CHECK_CUDA(cudaMalloc(&data, std::max<int64_t>(n, 1) * 2)); }
  ~Buffer() { cudaFree(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

void fill(Buffer& b, uint64_t seed, float scale, DType dtype) {
  fill_kernel<<<1024, 256>>>(b.data, b.count, seed, scale, dtype == DType::kBFloat16);
  FMOE_CHECK_LAUNCH();
}

struct Comparison {
  float max_diff = 0, max_ref = 0;
  unsigned int differing = 0;
};

Comparison compare(const Buffer& a, const Buffer& b, DType dtype) {
  float* d_floats;
  unsigned int* d_count;
  FMOE_CHECK_CUDA(cudaMalloc(&d_floats, 2 * sizeof(float)));
  FMOE_CHECK_CUDA(cudaMalloc(&d_count, sizeof(unsigned int)));
  FMOE_CHECK_CUDA(cudaMemset(d_floats, 0, 2 * sizeof(float)));
  FMOE_CHECK_CUDA(cudaMemset(d_count, 0, sizeof(unsigned int)));
  compare_kernel<<<1024, 256>>>(a.data, b.data, a.count, dtype == DType::kBFloat16, d_floats, d_floats + 1, d_count);
  FMOE_CHECK_LAUNCH();
  Comparison c;
  float host[2];
  FMOE_CHECK_CUDA(cudaMemcpy(host, d_floats, sizeof(host), cudaMemcpyDeviceToHost));
  FMOE_CHECK_CUDA(cudaMemcpy(&c.differing, d_count, sizeof(unsigned int), cudaMemcpyDeviceToHost));
  c.max_diff = host[0];
  c.max_ref = host[1];
  cudaFree(d_floats);
  cudaFree(d_count);
  return c;
}

// Median milliseconds of reps calls of fn, each timed alone with events, after warmup calls.
template <typename Fn>
double median_ms(int warmup, int reps, Fn&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start, stop;
  FMOE_CHECK_CUDA(cudaEventCreate(&start));
  FMOE_CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    FMOE_CHECK_CUDA(cudaEventRecord(start));
    fn();
    FMOE_CHECK_CUDA(cudaEventRecord(stop));
    FMOE_CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    FMOE_CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

const char* const kGemmNames[3] = {"forward", "grad_x", "grad_weight"};

int run(const Options& options) {
  std::vector<Candidate> list = candidates();
  std::sort(list.begin(), list.end(), [](const Candidate& a, const Candidate& b) { return a.index < b.index; });
  FMOE_CHECK(!list.empty() && list[0].index == 0, "bench_cutlass_configs: candidate 0 (the shipped one) is missing");
  FILE* json = options.json.empty() ? nullptr : std::fopen(options.json.c_str(), "a");
  FMOE_CHECK(options.json.empty() || json != nullptr, "bench_cutlass_configs: cannot open --json ", options.json);
  cudaDeviceProp prop;
  FMOE_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs; %zu candidates; dtype %s; median of %d calls after %d warm-ups\n", prop.name,
              prop.multiProcessorCount, list.size(), dtype_name(options.dtype), options.reps, options.warmup);
  int wrong = 0;
  for (const std::string& shape_name : options.shapes) {
    const Shape& s = find_shape(shape_name);
    const std::vector<int64_t> offsets = route(s, 1234);
    const int64_t rows = offsets.back(), in = s.in_features, out = s.out_features, E = s.num_experts;
    int64_t min_rows = rows, max_rows = 0;
    for (int64_t e = 0; e < E; ++e) {
      min_rows = std::min(min_rows, offsets[e + 1] - offsets[e]);
      max_rows = std::max(max_rows, offsets[e + 1] - offsets[e]);
    }
    std::printf("\n## %s: E %ld, rows %ld (%ld..%ld an expert), in %ld, out %ld\n", s.name, E, rows, min_rows, max_rows,
                in, out);
    int64_t* d_offsets;
    FMOE_CHECK_CUDA(cudaMalloc(&d_offsets, offsets.size() * sizeof(int64_t)));
    FMOE_CHECK_CUDA(cudaMemcpy(d_offsets, offsets.data(), offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
    Buffer x(rows * in), w(E * out * in), dy(rows * out);
    fill(x, 1, 1.0f, options.dtype);
    fill(w, 2, 1.0f / std::sqrt(static_cast<float>(in)), options.dtype);
    fill(dy, 3, 1.0f, options.dtype);
    // Outputs: [candidate 0's, the current candidate's] for each GEMM.
    Buffer y0(rows * out), dx0(rows * in), dw0(E * out * in), y(rows * out), dx(rows * in), dw(E * out * in);
    const double flop = 2.0 * static_cast<double>(rows) * static_cast<double>(in) * static_cast<double>(out);
    double best_ms[3] = {1e30, 1e30, 1e30};
    const char* best_name[3] = {"", "", ""};
    double shipped_ms[3] = {0, 0, 0};
    for (const Candidate& c : list) {
      const size_t ws_bytes = c.workspace_bytes(options.dtype, E);
      void* ws;
      FMOE_CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
      Buffer* targets[3] = {c.index == 0 ? &y0 : &y, c.index == 0 ? &dx0 : &dx, c.index == 0 ? &dw0 : &dw};
      Buffer* references[3] = {&y0, &dx0, &dw0};
      for (int g = 0; g < 3; ++g) {
        auto call = [&]() {
          if (g == 0) {
            c.forward(options.dtype, x.data, rows, in, d_offsets, E, w.data, out, nullptr, targets[0]->data, ws,
                      ws_bytes, nullptr);
          } else {
            c.backward(options.dtype, dy.data, x.data, rows, in, d_offsets, E, w.data, out,
                       g == 1 ? targets[1]->data : nullptr, g == 2 ? targets[2]->data : nullptr, nullptr, ws, ws_bytes,
                       nullptr);
          }
        };
        const double ms = median_ms(options.warmup, options.reps, call);
        FMOE_CHECK_CUDA(cudaDeviceSynchronize());
        const Comparison cmp = compare(*targets[g], *references[g], options.dtype);
        // Candidates sum K in different chunk orders only through the K tile; allow a few output roundings.
        const float tolerance = (options.dtype == DType::kBFloat16 ? 0x1p-6f : 0x1p-9f) * std::max(cmp.max_ref, 1e-3f);
        const bool ok = cmp.max_diff <= tolerance;
        wrong += ok ? 0 : 1;
        if (c.index == 0) shipped_ms[g] = ms;
        if (ms < best_ms[g]) {
          best_ms[g] = ms;
          best_name[g] = c.name;
        }
        std::printf("%-16s %-12s %-34s %9.1f us %7.1f TFLOP/s  x%.3f vs shipped  %s\n", s.name, kGemmNames[g], c.name,
                    ms * 1e3, flop / (ms * 1e-3) / 1e12, shipped_ms[g] / ms,
                    !ok                  ? "WRONG"
                    : cmp.differing == 0 ? "bits of shipped"
                                         : "within rounding");
        if (json != nullptr) {
          std::fprintf(json,
                       "{\"shape\": \"%s\", \"gemm\": \"%s\", \"candidate\": %d, \"config\": \"%s\", \"dtype\": "
                       "\"%s\", \"us\": %.2f, \"tflops\": %.1f, \"max_diff\": %g, \"differing\": %u, \"ok\": %s}\n",
                       s.name, kGemmNames[g], c.index, c.name, dtype_name(options.dtype), ms * 1e3,
                       flop / (ms * 1e-3) / 1e12, cmp.max_diff, cmp.differing, ok ? "true" : "false");
        }
      }
      cudaFree(ws);
    }
    for (int g = 0; g < 3; ++g) {
      std::printf("best %-16s %-12s %-34s %9.1f us  x%.3f vs shipped\n", s.name, kGemmNames[g], best_name[g],
                  best_ms[g] * 1e3, shipped_ms[g] / best_ms[g]);
    }
    cudaFree(d_offsets);
  }
  if (json != nullptr) std::fclose(json);
  std::printf("\n%d candidate results WRONG\n", wrong);
  return wrong == 0 ? 0 : 1;
}

}  // namespace
}  // namespace fastmoe::bench

int main(int argc, char** argv) {
  try {
    return fastmoe::bench::run(fastmoe::bench::parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
