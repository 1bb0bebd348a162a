// Top-k token selection on the GPU: one block per (b, h) row, for rows of any length (128k tokens and more).
//
// The row does not fit in shared memory, so the k-th score is found by a threshold search: a radix select over the
// 32-bit ordered keys, 8 bits per pass (4 passes, each a 256-bin shared histogram of the keys that still match the
// prefix found so far). Then one ordered pass over the row writes, ascending, every token that is forced (sink or
// recent), above the threshold, or equal to it and among the lowest-index ties still needed; a block-wide prefix sum
// gives each kept token its output slot.
#include <cuda_runtime.h>

#include "../ordered_key.h"
#include "kernels.h"
#include "launch.h"

namespace sparse_attn::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kWarps == 32, "block_exclusive_scan scans the warp sums with one warp");

__device__ __forceinline__ int warp_inclusive_scan(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, d);
    if (lane >= d) x += y;
  }
  return x;
}

// Exclusive prefix sum of one value per thread, in thread order; *total receives the block's sum.
// Every thread of the block must call it.
__device__ int block_exclusive_scan(int x, int* total) {
  __shared__ int warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int inclusive = warp_inclusive_scan(x);
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) warp_sums[lane] = warp_inclusive_scan(warp_sums[lane]);  // kWarps == 32
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - x;
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

__global__ void __launch_bounds__(kThreads) topk_tokens_kernel(TopkTokensParams p) {
  const int row = blockIdx.x;
  const float* scores = p.scores + static_cast<int64_t>(row) * p.max_len;
  int32_t* out = p.indices + static_cast<int64_t>(row) * p.k;
  const int b = row / p.heads;
  const int len = min(max(p.lengths[b], 0), p.max_len);
  const int budget = p.budgets ? min(max(p.budgets[b], 0), p.k) : p.k;
  if (len <= budget) {  // everything fits; zero padding past the count
    for (int i = threadIdx.x; i < p.k; i += blockDim.x) out[i] = i < len ? i : 0;
    if (threadIdx.x == 0) p.counts[row] = len;
    return;
  }
  // Sink [0, sink_end) and recent [recent_start, len) are kept; `need` more come from the middle by score.
  const int sink_end = min(p.sink, len);
  const int recent_start = max(len - p.recent, sink_end);
  const int forced = sink_end + (len - recent_start);
  const int need = max(budget - forced, 0);

  // Radix select: after the passes, `threshold` is the key of the need-th highest middle token, and `ties` is how
  // many tokens with exactly that key are still needed (the keys above it supply the rest).
  __shared__ int hist[256];
  __shared__ uint32_t chosen_prefix;
  __shared__ int chosen_ties;
  uint32_t threshold = 0, matched = 0;
  int ties = need;
  if (need > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int i = sink_end + threadIdx.x; i < recent_start; i += blockDim.x) {
        const uint32_t key = ordered_key(scores[i]);
        if ((key & matched) == threshold) atomicAdd(&hist[(key >> shift) & 0xff], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {  // highest digit whose cumulative count (from the top) reaches the remaining need
        int above = 0, digit = 255;
        for (; digit > 0 && above + hist[digit] < ties; --digit) above += hist[digit];
        chosen_prefix = threshold | (static_cast<uint32_t>(digit) << shift);
        chosen_ties = ties - above;
      }
      __syncthreads();
      threshold = chosen_prefix;
      ties = chosen_ties;
      matched |= 0xffu << shift;
    }
  }

  // Ordered compaction, blockDim tokens at a time.
  int written = 0, ties_seen = 0;
  for (int base = 0; base < len; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool forced = i < len && (i < sink_end || i >= recent_start);
    bool above = false, tie = false;
    if (i < len && !forced && need > 0) {
      const uint32_t key = ordered_key(scores[i]);
      above = key > threshold;
      tie = key == threshold;
    }
    int tie_total, take_total;
    const int tie_rank = ties_seen + block_exclusive_scan(tie, &tie_total);
    const bool take = forced || above || (tie && tie_rank < ties);
    const int slot = written + block_exclusive_scan(take, &take_total);
    if (take) out[slot] = i;
    written += take_total;
    ties_seen += tie_total;
  }
  for (int i = forced + need + threadIdx.x; i < p.k; i += blockDim.x) out[i] = 0;  // padding
  if (threadIdx.x == 0) p.counts[row] = forced + need;
}

}  // namespace

cudaError_t launch_topk_tokens(const TopkTokensParams& p, cudaStream_t stream) {
  const int rows = p.batch * p.heads;
  if (rows == 0) return cudaSuccess;
  SPARSE_ATTN_LAUNCH(topk_tokens_kernel, rows, kThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace sparse_attn::cuda
