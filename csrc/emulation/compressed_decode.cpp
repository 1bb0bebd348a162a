// The GPU compressed-cache decode kernels (csrc/cuda/compressed_decode.cu), compiled by the host compiler against the
// CUDA emulation.
#include "../cuda/compressed_decode.cu"
