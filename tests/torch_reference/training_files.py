"""What the training scripts of the published networks save beside the weights, so importer
tests read files laid out as the real ones: 0-dim tensors (an optimiser's step, LDM's loss
logvar), plain scalars, and the argparse.Namespace of the run's flags."""
import argparse


def adamw_state(torch, state_dict):
  """torch.optim.AdamW(...).state_dict() after some steps: per-param 'step' is a 0-dim tensor."""
  names = list(state_dict)
  return {
      "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(state_dict[k]),
                    "exp_avg_sq": torch.zeros_like(state_dict[k])} for i, k in enumerate(names)},
      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                        "amsgrad": False, "foreach": None, "maximize": False,
                        "capturable": False, "differentiable": False, "fused": None,
                        "params": list(range(len(names)))}],
  }


def train_args(**fields):
  """The argparse.Namespace that DiT/SiT/REPA/LightningDiT training scripts pickle as 'args'."""
  defaults = dict(model="SiT-XL/2", image_size=256, num_classes=1000, epochs=1400,
                  global_batch_size=256, results_dir="results", vae="ema", ckpt=None)
  return argparse.Namespace(**{**defaults, **fields})


def dit_style(torch, state_dict, **extra):
  """{'model', 'ema', 'opt', 'args', ...}: the layout of DiT/SiT/REPA/LightningDiT train.py."""
  return {"model": state_dict, "ema": state_dict, "opt": adamw_state(torch, state_dict),
          "args": train_args(), **extra}


def lightning_style(torch, state_dict):
  """PyTorch Lightning's checkpoint (LDM's and VA-VAE's training): scalars beside the weights."""
  return {"state_dict": state_dict, "epoch": 3, "global_step": 560000,
          "pytorch-lightning_version": "1.4.2", "lr_schedulers": [],
          "optimizer_states": [adamw_state(torch, state_dict)]}
