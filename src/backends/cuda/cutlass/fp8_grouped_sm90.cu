// The FP8 x FP8 grouped GEMM with blockwise scales of the W8A8 path (w8a8.cuh), built from
// CUTLASS 4.2's Hopper ptr-array kernels with FP8 blockwise scaling (the kernels behind CUTLASS
// example 68): TMA loads, a producer warpgroup and two consumer warpgroups, FP8 wgmma over 128-wide
// K blocks whose partial sums are scaled into FP32 accumulators (per-row activation scale x weight
// block scale), and a persistent scheduler over every expert's tiles. Two tiles (Sm90Tile, chosen
// in w8a8_dispatch.cpp):
//   M128  cooperative 128x128x128: both consumer warpgroups share a tile. bench/fp8_lab measured
//         it best on an H100 (its README): with a 1x2 cluster (A multicast) 0.80-0.83x of dense
//         torch._scaled_mm at 512 rows per expert and 84-91% of the memory floor at 128.
//   M64   ping-pong 64x128x128: each consumer warpgroup owns a 64-row tile and one's epilogue
//         overlaps the other's MMAs. With a few rows per expert (16 at 256 Qwen3 tokens) a 128-row
//         tile is mostly padding whose MMAs take about as long as the weight tile's load; this one
//         halves them.
//
// This translation unit alone includes CUTLASS, and is built only for sm_90a (CMakeLists.txt:
// fp8moe_w8a8_sm90). Layouts, as fp8moe stores them (no copy, no transpose):
//   A  [M, K] e4m3 row-major, experts' rows contiguous (offsets)   SFA [M, Kb] F32 (K-major)
//   B  [E, N, K] e4m3 (CUTLASS's column-major K x N)                SFB [E, Nb, Kb] F32 (K-major)
//   D  [M, N] BF16 row-major
// Per-expert argument arrays are written on the device from the offsets by fill_group_args (one
// thread per expert), and the kernel reads the problem shapes on the device: no host sync.
#include <cuda_runtime.h>

#include <algorithm>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/w8a8.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler_params.h"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

namespace fp8moe::cuda::w8a8 {
namespace {

using Fp8 = cutlass::float_e4m3_t;
using Bf16 = cutlass::bfloat16_t;

// ---- the kernel types: one per Sm90Tile, the same operands, scales and epilogue
template <int kTileM, class KernelSchedule, class EpilogueSchedule>
struct Config {
  using Tile = cute::Shape<cute::Int<kTileM>, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;     // M x K, K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // K x N column-major == [N, K], K contiguous
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16, kAlignD = 8;  // elements of 16 bytes: TMA's unit
  // One activation scale per row (ScaleGranularityM = 1) and 128-wide K block; weights in
  // 128 x 128 blocks; both K-major, as the quantizer and the checkpoints write them.
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float, void, LayoutD*, kAlignD, Bf16, LayoutD*, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Bf16, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Fp8, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB, Fp8,
      cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, CollEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
};

using ConfigM128 = Config<128, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                          cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
using ConfigM64 = Config<64, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;

// The per-expert arrays CUTLASS reads (E entries each), carved from the caller's scratch.
template <class C>
struct GroupArgs {
  typename C::Shape3* problem;
  const Fp8** a;
  const Fp8** b;
  const float** sa;
  const float** sb;
  Bf16** d;
  typename C::StrideA* stride_a;
  typename C::StrideB* stride_b;
  typename C::StrideD* stride_d;
  typename C::LayoutSFA* layout_sa;
  typename C::LayoutSFB* layout_sb;
  float* ones;  // [Nb * Kb] unit weight scales (p.sb null: channel scales come in the epilogue)
};

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Byte offsets of GroupArgs' arrays in the scratch, then the unit scales, then the workspace.
template <class C>
struct ScratchLayout {
  size_t off[12];
  size_t args_end = 0;
  explicit ScratchLayout(const Sm90Fp8Grouped& p) {
    const size_t E = static_cast<size_t>(p.E);
    const size_t sizes[12] = {sizeof(typename C::Shape3),    sizeof(void*),
                              sizeof(void*),                 sizeof(void*),
                              sizeof(void*),                 sizeof(void*),
                              sizeof(typename C::StrideA),   sizeof(typename C::StrideB),
                              sizeof(typename C::StrideD),   sizeof(typename C::LayoutSFA),
                              sizeof(typename C::LayoutSFB), 0};
    size_t total = 0;
    for (int i = 0; i < 11; ++i) {
      off[i] = total;
      total += align256(sizes[i] * E);
    }
    off[11] = total;  // ones
    const size_t nb = static_cast<size_t>((p.N + 127) / 128), kb = static_cast<size_t>((p.K + 127) / 128);
    total += p.sb ? 0 : align256(nb * kb * sizeof(float));
    args_end = total;
  }
  GroupArgs<C> carve(void* scratch) const {
    char* s = static_cast<char*>(scratch);
    return {reinterpret_cast<typename C::Shape3*>(s + off[0]),     reinterpret_cast<const Fp8**>(s + off[1]),
            reinterpret_cast<const Fp8**>(s + off[2]),             reinterpret_cast<const float**>(s + off[3]),
            reinterpret_cast<const float**>(s + off[4]),           reinterpret_cast<Bf16**>(s + off[5]),
            reinterpret_cast<typename C::StrideA*>(s + off[6]),    reinterpret_cast<typename C::StrideB*>(s + off[7]),
            reinterpret_cast<typename C::StrideD*>(s + off[8]),    reinterpret_cast<typename C::LayoutSFA*>(s + off[9]),
            reinterpret_cast<typename C::LayoutSFB*>(s + off[10]), reinterpret_cast<float*>(s + off[11])};
  }
};

// One thread per expert writes that expert's entries; the first Nb*Kb threads also write the unit
// weight scales when the weights carry per-channel scales. Experts with no rows get m = 0, which
// the scheduler skips.
template <class C>
__global__ void fill_group_args(GroupArgs<C> ga, Sm90Fp8Grouped p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int N = p.N, K = p.K, Kb = (K + 127) / 128, Nb = (N + 127) / 128;
  if (!p.sb && i < Nb * Kb) ga.ones[i] = 1.0f;
  if (i >= p.E) return;
  const int e = i, m0 = p.offsets[e], m = p.offsets[e + 1] - m0;
  ga.problem[e] = cute::make_shape(m, N, K);
  ga.a[e] = reinterpret_cast<const Fp8*>(p.a) + static_cast<int64_t>(m0) * K;
  ga.b[e] = reinterpret_cast<const Fp8*>(p.b) + static_cast<int64_t>(e) * N * K;
  ga.d[e] = static_cast<Bf16*>(p.d) + static_cast<int64_t>(m0) * N;
  ga.sa[e] = p.sa + static_cast<int64_t>(m0) * Kb;
  ga.sb[e] = p.sb ? p.sb + static_cast<int64_t>(e) * Nb * Kb : ga.ones;
  ga.stride_a[e] = cutlass::make_cute_packed_stride(typename C::StrideA{}, cute::make_shape(m, K, 1));
  ga.stride_b[e] = cutlass::make_cute_packed_stride(typename C::StrideB{}, cute::make_shape(N, K, 1));
  ga.stride_d[e] = cutlass::make_cute_packed_stride(typename C::StrideD{}, cute::make_shape(m, N, 1));
  // The kernel rebuilds these from the group's shape itself; the arrays must exist all the same.
  ga.layout_sa[e] = C::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, N, K, 1));
  ga.layout_sb[e] = C::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, N, K, 1));
}

// The current device's SM count and how many 1x2 clusters of this kernel fit at once (the
// persistent grid's size), asked once per device and kernel: host queries, none on the stream.
template <class C>
cutlass::KernelHardwareInfo hardware() {
  int device = 0;
  FP8MOE_CUDA_CHECK(cudaGetDevice(&device));
  static cutlass::KernelHardwareInfo cached[64];
  static bool known[64];
  const int slot = std::min(device, 63);
  if (!known[slot]) {
    int sms = 0;
    FP8MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[slot] = cutlass::KernelHardwareInfo::make_kernel_hardware_info<typename C::Kernel>(device, sms);
    known[slot] = true;
  }
  return cached[slot];
}

template <class C>
typename C::Gemm::Arguments arguments(const Sm90Fp8Grouped& p, const GroupArgs<C>& ga) {
  typename C::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      // No host copy of the problem shapes: the persistent scheduler reads them on the device.
      {p.E, ga.problem, nullptr},
      {ga.a, ga.stride_a, ga.b, ga.stride_b, ga.sa, ga.layout_sa, ga.sb, ga.layout_sb},
      {{}, nullptr, nullptr, ga.d, ga.stride_d},
      hardware<C>()};
  auto& f = args.epilogue.thread;  // D = 1 * acc
  f.alpha = 1.0f;
  f.beta = 0.0f;
  f.alpha_ptr = nullptr;
  f.beta_ptr = nullptr;
  f.alpha_ptr_array = nullptr;
  f.beta_ptr_array = nullptr;
  f.dAlpha = {cute::_0{}, cute::_0{}, 0};
  f.dBeta = {cute::_0{}, cute::_0{}, 0};
  return args;
}

void check_status(cutlass::Status st, const char* what, const Sm90Fp8Grouped& p) {
  FP8MOE_CHECK(st == cutlass::Status::kSuccess, "W8A8 grouped GEMM (CUTLASS sm90 FP8 blockwise, ", sm90_tile_name(p.tile),
               " tile): ", what, " failed: ", cutlassGetStatusString(st), " (E = ", p.E, ", N = ", p.N, ", K = ", p.K,
               ", M = ", p.M, ")");
}

template <class C>
size_t scratch_bytes(const Sm90Fp8Grouped& p) {
  const ScratchLayout<C> l(p);
  const size_t ws = C::Gemm::get_workspace_size(arguments<C>(p, l.carve(nullptr)));
  return l.args_end + align256(std::max<size_t>(ws, 16));
}

template <class C>
void run(const Sm90Fp8Grouped& p, void* scratch, cudaStream_t stream) {
  const ScratchLayout<C> l(p);
  const GroupArgs<C> ga = l.carve(scratch);
  const int Nb = (p.N + 127) / 128, Kb = (p.K + 127) / 128;
  const int threads = std::max(p.E, p.sb ? 0 : Nb * Kb);
  fill_group_args<C><<<(threads + 127) / 128, 128, 0, stream>>>(ga, p);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 fill_group_args");
  auto args = arguments<C>(p, ga);
  typename C::Gemm gemm;
  check_status(gemm.can_implement(args), "can_implement", p);
  // Host-side parameter set-up (TMA descriptors of placeholder shapes; the kernel rewrites them
  // per expert in its workspace) plus stream-ordered work only: capturable in a CUDA graph.
  check_status(gemm.initialize(args, static_cast<char*>(scratch) + l.args_end, stream), "initialize", p);
  check_status(gemm.run(stream), "run", p);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 CUTLASS grouped GEMM");
}

void check_tile(const Sm90Fp8Grouped& p) {
  FP8MOE_CHECK(p.tile == Sm90Tile::M128 || p.tile == Sm90Tile::M64,
               "W8A8 grouped GEMM: the CUTLASS tile must be chosen (m128 or m64), found ", sm90_tile_name(p.tile));
}

}  // namespace

size_t sm90_fp8_grouped_scratch(const Sm90Fp8Grouped& p) {
  check_tile(p);
  return p.tile == Sm90Tile::M64 ? scratch_bytes<ConfigM64>(p) : scratch_bytes<ConfigM128>(p);
}

void sm90_fp8_grouped(const Sm90Fp8Grouped& p, void* scratch, cudaStream_t stream) {
  check_tile(p);
  if (p.tile == Sm90Tile::M64)
    run<ConfigM64>(p, scratch, stream);
  else
    run<ConfigM128>(p, scratch, stream);
}

}  // namespace fp8moe::cuda::w8a8
