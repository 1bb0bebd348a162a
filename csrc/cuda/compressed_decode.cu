// Decode attention on the bitmap-compressed KV cache, GPU (flash-decoding style).
//
// Grid (split, KV head, sequence): each block reads one slice of one (sequence, KV head)'s context and serves all
// query heads of its GQA group, so every compressed tile is read once per step. A warp takes one token at a time;
// lane `l` owns channels l + 32 r. A lane finds its channel's packed value without decoding the tile sequentially:
// the value sits at popcount(bits below the channel) after the values of the token's earlier tiles. Scores use a
// warp sum per head, the softmax is online (lane h keeps head h's running max and sum), and the block's warps and
// then the splits are merged through their log-sum-exp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels.h"
#include "launch.h"

namespace sparse_attn::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunks = 8;  // channels per lane: head_dim <= 32 * kChunks = 256
constexpr int kMinTokensPerSplit = 64;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(kFullMask, x, d);
  return x;
}

// x[r] = channel lane + 32 r of one compressed token (0 where pruned or past head_dim).
template <typename T>
__device__ __forceinline__ void load_compressed(const uint64_t* bitmaps, const T* values, int dim, int lane,
                                                float (&x)[kChunks]) {
  const int tiles = (dim + 63) / 64;
  int before = 0;  // values stored for the token's earlier tiles
#pragma unroll
  for (int c = 0; c < kChunks / 2; ++c) {
    const uint64_t bits = c < tiles ? bitmaps[c] : 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int bit = lane + 32 * half;
      const bool kept = (bits >> bit) & 1;  // bits past head_dim are never set
      const int rank = __popcll(bits & ((1ull << bit) - 1));
      x[2 * c + half] = kept ? to_float(values[before + rank]) : 0.0f;
    }
    before += __popcll(bits);
  }
}

template <typename T>
__device__ __forceinline__ void load_dense(const T* row, int dim, int lane, float (&x)[kChunks]) {
#pragma unroll
  for (int r = 0; r < kChunks; ++r) {
    const int e = lane + 32 * r;
    x[r] = e < dim ? to_float(row[e]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void load_token(const CompressedDecodeParams& p, bool values, int64_t bg, int t,
                                           int n_comp, int lane, float (&x)[kChunks]) {
  const int dim = p.head_dim;
  if (t < n_comp) {
    const int64_t slot = p.offsets[bg] + t;
    const int tiles = (dim + 63) / 64, keep = values ? p.v_keep : p.k_keep;
    const uint64_t* bitmaps = (values ? p.v_bitmaps : p.k_bitmaps) + slot * tiles;
    const T* packed = static_cast<const T*>(values ? p.v_values : p.k_values) + slot * keep;
    load_compressed(bitmaps, packed, dim, lane, x);
  } else {
    const T* window = static_cast<const T*>(values ? p.v_recent : p.k_recent);
    load_dense(window + (bg * p.window + (t - n_comp)) * dim, dim, lane, x);
  }
}

// Shared memory: q [group, dim] (pre-scaled), one accumulator [group, dim] per warp, per-warp max and sum [group].
__host__ __device__ inline size_t split_smem_bytes(int group, int dim) {
  return sizeof(float) * (static_cast<size_t>(1 + kWarps) * group * dim + 2 * kWarps * group);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) compressed_decode_split_kernel(CompressedDecodeParams p) {
  const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int group = p.q_heads / p.kv_heads, dim = p.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bg = static_cast<int64_t>(b) * p.kv_heads + g;
  const int64_t head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(g) * group;  // flat (b, h)

  SPARSE_ATTN_DYNAMIC_SHARED(float, smem);
  float* q_s = smem;
  float* accs = smem + group * dim;
  float* acc = accs + warp * group * dim;
  float* warp_max = accs + kWarps * group * dim;
  float* warp_sum_exp = warp_max + kWarps * group;

  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < group * dim; i += kThreads) q_s[i] = to_float(q[head0 * dim + i]) * p.scale;
  for (int i = threadIdx.x; i < kWarps * group * dim; i += kThreads) accs[i] = 0.0f;
  __syncthreads();

  // This split's tokens; the last split also takes anything past the planned context.
  const int n_comp = p.comp_lengths[b], n = n_comp + p.recent_lengths[b];
  const int t0 = split * p.tokens_per_split;
  const int t1 = split == p.num_splits - 1 ? n : min(n, t0 + p.tokens_per_split);

  float run_max = -INFINITY, run_sum = 0.0f;  // lane h < group: head h
  float x[kChunks];
  for (int t = t0 + warp; t < t1; t += kWarps) {
    load_token<T>(p, false, bg, t, n_comp, lane, x);
    float score = -INFINITY;
    for (int h = 0; h < group; ++h) {
      float dot = 0.0f;
#pragma unroll
      for (int r = 0; r < kChunks; ++r) {
        const int e = lane + 32 * r;
        if (e < dim) dot += q_s[h * dim + e] * x[r];
      }
      dot = warp_sum(dot);
      if (lane == h) score = dot;
    }
    // Online softmax: the old sum and accumulator are rescaled by exp(max_old - max_new).
    float rescale = 1.0f, prob = 0.0f;
    if (lane < group) {
      const float new_max = fmaxf(run_max, score);
      rescale = __expf(run_max - new_max);
      prob = __expf(score - new_max);
      run_sum = run_sum * rescale + prob;
      run_max = new_max;
    }
    load_token<T>(p, true, bg, t, n_comp, lane, x);
    for (int h = 0; h < group; ++h) {
      const float a = __shfl_sync(kFullMask, rescale, h), w = __shfl_sync(kFullMask, prob, h);
#pragma unroll
      for (int r = 0; r < kChunks; ++r) {
        const int e = lane + 32 * r;
        if (e < dim) acc[h * dim + e] = acc[h * dim + e] * a + w * x[r];
      }
    }
  }
  if (lane < group) {
    warp_max[warp * group + lane] = run_max;
    warp_sum_exp[warp * group + lane] = run_sum;
  }
  __syncthreads();

  // Merge the warps into this split's normalised output and log-sum-exp.
  for (int i = threadIdx.x; i < group * dim; i += kThreads) {
    const int h = i / dim, e = i % dim;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w * group + h]);
    float total = 0.0f, o = 0.0f;
    if (m != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(warp_max[w * group + h] - m);
        total += warp_sum_exp[w * group + h] * f;
        o += accs[(w * group + h) * dim + e] * f;
      }
    }
    const int64_t part = (head0 + h) * p.num_splits + split;
    p.partial_out[part * dim + e] = total > 0.0f ? o / total : 0.0f;
    if (e == 0) p.partial_lse[part] = total > 0.0f ? m + __logf(total) : -INFINITY;
  }
}

// One block per (b, h): out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s.
template <typename T>
__global__ void combine_splits_kernel(CompressedDecodeParams p) {
  const int64_t head = blockIdx.x;
  const float* lse_s = p.partial_lse + head * p.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, lse_s[s]);
  float total = 0.0f;
  if (m != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) total += __expf(lse_s[s] - m);
  }
  const float lse = m == -INFINITY ? -INFINITY : m + __logf(total);
  T* out = static_cast<T*>(p.out) + head * p.head_dim;
  for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
    float o = 0.0f;
    if (lse != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        o += __expf(lse_s[s] - lse) * p.partial_out[(head * p.num_splits + s) * p.head_dim + e];
      }
    }
    out[e] = from_float<T>(o);
  }
  if (threadIdx.x == 0) p.lse[head] = lse;
}

template <typename T>
cudaError_t launch_typed(const CompressedDecodeParams& p, cudaStream_t stream) {
  const size_t smem = split_smem_bytes(p.q_heads / p.kv_heads, p.head_dim);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(compressed_decode_split_kernel<T>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.num_splits, p.kv_heads, p.batch);
  SPARSE_ATTN_LAUNCH(compressed_decode_split_kernel<T>, grid, kThreads, smem, stream, p);
  SPARSE_ATTN_LAUNCH(combine_splits_kernel<T>, p.batch * p.q_heads, 128, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

void plan_compressed_decode(CompressedDecodeParams& p, int max_context, int device_sms) {
  // About two blocks per SM over all (sequence, KV head) pairs, but no split shorter than kMinTokensPerSplit.
  const int pairs = std::max(1, p.batch * p.kv_heads);
  const int wanted = std::max(1, (2 * device_sms + pairs - 1) / pairs);
  const int most = std::max(1, (max_context + kMinTokensPerSplit - 1) / kMinTokensPerSplit);
  p.num_splits = std::min(wanted, most);
  p.tokens_per_split = std::max(1, (max_context + p.num_splits - 1) / p.num_splits);
}

cudaError_t launch_compressed_decode(DType dtype, const CompressedDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, stream);
    case DType::kFloat16: return launch_typed<__half>(p, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparse_attn::cuda
