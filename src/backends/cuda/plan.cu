// The routing plan on the device: a stable counting sort of the M = T*k (token, slot) pairs by
// expert, with no host synchronisation (so it can sit inside a captured CUDA graph).
//
// The pairs are cut into tiles of `tile_pairs` consecutive pairs, one warp per tile:
//   1. histogram: per tile, the count of each bucket          hist [tiles, E + 1]
//   2. column scan: per bucket, exclusive prefix over tiles   hist -> tile base, totals [E + 1]
//   3. scatter: each warp scans the bucket totals into the offsets (tile 0 writes them), adds its
//      tile base, then walks its pairs in increasing order, ranking equal buckets among the lanes
//      with __match_any_sync; so rows of an expert come out in increasing pair order.
// Bucket E collects pairs whose id is outside [0, E): they land after every expert's rows, at
// [offsets[E], M), are counted in DeviceErrors, and no consumer reads them as expert rows.
// The result does not depend on the tile size: it is the unique stable order.
#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_backend.cuh"

namespace fp8moe::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxBuckets = 1025;  // E + 1, E <= 1024: the per-warp counters live in shared memory

template <typename Id>
__device__ __forceinline__ int bucket_of(const Id* ids, int64_t p, int experts, long long& raw) {
  raw = static_cast<long long>(ids[p]);
  return (raw >= 0 && raw < experts) ? static_cast<int>(raw) : experts;
}

// Key for DeviceErrors::first_bad: the lowest bad pair wins atomicMin, carrying its id.
__device__ __forceinline__ unsigned long long bad_key(int64_t p, long long raw) {
  const long long clamped = raw < INT_MIN ? INT_MIN : (raw > INT_MAX ? INT_MAX : raw);
  return (static_cast<unsigned long long>(p) << 32) | static_cast<uint32_t>(static_cast<int32_t>(clamped));
}

// 1. hist [tiles, E + 1]: bucket counts of each tile; out-of-range ids reported to `errors`.
template <typename Id>
__global__ void plan_histogram(const Id* __restrict__ ids, int64_t pairs, int experts, int tile_pairs, int64_t tiles,
                               int* __restrict__ hist, DeviceErrors* errors) {
  extern __shared__ int counts_all[];  // [kWarpsPerBlock, E + 1]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (tile >= tiles) return;  // whole warps only: no block-wide barrier below
  const int buckets = experts + 1;
  int* counts = counts_all + warp * buckets;
  for (int b = lane; b < buckets; b += 32) counts[b] = 0;
  __syncwarp();

  const int64_t begin = tile * tile_pairs, end = min(begin + tile_pairs, pairs);
  unsigned long long bad = 0, first = ~0ull;
  for (int64_t p = begin + lane; p < end; p += 32) {
    long long raw;
    const int b = bucket_of(ids, p, experts, raw);
    atomicAdd(&counts[b], 1);
    if (b == experts) {
      ++bad;
      first = min(first, bad_key(p, raw));
    }
  }
  __syncwarp();
  for (int b = lane; b < buckets; b += 32) hist[tile * buckets + b] = counts[b];

  for (int o = 16; o > 0; o >>= 1) {
    bad += __shfl_xor_sync(0xffffffffu, bad, o);
    first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
  }
  if (lane == 0 && bad) {
    atomicAdd(&errors->bad_ids, bad);
    atomicMin(&errors->first_bad, first);
  }
}

// 2. In place: hist[t, b] <- sum_{t' < t} hist[t', b]; totals[b] = sum over all tiles.
// A block owns 32 buckets (one per lane: coalesced rows) and splits the tiles among its warps.
constexpr int kScanWarps = 32;
__global__ void plan_scan_columns(int* __restrict__ hist, int64_t tiles, int buckets, int* __restrict__ totals) {
  __shared__ int part[kScanWarps][32];  // per warp, per bucket: sum of the warp's tile range
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.x * 32 + lane;
  const int64_t per_warp = (tiles + kScanWarps - 1) / kScanWarps;
  const int64_t t0 = min(tiles, warp * per_warp), t1 = min(tiles, t0 + per_warp);
  int sum = 0;
  if (b < buckets)
    for (int64_t t = t0; t < t1; ++t) sum += hist[t * buckets + b];
  part[warp][lane] = sum;
  __syncthreads();
  int base = 0, total = 0;
  for (int w = 0; w < kScanWarps; ++w) {
    base += w < warp ? part[w][lane] : 0;
    total += part[w][lane];
  }
  if (b >= buckets) return;
  for (int64_t t = t0; t < t1; ++t) {
    const int v = hist[t * buckets + b];
    hist[t * buckets + b] = base;
    base += v;
  }
  if (warp == 0) totals[b] = total;
}

// 3. Offsets, then the scatter. Each warp first turns the bucket totals into the exclusive
// offsets (a few hundred adds: cheaper than a launch) plus its tile base, in shared memory.
template <typename Id>
__global__ void plan_scatter(const Id* __restrict__ ids, int64_t pairs, int experts, int tile_pairs, int64_t tiles,
                             const int* __restrict__ tile_base, const int* __restrict__ totals,
                             int* __restrict__ offsets, int* __restrict__ sorted_pairs, int* __restrict__ row_of_pair) {
  extern __shared__ int next_all[];  // [kWarpsPerBlock, E + 1] next free row of each bucket
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (tile >= tiles) return;
  const int buckets = experts + 1;
  int* next = next_all + warp * buckets;

  // Lane l scans buckets [l * per_lane, (l + 1) * per_lane) serially; lanes combine by shuffles.
  const int per_lane = (buckets + 31) / 32;
  const int b0 = min(buckets, lane * per_lane), b1 = min(buckets, b0 + per_lane);
  int lane_sum = 0;
  for (int b = b0; b < b1; ++b) lane_sum += totals[b];
  int incl = lane_sum;
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  int run = incl - lane_sum;  // exclusive prefix of this lane's first bucket
  for (int b = b0; b < b1; ++b) {
    if (tile == 0) offsets[b] = run;  // offsets [E + 1]: bucket E's start is offsets[E]
    next[b] = run + tile_base[tile * buckets + b];
    run += totals[b];
  }
  __syncwarp();

  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = tile * tile_pairs, end = min(begin + tile_pairs, pairs);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t p = base + lane;
    const bool valid = p < end;
    long long raw = 0;
    const int b = valid ? bucket_of(ids, p, experts, raw) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    const int rank = __popc(peers & lanes_below);
    if (valid) {
      const int row = next[b] + rank;
      sorted_pairs[row] = static_cast<int>(p);
      row_of_pair[p] = row;
    }
    __syncwarp();
    if (valid && rank == 0) next[b] += __popc(peers);  // the lowest peer advances its bucket
    __syncwarp();
  }
}

template <typename Id>
void launch_plan(const TensorView& topk_ids, int64_t experts, int64_t pairs, int tile_pairs, int64_t tiles,
                 int* hist, int* totals, RoutingPlan& plan, DeviceErrors* errors, cudaStream_t stream) {
  const Id* ids = topk_ids.ptr<const Id>();
  const int E = static_cast<int>(experts), buckets = E + 1;
  const unsigned blocks = grid_blocks(tiles, kWarpsPerBlock);
  const size_t smem = sizeof(int) * kWarpsPerBlock * buckets;
  plan_histogram<Id><<<blocks, 32 * kWarpsPerBlock, smem, stream>>>(ids, pairs, E, tile_pairs, tiles, hist, errors);
  FP8MOE_CUDA_LAUNCH_CHECK("plan_histogram");
  plan_scan_columns<<<grid_blocks(buckets, 32), 32 * kScanWarps, 0, stream>>>(hist, tiles, buckets, totals);
  FP8MOE_CUDA_LAUNCH_CHECK("plan_scan_columns");
  plan_scatter<Id><<<blocks, 32 * kWarpsPerBlock, smem, stream>>>(
      ids, pairs, E, tile_pairs, tiles, hist, totals, plan.offsets.ptr<int>(), plan.sorted_pairs.ptr<int>(),
      plan.row_of_pair.ptr<int>());
  FP8MOE_CUDA_LAUNCH_CHECK("plan_scatter");
}

// offsets = {0, rows}; sorted_pairs[r] = row_of_pair[r] = r.
__global__ void identity_plan_kernel(int32_t rows, int32_t* __restrict__ offsets, int32_t* __restrict__ sorted_pairs,
                                     int32_t* __restrict__ row_of_pair) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) sorted_pairs[r] = row_of_pair[r] = static_cast<int32_t>(r);
  if (r == 0) offsets[0] = 0, offsets[1] = rows;
}

}  // namespace

void identity_plan(int64_t rows, RoutingPlan& plan, Allocator& alloc, cudaStream_t stream) {
  FP8MOE_CHECK(rows >= 0 && rows < (int64_t{1} << 31), "identity_plan: ", rows, " rows overflow the I32 plan");
  provide_plan_tensors(plan, rows, 1, 1, alloc);
  constexpr int kThreads = 256;
  identity_plan_kernel<<<grid_blocks(std::max<int64_t>(rows, 1), kThreads), kThreads, 0, stream>>>(
      static_cast<int32_t>(rows), plan.offsets.ptr<int32_t>(), plan.sorted_pairs.ptr<int32_t>(),
      plan.row_of_pair.ptr<int32_t>());
  FP8MOE_CUDA_LAUNCH_CHECK("identity_plan_kernel");
}

void build_plan(const TensorView& topk_ids, int64_t experts, RoutingPlan& plan, Allocator& alloc,
                DeviceErrors* errors, cudaStream_t stream) {
  FP8MOE_CHECK(topk_ids.defined() && topk_ids.rank() == 2, "build_plan: tensor topk_ids must be [T, k], found ",
               topk_ids.defined() ? topk_ids.str() : std::string("no tensor"));
  check_device_operand(topk_ids, "build_plan topk_ids", {DType::I32, DType::I64});
  FP8MOE_CHECK(experts >= 1 && experts < kMaxBuckets, "build_plan: expert count must be in [1, ", kMaxBuckets - 1,
               "], found ", experts);
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), M = T * k;
  FP8MOE_CHECK(M < (int64_t{1} << 31), "build_plan: tensor topk_ids ", topk_ids.str(), " has ", M,
               " (token, slot) pairs, which overflow the I32 plan");

  provide_plan_tensors(plan, T, k, experts, alloc);  // offsets [E + 1], sorted_pairs [M], row_of_pair [M]
  if (M == 0) {  // no pairs: every expert is empty; a memset, no kernel
    FP8MOE_CUDA_CHECK(cudaMemsetAsync(plan.offsets.data(), 0, sizeof(int) * (experts + 1), stream));
    return;
  }

  // Tiles of at least 512 pairs, and at most ~2048 tiles (bounds the histogram to 2048 x (E+1)).
  const int64_t tile_pairs64 = std::max<int64_t>(512, (M / 2048 + 31) / 32 * 32 + 32);
  const int tile_pairs = static_cast<int>(tile_pairs64);
  const int64_t tiles = (M + tile_pairs - 1) / tile_pairs;
  const int64_t buckets = experts + 1;
  Tensor scratch(DType::I32, {tiles * buckets + buckets}, alloc);  // hist [tiles, E + 1] then totals [E + 1]
  int* hist = scratch.ptr<int>();
  int* totals = hist + tiles * buckets;
  if (topk_ids.dtype == DType::I32)
    launch_plan<int32_t>(topk_ids, experts, M, tile_pairs, tiles, hist, totals, plan, errors, stream);
  else
    launch_plan<int64_t>(topk_ids, experts, M, tile_pairs, tiles, hist, totals, plan, errors, stream);
}

}  // namespace fp8moe::cuda
