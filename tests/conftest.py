"""Test-wide setup."""

import os

# Triton runs kernels on CPU tensors only under its interpreter, chosen when triton is first imported, so it is set
# before any test module imports triton. Set TRITON_INTERPRET=0 to test the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A generator seeded from the OS (fresh inputs every run), and its seed for failure messages."""
    seed = random.SystemRandom().randrange(1 << 31)
    return torch.Generator().manual_seed(seed), seed
