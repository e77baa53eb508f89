"""Packaging for batched_specdec: the engine/CLI package with its Triton kernels (`batched_specdec.kernels`)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="batched_specdec",
    version="0.1.0",
    description="Lossless batched speculative decoding over ragged prompts for Hugging Face causal LMs, with Triton kernels",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["batched_specdec", "batched_specdec.*"]),
    # drafting/drafts/: distilled drafts shipped for built-in targets (config, weights, manifest)
    package_data={
        "batched_specdec": ["data/*.jsonl"],
        "batched_specdec.drafting": ["drafts/*/*"],
        "batched_specdec.training": ["*.jsonl"],
    },
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        # On CPU-only machines install torch==2.13.0 (CPU build) first, see README: a bare `torch` requirement
        # with nothing installed pulls the newest CUDA build (several GB).
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        # The tests cover 5.17 (the GPU image) to 5.25 (the CPU machines); 5.40 drops the past_key_values keyword.
        "transformers>=5.17,<5.26",
        "accelerate",
        "rich",
        "tqdm",
        "gguf",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "scipy"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["batched-specdec=batched_specdec.main:cli"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
