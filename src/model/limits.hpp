// The bounds every count and size of a model must respect before the loader loops over it or
// allocates with it: config.json values (config.cpp) and, without a config.json, the dimensions
// inferred from the tensors (checkpoint.cpp). Generous: released models stay well inside, with
// at most ~128 layers (Llama-3.1-405B: 126), hidden sizes below 20000 (Nemotron-4-340B: 18432),
// intermediate sizes below 80000 (its dense MLP: 73728), at most 512 routed experts (Qwen3-Next)
// and a few shared ones (DeepSeek-V2: 2), routed_scaling_factor up to 16 (DeepSeek-V2). A hostile
// num_hidden_layers of 2^63 - 1 is then an error naming the field and the limit, not minutes
// spent allocating.
#pragma once

#include <cstdint>

namespace fp8moe::model {

constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHidden = 65536;
constexpr int64_t kMaxIntermediate = 262144;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxSharedExperts = 64;
constexpr double kMaxRoutedScaling = 1000.0;
constexpr double kMaxSwigluLimit = 1.0e6;
// One weight matrix's rows or columns, wherever they come from (the largest: vocabularies of
// ~256000 rows).
constexpr int64_t kMaxMatrixDim = int64_t{1} << 24;
// Scale block and group extents: released checkpoints use 128 (blocks) and 32 to 128 (groups).
constexpr int64_t kMaxBlock = 65536;
// Module lists of a quantization config (ignore, targets, modules_to_not_convert) and the length
// of one entry: released configs list tens to hundreds of short names. Every listed regex is tried
// on every module the loader classifies, so the list length bounds that work.
constexpr int64_t kMaxModulePatterns = 4096;
constexpr int64_t kMaxPatternLength = 512;

}  // namespace fp8moe::model
