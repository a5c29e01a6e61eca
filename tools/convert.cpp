// fp8moe convert SRC DST --to bf16|fp8 [--scheme channel|block] [--block N] [--threads N] [--quiet]
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/convert.hpp"
#include "progress.hpp"
#include "signals.hpp"

namespace fp8moe::cli {
namespace {

constexpr const char* kUsage =
    "usage: fp8moe convert SRC DST --to bf16|fp8 [--scheme channel|block] [--block N] [--threads N] [--quiet]\n"
    "\n"
    "  --to bf16   dequantize every FP8 weight of an FP8 checkpoint (fp8 or compressed-tensors):\n"
    "              same tensor names, value = fp8 x scale rounded once to BF16, scales dropped\n"
    "  --to fp8    quantize the Linear weights of a BF16 checkpoint (MoE or dense) to F8_E4M3:\n"
    "              --scheme channel  compressed-tensors FP8_DYNAMIC (weight_scale [out, 1])   (default)\n"
    "              --scheme block    quant_method fp8, weight_scale_inv per N x N block (--block, default 128;\n"
    "                                16, 32, 64, 128 or 256: the sizes fine-grained FP8 loaders read)\n"
    "  --threads   worker threads (default: one per core)\n"
    "  Routers, norms, embeddings and lm_head stay as they are. DST must not exist or be an empty\n"
    "  directory, and must not lie inside SRC; a sharded SRC gives a DST with the same shards and index.\n"
    "  The output is built in a staging folder beside DST and renamed to DST when complete: a failure,\n"
    "  Ctrl-C or SIGTERM removes it and leaves DST as it was. Progress goes to stderr (a bar on a\n"
    "  terminal, a line every few seconds otherwise); --quiet silences it.\n";

std::string block_list() {
  std::string s;
  for (int64_t b : fp8_readable_block_sizes()) s += (s.empty() ? "" : ", ") + std::to_string(b);
  return s;
}

int run_convert(const std::vector<std::string>& argv) {
  const Args args(argv, {"to", "scheme", "block", "threads"}, {"quiet"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(2, "SRC DST");
  ConvertOptions opt;
  const std::string to = args.required("to");
  if (to == "bf16") {
    opt.to = ConvertTarget::BF16;
    FP8MOE_USAGE_CHECK(!args.has("scheme") && !args.has("block"), "--scheme and --block apply to --to fp8 only");
  } else if (to == "fp8") {
    opt.to = ConvertTarget::FP8;
    const std::string scheme = args.get_or("scheme", "channel");
    if (scheme == "channel")
      opt.scheme = ScaleKind::Channel;
    else if (scheme == "block")
      opt.scheme = ScaleKind::Block;
    else
      FP8MOE_USAGE_FAIL("--scheme: expected channel or block, found '", scheme, "'");
    FP8MOE_USAGE_CHECK(!args.has("block") || opt.scheme == ScaleKind::Block, "--block applies to --scheme block only");
    opt.block = args.get_int("block", 128);
    FP8MOE_USAGE_CHECK(fp8_block_size_readable(opt.block), "--block ", opt.block,
                       ": fine-grained FP8 loaders (transformers, vLLM) read block sizes ", block_list(),
                       " only; 128 is the one released checkpoints use");
  } else {
    FP8MOE_USAGE_FAIL("--to: expected bf16 or fp8, found '", to, "'");
  }
  const int64_t threads = args.get_int("threads", 0);
  FP8MOE_USAGE_CHECK(threads >= 0 && threads <= 1024, "--threads: expected 0 (one per core) to 1024, found ", threads);
  opt.threads = static_cast<int>(threads);

  const std::string& src = args.positional()[0];
  const std::string& dst = args.positional()[1];
  ProgressMeter meter("convert", ::isatty(2) != 0);
  if (!args.has("quiet"))
    opt.progress = [&meter](const ConvertProgress& p) {
      if (p.file_done)
        meter.note("[" + std::to_string(p.file) + "/" + std::to_string(p.files) + "] wrote " + p.file_name + " (" +
                   std::to_string(p.file_tensors_in) + " tensors in, " + std::to_string(p.file_tensors_out) +
                   " tensors out, " + mib(p.file_bytes_out) + ")");
      meter.update(p.bytes_done, p.bytes_total, p.seconds, p.file_name);
    };
  const CooperativeStop cooperative;
  opt.cancel = &stop_flag();
  ConvertReport r;
  try {
    r = convert_checkpoint(src, dst, opt);
  } catch (const ConvertCancelled&) {
    meter.finish();
    throw Interrupted(stop_signal(), std::string("interrupted by ") + signal_name(stop_signal()) +
                                         ": the partial output was removed; " + dst + " was not written");
  } catch (const Error& e) {
    meter.finish();
    throw Error(e.message() + " (nothing was written to " + dst + ")", e.internals());
  }
  meter.finish();
  if (!r.removed_partial.empty())
    std::fprintf(stderr, "convert: removed %s, the partial output of an earlier run that was killed\n",
                 r.removed_partial.c_str());
  std::printf("converted %s -> %s (%s): %lld weights %s, %lld tensors in, %lld tensors out, %lld file%s, "
              "%s -> %s in %.1f s (%.0f MB/s of input, %d thread%s)\n",
              src.c_str(), dst.c_str(), to.c_str(), static_cast<long long>(r.converted),
              opt.to == ConvertTarget::BF16 ? "dequantized" : "quantized", static_cast<long long>(r.tensors_in),
              static_cast<long long>(r.tensors_out), static_cast<long long>(r.files), r.files == 1 ? "" : "s",
              mib(r.bytes_in).c_str(), mib(r.bytes_out).c_str(), r.seconds,
              r.seconds > 0 ? static_cast<double>(r.bytes_in) / 1e6 / r.seconds : 0.0, r.threads,
              r.threads == 1 ? "" : "s");
  return 0;
}

}  // namespace

FP8MOE_COMMAND(convert, "convert a checkpoint between BF16 and FP8 (channel / 128x128 block)", run_convert);

}  // namespace fp8moe::cli
