"""Multimodal nowcasting (notebook 06): the next VIL frames from radar plus satellite infrared.

    VIL + IR069 + IR107, T_IN frames  ->  VIL, T_OUT frames,   MODEL: EvolutionNet (motion and growth applied
    to the last VIL frame), MultimodalNowcastNet (NowcastNet with one input channel per modality), a U-Net
    over time stacked as channels, or a ConvLSTM; LOSS: balanced MSE + MAE.

Reference forecasts: persistence (the last VIL frame, repeated), optical flow (pysteps' Lucas-Kanade motion and
semi-Lagrangian extrapolation), the SEVIR paper's dense DIS flow with constant-vector advection, and the last
frame moved along one motion vector (shift).
--protocol=sevir sets the SEVIR benchmark: 13 -> 12 frames at 384 x 384, Earthformer's split and windows,
and a model for a GPU run on it (width 32, 5 epochs of batches of 16 at LR 1e-3; README).
Run `python train_multimodal.py --help` for every setting; override any with --key=value.
"""
import common
import torch
from common import SEVIRMultimodal


class Config:
    CATALOG_PATH = common.DEFAULT_CATALOG    # SEVIR CATALOG.csv; default: the usual places (README), else a sample
    SEVIR_ROOT = common.DEFAULT_ROOT         # folder holding vil/, ir069/, ... or the bucket's top (holding data/)
    OUT_DIR = "outputs/train_multimodal"     # checkpoints, history, metrics and figures
    MODALITIES = ("vil", "ir069", "ir107")   # input channels, in order; vil is required (it is the target); lght too
    MODEL = "evolution"                      # evolution (last frame moved, grown), nowcastnet (notebook 06), unet, convlstm
    LOSS = "bmse_bmae"                       # bmse_bmae (balanced MSE + MAE, Shi et al. 2017), mse (notebooks), mae, bmse
    PROTOCOL = "none"                        # sevir: T_IN=13, T_OUT=12, TARGET_SIZE=384, Earthformer's split
                                             # and BASE=32, EPOCHS=5, BATCH_SIZE=16, LR=1e-3 (flags given win)
    T_IN = 12                                # input frames (5 min apart): 12 = the last hour
    T_OUT = 1                                # VIL frames to forecast: 1 = the next 5 minutes
    TARGET_SIZE = 96                         # common grid in pixels (VIL 384, IR 192 are resized to it)
    BASE = 8                                 # network width (notebook: 32, too slow for a laptop CPU)
    EPOCHS = 3                               # passes over every window of every training event (chosen on validation)
    BATCH_SIZE = 4                           # samples per optimizer step
    LR = 1e-3                                # Adam learning rate, peak of a cosine decay to 0 (3e-3 learnt slower here)
    AUGMENT = False                          # random quarter turns and flips of each batch (off: chosen on validation)
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
    """Events with every modality, split by date into train / validation / test; all modalities resized
    to TARGET_SIZE and stacked."""
    data = common.load_events(cfg, mods=cfg.MODALITIES)
    kw = dict(mods=cfg.MODALITIES, t_in=cfg.T_IN, t_out=cfg.T_OUT, target_size=cfg.TARGET_SIZE,
              ir_norm=cfg.IR_NORM)
    data.train = SEVIRMultimodal(data.train_events, data.root, train=True, **kw)  # x (C, T_IN, S, S), y (1, T_OUT, S, S)
    data.val = SEVIRMultimodal(data.val_events, data.root, train=False, **kw)    # chooses best.pt
    data.test = SEVIRMultimodal(data.test_events, data.root, train=False, **kw)  # the reported scores
    return data


def build_model(cfg):
    """EvolutionNet, MultimodalNowcastNet, NowcastUNet or ConvLSTMNet with one input channel per modality."""
    return common.build_nowcaster(cfg.MODEL, len(cfg.MODALITIES), cfg.T_IN, cfg.T_OUT, cfg.BASE,
                                  vil_channel=cfg.MODALITIES.index("vil"))


def build_reference(cfg, data):
    """Persistence, pysteps' optical flow and the SEVIR paper's DIS flow (if installed), the one-vector shift, on the VIL channel."""
    return common.nowcast_references(vil_channel=cfg.MODALITIES.index("vil"), t_out=cfg.T_OUT,
                                     pixel_km=common.NATIVE_SIZE["vil"] / cfg.TARGET_SIZE)


def main(argv=None):
    cfg = common.parse_config(Config, argv, size_multiple=common.NOWCASTER_GRID, script="train_multimodal")
    common.seed_everything(cfg.SEED)
    device = common.init_device(cfg.DEVICE)            # joins torchrun's process group if launched so
    out = common.check_out_dir(cfg)
    data = build_data(cfg)
    model = common.prepare_model(build_model(cfg), cfg, device)
    print(f"{type(common.unwrap(model)).__name__}: {common.count_parameters(model):,} parameters, "
          f"{'+'.join(cfg.MODALITIES)} x {cfg.T_IN} -> {cfg.T_OUT} VIL frames at {cfg.TARGET_SIZE}x{cfg.TARGET_SIZE}, "
          f"device {device}")

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LR)
    train_loader = common.make_loader(data.train, cfg, device, shuffle=True)
    val_loader = common.make_loader(data.val, cfg, device, shuffle=False)
    scheduler = common.cosine_schedule(optimizer, cfg.EPOCHS * len(train_loader))
    with common.locked(out):                           # one run at a time writes in OUT_DIR
        start = common.start_or_resume(model, optimizer, scheduler, cfg)   # epoch 1, or after last.pt's
        history = common.fit(model, train_loader, val_loader, common.LOSSES[cfg.LOSS], optimizer, cfg, device,
                             scheduler, augment=common.flip_rotate if cfg.AUGMENT else None, start=start)
        best = common.load_weights(model, out / "best.pt")      # chosen on validation, reported on test
        common.test_and_report(model, build_reference(cfg, data), data, cfg, device, history, epoch=best["epoch"])


if __name__ == "__main__":
    common.run_with_exit_status(main)
