// One CUTLASS configuration per object file: compile with -DFP8LAB_CFG=<id> (run.sh builds them
// in parallel). Each defines fp8lab_make_cfg_<id>(); lab.cu lists them as weak symbols, so a
// configuration left out of the link is skipped rather than breaking the build.
#include "grouped_fp8.cuh"

using namespace cute;
using fp8lab::SfaLayout;
using CoopK = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
using CoopE = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
using PingK = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise;
using PingE = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
using T128 = Shape<_128, _128, _128>;
using T64 = Shape<_64, _128, _128>;
using C11 = Shape<_1, _1, _1>;
using C12 = Shape<_1, _2, _1>;
using C21 = Shape<_2, _1, _1>;

#ifndef FP8LAB_CFG
#error "compile with -DFP8LAB_CFG=<id>"
#endif

// id, name, tile, cluster, kernel schedule, epilogue schedule, SFA layout, weight scale
// granularity along N (128: 128x128 blocks, 1: per output channel), [channel scales applied in
// the epilogue]
#if FP8LAB_CFG == 0
#define CFG 0, "coop128_c1x2_sfaK", T128, C12, CoopK, CoopE, SfaLayout::KMajor, 128, false
#elif FP8LAB_CFG == 1
#define CFG 1, "coop128_c1x2_sfaMN", T128, C12, CoopK, CoopE, SfaLayout::MNMajor, 128, false
#elif FP8LAB_CFG == 2
#define CFG 2, "coop128_c1x1_sfaMN", T128, C11, CoopK, CoopE, SfaLayout::MNMajor, 128, false
#elif FP8LAB_CFG == 3
#define CFG 3, "ping64_c1x1_sfaMN", T64, C11, PingK, PingE, SfaLayout::MNMajor, 128, false
#elif FP8LAB_CFG == 4
#define CFG 4, "ping64_c1x1_sfaK", T64, C11, PingK, PingE, SfaLayout::KMajor, 128, false
#elif FP8LAB_CFG == 5
#define CFG 5, "coop128_c2x1_sfaMN", T128, C21, CoopK, CoopE, SfaLayout::MNMajor, 128, false
#elif FP8LAB_CFG == 6
#define CFG 6, "coop128_c1x2_sfaMN_chan", T128, C12, CoopK, CoopE, SfaLayout::MNMajor, 1, false
#elif FP8LAB_CFG == 7
#define CFG 7, "ping64_c1x1_sfaMN_chan", T64, C11, PingK, PingE, SfaLayout::MNMajor, 1, false
#elif FP8LAB_CFG == 8
#define CFG 8, "coop128_c1x2_sfaK_epichan", T128, C12, CoopK, CoopE, SfaLayout::KMajor, 128, true
#elif FP8LAB_CFG == 9
#define CFG 9, "coop128_c1x1_sfaK_epichan", T128, C11, CoopK, CoopE, SfaLayout::KMajor, 128, true
#else
#error "unknown FP8LAB_CFG"
#endif

#define FP8LAB_DEFINE2(ID, NAME, TILE, CLUSTER, KS, ES, SFA, GRANN, EPI)                   \
  fp8lab::Runner* fp8lab_make_cfg_##ID() {                                               \
    return new fp8lab::CutlassGroupedFp8<TILE, CLUSTER, KS, ES, SFA, GRANN, EPI>( \
        fp8lab::ConfigInfo{NAME, SFA, GRANN, #TILE " " #CLUSTER " " #KS, EPI}); \
  }
#define FP8LAB_DEFINE(...) FP8LAB_DEFINE2(__VA_ARGS__)
FP8LAB_DEFINE(CFG)
