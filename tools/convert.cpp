// fp8moe convert SRC DST --to bf16|fp8 [--scheme channel|block] [--block 128] [--quiet]
#include <cstdio>
#include <string>
#include <vector>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/convert.hpp"

namespace fp8moe::cli {
namespace {

constexpr const char* kUsage =
    "usage: fp8moe convert SRC DST --to bf16|fp8 [--scheme channel|block] [--block N] [--quiet]\n"
    "\n"
    "  --to bf16   dequantize every FP8 weight of an FP8 checkpoint (fp8 or compressed-tensors):\n"
    "              same tensor names, value = fp8 x scale rounded once to BF16, scales dropped\n"
    "  --to fp8    quantize the Linear weights of a BF16 checkpoint to F8_E4M3:\n"
    "              --scheme channel  compressed-tensors FP8_DYNAMIC (weight_scale [out, 1])   (default)\n"
    "              --scheme block    quant_method fp8, weight_scale_inv per N x N block (--block, default 128)\n"
    "  Routers, norms, embeddings and lm_head stay as they are. DST must not exist or be empty;\n"
    "  a sharded SRC gives a DST with the same shards and index. Progress goes to stderr.\n";

int run_convert(const std::vector<std::string>& argv) {
  const Args args(argv, {"to", "scheme", "block"}, {"quiet"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(2, "SRC DST");
  ConvertOptions opt;
  const std::string to = args.required("to");
  if (to == "bf16") {
    opt.to = ConvertTarget::BF16;
    FP8MOE_CHECK(!args.has("scheme") && !args.has("block"), "--scheme and --block apply to --to fp8 only");
  } else if (to == "fp8") {
    opt.to = ConvertTarget::FP8;
    const std::string scheme = args.get_or("scheme", "channel");
    if (scheme == "channel")
      opt.scheme = ScaleKind::Channel;
    else if (scheme == "block")
      opt.scheme = ScaleKind::Block;
    else
      FP8MOE_FAIL("--scheme: expected channel or block, found '", scheme, "'");
    FP8MOE_CHECK(!args.has("block") || opt.scheme == ScaleKind::Block, "--block applies to --scheme block only");
    opt.block = args.get_int("block", 128);
  } else {
    FP8MOE_FAIL("--to: expected bf16 or fp8, found '", to, "'");
  }
  if (!args.has("quiet"))
    opt.progress = [](const std::string& line) { std::fprintf(stderr, "convert: %s\n", line.c_str()); };

  const std::string& src = args.positional()[0];
  const std::string& dst = args.positional()[1];
  const ConvertReport r = convert_checkpoint(src, dst, opt);
  std::printf("converted %s -> %s (%s): %lld weights %s, %lld tensors in, %lld tensors out, %lld file%s, %.2f MiB -> %.2f MiB\n",
              src.c_str(), dst.c_str(), to.c_str(), static_cast<long long>(r.converted),
              opt.to == ConvertTarget::BF16 ? "dequantized" : "quantized", static_cast<long long>(r.tensors_in),
              static_cast<long long>(r.tensors_out), static_cast<long long>(r.files), r.files == 1 ? "" : "s",
              r.bytes_in / 1048576.0, r.bytes_out / 1048576.0);
  return 0;
}

}  // namespace

FP8MOE_COMMAND(convert, "convert a checkpoint between BF16 and FP8 (channel / 128x128 block)", run_convert);

}  // namespace fp8moe::cli
