// Tokenizer time against input length: encode() of 10 kB, 100 kB and 1 MB texts of several
// shapes (one long pre-token, prose, digits, whitespace runs, special-token text) with a
// GGUF or HF model's tokenizer. Linear (n log n) growth is the contract: a 10x longer input
// takes ~10x longer. Prints one line per (shape, size) and the model's prompt byte cap
// (context length x longest token bytes), beyond which `generate` refuses a prompt unread.
//
//   build/bench/bench_tokenizer MODEL [--reps N]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/tokenizer.h"
#include "kernels/cpu/cpu_features.h"

using namespace atmoe;

static std::string make_text(const std::string& shape, size_t n) {
  std::mt19937_64 rng(7);
  std::string s;
  s.reserve(n + 64);
  static const char* words[] = {"the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog, ", "and ",
                                "tokenizers ", "merge ", "pairs.\n", "Über ", "naïve ", "世界 ", "👋 "};
  while (s.size() < n) {
    if (shape == "one-word") s += 'a';
    else if (shape == "prose") s += words[rng() % 16];
    else if (shape == "digits") s += char('0' + rng() % 10);
    else if (shape == "spaces") s += (rng() % 50 ? ' ' : '\n');
    else if (shape == "specials") s += (rng() % 2 ? "<|im_start|>user\nhi<|im_end|>" : "x");
  }
  s.resize(n);
  // Never end inside a UTF-8 sequence.
  while (!s.empty() && (uint8_t(s.back()) & 0xc0) == 0x80) s.pop_back();
  if (!s.empty() && uint8_t(s.back()) >= 0xc0) s.pop_back();
  return s;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_tokenizer MODEL(.gguf or HF dir) [--reps N]\n");
    return 2;
  }
  const std::string path = argv[1];
  int reps = 3;
  for (int i = 2; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
  try {
    int64_t ctx = 0;
    std::unique_ptr<Tokenizer> tok;
    if (std::filesystem::is_directory(path)) {
      tok = std::make_unique<Tokenizer>(Tokenizer::from_hf_dir(path));
      ctx = config_from_hf_json(path + "/config.json").max_position;
    } else {
      GgufFile f(path);
      tok = std::make_unique<Tokenizer>(Tokenizer::from_gguf(f));
      ctx = config_from_gguf(f).max_position;
    }
    std::printf("tokenizer %s\nisa %s, 1 thread, best of %d\n", tok->summary().c_str(), cpu::isa_name(cpu::best_isa()), reps);
    std::printf("prompt byte cap: context %lld x longest token %zu bytes = %lld bytes\n", (long long)ctx, tok->max_token_bytes(),
                (long long)(ctx * int64_t(tok->max_token_bytes())));
    std::printf("%-10s %10s %10s %10s %12s %10s\n", "shape", "bytes", "tokens", "seconds", "MB/s", "x prev");
    for (const char* shape : {"one-word", "prose", "digits", "spaces", "specials"}) {
      double prev = 0;
      for (size_t n : {size_t(10000), size_t(100000), size_t(1000000)}) {
        const std::string text = make_text(shape, n);
        double best = 1e30;
        size_t ntok = 0;
        for (int r = 0; r < reps; ++r) {
          auto t0 = std::chrono::steady_clock::now();
          auto ids = tok->encode(text, false, true);
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
          ntok = ids.size();
        }
        std::printf("%-10s %10zu %10zu %10.4f %12.2f %10s\n", shape, text.size(), ntok, best, double(text.size()) / best / 1e6,
                    prev > 0 ? (std::to_string(best / prev).substr(0, 5) + "x").c_str() : "");
        prev = best;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 2;
  }
  return 0;
}
