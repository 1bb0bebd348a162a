"""Where the tests run: the device, and which op backends can run there (Triton on a GPU or under its interpreter)."""

import pytest
import torch

from sparse_attn.ops.attention import triton_interpreter_enabled, triton_kernels

ON_GPU = torch.cuda.is_available() and not triton_interpreter_enabled()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_RUNS = triton_kernels() is not None and (ON_GPU or triton_interpreter_enabled())
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here"))]
