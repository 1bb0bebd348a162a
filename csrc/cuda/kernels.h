// Launchers of the CUDA kernels, on raw pointers. The .cu files include only the CUDA toolkit's headers (no torch),
// so they compile with nvcc against any torch install, CPU builds included (scripts/nvcc_check.sh); the torch glue
// that allocates outputs and picks the stream lives in ops_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparse_attn::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct TopkTokensParams {
  const float* scores;     // [B, H, L]
  const int32_t* lengths;  // [B], clamped to [0, L]
  const int32_t* budgets;  // [B] tokens per row, clamped to [0, k]; null: k
  int32_t* indices;        // [B, H, k]
  int32_t* counts;         // [B, H]
  int batch, heads, max_len, k, sink, recent;
};

// Returns cudaSuccess or the launch error.
cudaError_t launch_topk_tokens(const TopkTokensParams& p, cudaStream_t stream);

struct CompressedDecodeParams {
  const void* q;  // [B, Hq, D]
  const uint64_t* k_bitmaps;
  const void* k_values;
  const uint64_t* v_bitmaps;
  const void* v_values;
  int k_keep, v_keep;
  const int64_t* offsets;       // [B, Hkv], first slot of (b, h)
  const int32_t* comp_lengths;  // [B]
  const void* k_recent;         // [B, Hkv, W, D]
  const void* v_recent;
  const int32_t* recent_lengths;  // [B]
  int batch, q_heads, kv_heads, head_dim, window;
  float scale;
  int num_splits, tokens_per_split;  // from plan_compressed_decode
  float* partial_out;                // [B, Hq, num_splits, D] workspace
  float* partial_lse;                // [B, Hq, num_splits] workspace
  void* out;                         // [B, Hq, D], q's dtype
  float* lse;                        // [B, Hq]
};

// Splits the context of every (sequence, KV head) so the grid fills the GPU; fills num_splits and tokens_per_split.
void plan_compressed_decode(CompressedDecodeParams& p, int max_context, int device_sms);

cudaError_t launch_compressed_decode(DType dtype, const CompressedDecodeParams& p, cudaStream_t stream);

}  // namespace sparse_attn::cuda
