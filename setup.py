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
        "einops>=0.8",
        "absl-py>=2.1",
        "pillow>=10",
        # The embedded default experiment builds its data set from the 8x8 digits that
        # scikit-learn ships inside its wheel: the only way to train with no download.
        "scikit-learn>=1.3",
        # The text encoder's and CLIP score's tokenizers read the tokenizer.json that ships with
        # the published weights (Gemma-2, CLIP): `tokenizers` is the only reader of that format.
        # A compiled package with no torch dependency.
        "tokenizers>=0.19",
        # An exported generator's weights are safetensors (launch/export.py), written and read
        # by its numpy API; the importers read published .safetensors with it too. Small, and
        # no torch dependency.
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # The reference implementations the importers are tested against (tests marked
        # `torch`). Importing the published files needs none of it: .pt files are read by a
        # restricted unpickler, .safetensors by safetensors' numpy API. The torch range stops
        # below 2.14 so that, with a CPU build of 2.13 installed first, pip adds nothing big.
        # pytorch-fid, the FID Inception reference, is installed with --no-deps (its torchvision
        # requirement would pull another torch): pip install --no-deps pytorch-fid==0.3.0
        # transformers: the reference implementations of Gemma-2 and CLIP that the text-encoder
        # and CLIP-score importers are tested against.
        "torch": ["torch>=2.1,<2.14", "safetensors>=0.4", "diffusers>=0.27",
                  "transformers>=4.44"],
        # The TPU compiler (libtpu), for planning pods from any machine: launch/plan.py compiles
        # every program of a run for a described slice (v4, v5e, v5p, v6e) with no TPU present.
        # jax's own extra pins the libtpu that matches the jax installed; on a TPU VM it is
        # also what runs the programs. libtpu ships for Linux only.
        "tpu": ["jax[tpu]; sys_platform == 'linux'"],
        # For the benchmarks' plots only (benchmarks/hd_curves.py draws its curves with it);
        # nothing in hierdistill imports it.
        "bench": ["matplotlib>=3.7"],
    },
)
