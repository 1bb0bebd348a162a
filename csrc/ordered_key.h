// The order used by top-k selection, shared by the CPU and CUDA code (this header needs no torch).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPARSE_ATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPARSE_ATTN_HOST_DEVICE inline
#endif

namespace sparse_attn {

// Maps a score to a uint32 with the same order (larger float -> larger key; NaN ranks as -inf), so selection can
// compare keys, radix-select on their bytes, and break ties by token index (the lower index wins) on every device.
SPARSE_ATTN_HOST_DEVICE uint32_t ordered_key(float x) {
  if (x != x) x = -INFINITY;
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace sparse_attn
