"""Independent PyTorch implementations of published architectures, the references that the
importers of hierdistill.convert are tested against (tests marked `torch`).

Each is written here from the published architecture (paper and checkpoint key layout), not
copied, and kept small: only what a forward pass with the published state dict needs.
"""
