"""hierdistill: one-step generators from diffusion/flow teachers by Hierarchical Distillation."""
from setuptools import find_packages, setup

setup(
    name="hierdistill",
    version="0.1.0",
    description="Hierarchical Distillation (MeanFlow trajectory distillation, then DMD + AWD) in JAX/Flax",
    packages=find_packages(include=["hierdistill", "hierdistill.*"]),
    python_requires=">=3.10",
    # Ranges, not pins: the accelerator images ship their own jax/flax builds.
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "chex>=0.1.87",
        "ml_collections>=0.1.1",
        "tensorflow-datasets>=4.9",
        "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
        "tensorboard>=2.16",
        "clu>=0.0.12",
        "einops>=0.8",
        "absl-py>=2.1",
        "pillow>=10",
        # The embedded default experiment builds its data set from the 8x8 digits that
        # scikit-learn ships inside its wheel: the only way to train with no download.
        "scikit-learn>=1.3",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # PyTorch only to import published checkpoints and to test importers against references.
        "torch": ["torch>=2.1", "safetensors>=0.4"],
    },
)
