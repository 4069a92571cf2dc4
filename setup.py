"""Build script: the Python package, the Triton kernels (kernels/ -> repa_fused.kernels) and the optional
C++ extension (csrc/ -> repa_fused._C, built with ninja through torch's cpp_extension).

The extension needs torch at build time, so install with ``pip install --no-build-isolation``. Without a
working compiler (or torch) the install still succeeds without it: it says so once, and
``repa_fused.available_backends("cpu")`` then omits "cpp".
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CPP_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def cpp_extension_modules():
    if not CPP_SOURCES or os.environ.get("REPA_FUSED_NO_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("repa_fused: torch is not importable at build time; the C++ extension is skipped "
              "(install with --no-build-isolation to build it)", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds with ninja; a failed build leaves the pure-Python package working."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must not fail the install
                print(f"repa_fused: the C++ extension was not built ({error}); the 'cpp' backend is "
                      "unavailable", file=sys.stderr)

    extension = CppExtension(
        "repa_fused._C", CPP_SOURCES,
        # torch adds the -std its headers need; -g0 drops the debug info Python's CFLAGS ask for (it
        # doubles the compile time of torch's templates). OpenMP: at::parallel_for runs on it.
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extension_modules()

setup(
    packages=["repa_fused", "repa_fused.ops", "repa_fused.training", "repa_fused.tools", "repa_fused.kernels"],
    package_dir={"repa_fused": "repa_fused", "repa_fused.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass or {"build_ext": build_ext},
)
