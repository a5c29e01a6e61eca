// Checkpoint conversion between BF16 and the two real FP8 formats, tensor by tensor.
//
//  - to BF16: every FP8 weight (F8_E4M3/F8_E5M2 with its `_scale` / `_scale_inv` sibling) becomes
//    BF16 under the same name, value = code x scale rounded once to BF16 (the exact product, as
//    quant.hpp's dequantize); scales are dropped; every other tensor is copied unchanged;
//    config.json loses its quantization_config. Each weight's scale scheme follows the loader's
//    per-tensor rule (checkpoint.hpp): the one the quantization_config declares for its module,
//    or, where the config declares none (no quantization_config at all, or a module no group
//    targets), the one its scale's shape states unambiguously. What the loader refuses, this
//    refuses, naming the tensor.
//  - to FP8: the Linear weights of a plain checkpoint (experts, shared experts, dense MLPs,
//    attention projections; dense models included) are quantized to F8_E4M3, everything else
//    stays as it is: the routers (mlp.gate), norms, embeddings, lm_head, the MTP head and
//    e_score_correction_bias.
//      channel -> compressed-tensors "float-quantized" (the FP8_DYNAMIC preset): `weight_scale`
//                 [out, 1] F32; `ignore` names the Linear modules left in BF16;
//      block   -> quant_method "fp8": `weight_scale_inv` [ceil(out/b), ceil(in/b)] F32,
//                 weight_block_size [b, b], modules_to_not_convert names what stayed BF16.
//
// The output keeps the source's file split: one output file per source file (same relative
// name), and model.safetensors.index.json when the source has one.
//
// How it runs: every file is planned first (names, dtypes, shapes and offsets of its output
// tensors, so its header is known), then its tensors are cut into row chunks of a few MiB that a
// pool of threads quantizes, dequantizes or copies, each chunk written at its final offset in the
// output file (pwrite): no output file is assembled in memory, the page cache does the writing
// behind the computation, and a chunk's source pages are released once it is done. Peak memory is
// the threads' chunk buffers, far below one shard. The kernels here are bit-identical to
// quant.hpp's reference quantize / dequantize (tests/model/test_convert.cpp holds them to it).
//
// Nothing is written to `dst` until the end: the output is built in a staging folder beside it
// (".<name>.fp8moe-partial-<pid>") and renamed into place once complete and flushed. A failure or
// a cancellation removes the staging folder; a staging folder left by a process that no longer
// runs (killed outright) is removed by the next conversion to the same destination.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fp8moe/error.hpp"
#include "fp8moe/quant.hpp"

namespace fp8moe {

enum class ConvertTarget : uint8_t { BF16, FP8 };

// Where a conversion stands; passed to ConvertOptions::progress.
struct ConvertProgress {
  uint64_t bytes_done = 0, bytes_total = 0;  // source tensor bytes processed / in all files
  double seconds = 0;                        // since the conversion started
  int64_t file = 0, files = 0;               // the file being written (1-based) / output files
  std::string file_name;                     // its name relative to the checkpoint
  // Set on the one call made when that file is complete (then the counts below are filled).
  bool file_done = false;
  int64_t file_tensors_in = 0, file_tensors_out = 0;
  uint64_t file_bytes_out = 0;  // tensor data written to that file
};

struct ConvertOptions {
  ConvertTarget to = ConvertTarget::BF16;
  ScaleKind scheme = ScaleKind::Channel;  // FP8 only: Channel or Block
  // FP8 block: square block edge. Any positive size is accepted here; fp8_block_size_readable()
  // says which ones other loaders read (the CLI accepts only those).
  int64_t block = 128;
  int threads = 0;  // worker threads; 0: one per core (std::thread::hardware_concurrency)
  // Called on the calling thread about five times a second and once per finished file;
  // nullptr: silent.
  std::function<void(const ConvertProgress&)> progress;
  // Polled about ten times a second: once true, the workers stop, the staging folder is removed
  // and convert_checkpoint throws ConvertCancelled. nullptr: not cancellable.
  const std::atomic<bool>* cancel = nullptr;
};

struct ConvertReport {
  int64_t tensors_in = 0, tensors_out = 0;
  int64_t converted = 0;      // weights quantized or dequantized
  int64_t files = 0;          // safetensors files written
  uint64_t bytes_in = 0, bytes_out = 0;  // tensor data
  double seconds = 0;         // wall time of the whole conversion
  int threads = 0;            // worker threads used
  std::string removed_partial;  // a staging folder left by an earlier, killed run, removed ("" if none)
};

// Thrown when ConvertOptions::cancel was set; the staging folder is gone and `dst` untouched.
class ConvertCancelled : public Error {
 public:
  using Error::Error;
};

// Is `name` (a tensor of a plain checkpoint) a Linear weight that FP8 conversion quantizes?
// Rank-2 float ".weight" tensors, except routers, embeddings, lm_head and the MTP head.
bool fp8_convertible_weight(const std::string& name, int rank);

// The FP8 block edges that the readers of fine-grained FP8 checkpoints take: powers of two from
// 16 to 256 (transformers' and vLLM's Triton block-FP8 kernels use the block as a tile edge, which
// Triton needs to be a power of two, and tl.dot at least 16; 128 is the one released checkpoints
// use and the only one DeepGEMM / CUTLASS run).
bool fp8_block_size_readable(int64_t block);
std::vector<int64_t> fp8_readable_block_sizes();

// Converts checkpoint directory `src` (config.json + safetensors) into `dst`, which must not
// exist or be an empty directory, must not be `src` and must not lie inside `src`. Other regular
// files at the top of `src` (tokenizer, generation config) are copied. On failure or
// cancellation nothing is left behind (`dst` stays as it was).
ConvertReport convert_checkpoint(const std::string& src, const std::string& dst, const ConvertOptions& opt);

}  // namespace fp8moe
