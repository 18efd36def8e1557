"""Build script: the pure-Python package (NumPy reference)."""
from setuptools import find_packages, setup

setup(
    name="pymoe",
    version="0.1.0",
    description="Mixture-of-Experts token routing, step by step in NumPy, with C and CUDA fast paths",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["pymoe", "pymoe.*"]),
    install_requires=["numpy>=1.22"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
    },
)
