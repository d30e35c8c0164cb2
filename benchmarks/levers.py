"""Stage 2's levers: named sets of overrides of config.distribution, shared by the benchmarks
that train stage 2 (stage2_levers.py reads each as a curve; hd_curves.py --lever runs every
variant with one)."""

# Overrides of config.distribution; the paper publishes none of its stage-2 hyper-parameters.
LEVERS = {
    "default": {},
    # Generator and fake network together (two time scales kept: the head stays at 1e-3).
    "lr 3e-4": {"optimizer.lr": 3e-4, "fake_optimizer.lr": 3e-4},
    # DMD2's critic ratio on ImageNet.
    "k=5": {"update_ratio": 5},
    # The GAN term against DMD's: DMD's surrogate spreads its gradient over every pixel
    # (dL/dx = g / x.size), the adversarial term's over the batch only, so a weight tuned on
    # 64x64x3 images (DMD2's 3e-3) is 192 times weaker, relatively, on 8x8x1 digits.
    "adv x10": {"gen_adv_weight": 3e-2},
    "adv x100": {"gen_adv_weight": 3e-1},
    "adv x300": {"gen_adv_weight": 9e-1},
    "adv x1000": {"gen_adv_weight": 3.0},
    "disc x10": {"disc_weight": 1e-1},
    # Stage 1's MeanFlow loss kept on random (r, t) in stage 2, so the flow map's other
    # intervals (the two-step path's) keep a loss once stage 2 moves the shared weights.
    "regulariser 1": {"regulariser_weight": 1.0},
    "regulariser 0.1": {"regulariser_weight": 0.1},
    # DMD and the adversarial term on the two-step path (z_m from u(e, m, 1), then u(z_m, 0, m))
    # for a share of the rows: the path the uniform two-step sampler reads.
    "two-step rows 0.25": {"two_step_fraction": 0.25},
    "two-step rows 0.5": {"two_step_fraction": 0.5},
    # The same with the intermediate time drawn per row from [0.25, 0.75]: a schedule of the
    # two-step path rather than one trained m.
    "two-step rows 0.5, t_mid drawn": {"two_step_fraction": 0.5, "two_step_mid_spread": 0.25},
    # The same on DMD2's re-noised path: the one-step sample noised back to m, then u(z_m, 0, m).
    "re-noised two-step rows 0.5": {"two_step_fraction": 0.5, "two_step_path": "renoised"},
    "teacher features": {"discriminator.features": "teacher"},
    "tau 0.3": {"discriminator.tau": 0.3},
    "DMD t from 0.2": {"dmd_t_min": 0.2},
    "real-score cfg 1.0": {"cfg_scale": 1.0},
    "mean-pooled head": {"discriminator.pooling": "mean"},
    "no adversarial term": {"gen_adv_weight": 0.0, "disc_weight": 0.0},
    # Stage 2 from the teacher instead of stage 1's sketch (DMD2's recipe, adversarial term kept).
    "from the teacher": {"init_from": "teacher"},
}


def overrides_of(name: str) -> dict:
  out = {}
  for part in name.split("+"):
    if part not in LEVERS:
      raise ValueError(f"unknown lever {part!r}; choose from {sorted(LEVERS)} (join with '+').")
    out.update(LEVERS[part])
  return out
