"""Synthetic radar (notebook 07): VIL where no radar exists, from satellite infrared at the same time.

    IR069 + IR107 (+ optional lightning)  ->  VIL,   SyntheticRadarUNet (4-level U-Net), LOSS: MAE (notebook: MSE).

Reference forecasts: `ir_lookup`, the mean VIL of each IR107 temperature bin in the training events, and
`ir2_lookup_*`, the same on bins of IR069 and IR107 together (mean or median per bin, chosen on validation).
Run `python train_synthetic.py --help` for every setting; override any with --key=value.
"""
import common
import torch
from common import SyntheticRadarDataset, SyntheticRadarUNet


class Config:
    CATALOG_PATH = common.DEFAULT_CATALOG    # SEVIR CATALOG.csv; default: the usual places (README), else a sample
    SEVIR_ROOT = common.DEFAULT_ROOT         # folder holding vil/, ir069/, ... or the bucket's top (holding data/)
    OUT_DIR = "outputs/train_synthetic"      # checkpoints, history, metrics and figures
    INPUT_MODS = ("ir069", "ir107")          # satellite inputs; add lght for lightning (as the SEVIR paper)
    TARGET_SIZE = 128                        # common grid in pixels (VIL is 384, IR 192); a multiple of 16
    BASE = 8                                 # U-Net width (channels of the first level); notebook 07: 32
    LOSS = "mae"                             # mae (sharp, no clear-sky haze), mse (notebook 07), or bmse (balanced MSE)
    EPOCHS = 4                               # passes over every frame of every training event (chosen on validation)
    BATCH_SIZE = 8                           # samples per optimizer step
    LR = 2e-3                                # Adam learning rate, peak of a cosine decay to 0 over the run
    MAX_TRAIN = 0                            # training events to use (spread over the period), 0 = all
    MAX_VAL = 0                              # validation events to use (spread over the period), 0 = all
    MAX_TEST = 0                             # test events to use (spread over the period), 0 = all
    SPLIT_DATES = ("2019-01-01", "2019-06-01")  # train <= 1st < validation <= 2nd < test (Earthformer)
    IR_NORM = "sevir"                        # sevir: fixed z-score in deg C; minmax: the notebooks' per-sample scaling
    SEED = 0                                 # seeds the weights and the order of the training samples
    DEVICE = "auto"                          # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    NUM_WORKERS = 0                          # DataLoader worker processes
    RESUME = False                           # continue from OUT_DIR/last.pt
    OVERWRITE = False                        # replace a previous run in OUT_DIR
    TORCH_COMPILE = False                    # torch.compile the model (CUDA; slower start, faster steps)


def build_data(cfg):
    """Events with INPUT_MODS and VIL, split by date into train / validation / test; single frames, every
    input and VIL resized to TARGET_SIZE (every frame in training, frames 0, 4, ..., 48 when held out)."""
    data = common.load_events(cfg, mods=cfg.INPUT_MODS + ("vil",))
    kw = dict(input_mods=cfg.INPUT_MODS, t_sample=None, target_size=cfg.TARGET_SIZE, ir_norm=cfg.IR_NORM)
    data.train = SyntheticRadarDataset(data.train_events, data.root, train=True, **kw)   # x (C, S, S), y (1, S, S)
    data.val = SyntheticRadarDataset(data.val_events, data.root, train=False, **kw)     # chooses best.pt
    data.test = SyntheticRadarDataset(data.test_events, data.root, train=False, **kw)   # the reported scores
    return data


def build_model(cfg):
    return SyntheticRadarUNet(in_channels=len(cfg.INPUT_MODS), out_channels=1, base=cfg.BASE)


# ir_lookup (IR107 bins) and ir2_lookup_mean or _median (IR069 x IR107 bins), fitted on the training events
build_reference = common.fit_ir_lookup


def main(argv=None):
    cfg = common.parse_config(Config, argv, size_multiple=2 ** 4, script="train_synthetic")   # 4 U-Net levels
    common.seed_everything(cfg.SEED)
    device = common.init_device(cfg.DEVICE)            # joins torchrun's process group if launched so
    out = common.check_out_dir(cfg)
    data = build_data(cfg)
    model = common.prepare_model(build_model(cfg), cfg, device)
    print(f"SyntheticRadarUNet: {common.count_parameters(model):,} parameters, "
          f"{'+'.join(cfg.INPUT_MODS)} -> vil at {cfg.TARGET_SIZE}x{cfg.TARGET_SIZE}, device {device}")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    train_loader = common.make_loader(data.train, cfg, device, shuffle=True)
    val_loader = common.make_loader(data.val, cfg, device, shuffle=False)
    scheduler = common.cosine_schedule(optimizer, cfg.EPOCHS * len(train_loader))
    with common.locked(out):                           # one run at a time writes in OUT_DIR
        start = common.start_or_resume(model, optimizer, scheduler, cfg)   # epoch 1, or after last.pt's
        history = common.fit(model, train_loader, val_loader, common.LOSSES[cfg.LOSS], optimizer, cfg, device,
                             scheduler, start=start)
        best = common.load_weights(model, out / "best.pt")      # chosen on validation, reported on test
        common.test_and_report(model, build_reference(cfg, data), data, cfg, device, history, epoch=best["epoch"])


if __name__ == "__main__":
    common.run_with_exit_status(main)
