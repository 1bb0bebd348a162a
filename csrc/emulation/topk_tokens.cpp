// The GPU top-k kernel (csrc/cuda/topk_tokens.cu), compiled by the host compiler against the CUDA emulation.
#include "../cuda/topk_tokens.cu"
