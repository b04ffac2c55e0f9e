"""Build script: the pure-Python package, plus the CUDA extension ``vit_fast._C`` when a toolkit is found.

``VIT_FAST_BUILD_CUDA=0`` skips the extension, ``=1`` requires it (and fails loudly without a toolkit),
unset builds it when a CUDA toolkit is found and ``csrc/`` has sources. The decision never looks at
``torch.cuda.is_available()``: build machines often have no GPU.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# A100, H100/H200 machine code, plus sm_90's PTX: a newer GPU (Blackwell and later) JIT-compiles it at first load.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _is_toolkit(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, checked by its contents (nvcc *and* headers), not guessed from PATH.

    The ``nvcc`` on PATH may be a wrapper script outside the toolkit; a candidate counts only if it holds
    ``bin/nvcc`` and ``include/cuda_runtime.h``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script: look for the toolkit path it executes.
        try:
            with open(real, errors="ignore") as f:
                head = f.read(4096)
            for token in head.replace('"', " ").replace("'", " ").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for c in candidates:
        if c and _is_toolkit(c):
            return os.path.realpath(c)
    return None


def _site_nvidia_dirs() -> list[str]:
    """``nvidia/<pkg>`` folders of the pip CUDA wheels next to the installed torch (cuBLAS ships there)."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(root, "*")))
    return dirs


def find_cublaslt(cuda_home: str) -> tuple[str, str] | None:
    """(include dir holding cublasLt.h, path of the cuBLASLt shared library), from the toolkit or torch's wheels."""
    header = lib = None
    for d in [os.path.join(cuda_home, "include"), *glob.glob(os.path.join(cuda_home, "targets", "*", "include")),
              *(os.path.join(p, "include") for p in _site_nvidia_dirs())]:
        if os.path.isfile(os.path.join(d, "cublasLt.h")):
            header = d
            break
    for d in [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
              *glob.glob(os.path.join(cuda_home, "targets", "*", "lib")),
              *(os.path.join(p, "lib") for p in _site_nvidia_dirs())]:
        found = sorted(glob.glob(os.path.join(d, "libcublasLt.so*")), key=len)
        if found:
            lib = found[0]
            break
    return (header, lib) if header and lib else None


def _fail(why: str) -> None:
    sys.exit(f"vit_fast: cannot build the CUDA extension vit_fast._C: {why}. "
             "Set VIT_FAST_BUILD_CUDA=0 to install the pure-Python package (Triton and reference backends).")


def cuda_extensions() -> tuple[list, dict]:
    flag = os.environ.get("VIT_FAST_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_home = find_cuda_home()
    if flag == "1" and (cuda_home is None or not sources):
        why = "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else "csrc/ has no sources"
        sys.exit(f"VIT_FAST_BUILD_CUDA=1 but {why}. Unset it, or set VIT_FAST_BUILD_CUDA=0 for a pure-Python install.")
    if cuda_home is None or not sources:
        print("vit_fast: building without the CUDA extension "
              f"({'no CUDA toolkit found' if cuda_home is None else 'csrc/ has no sources'})")
        return [], {}
    cublaslt = find_cublaslt(cuda_home)
    if cublaslt is None:
        _fail(f"cuBLASLt (cublasLt.h and libcublasLt.so) not found in {cuda_home} nor in the nvidia pip packages")
    cublas_include, cublas_lib = cublaslt

    # torch.utils.cpp_extension reads CUDA_HOME when imported: set it to the verified toolkit first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        _fail(f"torch is needed to build it ({e}); install torch first and build with --no-build-isolation")

    class LoudBuildExtension(BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - re-raised with the way out
                raise RuntimeError(
                    f"vit_fast: building the CUDA extension vit_fast._C failed ({e}); the compiler output above "
                    "names the cause. Set VIT_FAST_BUILD_CUDA=0 to install without it."
                ) from e

    lib_dir = os.path.dirname(cublas_lib)
    ext = CUDAExtension(
        name="vit_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc"), cublas_include],
        extra_compile_args={
            # torch picks the C++ standard its headers need; no -std here.
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        # The wheel's library may carry only a versioned name (libcublasLt.so.13): link it by path. At run time
        # torch has already loaded the same library (same soname); the rpath covers a standalone load.
        extra_link_args=[cublas_lib, f"-Wl,-rpath,{lib_dir}"],
        py_limited_api=False,
    )
    print(f"vit_fast: building vit_fast._C with CUDA_HOME={cuda_home} "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} cuBLASLt={cublas_lib}")
    return [ext], {"build_ext": LoudBuildExtension.with_options(use_ninja=True)}


def _default_arch_list() -> str:
    """The visible GPU's architecture (with its PTX) when there is one, else A100 + H100/H200."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}+PTX"
    except Exception:  # noqa: BLE001 - no usable torch.cuda: use the default list
        pass
    return DEFAULT_ARCH_LIST


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=["vit_fast", "vit_fast.bench", "vit_fast.ops", "vit_fast.ops.attention", "vit_fast.train",
              "vit_fast.kernels", "vit_fast.kernels.attention"],
    package_dir={"vit_fast": "vit_fast", "vit_fast.kernels": "kernels"},
    # the dispatch policies measured by the project on real GPUs (vit_fast/policy.py reads them)
    package_data={"vit_fast": ["policies/*.json", "pretrained_tags.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
