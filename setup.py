"""Packaging. `kernels/` ships as `tempflow_fast.kernels` and `csrc/` as `tempflow_fast.csrc`
(sources only, compiled on first use). Set TEMPFLOW_FAST_BUILD_EXT=1 (with torch already
installed and `--no-build-isolation`) to compile the C++ extension at install time instead."""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["tempflow_fast", "tempflow_fast.*"])
packages += ["tempflow_fast.kernels", "tempflow_fast.csrc"]
package_dir = {"tempflow_fast.kernels": "kernels", "tempflow_fast.csrc": "csrc"}

ext_modules, cmdclass = [], {}
if os.environ.get("TEMPFLOW_FAST_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "tempflow_fast._C",
            sources=["csrc/flow_grpo_ops.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"tempflow_fast.csrc": ["*.cpp", "*.h", "*.cu"], "tempflow_fast": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
