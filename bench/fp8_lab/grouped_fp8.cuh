// FP8 x FP8 grouped GEMM with fine-grained scales, built from CUTLASS 4.2's Hopper
// "PtrArray ... FP8Blockwise" kernel (the one behind example 68), for fp8moe's layouts:
//
//   A   [M_total, K] e4m3 row-major: all experts' rows, expert-ordered; offsets[E+1] on the device
//   SFA f32, one scale per row and 128-wide K block, in one of two layouts (SfaLayout below)
//   B   [E, N, K] e4m3, each expert's W is N x K with K contiguous (nn.Linear as stored)
//   SFB f32 [E, ceil(N/128), ceil(K/128)] (128x128 blocks), or for per-output-channel weight
//       scales (GranN == 1) [E, ceil(K/128), N]: the channel scale repeated for every K block
//   D   [M_total, N] bf16 row-major
//
// The per-group argument arrays CUTLASS wants (problem shapes, pointers, strides, scale layouts)
// are written by fill_group_args, one thread per expert, from the offsets on the device: no host
// sync, one launch, and the GEMM itself is one persistent launch over all experts' tiles.
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler_params.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fp8lab {

using fp8 = cutlass::float_e4m3_t;
using bf16 = cutlass::bfloat16_t;

// SFA layouts the kernel can read.
//  KMajor:   [M_total, Kb] row-major (fp8moe's natural per-token layout); group e starts at
//            offsets[e] * Kb. The kernel fetches 128 scales per K tile with a stride of Kb floats.
//  MNMajor:  per expert, a [Kb, m_e] block (the expert's rows contiguous for each K block), the
//            blocks concatenated in expert order; group e also starts at offsets[e] * Kb, and the
//            scale of row r (of expert e) and K block kb is at offsets[e]*Kb + kb*m_e + (r-offsets[e]).
//            The kernel derives the K-block stride from the group's own M, so a plain
//            [Kb, M_total] layout (stride M_total) is NOT what it reads.
enum class SfaLayout { KMajor, MNMajor };

struct Problem {
  int E = 0, N = 0, K = 0;
  int64_t M_total = 0;
  const int* offsets = nullptr;  // device, E+1 int32
  const fp8* A = nullptr;
  const float* SFA = nullptr;
  const fp8* B = nullptr;
  const float* SFB = nullptr;
  bf16* D = nullptr;
};

struct ConfigInfo {
  const char* name;
  SfaLayout sfa;
  int gran_n;  // 128: 128x128 weight blocks; 1: per-output-channel weight scales
  const char* desc;
  // Per-output-channel weight scales applied in the epilogue (a per-group row-vector broadcast)
  // while the mainloop runs with 128-granular weight scales that are all 1: SFB is then the
  // checkpoint's own [E, N] channel-scale array.
  bool chan_epilogue = false;
};

struct Runner {
  virtual ~Runner() {}
  virtual const ConfigInfo& info() const = 0;
  // Allocates the per-group arrays and the workspace, builds the kernel's params. E, N, K and the
  // buffer pointers are fixed after this; offsets' contents may change between runs.
  virtual int setup(const Problem& p, int raster, int swizzle, cudaStream_t s) = 0;
  virtual int fill(cudaStream_t s) = 0;  // per-group arrays from the offsets (device)
  virtual int gemm(cudaStream_t s) = 0;  // the grouped GEMM alone
};

template <class Mainloop_, class ProblemShape_, class StrideA, class StrideB, class StrideD,
          class LayoutSFA, class LayoutSFB, class ScaleConfig, int GranN>
struct GroupArgs {
  using UnderlyingShape = typename ProblemShape_::UnderlyingProblemShape;
  UnderlyingShape* problem;
  const fp8** ptrA;
  const fp8** ptrB;
  const float** ptrSFA;
  const float** ptrSFB;
  bf16** ptrD;
  StrideA* strideA;
  StrideB* strideB;
  StrideD* strideD;
  LayoutSFA* layoutSFA;
  LayoutSFB* layoutSFB;
  const float** ptrChan;  // chan_epilogue: per-group pointer to the expert's N channel scales
  const float* ones;      // chan_epilogue: Nb*Kb ones, the mainloop's weight scales
};

template <class GA, class StrideA, class StrideB, class StrideD, class ScaleConfig, int GranN>
__global__ void fill_group_args(GA ga, Problem p) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.E) return;
  const int m0 = p.offsets[e];
  const int m = p.offsets[e + 1] - m0;
  const int N = p.N, K = p.K;
  const int Kb = (K + 127) / 128, Nb = (N + 127) / 128;
  ga.problem[e] = cute::make_shape(m, N, K);
  ga.ptrA[e] = p.A + (int64_t)m0 * K;
  ga.ptrB[e] = p.B + (int64_t)e * N * K;
  ga.ptrD[e] = p.D + (int64_t)m0 * N;
  ga.ptrSFA[e] = p.SFA + (int64_t)m0 * Kb;
  if (ga.ones) {
    ga.ptrSFB[e] = ga.ones;
    ga.ptrChan[e] = p.SFB + (int64_t)e * N;
  } else {
    ga.ptrSFB[e] = p.SFB + (int64_t)e * (GranN == 1 ? (int64_t)Kb * N : (int64_t)Nb * Kb);
  }
  ga.strideA[e] = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, K, 1));
  ga.strideB[e] = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
  ga.strideD[e] = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, N, 1));
  ga.layoutSFA[e] = ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, N, K, 1));
  ga.layoutSFB[e] = ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, N, K, 1));
}

#define FP8LAB_CUDA(x)                                                                 \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                                        \
    }                                                                                  \
  } while (0)

// One kernel configuration. Pingpong: each of the two consumer warpgroups owns a 64-row tile;
// Cooperative: both share a 128-row tile.
template <int kGranN, bool kEpiChan, class TileShape>
struct FusionFor {  // D = acc
  using type = cutlass::epilogue::fusion::LinearCombination<bf16, float, void, float>;
};
template <class TileShape>
struct FusionFor<128, true, TileShape> {  // D = acc * chan_scale[e][n]
  using type = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, bf16, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float*, float,
                                                  cute::Stride<cute::_0, cute::_1, cute::_0>>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
};

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          SfaLayout kSfa, int kGranN, bool kEpiChan = false>
struct CutlassGroupedFp8 : Runner {
  static_assert(!kEpiChan || kGranN == 128, "channel epilogue runs a 128-granular mainloop");
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using ElementA = fp8;
  using LayoutA = cutlass::layout::RowMajor;  // M x K, K contiguous
  using ElementB = fp8;
  using LayoutB = cutlass::layout::ColumnMajor;  // K x N column-major == N x K with K contiguous
  using ElementC = void;
  using LayoutC = cutlass::layout::RowMajor;
  using ElementD = bf16;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int AlignA = 16, AlignB = 16, AlignC = 8, AlignD = 8;
  using ElementAcc = float;

  static constexpr cute::GMMA::Major kMajorSFA =
      kSfa == SfaLayout::MNMajor ? cute::GMMA::Major::MN : cute::GMMA::Major::K;
  // Per-channel scales are read N-major ([Kb][N] per expert: 128 consecutive floats per tile);
  // 128x128 block scales K-major, as checkpoints store them ([Nb][Kb] per expert).
  static constexpr cute::GMMA::Major kMajorSFB =
      kGranN == 1 ? cute::GMMA::Major::MN : cute::GMMA::Major::K;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kGranN, 128, kMajorSFA, kMajorSFB>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, ElementC, LayoutC*,
      AlignC, ElementD, LayoutD*, AlignD, EpilogueSchedule,
      typename FusionFor<kGranN, kEpiChan, TileShape>::type>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA,
      cute::tuple<LayoutA*, LayoutSFA*>, AlignA, ElementB, cute::tuple<LayoutB*, LayoutSFB*>,
      AlignB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  using GA = GroupArgs<CollectiveMainloop, ProblemShape, StrideA, StrideB, StrideD, LayoutSFA,
                       LayoutSFB, ScaleConfig, kGranN>;

  ConfigInfo info_;
  Problem p_{};
  GA ga_{};
  void* arena_ = nullptr;
  void* workspace_ = nullptr;
  float* ones_ = nullptr;
  Gemm gemm_;

  explicit CutlassGroupedFp8(ConfigInfo i) : info_(i) {}
  ~CutlassGroupedFp8() override {
    if (arena_) cudaFree(arena_);
    if (workspace_) cudaFree(workspace_);
    if (ones_) cudaFree(ones_);
  }
  const ConfigInfo& info() const override { return info_; }

  int setup(const Problem& p, int raster, int swizzle, cudaStream_t s) override {
    p_ = p;
    const int E = p.E;
    // One allocation for all per-group arrays, each 256-byte aligned.
    size_t sizes[] = {sizeof(typename GA::UnderlyingShape), sizeof(void*), sizeof(void*),
                      sizeof(void*), sizeof(void*), sizeof(void*), sizeof(StrideA),
                      sizeof(StrideB), sizeof(StrideD), sizeof(LayoutSFA), sizeof(LayoutSFB),
                      sizeof(void*)};
    size_t off[12], total = 0;
    for (int i = 0; i < 12; ++i) {
      off[i] = total;
      total += (sizes[i] * E + 255) / 256 * 256;
    }
    FP8LAB_CUDA(cudaMalloc(&arena_, total));
    char* b = static_cast<char*>(arena_);
    ga_.problem = reinterpret_cast<typename GA::UnderlyingShape*>(b + off[0]);
    ga_.ptrA = reinterpret_cast<const fp8**>(b + off[1]);
    ga_.ptrB = reinterpret_cast<const fp8**>(b + off[2]);
    ga_.ptrSFA = reinterpret_cast<const float**>(b + off[3]);
    ga_.ptrSFB = reinterpret_cast<const float**>(b + off[4]);
    ga_.ptrD = reinterpret_cast<bf16**>(b + off[5]);
    ga_.strideA = reinterpret_cast<StrideA*>(b + off[6]);
    ga_.strideB = reinterpret_cast<StrideB*>(b + off[7]);
    ga_.strideD = reinterpret_cast<StrideD*>(b + off[8]);
    ga_.layoutSFA = reinterpret_cast<LayoutSFA*>(b + off[9]);
    ga_.layoutSFB = reinterpret_cast<LayoutSFB*>(b + off[10]);
    ga_.ptrChan = reinterpret_cast<const float**>(b + off[11]);
    ga_.ones = nullptr;
    if constexpr (kEpiChan) {
      const int nk = ((p.N + 127) / 128) * ((p.K + 127) / 128);
      std::vector<float> h(nk, 1.0f);
      FP8LAB_CUDA(cudaMalloc(&ones_, nk * sizeof(float)));
      FP8LAB_CUDA(cudaMemcpy(ones_, h.data(), nk * sizeof(float), cudaMemcpyHostToDevice));
      ga_.ones = ones_;
    }
    if (fill(s)) return 1;

    cutlass::KernelHardwareInfo hw =
        cutlass::KernelHardwareInfo::make_kernel_hardware_info<GemmKernel>(0);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        // No host copy of the problem shapes: the persistent scheduler reads them on the device.
        {E, ga_.problem, nullptr},
        {ga_.ptrA, ga_.strideA, ga_.ptrB, ga_.strideB, ga_.ptrSFA, ga_.layoutSFA, ga_.ptrSFB,
         ga_.layoutSFB},
        {{}, nullptr, nullptr, ga_.ptrD, ga_.strideD},
        hw};
    auto& fa = args.epilogue.thread;
    if constexpr (kEpiChan) {
      // {row broadcast {per-group pointers, default, stride}, acc fetch {}, multiply {}}
      fa = {{ga_.ptrChan, 0.0f, {}}, {}, {}};
    } else {
      fa.alpha = 1.0f;
      fa.beta = 0.0f;
      fa.alpha_ptr = nullptr;
      fa.beta_ptr = nullptr;
      fa.alpha_ptr_array = nullptr;
      fa.beta_ptr_array = nullptr;
      fa.dAlpha = {cute::_0{}, cute::_0{}, 0};
      fa.dBeta = {cute::_0{}, cute::_0{}, 0};
    }
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order =
        raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;
    args.scheduler.max_swizzle_size = swizzle;

    size_t ws = Gemm::get_workspace_size(args);
    FP8LAB_CUDA(cudaMalloc(&workspace_, ws > 0 ? ws : 16));
    cutlass::Status st = gemm_.can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      fprintf(stderr, "%s: can_implement failed: %s\n", info_.name, cutlassGetStatusString(st));
      return 1;
    }
    st = gemm_.initialize(args, workspace_, s);
    if (st != cutlass::Status::kSuccess) {
      fprintf(stderr, "%s: initialize failed: %s\n", info_.name, cutlassGetStatusString(st));
      return 1;
    }
    return 0;
  }

  int fill(cudaStream_t s) override {
    fill_group_args<GA, StrideA, StrideB, StrideD, ScaleConfig, kGranN>
        <<<(p_.E + 127) / 128, 128, 0, s>>>(ga_, p_);
    FP8LAB_CUDA(cudaGetLastError());
    return 0;
  }

  int gemm(cudaStream_t s) override {
    cutlass::Status st = gemm_.run(s);
    if (st != cutlass::Status::kSuccess) {
      fprintf(stderr, "%s: run failed: %s\n", info_.name, cutlassGetStatusString(st));
      return 1;
    }
    return 0;
  }
};

}  // namespace fp8lab
