"""Test-wide setup."""

import os

# Triton runs kernels on CPU tensors only under its interpreter, chosen when triton is first imported, so it is set
# before any test module imports triton. Set TRITON_INTERPRET=0 to test the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _import_bench() -> None:
    """Make the repository's bench/ package importable without putting the repository root on sys.path: from there
    the triton_kernels/ folder would shadow the top-level module of that name that vLLM (and its spawned workers)
    look for. The folder is only meant to be imported as sparse_attn.triton_kernels."""
    folder = pathlib.Path(__file__).resolve().parent.parent / "bench"
    spec = importlib.util.spec_from_file_location("bench", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)


if "bench" not in sys.modules:
    _import_bench()


@pytest.fixture
def rng():
    """A generator seeded from the OS (fresh inputs every run), and its seed for failure messages."""
    seed = random.SystemRandom().randrange(1 << 31)
    return torch.Generator().manual_seed(seed), seed
