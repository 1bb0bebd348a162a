"""Test-wide setup."""

import os

# Triton runs kernels on CPU tensors only under its interpreter, chosen when triton is first imported, so it is set
# before any test module imports triton. Set TRITON_INTERPRET=0 to test the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
