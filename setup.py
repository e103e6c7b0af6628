"""Packaging: one importable package, `marginfused`.

The Triton code in kernels/ installs as `marginfused.kernels`, and the C++/CUDA sources in csrc/
ship as package data (`marginfused/csrc/`) so the JIT build finds them after any install.

The minimum versions are the oldest the project checks (`make test-compat`: torch 2.11 and Triton
3.6; `make test`: torch 2.13 and Triton 3.9).
"""

from setuptools import setup

setup(
    name="marginfused",
    version="0.1.0",
    description=("Fused margin softmax losses (CosFace, ArcFace, SphereFace, ExpFace, AdaFace, MagFace, "
                 "CurricularFace, ElasticFace) for very many classes"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["marginfused", "marginfused.backends", "marginfused.compat", "marginfused.distributed",
              "marginfused.kernels", "marginfused.csrc"],
    package_dir={
        "marginfused": "marginfused",
        "marginfused.kernels": "kernels",
        "marginfused.csrc": "csrc",
    },
    package_data={"marginfused.csrc": ["*.cpp", "*.cu", "*.cuh", "*.h", "*.md"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "pytorch-metric-learning"],
        "bench": ["tqdm", "matplotlib", "pytorch-metric-learning"],
    },
)
