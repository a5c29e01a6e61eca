// Checkpoint conversion between BF16 and the two real FP8 formats, tensor by tensor.
//
//  - to BF16: every FP8 weight (F8_E4M3/F8_E5M2 with its `_scale` / `_scale_inv` sibling) of a
//    "fp8" or "compressed-tensors" checkpoint becomes BF16 under the same name, value =
//    code x scale rounded once to BF16 (quant.hpp's dequantize); scales are dropped; every other
//    tensor is copied unchanged; config.json loses its quantization_config.
//  - to FP8: the Linear weights of a plain checkpoint (experts, shared experts, dense MLPs,
//    attention projections) are quantized to F8_E4M3, everything else stays as it is: the
//    routers (mlp.gate), norms, embeddings, lm_head, the MTP head and e_score_correction_bias.
//      channel -> compressed-tensors "float-quantized" (the FP8_DYNAMIC preset): `weight_scale`
//                 [out, 1] F32; `ignore` names the Linear modules left in BF16;
//      block   -> quant_method "fp8": `weight_scale_inv` [ceil(out/b), ceil(in/b)] F32,
//                 weight_block_size [b, b], modules_to_not_convert names what stayed BF16.
//
// The output keeps the source's file split: one output file per source file (same relative
// name), and model.safetensors.index.json when the source has one. Only one output file is held
// in memory at a time; source tensors are read from the memory-mapped files.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "fp8moe/quant.hpp"

namespace fp8moe {

enum class ConvertTarget : uint8_t { BF16, FP8 };

struct ConvertOptions {
  ConvertTarget to = ConvertTarget::BF16;
  ScaleKind scheme = ScaleKind::Channel;  // FP8 only: Channel or Block
  int64_t block = 128;                    // FP8 block: square block edge
  // Called with one line of progress (per output file written, and every few seconds inside a
  // long file); nullptr: silent.
  std::function<void(const std::string&)> progress;
};

struct ConvertReport {
  int64_t tensors_in = 0, tensors_out = 0;
  int64_t converted = 0;      // weights quantized or dequantized
  int64_t files = 0;          // safetensors files written
  uint64_t bytes_in = 0, bytes_out = 0;  // tensor data
};

// Is `name` (a tensor of a plain checkpoint) a Linear weight that FP8 conversion quantizes?
// Rank-2 float ".weight" tensors, except routers, embeddings, lm_head and the MTP head.
bool fp8_convertible_weight(const std::string& name, int rank);

// Converts checkpoint directory `src` (config.json + safetensors) into `dst`, which must not
// exist or be an empty directory, and must not be `src`. Other regular files at the top of
// `src` (tokenizer, generation config) are copied. On failure, files written so far are
// removed (and `dst` too when this call created it).
ConvertReport convert_checkpoint(const std::string& src, const std::string& dst, const ConvertOptions& opt);

}  // namespace fp8moe
