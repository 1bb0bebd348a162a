// Kernel launches and dynamic shared memory, spelled once for the two builds of the .cu files: nvcc's for the GPU,
// and the host compiler's against the CPU execution harness in csrc/emulation (tests/test_cuda_emulation.py).
#pragma once

#if defined(__CUDACC__)
#define SPARSE_ATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define SPARSE_ATTN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#include "../emulation/cuda_emulation.h"
#define SPARSE_ATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sparse_attn::emu::launch(kernel, (grid), (block), (smem), (stream), __VA_ARGS__)
#define SPARSE_ATTN_DYNAMIC_SHARED(type, name) type* const name = ::sparse_attn::emu::dynamic_shared<type>()
#endif
