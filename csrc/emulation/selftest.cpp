// Kernels that check the CUDA emulation itself against CUDA's documented semantics (tests/test_cuda_emulation.py):
// shuffles with widths, votes, shared-memory atomics, dynamic shared memory limits, and the failures a broken warp
// or block synchronisation must produce. Written in CUDA C++ like csrc/cuda, compiled only by the host compiler.
#include <cuda_runtime.h>

#include "../cuda/launch.h"
#include "selftest.h"

namespace sparse_attn::emu::selftest {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// One row of `kWarpOpColumns` results per thread (columns in selftest.h).
__global__ void warp_ops_kernel(const int* in, int* out) {
  __shared__ int counter;
  const int tid = threadIdx.x, x = in[tid];
  if (tid == 0) counter = 0;
  __syncthreads();
  int* row = out + tid * kWarpOpColumns;
  row[0] = __shfl_up_sync(kFullMask, x, 3);
  row[1] = __shfl_up_sync(kFullMask, x, 2, 8);
  row[2] = __shfl_down_sync(kFullMask, x, 5, 16);
  row[3] = __shfl_xor_sync(kFullMask, x, 7);
  row[4] = __shfl_xor_sync(kFullMask, x, 9, 8);
  row[5] = __shfl_sync(kFullMask, x, 13, 16);
  row[6] = static_cast<int>(__ballot_sync(kFullMask, x & 1));
  row[7] = __any_sync(kFullMask, x > 90);
  row[8] = __all_sync(kFullMask, x >= 0);
  const float f = __shfl_xor_sync(kFullMask, static_cast<float>(x) + 0.5f, 1);
  row[9] = static_cast<int>(2.0f * f);
  atomicAdd(&counter, x);
  __syncthreads();
  row[10] = counter;
}

// Lanes 0-15 shuffle while lanes 16-31 return: the shuffle's mask names lanes that never arrive.
__global__ void divergent_shuffle_kernel(int* out) {
  int x = threadIdx.x;
  if (threadIdx.x < 16) x = __shfl_xor_sync(kFullMask, x, 1);
  out[threadIdx.x] = x;
}

// Lanes 16-31 wait at __syncthreads for lanes 0-15, which wait at a shuffle for them: a deadlock.
__global__ void deadlock_kernel(int* out) {
  int x = threadIdx.x;
  if (threadIdx.x >= 16) __syncthreads();
  x = __shfl_xor_sync(kFullMask, x, 1);
  out[threadIdx.x] = x;
}

// Every thread writes its slots of dynamic shared memory, then reads a neighbour's after the barrier.
__global__ void dynamic_shared_kernel(int words, int* out) {
  SPARSE_ATTN_DYNAMIC_SHARED(int, buf);
  for (int i = threadIdx.x; i < words; i += blockDim.x) buf[i] = i;
  __syncthreads();
  int sum = 0;
  for (int i = threadIdx.x; i < words; i += blockDim.x) sum += buf[words - 1 - i];
  atomicAdd(out, sum);
}

}  // namespace

cudaError_t warp_ops(const int* in, int* out, int threads) {
  SPARSE_ATTN_LAUNCH(warp_ops_kernel, 1, threads, 0, nullptr, in, out);
  return cudaGetLastError();
}

cudaError_t divergent_shuffle(int* out) {
  SPARSE_ATTN_LAUNCH(divergent_shuffle_kernel, 1, 32, 0, nullptr, out);
  return cudaGetLastError();
}

cudaError_t deadlock(int* out) {
  SPARSE_ATTN_LAUNCH(deadlock_kernel, 1, 32, 0, nullptr, out);
  return cudaGetLastError();
}

cudaError_t dynamic_shared(int words, int opt_in_bytes, int* out) {
  if (opt_in_bytes > 0) {
    const cudaError_t err =
        cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();  // read the error, or the next launch's check would report it again
      return err;
    }
  }
  SPARSE_ATTN_LAUNCH(dynamic_shared_kernel, 2, 128, words * sizeof(int), nullptr, words, out);
  return cudaGetLastError();
}

uint16_t float_to_half_bits(float x) { return __float2half_rn(x).bits; }
uint16_t float_to_bfloat16_bits(float x) { return __float2bfloat16_rn(x).bits; }
float half_bits_to_float(uint16_t bits) { return __half2float(__half{bits}); }
float bfloat16_bits_to_float(uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }

}  // namespace sparse_attn::emu::selftest
