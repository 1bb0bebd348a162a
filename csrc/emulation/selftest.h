// Launchers of the emulation's self-test kernels (selftest.cpp), on raw CPU pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparse_attn::emu::selftest {

// Per thread: shfl_up 3, shfl_up 2 (width 8), shfl_down 5 (width 16), shfl_xor 7, shfl_xor 9 (width 8),
// shfl lane 13 (width 16), ballot(odd), any(> 90), all(>= 0), 2 * shfl_xor 1 of (x + 0.5f), block atomic sum.
constexpr int kWarpOpColumns = 11;

cudaError_t warp_ops(const int* in, int* out, int threads);
cudaError_t divergent_shuffle(int* out);
cudaError_t deadlock(int* out);
// Two blocks of 128 threads over `words` ints of dynamic shared memory; each adds the sum it read to *out.
cudaError_t dynamic_shared(int words, int opt_in_bytes, int* out);

uint16_t float_to_half_bits(float x);
uint16_t float_to_bfloat16_bits(float x);
float half_bits_to_float(uint16_t bits);
float bfloat16_bits_to_float(uint16_t bits);

}  // namespace sparse_attn::emu::selftest
