"""Sharper synthetic radar (notebook 07A): a deep residual U-Net with a perceptual loss.

    IR069 + IR107 (+ optional lightning)  ->  VIL,   AdvancedUNet (5 levels, a residual block on each and three
    more in the bottleneck, output clipped to [0, 1]), loss = balanced MSE + MAE (+ 0.1 x VGG16 perceptual with
    ImageNet weights); the first 2 epochs on frames halved to 64 x 64, then whole frames; ReduceLROnPlateau and
    best.pt on the validation MSE, BatchNorm statistics re-estimated before each validation.

Reference forecasts: `ir_lookup`, the mean VIL of each IR107 temperature bin in the training events, and
`ir2_lookup_*`, the same on bins of IR069 and IR107 together (mean or median per bin, chosen on validation).
Run `python train_advanced.py --help` for every setting; override any with --key=value.
"""
import common
import torch
import torch.nn.functional as F
from common import AdvancedUNet, SyntheticRadarDataset, VGGPerceptualLoss


class Config:
    CATALOG_PATH = common.DEFAULT_CATALOG    # SEVIR CATALOG.csv; default: the usual places (README), else a sample
    SEVIR_ROOT = common.DEFAULT_ROOT         # folder holding vil/, ir069/, ... or the bucket's top (holding data/)
    OUT_DIR = "outputs/train_advanced"       # checkpoints, history, metrics and figures
    INPUT_MODS = ("ir069", "ir107")          # satellite inputs; add lght for lightning (as the SEVIR paper)
    TARGET_SIZE = 128                        # common grid in pixels (notebook: 384); a multiple of 32
    BASE = 8                                 # U-Net width (notebook: 32 = 94 M parameters, too slow for a laptop CPU)
    BOTTLENECK_BLOCKS = 3                    # extra residual blocks in the bottleneck (07A's 3; 1 is 10% faster)
    LOSS = "bmse_mae"                        # pixel term: bmse_mae (balanced MSE + MAE), mse (notebook 07A), mae, ...
    PERCEPTUAL_WEIGHT = 0.1                  # loss = LOSS + PERCEPTUAL_WEIGHT x VGG perceptual loss (notebook 07A)
    PERCEPTUAL_POOL = 1                      # VGG16 sees both fields average-pooled k x k (1 = notebook; cost ~ 1/k^2)
    VGG_WEIGHTS = "imagenet"                 # imagenet (hub cache or download; if unavailable the perceptual term is
                                             # left out), or none: use untrained VGG16 layers anyway
    BN_BATCHES = 2                           # re-estimate BatchNorm statistics on this many batches per epoch (0: off)
    EPOCHS = 4                               # passes over every frame of every training event (chosen on validation)
    HALF_RES_EPOCHS = 2                      # the first epochs train on frames average-pooled 2 x 2 (0.4x the time)
    BATCH_SIZE = 16                          # samples per optimizer step
    LR = 1.5e-3                              # Adam learning rate (notebook: 1e-4, slower to converge on the sample)
    LR_PATIENCE = 0                          # ReduceLROnPlateau: halve LR after this many epochs without improvement
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
    return AdvancedUNet(in_channels=len(cfg.INPUT_MODS), out_channels=1, base=cfg.BASE,
                        bottleneck_blocks=cfg.BOTTLENECK_BLOCKS)


# ir_lookup (IR107 bins) and ir2_lookup_mean or _median (IR069 x IR107 bins), fitted on the training events
build_reference = common.fit_ir_lookup


def main(argv=None):
    cfg = common.parse_config(Config, argv, size_multiple=2 ** 5, script="train_advanced")   # 5 U-Net levels
    common.seed_everything(cfg.SEED)
    device = common.init_device(cfg.DEVICE)            # joins torchrun's process group if launched so
    out = common.check_out_dir(cfg)
    data = build_data(cfg)
    model = common.prepare_model(build_model(cfg), cfg, device)
    print(f"AdvancedUNet: {common.count_parameters(model):,} parameters, "
          f"{'+'.join(cfg.INPUT_MODS)} -> vil at {cfg.TARGET_SIZE}x{cfg.TARGET_SIZE}, device {device}")

    perceptual = VGGPerceptualLoss(weights=cfg.VGG_WEIGHTS).to(device)
    # Untrained VGG16 features made the sample's intense cores worse (README), so without ImageNet weights the
    # term is left out unless --vgg_weights=none asks for untrained layers.
    use_perceptual = cfg.PERCEPTUAL_WEIGHT > 0 and (perceptual.backbone == "imagenet" or cfg.VGG_WEIGHTS == "none")
    backbone = perceptual.backbone if use_perceptual else "off"
    if use_perceptual:
        print(f"perceptual loss: VGG16 to relu4_3, {backbone} weights, x {cfg.PERCEPTUAL_WEIGHT}")
    elif cfg.PERCEPTUAL_WEIGHT > 0:
        print("perceptual loss: off (no ImageNet weights; --vgg_weights=none uses untrained layers)")
    pixel_loss = common.LOSSES[cfg.LOSS]

    def loss_fn(pred, y):                                    # (B, 1, S, S) each; every term is logged
        terms = {"loss": pixel_loss(pred, y), "mse": F.mse_loss(pred, y)}
        if use_perceptual:
            k = cfg.PERCEPTUAL_POOL
            terms["perceptual"] = perceptual(F.avg_pool2d(pred, k), F.avg_pool2d(y, k))
            terms["loss"] = terms["loss"] + cfg.PERCEPTUAL_WEIGHT * terms["perceptual"]
        return terms

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=cfg.LR_PATIENCE)
    train_loader = common.make_loader(data.train, cfg, device, shuffle=True)
    val_loader = common.make_loader(data.val, cfg, device, shuffle=False)
    extra = {"perceptual_backbone": backbone}
    with common.locked(out):                           # one run at a time writes in OUT_DIR
        start = common.start_or_resume(model, optimizer, scheduler, cfg)   # epoch 1, or after last.pt's
        history = common.fit(model, train_loader, val_loader, loss_fn, optimizer, cfg, device, scheduler,
                             extra=extra, advanced=True, start=start)   # best.pt on val MSE (07A), half-res, BN
        best = common.load_weights(model, out / "best.pt")      # chosen on validation, reported on test
        common.test_and_report(model, build_reference(cfg, data), data, cfg, device, history, extra,
                               epoch=best["epoch"])


if __name__ == "__main__":
    common.run_with_exit_status(main)
