"""Build and install sparse-attn.

The Triton kernels live in the top-level ``triton_kernels/`` folder and install as ``sparse_attn.triton_kernels``
(never as a top-level ``triton_kernels`` module: vLLM imports any module of that name as another library).

The C++ extension ``sparse_attn._C`` is built from ``csrc/``: its CPU ops always (a C++ compiler is enough), its CUDA
kernels only where torch is a CUDA build and nvcc is found. Set ``SPARSE_ATTN_NO_EXTENSION=1`` to skip it entirely.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def extension_modules():
    if os.environ.get("SPARSE_ATTN_NO_EXTENSION", "0") == "1":
        print("sparse-attn: SPARSE_ATTN_NO_EXTENSION=1, building no C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sparse-attn: torch is not installed at build time, building no C++/CUDA extension "
              "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    emulation = os.path.join("csrc", "emulation")
    cpp = sorted(glob.glob(os.path.join(here, "csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(here, "csrc", "**", "*.cu"), recursive=True))
    cpp = [p for p in (os.path.relpath(p, here) for p in cpp) if not p.startswith(emulation + os.sep)]
    cu = [os.path.relpath(p, here) for p in cu]
    if not cpp and not cu:
        return [], {}
    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = bool(torch.version.cuda) and bool(nvcc) and os.path.exists(nvcc) and bool(cu)
    if cu and not with_cuda:
        reason = "torch is a CPU build" if not torch.version.cuda else "nvcc was not found"
        print(f"sparse-attn: {reason}; building the C++ CPU ops only, no CUDA kernels")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "sparse_attn._C", cpp + cu,
            extra_compile_args={"cxx": cxx_flags + ["-DSPARSE_ATTN_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-DSPARSE_ATTN_WITH_CUDA",
                                         "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        if not cpp:
            return [], {}
        ext = cpp_extension.CppExtension("sparse_attn._C", cpp, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    exts = [ext]
    emulated = sorted(glob.glob(os.path.join(here, emulation, "*.cpp")))
    if emulated:
        # C++20 for std::atomic_ref and atomic wait; the folder include/ stands in for the CUDA toolkit's headers.
        exts.append(cpp_extension.CppExtension(
            "sparse_attn._cuda_emu", [os.path.relpath(p, here) for p in emulated],
            include_dirs=[os.path.join(here, emulation, "include")],
            extra_compile_args=["-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas"], extra_link_args=["-pthread"],
        ))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="sparse-attn",
    version="0.1.0",
    description="Sparse attention for long-context LLM inference: block-sparse prefill, sparse decode, per-head plans",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]) + ["sparse_attn.triton_kernels"],
    package_dir={"sparse_attn.triton_kernels": "triton_kernels"},
    package_data={"sparse_attn.planner": ["plans/*.json"]},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "transformers": ["transformers>=5.0", "accelerate", "gguf"],
        "bench": ["matplotlib", "tqdm"],
        "test": ["pytest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "vllm.general_plugins": ["sparse_attn = sparse_attn.vllm.plugin:register"],
        "console_scripts": ["sparse-attn-plan = sparse_attn.planner.cli:main"],
    },
)
