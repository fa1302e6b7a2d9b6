"""Shared code for the StormFusion-SEVIR scripts, in two parts.

Part 1 is the notebooks' code in their order, under their names and signatures (read it beside notebooks
05, 06, 07 and 07A; each script's main() calls into it from top to bottom):
    1. data        the errors a user can fix; what one sample is: SEVIRVIL (05), SEVIRMultimodal (06),
                   SyntheticRadarDataset (07); the loaders
    2. models      NowcastNet, MultimodalNowcastNet, UNetBlock, SyntheticRadarUNet, ResidualBlock,
                   AdvancedUNet (the notebooks'), then EvolutionNet (the nowcasters' default), NowcastUNet
                   and ConvLSTMNet for nowcasting
    3. losses      VGGPerceptualLoss (07A), balanced MSE (+ MAE)
    4. loop        train_epoch(), evaluate(), fit()
    5. metrics     SkillScore (CSI, POD, SUCR, frequency bias at SEVIR's thresholds), intervals over events, power
                   spectra; reference forecasts: persistence, the one-vector shift, pysteps' optical flow, the
                   SEVIR paper's dense DIS flow, the IR lookups
    6. figures     visualize_predictions, visualize_multimodal (the notebooks'), curves, spectra, forecast.gif
Part 2 is the machinery, which a reader of the notebooks does not need to follow a sample or a step:
    7. events      catalog -> usable events -> train / validation / test by date
    8. run files   test_and_report() (metrics.json and every figure), checkpoints written atomically and loaded
                   weights_only, one run per folder, resume
    9. config      Config overrides from the command line, devices, torchrun
   10. sample      make_sample_sevir: a generated dataset in SEVIR's exact format
   11. download    a SEVIR subset over HTTP range requests; prepare: a copy that reads only what a sample needs
   12. the command line below

    python common.py sample --out DIR [--events N]       a generated sample dataset
    python common.py download --out DIR [--max-events N] a subset of the real SEVIR
    python common.py prepare --catalog C --root R --out DIR --size S   a copy that reads only what a sample needs
"""

import argparse
import contextlib
import csv
import datetime as dt
import errno
import fcntl
import inspect
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


# ######################################################################################
# Part 1. The notebooks' code, in their order (05, 06, 07, 07A)
# ######################################################################################

# ======================================================================================
# 1. Data: one item of each notebook's dataset (05, 06, 07), the loaders
# ======================================================================================

N_FRAMES = 49                                     # frames per SEVIR event, 5 minutes apart
# SEVIR layout facts (see the SEVIR paper and its tutorial)
NATIVE_SIZE = {"vil": 384, "ir069": 192, "ir107": 192, "lght": 48, "vis": 768}
EVENT_DTYPE = {"vil": np.uint8, "ir069": np.int16, "ir107": np.int16}     # as stored: VIL codes, deg C x 100
FRAME_TIMES_S = np.arange(-120, 125, 5) * 60      # the 49 frame times, seconds from time_utc
# IR normalisation. "sevir": the SEVIR paper's fixed z-score on stored units (deg C x 100),
# (x - shift) / scale, which keeps absolute cloud-top temperature. "minmax": the notebooks'
# per-sample scaling to [0, 1], which erases it. Lightning counts use the paper's z-score too.
SEVIR_ZSCORE = {"ir069": (-3683.58, 1174.68), "ir107": (-1552.80, 2562.43), "lght": (0.02990, 0.60517)}
IR_NORMS = ("sevir", "minmax")


def normalize(mod, frames, ir_norm="sevir"):
    """VIL: stored code / 255. IR and lightning: SEVIR paper z-score, or per-sample min-max."""
    if mod == "vil":
        return frames.mul_(1 / 255)
    if ir_norm == "minmax" and mod != "lght":
        lo, hi = frames.min(), frames.max()
        return frames.sub_(lo).div_(hi - lo + 1e-8)
    shift, scale = SEVIR_ZSCORE[mod]
    return frames.sub_(shift).div_(scale)


def resize_frames(frames, size):
    """(T, H, W) float -> (T, size, size), bilinear, antialiased when shrinking (plain bilinear would skip
    pixels and lower the peaks); contiguous. size None or equal: the frames, contiguous."""
    if size is None or frames.shape[-1] == size:
        return frames.contiguous()
    return F.interpolate(frames[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < frames.shape[-1])[0].contiguous()


def lightning_to_grid(flashes, size=48):
    """(n, 5) flash list -> (49, size, size) float32 flash counts per 5-minute frame, causal.

    Columns: [seconds from time_utc, lat, lon, raster x, raster y]. Frame k (time t_k = -120 + 5k
    minutes) counts the flashes of the five minutes up to its time, t_k - 5 min < t <= t_k, as the
    SEVIR paper describes its frames; frame 0 also counts all earlier ones, flashes after the last
    frame are dropped. So no frame holds a flash from after its own time (the reference code's
    [t_k, t_k + 5 min) would put the first forecast period into the last input frame). Row is
    raster y, column raster x; points off the grid are dropped.
    """
    grid = np.zeros((N_FRAMES, size, size), dtype=np.float32)
    if len(flashes) == 0:
        return grid
    t, x, y = flashes[:, 0], np.floor(flashes[:, 3]), np.floor(flashes[:, 4])
    frame = np.searchsorted(FRAME_TIMES_S, t, side="left")          # first k with t <= t_k
    on = (x >= 0) & (x < size) & (y >= 0) & (y < size) & (frame < N_FRAMES)
    np.add.at(grid, (frame[on], y[on].astype(np.int64), x[on].astype(np.int64)), 1.0)
    return grid


class SEVIRVIL(Dataset):
    """VIL -> VIL nowcasting (notebook 05). x: (1, t_in, S, S), y: (1, t_out, S, S), VIL code / 255.

    As the notebook calls it, SEVIRVIL(catalog_path, root_dir, t_in=12, t_out=1, limit=None, start_idx=0):
    the catalog's usable VIL events (load_catalog), `limit` of them from `start_idx`. The scripts pass their
    period's table of events in place of the path. Training takes every window of every event; held out,
    the windows starting every `val_stride` frames (Earthformer: frames 0-24, 12-36, 24-48 for 13 -> 12).
    """

    def __init__(self, catalog_path, root_dir, t_in=12, t_out=1, limit=None, start_idx=0, target_size=None,
                 train=True, val_stride=12):
        events = event_table(catalog_path, root_dir, ("vil",)).iloc[start_idx:][:limit]
        self.mods = ("vil",)
        self.reader = SEVIRReader(events, root_dir, self.mods)
        self.t_in, self.t_out, self.target_size = t_in, t_out, target_size
        self.windows = windows(len(events), t_in + t_out, 1 if train else val_stride)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, idx):
        e, s = self.windows[idx]                                   # event, first frame of the window
        with self.reader.skip_if_unreadable(e):                    # (a file gone bad since: None, skipped)
            vil = self.reader.read("vil", e, s, s + self.t_in + self.t_out, self.target_size)  # (T, S, S)
            vil = normalize("vil", vil)                            # VIL code / 255
            return vil[None, :self.t_in], vil[None, self.t_in:]    # (1, T_in, S, S), (1, T_out, S, S)


class SEVIRMultimodal(Dataset):
    """Modalities stacked as channels -> VIL (notebook 06). x: (C, t_in, S, S), y: (1, t_out, S, S) VIL.

    As the notebook calls it, SEVIRMultimodal(df, root, events, mods=("vil",), ...): `df` a SEVIR catalog
    (its usable events are taken) and `events` the ids to use. The scripts pass a table of events as `df`
    and no ids (all of them). Windows as SEVIRVIL's.
    """

    def __init__(self, df, root, events=None, mods=("vil",), t_in=12, t_out=1, target_size=192, train=True,
                 val_stride=12, ir_norm="sevir"):
        if "vil" not in mods:
            raise UserError("SEVIRMultimodal needs vil among its modalities (it is the target)")
        table = event_table(df, root, mods, events)
        self.reader = SEVIRReader(table, root, mods)
        self.mods, self.t_in, self.t_out = tuple(mods), t_in, t_out
        self.target_size, self.ir_norm = target_size, ir_norm
        self.windows = windows(len(table), t_in + t_out, 1 if train else val_stride)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, idx):
        e, s = self.windows[idx]                                   # event, first frame of the window
        x = torch.empty(len(self.mods), self.t_in, self.target_size, self.target_size)
        with self.reader.skip_if_unreadable(e):
            for c, mod in enumerate(self.mods):
                if mod == "vil":                                   # inputs and target: read once
                    vil = normalize(mod, self.reader.read(mod, e, s, s + self.t_in + self.t_out, self.target_size))
                    x[c], y = vil[:self.t_in], vil[None, self.t_in:]
                else:                                              # inputs only
                    x[c] = normalize(mod, self.reader.read(mod, e, s, s + self.t_in, self.target_size), self.ir_norm)
            return x, y                                            # (C, T_in, S, S), (1, T_out, S, S)


class SyntheticRadarDataset(Dataset):
    """Satellite -> radar at the same time (notebook 07). x: (C, S, S), y: (1, S, S) VIL.

    As the notebook calls it, SyntheticRadarDataset(df, root, events, input_mods, t_sample=24, ...): frame
    `t_sample` of each event. The scripts pass a table of events as `df` and t_sample=None: every frame of
    every event in training, frames 0, 4, 8, ..., 48 held out.
    """

    def __init__(self, df, root, events=None, input_mods=("ir069", "ir107"), t_sample=24, target_size=192,
                 train=True, val_stride=4, ir_norm="sevir"):
        self.input_mods = tuple(input_mods)
        self.mods = self.input_mods + ("vil",)
        table = event_table(df, root, self.mods, events)
        self.reader = SEVIRReader(table, root, self.mods)
        self.target_size, self.ir_norm = target_size, ir_norm
        self.windows = windows(len(table), 1, 1 if train else val_stride, only=t_sample)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, idx):
        e, t = self.windows[idx]                                   # event, frame
        with self.reader.skip_if_unreadable(e):
            x = torch.cat([normalize(mod, self.reader.read(mod, e, t, t + 1, self.target_size), self.ir_norm)
                           for mod in self.input_mods])            # (C, S, S)
            return x, normalize("vil", self.reader.read("vil", e, t, t + 1, self.target_size))   # (1, S, S)


def windows(n_events, length, stride, only=None):
    """(event, first frame) of every item: windows of `length` frames starting every `stride` frames (or
    only at frame `only`), event by event. An (n, 2) int64 array."""
    starts = [only] if only is not None else range(0, N_FRAMES - length + 1, stride)
    return np.array([(e, s) for e in range(n_events) for s in starts], dtype=np.int64).reshape(-1, 2)


def collate_skipping(batch):
    """Stack (x, y) items into (x, y, n_skipped), leaving out unreadable items (None); x, y None if all were."""
    good = [item for item in batch if item is not None]
    if not good:
        return None, None, len(batch)
    x, y = torch.utils.data.default_collate(good)
    return x, y, len(batch) - len(good)


class EpochSampler(torch.utils.data.Sampler):
    """One epoch's indices: a permutation seeded by (seed, epoch) when shuffling, else in order.

    With several processes, process `rank` takes every `world`-th index, so the processes' batches
    together are exactly the one-process batches of the global batch size. Training shards only
    whole global batches (DDP needs equal batch counts); validation shards everything, unpadded.
    """

    def __init__(self, n, shuffle, seed, batch_size, rank=0, world=1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.rank, self.world = rank, world
        self.used = n - n % batch_size if (shuffle and world > 1) else n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        return iter(order[:self.used][self.rank::self.world].tolist())

    def __len__(self):
        return len(range(self.rank, self.used, self.world))


def make_loader(dataset, cfg, device, shuffle):
    """A DataLoader of (x, y, n_skipped) batches; BATCH_SIZE is the global batch, split over processes."""
    rank, world = dist_info()                     # (BATCH_SIZE divides by world: check_config)
    sampler = EpochSampler(len(dataset), shuffle, cfg.SEED, cfg.BATCH_SIZE, rank, world)
    if len(range(world - 1, sampler.used, world)) == 0:      # the last share empty: every process stops here
        raise UserError(f"{len(dataset)} {'training' if shuffle else 'held-out'} samples cannot fill "
                        + (f"one global batch of --batch_size={cfg.BATCH_SIZE}" if shuffle and len(dataset)
                           else f"{world} processes") + ": use more events, a smaller batch or fewer processes")
    return DataLoader(dataset, batch_size=cfg.BATCH_SIZE // world, sampler=sampler, num_workers=cfg.NUM_WORKERS,
                      pin_memory=device.type == "cuda", collate_fn=collate_skipping)


def batches(loader, what):
    """Yield the (x, y) batches of a loader, counting skipped items; stop past 10% of the dataset."""
    skipped, total = 0, len(loader.sampler)
    for x, y, n in loader:
        skipped += n
        if skipped > 0.1 * total:
            raise RunError(f"{skipped} of {total} {what} samples could not be read (over 10%): "
                           f"stopped; see the warnings above for the files")
        if x is not None:
            yield x, y
    if skipped:
        print(f"warning: {skipped} {what} samples skipped (unreadable files)", file=sys.stderr)


def loader_epoch(loader, epoch):
    """Fix this epoch's shuffle from (SEED, epoch): a resumed run sees the same batches."""
    loader.sampler.set_epoch(epoch)
    return loader


# ======================================================================================
# 2. Models: the notebooks' networks under their names, then the nowcasting alternatives
# ======================================================================================

class NowcastNet(nn.Module):
    """Conv3D encoder-decoder at full resolution (notebook 05).

    x: (B, in_channels, T_in, H, W) -> (B, 1, T_out, H, W). Five 3x3x3 convolutions keep every frame;
    the output is average-pooled over time down to T_out frames, as the notebooks had it. The network
    works for any T_in; t_in is kept for the notebook's signature NowcastNet(t_in=12, t_out=1, base=32).
    """

    def __init__(self, t_in=12, t_out=1, base=32, in_channels=1):
        super().__init__()
        self.enc1 = nn.Conv3d(in_channels, base, 3, padding=1)
        self.enc2 = nn.Conv3d(base, base * 2, 3, padding=1)
        self.enc3 = nn.Conv3d(base * 2, base * 4, 3, padding=1)
        self.dec1 = nn.Conv3d(base * 4, base * 2, 3, padding=1)
        self.dec2 = nn.Conv3d(base * 2, base, 3, padding=1)
        self.out = nn.Conv3d(base, 1, 1)
        self.pool = nn.AdaptiveAvgPool3d((t_out, None, None))

    def forward(self, x):
        for conv in (self.enc1, self.enc2, self.enc3, self.dec1, self.dec2):
            x = F.relu(conv(x))                                   # (B, ch, T_in, H, W)
        return self.pool(self.out(x))                             # (B, 1, T_out, H, W)


class MultimodalNowcastNet(NowcastNet):
    """Notebook 06's network: NowcastNet with one input channel per modality (VIL, IR069, IR107, ...).

    x: (B, in_channels, T_in, H, W) -> (B, 1, T_out, H, W), as MultimodalNowcastNet(in_channels, t_in, t_out, base).
    """

    def __init__(self, in_channels=1, t_in=12, t_out=1, base=32):
        super().__init__(t_in, t_out, base, in_channels)


class UNetBlock(nn.Module):
    """Two 3x3 convolutions, each with BatchNorm and ReLU (notebook 07)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class SyntheticRadarUNet(nn.Module):
    """U-Net for synthetic radar (notebook 07). x: (B, C, H, W) -> (B, out_channels, H, W) in [0, 1]; H, W
    divisible by 16. About 7.8 M parameters at base=32."""

    def __init__(self, in_channels=2, out_channels=1, base=32):
        super().__init__()
        self.enc1 = UNetBlock(in_channels, base)       # 192x192
        self.enc2 = UNetBlock(base, base * 2)          # 96x96
        self.enc3 = UNetBlock(base * 2, base * 4)      # 48x48
        self.enc4 = UNetBlock(base * 4, base * 8)      # 24x24
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = UNetBlock(base * 8, base * 16)   # 12x12
        self.up1 = nn.ConvTranspose2d(base * 16, base * 8, 2, stride=2)
        self.dec1 = UNetBlock(base * 16, base * 8)     # concat with enc4
        self.up2 = nn.ConvTranspose2d(base * 8, base * 4, 2, stride=2)
        self.dec2 = UNetBlock(base * 8, base * 4)      # concat with enc3
        self.up3 = nn.ConvTranspose2d(base * 4, base * 2, 2, stride=2)
        self.dec3 = UNetBlock(base * 4, base * 2)      # concat with enc2
        self.up4 = nn.ConvTranspose2d(base * 2, base, 2, stride=2)
        self.dec4 = UNetBlock(base * 2, base)          # concat with enc1
        self.out = nn.Conv2d(base, out_channels, 1)
        self.sigmoid = nn.Sigmoid()
        nn.init.constant_(self.out.bias, -4.0)         # start at no rain, VIL 0.02, not 0.5: most of the sky is clear

    def forward(self, x):
        e1 = self.enc1(x)                              # (B, base, H, W)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))                  # (B, 8 base, H / 8, W / 8)
        b = self.bottleneck(self.pool(e4))             # (B, 16 base, H / 16, W / 16)
        d1 = self.dec1(torch.cat([self.up1(b), e4], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d1), e3], dim=1))
        d3 = self.dec3(torch.cat([self.up3(d2), e2], dim=1))
        d4 = self.dec4(torch.cat([self.up4(d3), e1], dim=1))
        return self.sigmoid(self.out(d4))              # (B, out_channels, H, W)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU (notebook 07A)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        residual = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class AdvancedUNet(nn.Module):
    """Deep residual U-Net (notebook 07A): 5 levels, a residual block on each, `bottleneck_blocks` more in the
    bottleneck (the notebook's 3). x: (B, C, H, W) -> (B, out_channels, H, W) in [0, 1]; H, W divisible by 32.
    About 94 M parameters at base=32 (the notebook said 2.2 M).

    Its output is the last convolution clipped to [0, 1], not the notebook's sigmoid, the gradient passed through
    the clip (straight-through): a pixel clipped at 0 whose truth rains still learns, and clear sky can be exactly
    0, where a sigmoid's vanishing slope leaves a haze that an absolute loss lowers only slowly (README).
    """

    def __init__(self, in_channels=2, out_channels=1, base=32, bottleneck_blocks=3):
        super().__init__()
        self.enc1 = nn.Sequential(UNetBlock(in_channels, base), ResidualBlock(base))
        self.enc2 = nn.Sequential(UNetBlock(base, base * 2), ResidualBlock(base * 2))
        self.enc3 = nn.Sequential(UNetBlock(base * 2, base * 4), ResidualBlock(base * 4))
        self.enc4 = nn.Sequential(UNetBlock(base * 4, base * 8), ResidualBlock(base * 8))
        self.enc5 = nn.Sequential(UNetBlock(base * 8, base * 16), ResidualBlock(base * 16))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(UNetBlock(base * 16, base * 32),
                                        *[ResidualBlock(base * 32) for _ in range(bottleneck_blocks)])
        self.up1 = nn.ConvTranspose2d(base * 32, base * 16, 2, stride=2)
        self.dec1 = UNetBlock(base * 32, base * 16)
        self.up2 = nn.ConvTranspose2d(base * 16, base * 8, 2, stride=2)
        self.dec2 = UNetBlock(base * 16, base * 8)
        self.up3 = nn.ConvTranspose2d(base * 8, base * 4, 2, stride=2)
        self.dec3 = UNetBlock(base * 8, base * 4)
        self.up4 = nn.ConvTranspose2d(base * 4, base * 2, 2, stride=2)
        self.dec4 = UNetBlock(base * 4, base * 2)
        self.up5 = nn.ConvTranspose2d(base * 2, base, 2, stride=2)
        self.dec5 = UNetBlock(base * 2, base)
        self.out = nn.Conv2d(base, out_channels, 1)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        e1 = self.enc1(x)                              # (B, base, H, W)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        e5 = self.enc5(self.pool(e4))                  # (B, 16 base, H / 16, W / 16)
        b = self.bottleneck(self.pool(e5))             # (B, 32 base, H / 32, W / 32)
        d1 = self.dec1(torch.cat([self.up1(b), e5], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d1), e4], dim=1))
        d3 = self.dec3(torch.cat([self.up3(d2), e3], dim=1))
        d4 = self.dec4(torch.cat([self.up4(d3), e2], dim=1))
        d5 = self.dec5(torch.cat([self.up5(d4), e1], dim=1))
        out = self.out(d5)
        return out + (out.clamp(0, 1) - out).detach()  # clipped to [0, 1], the gradient as if not (straight-through)


# Additions: the nowcasters beyond the notebooks (the nowcasting scripts' --model), reusing the networks above.

class UNet(nn.Module):
    """A plain U-Net of `levels` stages of UNetBlock (notebook 07's block), widths base, 2 base, ...; a linear 1x1
    output. x: (B, in_channels, H, W) -> (B, out_channels, H, W); H, W divisible by 2^levels. EvolutionNet's."""

    def __init__(self, in_channels, out_channels, base, levels):
        super().__init__()
        widths = [base * 2 ** i for i in range(levels + 1)]
        ins = [in_channels] + widths[:levels - 1]
        self.encoders = nn.ModuleList(UNetBlock(i, w) for i, w in zip(ins, widths[:levels]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(UNetBlock(widths[-2], widths[-1]))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(levels)))
        self.decoders = nn.ModuleList(UNetBlock(2 * widths[i], widths[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(base, out_channels, 1)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)                     # (B, w_i, H / 2^i, W / 2^i)
            x = self.pool(x)
        x = self.bottleneck(x)                  # (B, w_L, H / 2^L, W / 2^L)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class NowcastUNet(nn.Module):
    """The SEVIR paper's nowcast baseline: a 2-D U-Net over the input frames stacked as channels.

    x: (B, C, T_in, H, W) -> (B, 1, T_out, H, W) in [0, 1]; H, W divisible by 16.
    """

    def __init__(self, in_channels=1, t_in=13, t_out=12, base=32):
        super().__init__()
        self.unet = SyntheticRadarUNet(in_channels * t_in, t_out, base)      # notebook 07's U-Net, frames as channels

    def forward(self, x):
        b, c, t, h, w = x.shape
        return self.unet(x.reshape(b, c * t, h, w)).unsqueeze(1)       # (B, 1, T_out, H, W)


class EvolutionNet(nn.Module):
    """Motion and growth applied to the last frame (an idea of the evolution network of Zhang et al., Nature
    2023; not the notebooks' NowcastNet above, a plain Conv3D). The motion at every pixel is measured in the input
    (dense_motion: the dense optical flow of the last two VIL frames) and every input frame is moved along it to
    the last frame's time; a U-Net over these aligned frames, stacked as channels, predicts for each lead k a
    correction to the velocity and an intensity change s_k (growth and decay). The forecast is the last VIL frame
    moved k steps along the velocity (bilinear backward warp, differentiable; what comes in from outside the grid
    is no rain) plus s_k.

    The U-Net's heads start at zero, so an untrained EvolutionNet is the DenseFlow reference; training learns
    where the motion differs from it and how cells grow and decay.
    x: (B, in_channels, T_in, H, W) -> (B, 1, T_out, H, W); H, W divisible by 2^levels; VIL is channel vil_channel.
    """

    def __init__(self, in_channels=1, t_in=12, t_out=1, base=16, levels=3, vil_channel=0):
        super().__init__()
        self.t_out, self.vil_channel = t_out, vil_channel
        self.unet = UNet(in_channels * t_in, 3 * t_out, base, levels)
        nn.init.zeros_(self.unet.out.weight)
        nn.init.zeros_(self.unet.out.bias)

    def forward(self, x):
        b, c, t, h, w = x.shape
        k = self.t_out
        motion = dense_motion(x[:, self.vil_channel])[:, None]                 # (B, 1, 2, H, W) pixels per frame
        # every input frame moved along the motion to the last frame's time: the U-Net sees the storms standing
        # still, so growth, decay and what moves otherwise are what changes between frames
        ago = torch.arange(t - 1, -1, -1, device=x.device, dtype=x.dtype).repeat(c).view(1, c * t, 1, 1, 1)
        aligned = warp(x.reshape(b, c * t, h, w), motion * ago)
        out = self.unet(aligned)                                                # (B, 3 T_out, H, W)
        velocity = motion + out[:, :2 * k].reshape(b, k, 2, h, w)               # (B, T_out, 2, H, W)
        lead = torch.arange(1, k + 1, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        moved = warp(x[:, self.vil_channel, -1], velocity * lead)               # (B, T_out, H, W)
        return (moved + out[:, 2 * k:]).unsqueeze(1)                            # (B, 1, T_out, H, W)


@torch.no_grad()
def dense_motion(frames, preset=2):
    """Motion at every pixel, (B, 2, H, W) pixels per frame (dx, dy), from VIL frames (B, T, H, W) in [0, 1]: OpenCV's
    dense DIS optical flow (preset 2, MEDIUM: of the presets 0-2 the best on validation) from the last frame back to
    the one before it, on VIL codes 0..255, negated (the SEVIR paper's optical-flow baseline, "backward" as
    rainymotion's Dense). Computed on the CPU; no gradient flows through it."""
    try:
        import cv2
    except ImportError:
        raise UserError("dense optical flow needs OpenCV: pip install opencv-python-headless") from None
    codes = (frames[:, -2:].float().clamp(0, 1) * 255).round().byte().cpu().numpy()          # (B, 2, H, W)
    dis = cv2.DISOpticalFlow_create(preset)
    back = np.stack([dis.calc(c[1], c[0], None) for c in codes])          # (B, H, W, 2): last(p) ~ before(p + f(p))
    return -torch.from_numpy(back).to(frames).permute(0, 3, 1, 2)


def warp(frame, displacement):
    """frame (B, H, W) or frames (B, K, H, W) moved by displacement (B, K, 2, H, W) in pixels (dx, dy):
    out[k](p) = frame[k](p - d_k(p)), bilinear, zero outside the grid. (B, K, H, W)."""
    b, k, _, h, w = displacement.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=frame.device, dtype=frame.dtype),
                            torch.arange(w, device=frame.device, dtype=frame.dtype), indexing="ij")
    px = xs - displacement[:, :, 0]                                             # (B, K, H, W) source column
    py = ys - displacement[:, :, 1]
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1)      # grid_sample's [-1, 1], align_corners=False
    src = (frame[:, None] if frame.ndim == 3 else frame).expand(b, k, h, w).reshape(b * k, 1, h, w)
    return F.grid_sample(src, grid.reshape(b * k, h, w, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=False).view(b, k, h, w)


class ConvLSTMCell(nn.Module):
    """LSTM gates from one convolution over [input, hidden] (Shi et al. 2015)."""

    def __init__(self, in_ch, hidden):
        super().__init__()
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, 3, padding=1)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = self.conv(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ConvLSTMNet(nn.Module):
    """Encoder-forecaster ConvLSTM: frames are encoded to 1/4 resolution, one ConvLSTM reads the T_in
    inputs, a second one starts from its state and rolls out T_out steps, each decoded to a change of the
    last input frame (its VIL channel, vil_channel). The decoder's last layer starts at zero, so training
    starts from persistence: with a sigmoid output instead, an absolute loss on mostly clear sky drove it to
    the no-rain forecast and held it there.

    x: (B, C, T_in, H, W) -> (B, 1, T_out, H, W); H, W divisible by 4.
    """

    def __init__(self, in_channels=1, t_out=12, base=32, vil_channel=0):
        super().__init__()
        hidden, self.t_out, self.vil_channel = 2 * base, t_out, vil_channel
        self.encode = nn.Sequential(nn.Conv2d(in_channels, base, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(base, hidden, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.encoder, self.forecaster = ConvLSTMCell(hidden, hidden), ConvLSTMCell(hidden, hidden)
        self.decode = nn.Sequential(nn.ConvTranspose2d(hidden, base, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                                    nn.ConvTranspose2d(base, base, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(base, 1, 1))
        nn.init.zeros_(self.decode[-1].weight)
        nn.init.zeros_(self.decode[-1].bias)

    def forward(self, x):
        b, _, t_in, h, w = x.shape
        state = (x.new_zeros(b, self.encoder.conv.out_channels // 4, h // 4, w // 4),) * 2
        for t in range(t_in):
            state = self.encoder(self.encode(x[:, :, t]), state)   # (B, hidden, H/4, W/4)
        last, frames = x[:, self.vil_channel, -1:], []              # (B, 1, H, W)
        for _ in range(self.t_out):
            state = self.forecaster(state[0], state)
            frames.append(last + self.decode(state[0]))              # (B, 1, H, W)
        return torch.stack(frames, 2)                                # (B, 1, T_out, H, W)


# MODEL in train_baseline / train_multimodal, and what TARGET_SIZE must divide by for it
NOWCASTER_GRID = {"evolution": 8, "nowcastnet": 1, "unet": 16, "convlstm": 4}


def build_nowcaster(name, in_channels, t_in, t_out, base, vil_channel=0):
    """EvolutionNet, NowcastNet, NowcastUNet or ConvLSTMNet: (B, in_channels, t_in, H, W) -> (B, 1, t_out, H, W)."""
    if name == "evolution":
        return EvolutionNet(in_channels, t_in, t_out, base, vil_channel=vil_channel)
    if name == "unet":
        return NowcastUNet(in_channels, t_in, t_out, base)
    if name == "convlstm":
        return ConvLSTMNet(in_channels, t_out, base, vil_channel=vil_channel)
    if in_channels == 1:
        return NowcastNet(t_in, t_out, base)
    return MultimodalNowcastNet(in_channels, t_in, t_out, base)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ======================================================================================
# 3. Losses: the perceptual loss (notebook 07A), balanced MSE
# ======================================================================================

# torchvision's VGG16_Weights.IMAGENET1K_V1.url (a test checks it): importing torchvision for it costs 1.5 to 3 s
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class VGGPerceptualLoss(nn.Module):
    """Mean of feature MSEs at VGG16's relu1_2, relu2_2, relu3_3 and relu4_3 (notebook 07A).

    VGG16 gets torchvision's ImageNet weights (IMAGENET1K_V1, the file at VGG16_URL) when they can be had
    (torch hub cache or download); otherwise it says so once and uses the same layers untrained.
    `self.backbone` records which. Inputs: (B, 1, H, W) in [0, 1], repeated to RGB, ImageNet-normalised.
    """

    def __init__(self, weights="imagenet"):
        super().__init__()
        features, channels = [], 3                # VGG16's layers up to relu4_3, as torchvision numbers them
        for width in (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512):
            if width == "pool":
                features.append(nn.MaxPool2d(2, 2))
            else:
                features += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        features = nn.Sequential(*features)
        for conv in features[::2]:                 # torchvision's initialisation of VGG16 (used untrained)
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.backbone = "untrained"
        if weights == "imagenet":
            try:
                state = torch.hub.load_state_dict_from_url(VGG16_URL, progress=False,
                                                           check_hash=True)        # hub cache, else download
                features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                          if k.startswith("features.") and int(k.split(".")[1]) < len(features)})
                self.backbone = "imagenet"
            except Exception as e:             # offline, blocked, corrupt cache: all mean "no weights"
                print(f"note: VGG16 ImageNet weights unavailable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "this VGG16 has untrained layers. Put vgg16-397923af.pth in "
                      "~/.cache/torch/hub/checkpoints/ to use them.")
        self.slices = nn.ModuleList([features[:4], features[4:9], features[9:16], features[16:23]])
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):                # the backbone stays in eval mode
        return super().train(False)

    def forward(self, pred, target):
        pred = (pred.expand(-1, 3, -1, -1) - self.mean) / self.std
        target = (target.expand(-1, 3, -1, -1) - self.mean) / self.std
        loss = 0.0
        for block in self.slices:
            pred, target = block(pred), block(target)
            loss = loss + F.mse_loss(pred, target)
        return loss / len(self.slices)


# Balanced MSE (after Shi et al. 2017): squared errors weighted by the true intensity, so the rare intense
# cells are not washed out. Weights 1, 2, 5, 10, 30 below 16, from 16, 74, 133 and 181 (VIL codes:
# about 0.15, 0.78, 3.5 and 12.1 kg/m^2).
BMSE_THRESHOLDS = (16, 74, 133, 181)
BMSE_WEIGHTS = (1.0, 2.0, 5.0, 10.0, 30.0)


def bmse_weights(y):
    """Per-pixel weights of balanced MSE for targets y in [0, 1]."""
    codes = y * 255
    w = torch.full_like(y, BMSE_WEIGHTS[0])
    for t, weight in zip(BMSE_THRESHOLDS, BMSE_WEIGHTS[1:]):
        w = torch.where(codes >= t, torch.full_like(y, weight), w)
    return w


def balanced_mse(pred, y):
    return (bmse_weights(y) * (pred - y) ** 2).mean()


def balanced_mse_balanced_mae(pred, y):
    """B-MSE + B-MAE, the training loss of Shi et al. 2017: the absolute term keeps clear sky at 0 (no haze)."""
    err = pred - y
    return (bmse_weights(y) * (err ** 2 + err.abs())).mean()


def balanced_mse_plain_mae(pred, y):
    """B-MSE + unweighted MAE: the median where errors are small (clear sky, light rain), the intensity-weighted
    mean where they are large (the cores), so intense cells are not washed out and clear sky stays clear."""
    err = pred - y
    return (bmse_weights(y) * err ** 2 + err.abs()).mean()


LOSSES = {"mse": F.mse_loss, "mae": F.l1_loss, "bmse": balanced_mse, "bmse_bmae": balanced_mse_balanced_mae,
          "bmse_mae": balanced_mse_plain_mae}


# ======================================================================================
# 4. Training loop: train_epoch, evaluate, fit
# ======================================================================================

def train_epoch(model, loader, loss_fn, optimizer, device, epoch, scaler=None, scheduler=None, augment=None):
    """One pass over the training data; returns the mean of each loss term per sample, {"loss": ...}.
    A `scheduler` given here steps once per batch (e.g. a cosine decay over the whole run); `augment(x, y)`
    transforms each batch on the device (drawn from torch's seeded generator, so resume and workers agree)."""
    from tqdm import tqdm
    model.train()
    amp = amp_dtype(device)
    sums, n, stop = 0.0, 0, None
    bar = tqdm(batches(loader, "training"), total=len(loader), desc=f"epoch {epoch}", leave=False,
               dynamic_ncols=True, disable=not is_main())
    with uneven_inputs(model):                     # torchrun: a process that stops early never leaves others waiting
        try:
            for batch, (x, y) in enumerate(bar, start=1):
                x, y = to_device(x, device), to_device(y, device)
                if augment is not None:
                    x, y = augment(x, y)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    terms = loss_terms(loss_fn(model(x), y))
                loss = terms["loss"]
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if not torch.isfinite(loss):        # checked after the step, whose all-reduce the others wait for;
                    stop = (f"loss is {loss.item()} at epoch {epoch}, batch {batch}: stopped; last.pt holds the "
                            f"last finished epoch, best.pt the best one (try a lower --lr)")
                    break                           # the weights are spoilt: nothing of this epoch is saved
                sums = sums + torch.tensor([t.item() for t in terms.values()], dtype=torch.float64) * len(x)
                n += len(x)
                bar.set_postfix(loss=f"{sums[0] / n:.5f}")
        except RunError as e:                       # over 10% of its samples unreadable
            stop = str(e)
    stop_together(stop, device)
    return _mean_terms(terms, sums, n, device)


@torch.inference_mode()
def evaluate(forecast, loader, device, loss_fn=None):
    """Score a model or a reference forecast on a loader: (mean loss terms or None, SkillScore dict).

    Forecasts are clamped to [0, 1] before scoring; the loss uses them as they are. Everything runs in
    float32 (no autocast: bf16 would snap values near the high thresholds). Under torchrun each process
    scores its share and the sums are added up, so every process gets the whole set's scores.
    """
    if isinstance(forecast, nn.Module):
        forecast = unwrap(forecast).eval()                # DDP's forward would sync; plain forward here
    skill, sums, n, terms, stop = SkillScore(), 0.0, 0, {"loss": None}, None
    try:
        for x, y in batches(loader, "validation"):
            x, y = to_device(x, device), to_device(y, device)
            pred = forecast(x)
            if loss_fn is not None:
                terms = loss_terms(loss_fn(pred, y))
                sums = sums + torch.tensor([t.item() for t in terms.values()], dtype=torch.float64) * len(x)
            n += len(x)
            skill.update(pred.float().clamp(0, 1), y)
    except RunError as e:                           # over 10% of its samples unreadable
        stop = str(e)
    stop_together(stop, device)
    means = _mean_terms(terms, sums if loss_fn is not None else [0.0], n, device)
    return (means if loss_fn is not None else None), skill.all_reduce().compute()


def fit(model, train_loader, val_loader, loss_fn, optimizer, cfg, device, scheduler=None, augment=None, extra=None,
        advanced=False, start=(1, float("inf"), [])):
    """Train for cfg.EPOCHS epochs from `start` (start_or_resume: first epoch, best validation value, history),
    validating after each and writing history.csv, last.pt and best.pt (save_epoch). loss_fn(pred, y) returns the
    loss, or a dict of terms with it under "loss" (each term is logged). The validation loss picks best.pt and steps
    a ReduceLROnPlateau scheduler; another scheduler steps once per training batch; `augment(x, y)` transforms each
    training batch. advanced=True is train_advanced.py's recipe: best.pt on the validation "mse" term (07A), the
    first cfg.HALF_RES_EPOCHS on half_resolution batches, BatchNorm re-estimated on cfg.BN_BATCHES training batches
    before each validation. `extra` goes into every checkpoint. Returns the history, one dict per epoch."""
    select = "mse" if advanced else "loss"                         # the validation term that picks best.pt
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device) == torch.float16 else None
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    first, best_val, history = start
    saved = first - 1                                               # the epoch last.pt holds (0: none yet)
    try:
        for epoch in range(first, cfg.EPOCHS + 1):
            t0, lr = time.time(), optimizer.param_groups[0]["lr"]          # the rate this epoch starts at
            transform = half_resolution if advanced and epoch <= cfg.HALF_RES_EPOCHS else augment
            train = train_epoch(model, loader_epoch(train_loader, epoch), loss_fn, optimizer, device, epoch, scaler,
                                None if plateau else scheduler, transform)
            if advanced:
                recompute_batchnorm(model, train_loader, device, cfg.BN_BATCHES)
            val, metrics = evaluate(model, val_loader, device, loss_fn)
            if plateau:
                scheduler.step(val[select])
            improved = val[select] < best_val
            best_val = min(best_val, val[select])
            history.append({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
                            **{f"val_{k}": v for k, v in val.items()},
                            "lr": lr, "seconds": round(time.time() - t0, 2)})
            save_epoch(model, optimizer, scheduler, cfg, epoch, best_val, metrics, history, extra, improved)
            saved = epoch
            print(f"epoch {epoch}/{cfg.EPOCHS}  train {_terms_text(train)}  val {_terms_text(val)}  "
                  f"CSI-M {metrics['csi_m']:.3f}  {history[-1]['seconds']:.0f}s" + ("  * best" if improved else ""))
    except KeyboardInterrupt:                       # Ctrl-C, SIGTERM (run_with_exit_status): last.pt is the last epoch
        raise stopped(cfg, saved) from None
    except RuntimeError as e:                       # a DataLoader worker killed, most often by the out-of-memory killer
        if "DataLoader worker" not in str(e):
            raise
        raise RunError(f"{str(e).splitlines()[0]} (out of memory? try fewer --num_workers or a smaller --batch_size); "
                       f"{stopped(cfg, saved)}") from None
    barrier()                                      # the others read best.pt next: wait for rank 0's writes
    return history


def loss_terms(loss):
    """A loss function returns the loss to minimise, or a dict with it under "loss" and other terms to log."""
    return loss if isinstance(loss, dict) else {"loss": loss}


def _mean_terms(terms, sums, n, device="cpu"):
    """{name: sum / n} with sums and n added up over processes (torchrun)."""
    totals = all_reduce_sum(torch.cat([torch.as_tensor(sums, dtype=torch.float64).reshape(-1),
                                       torch.tensor([float(n)], dtype=torch.float64)]).to(device)).tolist()
    return {k: v / totals[-1] for k, v in zip(terms, totals[:-1])}


def stop_together(stop, device="cpu"):
    """Raise RunError(stop) in every process when any process has a reason to stop (one all-reduce under torchrun):
    the one that has it says why, the others that they stopped with it. A no-op when no process has one."""
    if all_reduce_sum(torch.tensor([float(stop is not None)], device=device)).item() > 0:
        raise RunError(stop or "stopped with another process (its message is above)")


def uneven_inputs(model):
    """DistributedDataParallel's join(): a process whose epoch ends early (unreadable samples skipped, or a stop)
    stands in for the gradient all-reduces the others still make, instead of leaving them waiting."""
    ddp = getattr(model, "_orig_mod", model)
    return ddp.join() if isinstance(ddp, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def _terms_text(terms):
    """'0.00123' for a plain loss, '0.00412 (mse 0.00110, perceptual 0.03010)' with more terms."""
    rest = ", ".join(f"{k} {v:.5f}" for k, v in terms.items() if k != "loss")
    return f"{terms['loss']:.5f}" + (f" ({rest})" if rest else "")


def cosine_schedule(optimizer, total_steps, warmup=20):
    """Learning rate: a short linear warm-up, then a cosine decay to 0 at `total_steps` (stepped per batch).
    The factor is computed from the step count alone, so a resumed run with more epochs decays to the new end."""
    def factor(step):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def flip_rotate(x, y):
    """The batch turned by a random quarter turn and flipped or not, inputs and targets alike (the last two
    axes, a square grid): storms move and grow alike in every direction, so each window counts 8 times."""
    turns, flip = int(torch.randint(4, ())), bool(torch.randint(2, ()))

    def turn(t):
        t = torch.rot90(t, turns, (-2, -1))
        return t.flip(-1) if flip else t
    return turn(x), turn(y)


def half_resolution(x, y):
    """Inputs and targets average-pooled 2 x 2: the same storms on a quarter of the pixels. A fully
    convolutional network's first epochs learn the coarse picture there at about 0.4x the time (progressive
    resizing; README); the later epochs, on whole frames, the fine detail."""
    return F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)


@torch.no_grad()
def recompute_batchnorm(model, loader, device, n_batches):
    """Re-estimate every BatchNorm's running mean and variance from `n_batches` training batches with the
    weights as they are now ("precise BN"). The running averages kept during training lag behind weights
    that still move fast; scored with them, a deep U-Net's validation scores swing from epoch to epoch."""
    net = unwrap(model)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or n_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                              # a plain mean over the batches below
    net.train()
    stop = None
    try:
        for i, (x, _) in enumerate(batches(loader, "training")):
            if i == n_batches:
                break
            net(to_device(x, device))
    except RunError as e:                              # over 10% unreadable: every process stops, none waits
        stop = str(e)
    stop_together(stop, device)
    world = dist_info()[1]
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        for t in (m.running_mean, m.running_var):      # every process scores with the same statistics
            all_reduce_sum(t).div_(world)


def prepare_model(model, cfg, device):
    """Move to the device; on CUDA use channels_last for 2-D networks; wrap in DistributedDataParallel under
    torchrun; torch.compile if TORCH_COMPILE."""
    model = model.to(device)
    if device.type == "cuda" and not any(isinstance(m, nn.Conv3d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    if dist_info()[1] > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)    # batch statistics over all GPUs
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if getattr(cfg, "TORCH_COMPILE", False):
        model = torch.compile(model)
    return model


def unwrap(model):
    """The plain module under torch.compile (and DistributedDataParallel) wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def to_device(t, device):
    t = t.to(device, non_blocking=True)
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 and device.type == "cuda" else t


def amp_dtype(device):
    """Mixed precision on CUDA only: bf16 where supported, else fp16 (with a GradScaler)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ======================================================================================
# 5. Skill scores and reference forecasts
# ======================================================================================

SEVIR_THRESHOLDS = (16, 74, 133, 160, 181, 219)   # VIL codes: ~0.15, 0.78, 3.5, 7.1, 12.1, 32 kg/m^2


class SkillScore:
    """CSI, POD, success ratio (SUCR) and frequency bias (H + F) / (H + M) at SEVIR's VIL thresholds, with MSE and MAE.

    update(pred, target): tensors of equal shape (..., H, W) in [0, 1] (VIL code / 255); a 5-D (B, C, T, H, W)
    input also gets per-lead scores over T. Threshold t counts 255 * value >= t; hits, misses and false alarms are
    summed over every pixel, sample and lead. Pooled CSI (csi_pool4_m, csi_pool16_m) max-pools both fields over
    k x k tiles of the scored grid first. A score whose denominator is 0 is undefined (NaN, printed n/a); CSI-M
    is Earthformer's: the mean over all six thresholds with an undefined CSI counted as 0.
    """

    def __init__(self, thresholds=SEVIR_THRESHOLDS, pools=(4, 16)):
        self.thresholds, self.pools = tuple(thresholds), tuple(pools)
        self.counts = None                # name -> summed tensor, (n_leads,) or (n_leads, n_thresholds)

    def _contingency(self, p, y, dims):
        """(hits, misses, false alarms) of VIL codes p, y, each (n_leads, n_thresholds)."""
        per_t = [((pe & ye).sum(dims), (~pe & ye).sum(dims), (pe & ~ye).sum(dims))
                 for pe, ye in ((p >= t, y >= t) for t in self.thresholds)]
        return [torch.stack(counts, -1) for counts in zip(*per_t)]

    @torch.no_grad()
    def update(self, pred, target):
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        p, y = pred.detach().float() * 255, target.detach().float() * 255
        if p.ndim == 5:                        # (B, C, T, H, W) -> (B, T, C, H, W): lead time on axis 1
            p, y = p.transpose(1, 2), y.transpose(1, 2)
        else:                                  # one lead
            p, y = p.unsqueeze(1), y.unsqueeze(1)
        dims = [d for d in range(p.ndim) if d != 1]
        err = ((p - y) / 255).double()
        new = {"sse": (err ** 2).sum(dims), "sae": err.abs().sum(dims),
               "n": torch.full((p.shape[1],), float(p[:, 0].numel()), dtype=torch.float64, device=p.device)}
        new["hits"], new["misses"], new["fas"] = self._contingency(p, y, dims)
        for k in self.pools:                   # every (H, W) image max-pooled in k x k tiles, then counted
            pp, yp = (F.max_pool2d(v.reshape(-1, 1, *v.shape[-2:]), k, k) for v in (p, y))
            for name, c in zip(("hits", "misses", "fas"), self._contingency(pp, yp, [0, 1, 2, 3])):
                new[f"{name}_pool{k}"] = c[None]
        self.counts = new if self.counts is None else {k: v + new[k] for k, v in self.counts.items()}

    def all_reduce(self):
        """Add up the counts of every process (torchrun); a no-op in one process."""
        if dist_info()[1] > 1:
            if self.counts is None:
                raise RunError("a process had no validation samples: use fewer processes or more events")
            for v in self.counts.values():
                all_reduce_sum(v)
        return self

    def compute(self):
        """{'mse', 'mae', 'csi_<t>', 'pod_<t>', 'sucr_<t>', 'bias_<t>', 'csi_m', 'csi_pool4_m', ...}."""
        if self.counts is None:
            raise ValueError("SkillScore.compute() before any update()")
        c = {k: v.cpu().double().numpy() for k, v in self.counts.items()}

        def ratio(a, b):
            return np.where(b > 0, a / np.maximum(b, 1), np.nan)

        def csi(suffix="", leads=False):
            h, m, f = (c[name + suffix] if leads else c[name + suffix].sum(0) for name in ("hits", "misses", "fas"))
            return ratio(h, h + m + f)
        h, m, f = (c[name].sum(0) for name in ("hits", "misses", "fas"))       # over leads
        out = {"mse": float(c["sse"].sum() / c["n"].sum()), "mae": float(c["sae"].sum() / c["n"].sum())}
        scores = {"csi": ratio(h, h + m + f), "pod": ratio(h, h + m), "sucr": ratio(h, h + f), "bias": ratio(h + f, h + m)}
        for i, t in enumerate(self.thresholds):
            out.update({f"{name}_{t}": float(v[i]) for name, v in scores.items()})
        out["csi_m"] = _csi_mean(scores["csi"])
        for k in self.pools:
            out[f"csi_pool{k}_m"] = _csi_mean(csi(f"_pool{k}"))
        if len(c["n"]) > 1:                    # per lead time
            out["csi_m_per_lead"] = [_csi_mean(row) for row in csi(leads=True)]
            out["mse_per_lead"] = [float(v) for v in c["sse"] / c["n"]]
        return out


def _csi_mean(csi):
    """CSI-M as Earthformer: the mean over every threshold, an undefined (NaN) CSI counted as 0."""
    return float(np.nan_to_num(np.asarray(csi, dtype=np.float64), nan=0.0).mean())


@torch.inference_mode()
def event_counts(forecast, dataset, device, batch_size):
    """A forecast's SkillScore counts on each event of a held-out dataset: a list with one dict of summed tensors
    per event (None where every item of the event was skipped), for the scores (summed_scores) and their intervals
    (bootstrap_margins) alike. Under torchrun each process scores every world-th event and all get the whole list."""
    forecast = unwrap(forecast).eval() if isinstance(forecast, nn.Module) else forecast
    rank, world = dist_info()
    events, mine, stop = np.unique(dataset.windows[:, 0]), {}, None
    try:
        for e in events[rank::world]:
            skill = SkillScore()
            items = torch.utils.data.Subset(dataset, np.flatnonzero(dataset.windows[:, 0] == e))
            for x, y in batches(DataLoader(items, batch_size, collate_fn=collate_skipping), "test"):
                skill.update(forecast(to_device(x, device)).float().clamp(0, 1), to_device(y, device))
            mine[int(e)] = skill.counts and {k: v.cpu() for k, v in skill.counts.items()}
    except RunError as err:                         # over 10% of an event's samples unreadable
        stop = str(err)
    stop_together(stop, device)
    if world > 1:
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {e: counts for part in parts for e, counts in part.items()}
    return [mine[int(e)] for e in events]


def summed_scores(per_event):
    """SkillScore.compute() of event_counts' counts summed over the events."""
    skill, present = SkillScore(), [c for c in per_event if c is not None]
    skill.counts = {k: sum(c[k] for c in present) for k in present[0]}
    return skill.compute()


def bootstrap_margins(model, reference, n_draws=2000, seed=0):
    """The model's margin over a reference forecast on MSE, MAE and CSI-M with a 95% interval from a paired
    bootstrap over events: {score: [margin, low, high]}, positive where the model is better. Both forecasts' counts
    (event_counts) are summed over the same draws of events with replacement, and the scores recomputed."""
    keep = [i for i, (m, r) in enumerate(zip(model, reference)) if m is not None and r is not None]
    rng = np.random.default_rng(seed)
    draws = np.vstack([np.ones(len(keep)), rng.multinomial(len(keep), np.full(len(keep), 1 / len(keep)), n_draws)])

    def scores(per_event):                         # row 0: the events as they are; then one row per draw
        total = {k: draws @ np.stack([per_event[i][k].sum(0).double().cpu().numpy().reshape(-1) for i in keep])
                 for k in ("sse", "sae", "n", "hits", "misses", "fas")}
        h, m, f = total["hits"], total["misses"], total["fas"]
        csi = np.where(h + m + f > 0, h / np.maximum(h + m + f, 1), 0.0)       # undefined counts 0, as CSI-M
        return {"mse": total["sse"][:, 0] / total["n"][:, 0], "mae": total["sae"][:, 0] / total["n"][:, 0],
                "csi_m": csi.mean(1)}
    ours, theirs = scores(model), scores(reference)
    out = {}
    for k, sign in (("mse", -1), ("mae", -1), ("csi_m", 1)):       # lower MSE and MAE, higher CSI-M is better
        margin = sign * (ours[k] - theirs[k])
        out[k] = [float(margin[0]), *map(float, np.percentile(margin[1:], [2.5, 97.5]))]
    return out


def radial_power_spectrum(power):
    """Radially averaged power of a 2-D power spectrum |FFT|^2 (H, W) of a square grid: (H // 2,) values,
    bin k holding the wavenumbers within half a step of k cycles per grid width, k = 1 ... H // 2
    (wavelength H / k pixels). The mean (k = 0) and the corners beyond H / 2 are left out."""
    n = power.shape[-1]
    freq = torch.fft.fftfreq(n, device=power.device) * n               # cycles per grid width
    k = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2).round().long().flatten()
    keep = (k >= 1) & (k <= n // 2)
    total = torch.zeros(n // 2 + 1, dtype=torch.float64, device=power.device)
    count = torch.zeros_like(total)
    total.index_add_(0, k[keep], power.flatten()[keep].double())
    count.index_add_(0, k[keep], torch.ones_like(total[k[keep]]))
    return (total / count.clamp(min=1))[1:]


@torch.inference_mode()
def power_spectra(forecasts, loader, device, pixel_km):
    """Mean radially averaged power spectrum of the truth and of each forecast over a loader's frames (the
    field's picture of blur: a blurred forecast has less power than the truth at small wavelengths).
    forecasts: {name: model or callable} giving (B, 1, H, W). Returns {"wavelength_km": [...], "truth": [...],
    name: [...]}, longest wavelength first; under torchrun the sums of every process."""
    forecasts = {name: unwrap(f).eval() if isinstance(f, nn.Module) else f for name, f in forecasts.items()}
    sums, n = {}, 0
    for x, y in batches(loader, "spectrum"):
        x, y = to_device(x, device), to_device(y, device)
        fields = {"truth": y, **{name: f(x).float().clamp(0, 1) for name, f in forecasts.items()}}
        for name, field in fields.items():                        # (B, 1, H, W) each
            power = torch.fft.fft2(field.double()[:, 0]).abs().pow(2).sum(0) / field[0, 0].numel()
            sums[name] = sums.get(name, 0) + power
        n += len(y)
    total = all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64, device=device))[0]
    spectra = {name: (radial_power_spectrum(all_reduce_sum(p)) / total).tolist() for name, p in sums.items()}
    size = next(iter(sums.values())).shape[-1]
    return {"wavelength_km": [size * pixel_km / k for k in range(1, size // 2 + 1)], **spectra}


class Persistence:
    """Reference nowcast: the last observed VIL frame, repeated. x (B, C, T_in, H, W) -> (B, 1, T_out, H, W)."""
    name = "persistence"

    def __init__(self, vil_channel=0, t_out=1):
        self.vil_channel, self.t_out = vil_channel, t_out

    def __call__(self, x):
        last = x[:, self.vil_channel:self.vil_channel + 1, -1:]
        return last.expand(-1, -1, self.t_out, -1, -1)


@torch.no_grad()
def steering_motion(frames):
    """One motion vector per sample, (B, 2) pixels per frame (dx, dy), from frames (B, T, H, W): the shift that
    best maps the first frame onto the last (the peak of their circular cross-correlation, refined to a
    fraction of a pixel by a parabola through its neighbours), divided by the T - 1 frames between them."""
    first, last = frames[:, 0].float(), frames[:, -1].float()
    b, h, w = last.shape
    corr = torch.fft.irfft2(torch.fft.rfft2(last) * torch.fft.rfft2(first).conj(), s=(h, w))  # [d] = sum last(p) first(p - d)
    peak = corr.reshape(b, -1).argmax(1)
    iy, ix = peak // w, peak % w
    rows = torch.arange(b, device=frames.device)

    def refine(before, at, after):                 # vertex of the parabola through three neighbours
        curve = before - 2 * at + after
        return torch.where(curve < 0, 0.5 * (before - after) / curve.where(curve < 0, torch.ones_like(curve)), 0.0)
    dy = iy + refine(corr[rows, (iy - 1) % h, ix], corr[rows, iy, ix], corr[rows, (iy + 1) % h, ix]).clamp(-0.5, 0.5)
    dx = ix + refine(corr[rows, iy, (ix - 1) % w], corr[rows, iy, ix], corr[rows, iy, (ix + 1) % w]).clamp(-0.5, 0.5)
    dy, dx = torch.where(dy > h / 2, dy - h, dy), torch.where(dx > w / 2, dx - w, dx)            # wrap to +-H/2
    return torch.stack([dx, dy], 1).to(frames.dtype) / max(frames.shape[1] - 1, 1)


class ShiftExtrapolation:
    """Reference nowcast: the last frame moved along one motion vector per window (steering_motion: the shift
    that best maps the first input frame onto the last, an exhaustive search by cross-correlation), bilinear,
    no rain from outside the grid. x (B, C, T_in, H, W) -> (B, 1, T_out, H, W)."""
    name = "shift"

    def __init__(self, vil_channel=0, t_out=1):
        self.vil_channel, self.t_out = vil_channel, t_out

    def __call__(self, x):
        b, _, _, h, w = x.shape
        velocity = steering_motion(x[:, self.vil_channel])                                      # (B, 2)
        lead = torch.arange(1, self.t_out + 1, device=x.device, dtype=x.dtype)
        d = (lead.view(1, -1, 1) * velocity[:, None])[..., None, None].expand(b, self.t_out, 2, h, w)
        return warp(x[:, self.vil_channel, -1], d).unsqueeze(1)


PYSTEPS_MISSING = ("note: the optical-flow reference is skipped: pysteps or OpenCV is not installed "
                   "(pip install pysteps opencv-python-headless)")


def pysteps_methods():
    """pysteps' dense Lucas-Kanade motion and semi-Lagrangian extrapolation, imported only here (without its
    banner); None when pysteps or OpenCV is missing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):        # pysteps prints where its config file is
            from pysteps import extrapolation, motion
            motion.get_method("LK")(np.zeros((2, 8, 8)))       # fails here if OpenCV is missing
    except ImportError:
        return None
    except Exception as e:                                    # OpenCV missing: pysteps raises its own kind
        if type(e).__name__ != "MissingOptionalDependency":
            raise
        return None
    return motion.get_method("LK"), extrapolation.get_method("semilagrangian")


class OpticalFlow:
    """Reference nowcast, optical flow with the field's library, pysteps: Lucas-Kanade motion from the last
    `n_frames` input VIL frames with its sizes in pixels scaled to the grid (lk_settings), the last frame advected
    along it for each lead (semi-Lagrangian); what is advected in from outside the grid is no rain. Runs on the
    CPU. Of 2, 3 or 6 frames, at pysteps' settings or scaled, 6 scaled did best on validation (README).
    x (B, C, T_in, H, W) -> (B, 1, T_out, H, W)."""
    name = "optical_flow"

    def __init__(self, methods, vil_channel=0, t_out=1, n_frames=6, pixel_km=1.0):
        (self.motion, self.extrapolate), self.vil_channel, self.t_out, self.n_frames = methods, vil_channel, t_out, n_frames
        self.settings = lk_settings(pixel_km)

    def __call__(self, x):
        frames = x[:, self.vil_channel, -self.n_frames:].double().cpu().numpy()      # (B, n, H, W)
        out = np.empty((len(frames), 1, self.t_out) + frames.shape[-2:], np.float32)
        for b, f in enumerate(frames):
            with warnings.catch_warnings():          # pysteps warns on nearly empty fields; its result stands
                warnings.simplefilter("ignore")
                velocity = self.motion(f, **self.settings)                          # (2, H, W) pixels per frame
                out[b, 0] = np.nan_to_num(self.extrapolate(f[-1], velocity, self.t_out), nan=0.0)
        return torch.from_numpy(out).to(x.device)


def lk_settings(pixel_km):
    """pysteps' dense Lucas-Kanade settings given in pixels (its defaults suit ~1 km pixels: feature spacing 10,
    block 5, window 50, opening 3, declustering 20) scaled to pixels of `pixel_km` km."""
    def px(n):
        return max(1, round(n / pixel_km))
    return {"fd_kwargs": {"min_distance": px(10), "block_size": max(3, px(5) | 1), "buffer_mask": px(5)},
            "lk_kwargs": {"winsize": (max(3, px(50) | 1),) * 2}, "size_opening": px(3) if pixel_km <= 1 else 0,
            "decl_scale": max(2, px(20))}


class DenseFlow:
    """Reference nowcast, the SEVIR paper's own optical-flow baseline (rainymotion's Dense): each pixel's motion
    from the last two input VIL frames (dense_motion, OpenCV's DIS) held for every lead (constant-vector
    advection), here semi-Lagrangian, out_k(p) = last(p - k v(p)), in place of rainymotion's scatter and IDW.
    x (B, C, T_in, H, W) -> (B, 1, T_out, H, W)."""
    name = "dense_flow"

    def __init__(self, vil_channel=0, t_out=1):
        self.vil_channel, self.t_out = vil_channel, t_out

    def __call__(self, x):
        lead = torch.arange(1, self.t_out + 1, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
        velocity = dense_motion(x[:, self.vil_channel])[:, None]                      # (B, 1, 2, H, W)
        return warp(x[:, self.vil_channel, -1], velocity * lead).unsqueeze(1)         # (B, 1, T_out, H, W)


def nowcast_references(vil_channel, t_out, pixel_km=1.0):
    """Persistence, pysteps' optical flow and the SEVIR paper's dense DIS flow (where pysteps and OpenCV are
    installed, else one note says how) and the one-vector shift, for frames of `pixel_km` km pixels."""
    methods = pysteps_methods()
    if methods is None:
        print(PYSTEPS_MISSING)
    flow = [OpticalFlow(methods, vil_channel, t_out, pixel_km=pixel_km), DenseFlow(vil_channel, t_out)] if methods else []
    return [Persistence(vil_channel, t_out)] + flow + [ShiftExtrapolation(vil_channel, t_out)]


class IRLookup:
    """Reference synthetic radar: the VIL of each IR brightness-temperature bin, fitted on training frames.

    `channels` (indices into x) and `mods` (their modalities): one IR channel, or IR069 and IR107 together (a 2-D
    table of their bin pairs). Bins are 2.5 C wide from -100 C to +60 C (in the dataset's normalised units; 64
    bins over [0, 1] with ir_norm="minmax"). Each bin predicts the `statistic` ("mean" or "median") of the VIL
    seen in it in training, a bin never seen the overall one. x (B, C, H, W) -> (B, 1, H, W). Named "ir_lookup"
    on IR107, "ir069_lookup" on IR069, "ir2_lookup_mean" / "ir2_lookup_median" on both.
    """

    def __init__(self, channels, ir_norm="sevir", bins=64, mods=("ir107",), statistic="mean"):
        self.channels, self.bins, self.statistic = list(channels), bins, statistic
        self.ranges = [(0.0, 1.0) if ir_norm == "minmax" else
                       ((-10000 - SEVIR_ZSCORE[m][0]) / SEVIR_ZSCORE[m][1], (6000 - SEVIR_ZSCORE[m][0]) / SEVIR_ZSCORE[m][1])
                       for m in mods]
        self.name = (f"ir2_lookup_{statistic}" if len(mods) == 2 else "ir_lookup" if mods[0] == "ir107"
                     else f"{mods[0]}_lookup")
        self.table = torch.zeros(bins ** len(self.channels))

    def _bin(self, x):
        """The table index of every pixel: (B, H, W)."""
        index = 0
        for c, (lo, hi) in zip(self.channels, self.ranges):
            index = index * self.bins + ((x[:, c] - lo) / (hi - lo) * self.bins).long().clamp_(0, self.bins - 1)
        return index

    LEVELS = 1024                                  # the median's VIL histogram: levels 1/1024 of [0, 1] wide

    def fit(self, batches):
        """Fit on an iterable of (x, y) batches, streaming (SEVIR's training frames do not fit in memory): per bin,
        the count and sum of its VIL, for the median per VIL level of the bin; the median is the mean VIL of the
        level that holds the bin's middle value (the lower one of an even count, as torch.median), exact where a
        level holds one value, as VIL's 1/255 steps do at native resolution."""
        bins, levels = len(self.table), self.LEVELS if self.statistic == "median" else 1
        counts = torch.zeros(bins * levels, dtype=torch.float64)
        sums = torch.zeros(bins * levels, dtype=torch.float64)
        for x, y in batches:
            key, value = self._bin(x).flatten(), y[:, 0].flatten().double()
            if levels > 1:
                key = key * levels + (value * levels).long().clamp_(0, levels - 1)
            counts.index_add_(0, key, torch.ones_like(value))
            sums.index_add_(0, key, value)
        counts, sums = counts.view(bins, levels), sums.view(bins, levels)

        def middle(counts, sums):                  # (n, levels) -> the mean VIL of each row's middle level
            rank = (counts.sum(1, keepdim=True) - 1).clamp(min=0) // 2          # (one level: the row's mean)
            level = (counts.cumsum(1) <= rank).sum(1, keepdim=True).clamp(max=levels - 1)
            return (sums.gather(1, level) / counts.gather(1, level).clamp(min=1))[:, 0]
        overall = middle(counts.sum(0, keepdim=True), sums.sum(0, keepdim=True))    # for bins never seen
        self.table = torch.where(counts.sum(1) > 0, middle(counts, sums), overall).float()
        return self

    def __call__(self, x):
        return self.table.to(x.device)[self._bin(x)][:, None]


def fit_ir_lookup(cfg, data):
    """The synthetic-radar references, fitted on frames 0, 4, 8, ..., 48 of every training event (the held-out
    frames; the same each run): IRLookup on IR107 (on IR069 when that is the only IR input) and, with both IR
    channels as inputs, on the two together, its statistic (mean or median per bin) the one with the lower MAE on
    the validation events."""
    mods = cfg.INPUT_MODS
    fit_on = SyntheticRadarDataset(data.train_events, data.root, input_mods=mods, t_sample=None,
                                   target_size=cfg.TARGET_SIZE, train=False, ir_norm=cfg.IR_NORM)
    loader = DataLoader(fit_on, batch_size=16, collate_fn=collate_skipping)
    mod = "ir107" if "ir107" in mods else "ir069"
    lookups = [IRLookup([mods.index(mod)], cfg.IR_NORM, mods=[mod]).fit(batches(loader, "reference"))]
    if "ir069" in mods and "ir107" in mods:
        pair = ("ir069", "ir107")
        val = DataLoader(data.val, batch_size=16, collate_fn=collate_skipping)
        both = [IRLookup([mods.index(m) for m in pair], cfg.IR_NORM, mods=pair, statistic=stat)
                .fit(batches(loader, "reference")) for stat in ("mean", "median")]
        lookups.append(min(both, key=lambda lookup: evaluate(lookup, val, torch.device("cpu"))[1]["mae"]))
    return lookups


# ======================================================================================
# 6. Figures (the notebooks' two, then the run's curves and animations)
# ======================================================================================

def visualize_predictions(model, val_dataset, device, num_samples=3, path="predictions.png", cmap="sevir"):
    """Rows of [last input | ground truth | prediction] (notebooks 05 and 07), VIL in the SEVIR colours.

    Nowcasting shows the last input VIL frame and the last lead time; synthetic radar shows IR107 (or
    the first input channel) as input, in deg C.
    """
    plt = _plt()
    idx = _samples(val_dataset, num_samples)
    fig, axes = plt.subplots(len(idx), 3, figsize=(12, 4 * len(idx)), squeeze=False)
    style = _vil_style(cmap)
    for row, i in enumerate(idx):
        x, y, pred = _predict(model, val_dataset, i, device)
        if x.ndim == 4:                                     # nowcast: (C, T, H, W)
            lead = 5 * y.shape[1]
            axes[row, 0].imshow(x[0, -1] * 255, **style)
            axes[row, 0].set_title("last input VIL (t = 0)")
            truth, guess = y[0, -1], pred[0, -1]
            when = f"t = +{lead} min"
        else:                                               # synthetic: (C, H, W)
            mods = val_dataset.input_mods
            c = mods.index("ir107") if "ir107" in mods else 0
            image, label = _ir_image(mods[c], x[c], val_dataset.ir_norm)
            ir = axes[row, 0].imshow(image, cmap="gray_r")                    # cold cloud tops white
            axes[row, 0].set_title(f"input {label}")
            fig.colorbar(ir, ax=axes[row, 0], fraction=0.046, pad=0.02)
            truth, guess = y[0], pred[0]
            when = "same time"
        axes[row, 1].imshow(truth * 255, **style)
        axes[row, 1].set_title(f"ground truth VIL ({when})")
        im = axes[row, 2].imshow(guess * 255, **style)
        axes[row, 2].set_title(f"prediction ({when})")
        axes[row, 0].set_ylabel(f"sample {i}")
    _finish_vil_figure(fig, axes, im, cmap, path)


def visualize_multimodal(model, val_dataset, device, config=None, num_samples=2, path="predictions.png",
                         cmap="sevir"):
    """Rows of [VIL input | IR input | ground truth | prediction] (notebook 06).

    `config` is there for the notebook's call visualize_multimodal(model, val_dataset, device, config); the
    modalities come from the dataset itself, so a config that disagrees with the data cannot mislabel them.
    """
    plt = _plt()
    idx = _samples(val_dataset, num_samples)
    mods = val_dataset.mods
    v = mods.index("vil")
    ir = next((i for i, m in enumerate(mods) if m != "vil"), None)
    fig, axes = plt.subplots(len(idx), 4, figsize=(16, 4 * len(idx)), squeeze=False)
    style = _vil_style(cmap)
    for row, i in enumerate(idx):
        x, y, pred = _predict(model, val_dataset, i, device)
        lead = 5 * y.shape[1]
        axes[row, 0].imshow(x[v, -1] * 255, **style)
        axes[row, 0].set_title("VIL input (t = 0)")
        if ir is not None:
            image, label = _ir_image(mods[ir], x[ir, -1], val_dataset.ir_norm)
            im_ir = axes[row, 1].imshow(image, cmap="gray_r")
            axes[row, 1].set_title(f"input {label}, t = 0")
            fig.colorbar(im_ir, ax=axes[row, 1], fraction=0.046, pad=0.02)
        else:
            axes[row, 1].text(0.5, 0.5, "no IR input", ha="center", va="center", transform=axes[row, 1].transAxes)
        axes[row, 2].imshow(y[0, -1] * 255, **style)
        axes[row, 2].set_title(f"ground truth VIL (+{lead} min)")
        im = axes[row, 3].imshow(pred[0, -1] * 255, **style)
        axes[row, 3].set_title(f"predicted VIL (+{lead} min)")
        axes[row, 0].set_ylabel(f"sample {i}")
    fig.suptitle(f"Multimodal nowcasting: {' + '.join(m.upper() for m in mods)} -> VIL")
    _finish_vil_figure(fig, axes, im, cmap, path)


# The SEVIR VIL colour map (SEVIR tutorial): boundaries in VIL codes, grey below 16, magenta above 219.
VIL_BOUNDS = [0, 16, 31, 59, 74, 100, 133, 160, 181, 219, 255]
VIL_COLORS = [(0.302, 0.302, 0.302), (0.157, 0.745, 0.157), (0.098, 0.588, 0.098), (0.039, 0.412, 0.039),
              (0.039, 0.294, 0.039), (0.961, 0.961, 0.0), (0.929, 0.675, 0.0), (0.941, 0.431, 0.0),
              (0.627, 0.0, 0.0), (0.906, 0.0, 1.0)]


def vil_to_kgm2(code):
    """SEVIR's decoding of a VIL code (0..254) to kg/m^2."""
    code = np.asarray(code, dtype=np.float64)
    return np.where(code <= 5, 0.0, np.where(code <= 18, (code - 2) / 90.66, np.exp((code - 83.9) / 38.9)))


def _plt():
    import matplotlib
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")                 # headless: files only
    import matplotlib.pyplot as plt
    return plt


FIGURE_DPI = 80                        # figures' resolution (forecast.gif: 3/4 of it)


def _save_figure(fig, path):
    """Write the figure, free it, and show the file when running inside a notebook."""
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=FIGURE_DPI, bbox_inches="tight"))
    finally:
        _plt().close(fig)
    _show_if_notebook(path)


def _show_if_notebook(path):
    if "ipykernel" in sys.modules:
        from IPython.display import Image, display
        display(Image(filename=str(path)))


def _vil_style(cmap):
    """imshow keyword arguments for VIL codes 0..255: the SEVIR map (default) or turbo."""
    if cmap == "turbo":
        return {"cmap": "turbo", "vmin": 0, "vmax": 255}
    from matplotlib.colors import BoundaryNorm, ListedColormap
    cm = ListedColormap(VIL_COLORS).with_extremes(over=(0, 0, 0))     # 255: missing, in black
    return {"cmap": cm, "norm": BoundaryNorm(VIL_BOUNDS, cm.N)}


def _finish_vil_figure(fig, axes, im, cmap, path):
    """No ticks on the images, one VIL colour bar labelled in kg/m^2, then save (and show in a notebook)."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, ax=axes, fraction=0.025, pad=0.02)
    ticks = VIL_BOUNDS[1:-1]
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{v:.2g}" for v in vil_to_kgm2(ticks)])
    cb.set_label("VIL (kg/m$^2$)")
    _save_figure(fig, path)


def _samples(dataset, num_samples, candidates=48):
    """The held-out items with the most VIL in their target, among up to `candidates` spread over the set, each
    from another event while there are events left (so the rows show different storms)."""
    pool = np.unique(np.linspace(0, len(dataset) - 1, min(candidates, len(dataset))).astype(int))
    rain = {int(i): float(item[1].sum()) for i in pool if (item := dataset[int(i)]) is not None}
    ranked = sorted(rain, key=rain.get, reverse=True)
    chosen, events = [], set()
    for i in ranked:                                   # the rainiest item of each event first
        event = dataset.windows[i][0]
        if event not in events:
            chosen.append(i)
            events.add(event)
    chosen += [i for i in ranked if i not in chosen]
    return sorted(chosen[:num_samples])


def _ir_image(mod, frame, ir_norm):
    """(image, label): IR in deg C where the normalisation is fixed, else as normalised."""
    if ir_norm == "sevir" and mod in ("ir069", "ir107"):
        shift, scale = SEVIR_ZSCORE[mod]
        return (frame * scale + shift) / 100, f"{mod.upper()} (deg C)"
    return frame, f"{mod.upper()} (normalised)"


@torch.inference_mode()
def _predict(model, val_dataset, i, device):
    """(x, y, prediction) of validation item i, as NumPy arrays for plotting (rank 0 alone: no DDP forward)."""
    model = unwrap(model).eval()
    x, y = val_dataset[i]
    pred = model(x[None].to(device)).float().clamp(0, 1).cpu()[0]
    return x.numpy(), y.numpy(), pred.numpy()


def plot_loss(history, path):
    """Train and validation loss per epoch (the rows of history.csv)."""
    plt = _plt()
    h = history
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in h], [r["train_loss"] for r in h], "o-", label="train")
    ax.plot([r["epoch"] for r in h], [r["val_loss"] for r in h], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def plot_skill(metrics, path):
    """CSI, POD and success ratio per threshold, model against reference; CSI-M per lead if any."""
    plt = _plt()
    names = ["model"] + metrics["references"]
    styles = ("o-", "s--", "^:", "v-.", "d--")                  # one per forecast: the model and 4 references
    per_lead = "csi_m_per_lead" in metrics["model"]
    fig, axes = plt.subplots(1, 4 if per_lead else 3, figsize=(16 if per_lead else 12, 3.6))
    t = SEVIR_THRESHOLDS
    for ax, score in zip(axes, ("csi", "pod", "sucr")):
        for name, style in zip(names, styles):
            ax.plot(range(len(t)), [metrics[name][f"{score}_{v}"] for v in t], style, label=name)
        ax.set_xticks(range(len(t)), [str(v) for v in t])
        ax.set_xlabel("VIL threshold (code)")
        ax.set_title({"csi": "CSI", "pod": "POD", "sucr": "success ratio"}[score])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if per_lead:
        ax = axes[3]
        for name, style in zip(names, styles):
            lead = metrics[name]["csi_m_per_lead"]
            ax.plot([5 * (i + 1) for i in range(len(lead))], lead, style, label=name)
        ax.set_xlabel("lead time (min)")
        ax.set_title("CSI-M per lead")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    _save_figure(fig, path)


def plot_spectrum(spectra, path):
    """Radially averaged power spectrum of truth, model and references against wavelength (km), large scales
    on the left: a forecast below the truth at the right-hand end is blurred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n in spectra if n != "wavelength_km"]
    for name, style in zip(names, ("k-", "o-", "s--", "^:", "v-.")):
        ax.loglog(spectra["wavelength_km"], spectra[name], style, markersize=3, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("wavelength (km)")
    ax.set_ylabel("power (VIL / 255)$^2$")
    ax.set_title("radially averaged power spectrum, test frames")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save_figure(fig, path)


def forecast_gif(model, val_dataset, device, path, cmap="sevir", index=None):
    """Animated GIF: the input VIL frames, then ground truth beside prediction, frame by frame."""
    plt = _plt()
    from matplotlib.animation import FuncAnimation, PillowWriter
    i = int(index if index is not None else _samples(val_dataset, 3)[-1])
    x, y, pred = _predict(model, val_dataset, i, device)
    v = val_dataset.mods.index("vil")
    frames = [(x[v, k], None, f"input  t = {5 * (k - x.shape[1] + 1)} min") for k in range(x.shape[1])]
    frames += [(y[0, k], pred[0, k], f"forecast  t = +{5 * (k + 1)} min") for k in range(y.shape[1])]
    style = _vil_style(cmap)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    left = axes[0].imshow(frames[0][0] * 255, **style)
    right = axes[1].imshow(np.zeros_like(frames[0][0]), **style)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    title = fig.suptitle("")

    def draw(k):
        obs, fc, label = frames[k]
        left.set_data(obs * 255)
        right.set_data((fc if fc is not None else np.full_like(obs, np.nan)) * 255)
        axes[0].set_title("observed" if fc is None else "ground truth")
        axes[1].set_title("" if fc is None else "prediction")
        title.set_text(f"sample {i}: {label}")
        return left, right, title

    write_atomically(path, lambda tmp: FuncAnimation(fig, draw, frames=len(frames)).save(
        tmp, writer=PillowWriter(fps=3), dpi=FIGURE_DPI * 3 // 4))
    plt.close(fig)
    _show_if_notebook(path)


# ######################################################################################
# Part 2. The machinery: catalog checks, run files, configuration, devices, tools
# ######################################################################################

# ======================================================================================
# 7. Events: catalog, usable events, train / validation / test
# ======================================================================================

DEFAULT_ROOT = "data/sevir"                      # where real SEVIR is looked for by default
DEFAULT_CATALOG = "data/sevir/CATALOG.csv"
# At the defaults, real SEVIR is looked for in these places under the folder a script runs in, in order: a catalog
# and the folder that holds the type folders (vil/, ir069/, ...) or a data/ that does (the bucket s3://sevir as
# `aws s3 sync` copies it, Earthformer's datasets/sevir).
USUAL_PLACES = (("data/sevir/CATALOG.csv", "data/sevir"),            # these scripts' (or the bucket's top there)
                ("data/SEVIR_CATALOG.csv", "data/sevir"),            # the notebooks'
                ("sevir/CATALOG.csv", "sevir"),                      # the bucket's top
                ("datasets/sevir/CATALOG.csv", "datasets/sevir"))    # Earthformer's
SAMPLE_ROOT = "data/sevir_sample"                # where the generated sample goes when SEVIR is absent
SAMPLE_MARKER = "GENERATED_SAMPLE.txt"           # marks a folder as generated data, not real weather
SAMPLE_MARKER_TEXT = ("Generated by common.make_sample_sevir: SEVIR's file format with synthetic weather, "
                      "not real data. Sample version 3.\n")   # a default sample of another version is made again
SAMPLE_EVENTS = 32                               # events in the default sample: 16 train, 8 validation, 8 test
# Earthformer's cfg_sevir.yaml: train time_utc <= 2019-01-01 < validation <= 2019-06-01 < test.
EARTHFORMER_SPLIT = ("2019-01-01", "2019-06-01")


EVENT_CACHE_MB = 512             # a dataset whose events fit in this much memory keeps them (its workers share it)


def data_end(ds):
    """The byte where a contiguous dataset's data ends in its file (0 for chunked or empty data)."""
    offset = ds.id.get_offset() if ds.chunks is None else None
    return 0 if offset is None else offset + ds.id.get_storage_size()


def event_table(df, root, mods, events=None):
    """The datasets' events: a table of events as load_catalog returns it, or a catalog (its path, or the
    DataFrame the notebooks read) whose usable events load_catalog finds; only the ids `events`, if given."""
    if not isinstance(df, pd.DataFrame) or "img_type" in df:
        df = load_catalog(df, root, mods)
    if events is not None:
        usable = set(df["id"])
        df = df.set_index("id").loc[[i for i in events if i in usable]].reset_index()
    return df


class SEVIRReader:
    """Frames of a table of events from SEVIR's HDF5 files (or a prepared copy), float32 in stored units.

    Files open once per process, lazily (each DataLoader worker opens its own). SEVIR stores an event
    contiguous with time the fastest axis, so any of its frames touch every page of it: the event is read
    whole and sliced in memory (3x faster than h5py's strided read); a prepared copy stores one frame per
    chunk, and only the frames are read. Where frames are resized and every event fits in `cache_mb`,
    each event is read and resized once per process and its other windows are cut from memory (the same
    values). A file cut short or replaced since the catalog check is an OSError, never zeros read.
    """

    def __init__(self, events, root, mods):
        self.ids = events["id"].to_numpy().astype(str)
        self.paths, self.file_idx, self.index = {}, {}, {}
        for mod in mods:
            names = events[f"{mod}_file"].to_numpy().astype(str)
            uniq, inverse = np.unique(names, return_inverse=True)
            self.paths[mod] = [str(Path(root) / n) for n in uniq]      # joined once, not per item
            self.file_idx[mod] = inverse.astype(np.int64)
            self.index[mod] = events[f"{mod}_index"].to_numpy().astype(np.int64)
        self.n_values = len(self.ids) * len(self.paths) * N_FRAMES   # frames a cache of every event holds
        self.cache_mb = EVENT_CACHE_MB
        self._forget(pid=None)

    def __getstate__(self):                       # DataLoader workers open their own files
        return {**self.__dict__, "_files": {}, "_datasets": {}, "_events": {}, "_pid": None}

    def _forget(self, pid):
        """Drop the open files and the events kept in memory (this process's, or a worker's after a fork)."""
        self._files, self._datasets, self._events, self._pid = {}, {}, {}, pid

    def read(self, mod, e, start, stop, size):
        """Frames start..stop-1 of modality `mod` of event e, resized to size x size: float32 (T, size, size)."""
        if (mod, e) in self._events:              # read and resized before: no file touched
            return self._events[(mod, e)][start:stop].clone()
        path = self.paths[mod][self.file_idx[mod][e]]
        if mod == "lght":
            flashes = self._open(path, self.ids[e])[()]
            return resize_frames(torch.from_numpy(lightning_to_grid(flashes)[start:stop]), size)
        i = self.index[mod][e]
        ds = self._open(path, mod, i, self.ids[e])
        if ds.chunks is not None:       # frame by frame, each one chunk read contiguous (a strided read is 6x slower)
            frames = torch.from_numpy(np.stack([ds[i, :, :, t] for t in range(start, stop)])).float()
        elif size not in (None, ds.shape[1]) and self._all_fit(size):
            self._events[(mod, e)] = resize_frames(self._frames(ds, i, 0, N_FRAMES), size)
            return self._events[(mod, e)][start:stop].clone()
        else:
            frames = self._frames(ds, i, start, stop)
        return resize_frames(frames, size)

    @contextlib.contextmanager
    def skip_if_unreadable(self, e):
        """Around reading an item of event e: a file that went bad since the check is one warning, and the
        item None (collate_skipping drops it); the files are reopened next time (they may be back)."""
        try:
            yield
        except (OSError, KeyError) as err:
            print(f"warning: skipped event {self.ids[e]}: {str(err).splitlines()[0]}", file=sys.stderr)
            for f in self._files.values():
                f.close()
            self._forget(self._pid)

    def _open(self, path, name, index=None, event_id=None):
        """h5py dataset `name` of the file at `path`, opened once per process. A file cut short since (its
        size below the end of its data), or one that no longer holds event `event_id` at `index` (replaced by
        another file since the catalog check), is an OSError."""
        if self._pid != os.getpid():              # forked into a worker: never share HDF5 handles
            self._forget(os.getpid())
        if (path, name) not in self._datasets:
            if path not in self._files:
                self._files[path] = h5py.File(path, "r")
            f = self._files[path]
            ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["id"][()]] if "id" in f else None
            self._datasets[(path, name)] = f[name], data_end(f[name]), f[name].shape[0], ids
        ds, end, n_events, ids = self._datasets[(path, name)]
        if end and os.path.getsize(path) < end:
            raise OSError(f"{path} is truncated: {os.path.getsize(path):,} bytes, its data ends at {end:,}")
        if index is not None and index >= n_events:        # the file was replaced by a shorter one since
            raise OSError(f"{path} now holds {n_events} events, not event {index}")
        if ids is not None and event_id is not None and ids[index] != event_id:
            raise OSError(f"{path} now holds event {ids[index]} at {index}, not {event_id} (replaced since?)")
        return ds

    def _all_fit(self, size):
        """Whether every event's frames of every modality fit in `cache_mb` at `size` as float32, shared
        among the DataLoader's worker processes (each keeps its own)."""
        worker = torch.utils.data.get_worker_info()
        share = self.cache_mb / (worker.num_workers if worker else 1)
        return self.n_values * size ** 2 * 4 <= share * 2 ** 20

    @staticmethod
    def _frames(ds, i, start, stop):
        """Frames start..stop-1 of event i of a dataset in SEVIR's layout (N, H, W, T), as float32 (T, H, W):
        the bytes are reordered first (4x cheaper than reordering the floats). An event that holds nothing but
        the fill value was never written (a writer stopped after HDF5 had allocated the whole dataset): an
        OSError, not zeros read as weather. It is tested here, on the bytes read anyway, because testing every
        event when the catalog is checked would read all of SEVIR."""
        event = ds[i]
        if not np.any(event != ds.fillvalue):
            raise OSError(f"{ds.file.filename}: event {i} was never written (only the fill value)")
        return torch.from_numpy(np.ascontiguousarray(event[:, :, start:stop].transpose(2, 0, 1))).float()


def load_events(cfg, mods):
    """Catalog -> usable events -> train / validation / test events by SPLIT_DATES, each cut to
    MAX_TRAIN / MAX_VAL / MAX_TEST events spread over its period.

    Validation chooses the model (best.pt, learning-rate schedule); the final scores are on test.
    Returns a namespace with train_events, val_events, test_events, root and kind ("sample" or "sevir").
    """
    catalog, root, kind = resolve_data(cfg)
    events = load_catalog(catalog, root, mods=mods)               # pct_missing == 0, as the SEVIR paper
    train, val, test = split_by_dates(events, cfg.SPLIT_DATES)
    train, val, test = spread(train, cfg.MAX_TRAIN), spread(val, cfg.MAX_VAL), spread(test, cfg.MAX_TEST)
    first, second = cfg.SPLIT_DATES
    print(f"split: {len(train)} train events (time_utc <= {first}), {len(val)} validation (to {second}), "
          f"{len(test)} test (after {second})")
    size = getattr(cfg, "TARGET_SIZE", None)
    for mod in mods:                                # a prepared copy at a smaller grid: enlarging adds no detail
        grid = int(events[f"{mod}_grid"].min())
        if size and grid < min(size, NATIVE_SIZE.get(mod, grid)):
            print(f"warning: {mod} in {root} is {grid} x {grid} (a prepared copy), below --target_size={size}: "
                  f"its frames are enlarged, which adds no detail; prepare a copy at --size={size} or train at "
                  f"--target_size={grid}", file=sys.stderr)
    cfg.events = {name: event_record(ev) for name, ev in (("train", train), ("val", val), ("test", test))}
    return SimpleNamespace(train_events=train, val_events=val, test_events=test, root=root, kind=kind)


def event_record(events):
    """What a checkpoint remembers of a period's events (cfg.events): how many, their span, a digest of their ids."""
    import hashlib
    digest = hashlib.sha1(",".join(events["id"]).encode()).hexdigest()[:16]
    return {"n": len(events), "first": str(events["time_utc"].min()), "last": str(events["time_utc"].max()),
            "ids_sha1": digest}


def resolve_data(cfg):
    """(catalog_path, root, kind): real SEVIR where named or found, else the generated sample.

    At the defaults the USUAL_PLACES are looked in, and the sample is made only when none holds a catalog. With
    only --sevir_root its catalog is looked for in it and above it; with only --catalog_path the files beside the
    catalog (or in the notebooks' data/sevir). The root is the folder the catalog's file_names start in: the one
    named, or its data/ (the bucket's layout).
    """
    for key in ("CATALOG_PATH", "SEVIR_ROOT"):
        if not str(getattr(cfg, key)).strip():
            raise UserError(f"--{key.lower()} is empty: name the SEVIR catalog and its folder")
    catalog, root = Path(cfg.CATALOG_PATH), Path(cfg.SEVIR_ROOT)
    catalog_given, root_given = cfg.CATALOG_PATH != DEFAULT_CATALOG, cfg.SEVIR_ROOT != DEFAULT_ROOT
    if not catalog_given and not root_given:
        found = next(((Path(c), Path(r)) for c, r in USUAL_PLACES if Path(c).is_file()), None)
        if found is None:
            return generated_sample(), Path(SAMPLE_ROOT), "sample"
        catalog, root = found
    elif not catalog_given:
        catalog = next((c for c in (root / "CATALOG.csv", root.parent / "CATALOG.csv") if c.is_file()), catalog)
    if not catalog.exists():
        raise UserError(f"catalog not found: {catalog}")
    if root_given and not root.is_dir():
        raise UserError(f"SEVIR root folder not found: {root}")
    bases = [catalog.parent, Path(DEFAULT_ROOT)] if catalog_given and not root_given else [root]
    root = files_root(catalog, [d for b in bases for d in (b, b / "data")]) or bases[0]
    kind = "sample" if is_generated(root) else "sevir"
    print(f"{'GENERATED sample data, not real weather' if kind == 'sample' else 'SEVIR'}: {catalog}, "
          f"files under {root}")
    return catalog, root, kind


def generated_sample():
    """The generated sample's catalog, made in SAMPLE_ROOT the first time (under torchrun by rank 0)."""
    sample_catalog, marker = Path(SAMPLE_ROOT) / "CATALOG.csv", Path(SAMPLE_ROOT) / SAMPLE_MARKER
    if is_main():
        if not sample_catalog.exists():
            print(f"No SEVIR found ({', '.join(c for c, _ in USUAL_PLACES)}): generating a sample dataset in "
                  f"{SAMPLE_ROOT} (once).")
            make_sample_sevir(SAMPLE_ROOT)
        elif marker.exists() and marker.read_text() != SAMPLE_MARKER_TEXT:
            raise UserError(f"{SAMPLE_ROOT} holds a sample made by an older version of the scripts: delete "
                            f"the folder and run again")
    barrier()
    print("Using GENERATED sample data, not real weather. For SEVIR: --catalog_path=.../CATALOG.csv "
          "--sevir_root=...  (see README)")
    return sample_catalog


def files_root(catalog, candidates):
    """The first folder of `candidates` under which any of the catalog's file_names is a file; None if none."""
    names = [n for n in raw_catalog(catalog, columns=["file_name"], nrows=5000)["file_name"].unique()
             if unsafe_file_name(n) is None]                # enough to tell the root; load_catalog reads it all
    return next((c for c in candidates if c.is_dir() and any((c / n).is_file() for n in names)), None)


def is_generated(root):
    """True for the generated sample and for a prepared copy or a download of it (their marks say so)."""
    root = Path(root)
    marks = [root / PREPARED_MARKER, root / SUBSET_MARKER]
    return (root / SAMPLE_MARKER).exists() or any(m.is_file() and GENERATED_COPY in m.read_text() for m in marks)


CATALOG_COLUMNS = ["id", "file_name", "file_index", "img_type", "time_utc", "minute_offsets", "episode_id",
                   "event_id", "event_type", "llcrnrlat", "llcrnrlon", "urcrnrlat", "urcrnrlon", "proj",
                   "size_x", "size_y", "height_m", "width_m", "data_min", "data_max", "pct_missing"]
NEEDED_COLUMNS = ["id", "file_name", "file_index", "img_type", "time_utc", "pct_missing"]


def load_catalog(catalog_path, root, mods=("vil", "ir069", "ir107"), max_pct_missing=0.0):
    """One row per usable event of a catalog (its path, or the DataFrame pandas read from it): `id`,
    `time_utc`, `event_type`, and `<mod>_file`, `<mod>_index` per modality.

    Usable: every requested modality has exactly one catalog row (ids duplicated within a
    modality are dropped, as SEVIR's reference loaders do) with a safe file_name, a whole-number
    file_index and a clear time_utc; pct_missing <= max_pct_missing; its file opens and holds the
    dataset in SEVIR's layout and dtype, the index is in range and the file's id there is the
    event's. Each file is opened once; one summary line counts the events dropped for each reason.
    """
    mods = tuple(mods)
    df = read_catalog(catalog_path)
    if isinstance(catalog_path, pd.DataFrame):
        catalog_path = "the catalog"
    df = df[df["img_type"].isin(mods)]
    if df.empty:
        raise UserError(f"catalog {catalog_path} has no rows of type {', '.join(mods)}")
    all_ids = df["id"].unique()
    gone, dropped = set(), {}                               # ids left out; reason -> how many (first reason counts)

    def drop(reason, ids):
        new = set(ids) - gone
        if new:
            gone.update(new)
            dropped[reason] = dropped.get(reason, 0) + len(new)

    df, rejects = _catalog_rejects(df, len(mods), max_pct_missing)
    for reason, ids in rejects:
        drop(reason, ids)

    df = df[~df["id"].isin(gone)]
    problems = pd.Series(_check_files(df, root), dtype=object)       # each file opened once
    for reason in dict.fromkeys(problems):
        drop(reason, df.loc[problems.index[problems == reason], "id"])

    if "missing file" in problems.values:                           # one of them, and where the files may be
        name = df.loc[problems.index[problems == "missing file"][0], "file_name"]
        elsewhere = next((d for d in (Path(root) / "data", Path(root).parent) if (d / name).is_file()), None)
        missing = f"{Path(root) / name} is missing" + (f"; the files are under {elsewhere}: --sevir_root={elsewhere}"
                                                        if elsewhere else "")
        print(f"warning: {missing}", file=sys.stderr)
    df = df[~df["id"].isin(gone)]
    reasons = ", ".join(f"{r}: {n}" for r, n in dropped.items())
    print(f"catalog: {df['id'].nunique()} usable events of {len(all_ids)} with {'+'.join(mods)}"
          + (f" (dropped {reasons})" if reasons else ""))
    if df.empty:
        raise UserError(f"no usable events in {catalog_path} under {root}: dropped {reasons}"
                        + (f" ({missing})" if "missing file" in dropped else ""))
    df["grid"] = [whole_number(n) or NATIVE_SIZE.get(m, 0) for n, m in zip(df["size_x"], df["img_type"])]
    wide = df.pivot(index="id", columns="img_type", values=["file_name", "file_index", "grid"])
    events = pd.DataFrame({"id": wide.index})
    first = df.drop_duplicates("id").set_index("id")
    events["time_utc"] = first.loc[events["id"], "time_utc"].to_numpy()
    events["event_type"] = first.loc[events["id"], "event_type"].to_numpy() if "event_type" in first else ""
    for mod in mods:
        events[f"{mod}_file"] = wide[("file_name", mod)].to_numpy()
        events[f"{mod}_index"] = wide[("file_index", mod)].to_numpy().astype(np.int64)
        events[f"{mod}_grid"] = wide[("grid", mod)].to_numpy().astype(np.int64)       # frames are grid x grid
    return events.sort_values(["time_utc", "id"]).reset_index(drop=True)


def read_catalog(catalog):
    """A SEVIR CATALOG.csv (its path, or the DataFrame pandas read from it) with parsed file_index, pct_missing
    and time_utc, the rest as text; UserError if it is not one."""
    df = catalog.astype(str) if isinstance(catalog, pd.DataFrame) else \
        raw_catalog(catalog, columns=NEEDED_COLUMNS + ["event_type", "size_x"])
    missing = [c for c in NEEDED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{catalog if isinstance(catalog, (str, Path)) else 'the catalog'} lacks SEVIR catalog "
                        f"columns: {', '.join(missing)}")
    if df.empty:
        raise UserError(f"catalog {catalog} has no rows")
    df["img_type"] = df["img_type"].str.strip().str.lower()
    df["file_index"] = [whole_number(i, none=-1) for i in df["file_index"]]          # "3.7" is no index
    df["pct_missing"] = pd.to_numeric(df["pct_missing"], errors="coerce").fillna(1.0)
    df["size_x"] = df["size_x"] if "size_x" in df else ""
    df["time_utc"] = pd.to_datetime(df["time_utc"], format="%Y-%m-%d %H:%M:%S", errors="coerce")   # SEVIR's form
    return df


def whole_number(text, none=None):
    """A catalog's number of digits 0-9 as an int (up to 9 of them), else `none`: "3.7", "²", 20 digits are none."""
    text = str(text).strip()
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) else none


def raw_catalog(path, columns=None, nrows=None):
    """The columns of a SEVIR CATALOG.csv file as text (those of `columns` it has, or all; its first `nrows`
    rows, or all)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"catalog not found: {path}")
    if not path.is_file():
        raise UserError(f"catalog {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"catalog {path}: no permission to read it")
    if path.stat().st_size > MAX_CATALOG_BYTES:
        raise UserError(f"catalog {path} is over {MAX_CATALOG_BYTES >> 20} MiB: not a SEVIR catalog (32 MB)")
    with open(path, "rb") as f:
        header = f.readline()
        f.seek(max(path.stat().st_size - 1, 0))
        whole = f.read(1) in (b"\n", b"")
    if b"," not in header or b"id" not in header:
        raise UserError(f"{path} is not SEVIR's comma-separated CSV catalog (its first line: {header[:60]!r})")
    names = next(csv.reader([header.decode(errors="replace").strip()]))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"catalog {path} has the column {', '.join(twice)} twice: which one is meant? Keep one")
    if not whole:
        raise UserError(f"catalog {path} ends in the middle of a row (no line end at its end): it was cut short; "
                        f"download or copy it again")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, nrows=nrows,
                           usecols=None if columns is None else lambda c: c in columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a CSV catalog ({type(e).__name__}: {e})".splitlines()[0]) from None


def _catalog_rejects(df, n_mods, max_pct_missing):
    """(rows kept, [(reason, ids)]) for the rules the catalog alone can check, on rows of the wanted types.

    A file_name must be a relative path that stays inside the data root (a catalog may come from anyone).
    Then Earthformer's order, so the same events pass: rows with pct_missing above the limit go first;
    then an id needs a row of every type, and exactly one (an id with two rows of a type loses both).
    """
    unsafe = df["file_name"].map(unsafe_file_name).notna()
    if unsafe.any():
        example = df.loc[unsafe, "file_name"].iloc[0]
        print(f"warning: catalog rows with an unsafe file_name are refused, e.g. {example!r} "
              f"({unsafe_file_name(example)})", file=sys.stderr)
    unsafe_ids = df.loc[unsafe, "id"]
    df = df[~df["id"].isin(unsafe_ids)]
    bad_pct = df["pct_missing"] > max_pct_missing
    kept = df[~bad_pct]
    rows_per = kept.groupby(["id", "img_type"]).size()

    def n_types(rows):
        return rows.drop_duplicates(["id", "img_type"]).groupby("id").size()
    before, after = n_types(df), n_types(kept).reindex(df["id"].unique(), fill_value=0)
    return kept, [("unsafe file_name", unsafe_ids),
                  ("missing modality", before[before < n_mods].index),
                  (f"pct_missing > {max_pct_missing:g}", after[after < n_mods].index),
                  ("duplicated id", rows_per[rows_per > 1].index.get_level_values("id")),
                  ("bad time_utc", kept.loc[kept["time_utc"].isna(), "id"]),
                  ("bad file_index", kept.loc[kept["file_index"] < 0, "id"])]


def unsafe_file_name(name):
    """Why a catalog file_name may not be used, or None: it must be a relative path inside the root."""
    if not name or "\0" in name:
        return "empty" if not name else "holds a NUL"
    if "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "a backslash or a drive letter"
    if name.startswith("/"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' segment"
    return None


def writable_folder(folder, marker, what):
    """Check, before writing anything, that `folder` may be written by a tool that marks its folders with
    the file `marker`: absent, empty, or already marked (so never a folder of someone's real data)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder}: it is a file, not a folder")
    if folder.is_dir() and any(p.name != ".lock" for p in folder.iterdir()) and not (folder / marker).exists():
        raise UserError(f"{what} {folder}: the folder holds files this tool did not write (no {marker}); "
                        f"choose a new or empty folder")
    existing = next(p for p in [folder.resolve(), *folder.resolve().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {existing} is not writable")


@contextlib.contextmanager
def tool_folder(folder, marker, text, what):
    """Hold `folder` while a tool writes it: checked as writable_folder says, locked (a second tool or run
    there stops with one line) and marked with `marker` before any data, so a folder left by an interrupted
    tool is recognised as its own and the same command starts it again."""
    writable_folder(folder, marker, what)
    with locked(folder):
        write_atomically(Path(folder) / marker, lambda tmp: tmp.write_text(text))
        yield Path(folder)


def inside(path, root):
    """Whether `path`, with every link resolved, lies inside the folder `root`."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _check_files(df, root):
    """Open each file of the catalog once and check what its rows need; returns {row label: reason} for
    the rows that cannot be used. A file with a problem is named once on stderr."""
    bad = {}
    for file_name, group in df.groupby("file_name", sort=False):
        path = Path(root) / file_name
        if not path.is_file():
            bad.update({i: "missing file" for i in group.index})
            continue
        warned = set()
        try:
            with h5py.File(path, "r") as f:
                if "id" in f and (problem := dataset_problem(f, "id")):
                    print(f"warning: {path}: {problem[1]}; its rows are not used", file=sys.stderr)
                    bad.update({i: problem[0] for i in group.index})
                    continue
                ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["id"][()]] if "id" in f else None
                cache = {}
                for row in group.itertuples():
                    problem = _row_problem(f, row, ids, cache)
                    if problem:
                        reason, what = problem
                        bad[row.Index] = reason
                        if what and reason not in warned:
                            warned.add(reason)
                            print(f"warning: {path}: {what}; rows with this problem are not used", file=sys.stderr)
        except OSError as e:
            print(f"warning: cannot read {path}: {str(e).splitlines()[0]}", file=sys.stderr)
            bad.update({i: "unreadable file" for i in group.index})
    return bad


def dataset_problem(f, name):
    """(reason, what to say) when `name` in the open HDF5 file f cannot be read as data of f itself, else None:
    a link to another file, external raw storage or a virtual dataset (reading them would read files nobody
    named; h5py tells these without reading data), a group where a dataset should be, a compression filter
    this HDF5 lacks (Blosc, say: it would fail mid-run)."""
    link = f.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        return "data outside the file", f"{name} is a link to another file ({link.filename})"
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        return "not a dataset", f"{name} is a {type(ds).__name__.lower()}, not a dataset"
    if ds.is_virtual:
        return "data outside the file", f"{name} is a virtual dataset (its data lives in other files)"
    if ds.external:
        return "data outside the file", f"{name} keeps its data in another file ({ds.external[0][0]})"
    plist = ds.id.get_create_plist()
    for k in range(plist.get_nfilters()):
        code, _, _, label = plist.get_filter(k)
        if not h5py.h5z.filter_avail(code):
            return "missing HDF5 filter", f"{name} is compressed by filter {code} ({label.decode(errors='replace')}), " \
                                          f"which this h5py lacks"
    return None


def written_events(ds):
    """A bool per event (first axis of ds): True where its data was written. HDF5 reads data never written as
    zeros without a word; contiguous data is written whole or not at all, chunked data chunk by chunk (each
    event needs every chunk it lies in). Counting chunks reads no data: one call when all are there, else one
    pass over the chunk index (h5py's chunk_iter; get_chunk_info(k) would walk it again for every k)."""
    if ds.chunks is None:
        return np.full(ds.shape[0], ds.size == 0 or ds.id.get_storage_size() > 0)
    c = ds.chunks
    per_slab = math.prod(-(-n // k) for n, k in zip(ds.shape[1:], c[1:]))    # chunks across one slab of events
    counts = np.zeros(-(-ds.shape[0] // c[0]), dtype=np.int64)
    if ds.id.get_num_chunks() == per_slab * len(counts):
        return np.ones(ds.shape[0], dtype=bool)

    def count(info):
        counts[info.chunk_offset[0] // c[0]] += 1
    ds.id.chunk_iter(count)
    return np.repeat(counts == per_slab, c[0])[:ds.shape[0]]


def _row_problem(f, row, ids, cache):
    """(reason, what to say or None) when catalog row `row` cannot be read from the open file f, else None.

    Checks what a sample relies on: the dataset is one of f's own and readable (dataset_problem); it has
    SEVIR's layout (N, H, W, 49) with square frames of the catalog's size_x and the stored dtype; the index
    is in range and the file's `id` there is the row's id; the data is all in the file and the event's was
    written; lightning is an (n, 5) list of numbers. `cache` keeps what the rows of one dataset share
    (_dataset_facts), so a file of thousands of events is looked at once, not once per row.
    """
    name = row.id if row.img_type == "lght" else row.img_type
    if name not in cache:
        cache[name] = _dataset_facts(f, name)
    problem, ds = cache[name]
    if problem:
        return problem
    if row.img_type == "lght":
        if ds.dtype.kind not in "fiu":
            return "bad lightning data", f"{name} is {ds.dtype}, not numbers"
        if len(ds.shape) != 2 or ds.shape[1] != 5:
            return "bad lightning data", f"{name} is {ds.shape}, not (n, 5)"
        return None if ds.written.all() else ("never written", f"{name} was never written")
    want = np.dtype(EVENT_DTYPE[row.img_type])
    size = whole_number(row.size_x) or NATIVE_SIZE[row.img_type]
    if ds.shape[1:] != (size, size, N_FRAMES) or ds.dtype != want:
        return "bad shape or dtype", f"{name} is {ds.dtype} {ds.shape}, expected {want} (N, {size}, {size}, 49)"
    if not 0 <= row.file_index < ds.shape[0]:
        return "file_index out of range", None
    if ids is not None and (row.file_index >= len(ids) or ids[row.file_index] != row.id):
        return "id differs from the catalog", f"its id at {row.file_index} is not the catalog's {row.id}"
    if ds.truncated:
        return "truncated file", "it is shorter than the data it describes"
    if not ds.written[row.file_index]:
        return "never written", f"{name} holds events never written (they would read as zeros)"
    return None


def _dataset_facts(f, name):
    """(problem, facts) for dataset `name` of the open file f: a problem as _row_problem returns it (absent,
    or dataset_problem's), or None and its shape, dtype, whether the file ends before its data, and
    written_events."""
    if name not in f:
        return ("no dataset in file", None), None
    if problem := dataset_problem(f, name):
        return problem, None
    ds = f[name]
    return None, SimpleNamespace(shape=ds.shape, dtype=ds.dtype, written=written_events(ds),
                                 truncated=data_end(ds) > os.path.getsize(f.filename))


def split_by_dates(events, dates):
    """Events split by time_utc at each date, Earthformer's rule: (.., d1], (d1, d2], (d2, ..).

    An event stamped exactly on a date belongs to the earlier side, as in Earthformer's loader
    (`start_date < time_utc <= end_date`). Two dates give [train, validation, test]. A side without
    events is a UserError naming the dates and the span of the events.
    """
    cuts = [_parse_date(d) for d in dates]
    if None in cuts:
        raise UserError(f"split dates {', '.join(map(str, dates))}: expected dates like 2019-06-01")
    t, edges = events["time_utc"], [None] + cuts + [None]
    names = ["train", "validation", "test"] if len(cuts) == 2 else ["first", "second"]
    sides = []
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        keep = np.ones(len(events), dtype=bool)
        if lo is not None:
            keep &= (t > lo).to_numpy()
        if hi is not None:
            keep &= (t <= hi).to_numpy()
        if not keep.any():
            rule = (f"{lo:%Y-%m-%d %H:%M} < " if lo is not None else "") + "time_utc" + \
                (f" <= {hi:%Y-%m-%d %H:%M}" if hi is not None else "")
            span = f"{t.min():%Y-%m-%d %H:%M} .. {t.max():%Y-%m-%d %H:%M}"
            raise UserError(f"no {name} events ({rule}; the {len(events)} events run {span}): "
                            f"choose other --split_dates")
        sides.append(events[keep].reset_index(drop=True))
    return sides


def spread(events, n):
    """n of the events spread evenly over their period (every k-th by time, the same ones each run); all if n is 0."""
    if not n or n >= len(events):
        return events
    return events.iloc[(np.arange(n) * len(events)) // n].reset_index(drop=True)


# ======================================================================================
# 8. Run files: the report, checkpoints, one run per folder, resume, atomic writes
# ======================================================================================

def test_and_report(model, references, data, cfg, device, history=(), extra=None, num_samples=3, split="test",
           cmap="sevir", checkpoint="best.pt", epoch=None):
    """Score model and reference forecasts (one or a list) on the same held-out windows; write metrics.json
    and every figure.

    The scores are on data.test (split="test", the default) or data.val, with the other held-out
    split's scores beside them. The default (best.pt, test) writes metrics.json, predictions.png,
    skill.png, ...; another split or checkpoint adds a tag to every name (metrics_val.json,
    metrics_last.json, ...), so best.pt's test scores are never replaced by others.
    """
    if split not in ("val", "test"):
        raise UserError(f"--split={split!r}: val or test")
    references = list(references) if isinstance(references, (list, tuple)) else [references]
    out = Path(cfg.OUT_DIR)
    stem = Path(checkpoint).stem
    tag = ("" if stem == "best" else f"_{stem}") + ("" if split == "test" else f"_{split}")

    def scores(name, forecasts):
        dataset, times = getattr(data, name), getattr(data, f"{name}_events")["time_utc"]
        return {"split": name, "n_events": len(dataset.reader.ids), "n_samples": len(dataset),
                "period": [f"{times.min()}", f"{times.max()}"], **forecasts}

    shown, other = getattr(data, split), "val" if split == "test" else "test"
    counts = {f.name if f is not model else "model": event_counts(f, shown, device, cfg.BATCH_SIZE)
              for f in [model, *references]}                  # per event: the scores and their intervals
    loader = make_loader(shown, cfg, device, shuffle=False)
    beside = make_loader(getattr(data, other), cfg, device, shuffle=False)
    _, no_rain = evaluate(lambda x: torch.zeros_like(references[0](x)), loader, device)     # the trivial forecast
    pixel_km = NATIVE_SIZE["vil"] / shown.target_size          # pooled CSI's k x k tiles are k times this
    spectra = None
    if hasattr(shown, "input_mods"):                           # synthetic radar: how blurred is it?
        spectra = power_spectra({"model": model, **{r.name: r for r in references}}, loader, device, pixel_km)
    metrics = {"checkpoint": Path(checkpoint).name, "epoch": epoch, "data": data.kind,
               "pixel_km": pixel_km,
               "reference": references[0].name,
               "references": [r.name for r in references],
               **scores(split, {name: summed_scores(c) for name, c in counts.items()}),
               "no_rain": {"mse": no_rain["mse"], "mae": no_rain["mae"]},
               "beside": scores(other, {"model": evaluate(model, beside, device)[1],
                                        **{r.name: evaluate(r, beside, device)[1] for r in references}}),
               **({"spectrum": spectra} if spectra else {}),
               **(extra or {}),
               "intervals": {r.name: bootstrap_margins(counts["model"], counts[r.name]) for r in references}}
    if is_main():                                  # every process scored its share; rank 0 writes
        write_json(out / f"metrics{tag}.json", metrics)
        print_table(metrics)
        multimodal = len(getattr(shown, "mods", ())) > 1 and not hasattr(shown, "input_mods")
        plot = visualize_multimodal if multimodal else visualize_predictions
        written = [f"metrics{tag}.json", f"predictions{tag}.png", f"skill{tag}.png"]
        plot(model, shown, device, num_samples=num_samples, path=out / written[1], cmap=cmap)
        plot_skill(metrics, out / written[2])
        if history:
            plot_loss(history, out / f"loss{tag}.png")
            written.append(f"loss{tag}.png")
        if spectra:
            plot_spectrum(spectra, out / f"spectrum{tag}.png")
            written.append(f"spectrum{tag}.png")
        if getattr(cfg, "T_OUT", 1) > 1:
            forecast_gif(model, shown, device, out / f"forecast{tag}.gif", cmap=cmap)
            written.append(f"forecast{tag}.gif")
        note_written(out, written)
        print(f"outputs in {out}: {', '.join(written)}")
    barrier()                                      # leave together: gloo aborts if a peer hangs up mid-run
    return metrics


def note_written(out, names):
    """Add file names to OUT_DIR's RUN_MARKER (where it has one): what --overwrite=true deletes with the run."""
    marker = Path(out) / RUN_MARKER
    if marker.is_file():
        listed = list(dict.fromkeys(marker.read_text().splitlines() + list(names)))
        write_atomically(marker, lambda tmp: Path(tmp).write_text("\n".join(listed) + "\n"))


def print_table(metrics):
    """Model beside its reference forecasts, one score a row, on the reported split; validation below."""
    refs = metrics["references"]
    rows = ["mse", "mae", "csi_m", "csi_pool4_m", "csi_pool16_m"] + [f"csi_{t}" for t in SEVIR_THRESHOLDS] \
        + [f"pod_{t}" for t in SEVIR_THRESHOLDS] + [f"sucr_{t}" for t in SEVIR_THRESHOLDS] \
        + [f"bias_{t}" for t in SEVIR_THRESHOLDS]

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"
    name = {"test": "TEST", "val": "VALIDATION"}[metrics["split"]]
    km = metrics.get("pixel_km")
    grid = f"; {km:g} km pixels: pool4 = {4 * km:g} km tiles, pool16 = {16 * km:g} km" if km else ""
    print(f"\n{name} scores of {metrics['checkpoint']} (epoch {metrics['epoch']}): {metrics['n_events']} events, "
          f"{metrics['n_samples']} samples ({metrics['data']} data{grid}). Higher is better except mse/mae; bias is "
          f"the frequency bias, best at 1. n/a: undefined; CSI when neither forecast nor truth reached the "
          f"threshold (0 in CSI-M), POD and bias when the truth never did, sucr when the forecast never did")
    names = ["model"] + refs
    width = {n: max(14, len(n) + 2) for n in names}                  # a long name keeps a space before it
    print(f"  {'score':<14}" + "".join(f"{n:>{width[n]}}" for n in names) + f"{'no rain':>10}")
    for r in rows:
        trivial = fmt(metrics["no_rain"][r]) if r in metrics.get("no_rain", {}) else ""
        print(f"  {r:<14}" + "".join(f"{fmt(metrics[n][r]):>{width[n]}}" for n in names) + f"{trivial:>10}")
    if "csi_m_per_lead" in metrics["model"]:
        print(f"  CSI-M per lead (min), {' / '.join(names)}: " + "  ".join(
            f"+{5 * (k + 1)}: " + "/".join(fmt(metrics[n]["csi_m_per_lead"][k]) for n in names)
            for k in range(len(metrics["model"]["csi_m_per_lead"]))))
    if "intervals" in metrics:
        print(f"  the model's margin over the best reference of each score (positive: the model is better), with a "
              f"95% interval from a paired bootstrap over the {metrics['n_events']} events:")
        for score in ("mse", "mae", "csi_m"):
            best = min(refs, key=lambda r: -metrics[r][score] if score == "csi_m" else metrics[r][score])
            margin, low, high = metrics["intervals"][best][score]
            verdict = "beats" if low > 0 else "loses to" if high < 0 else "level with"
            print(f"    {score:<6} {verdict} {best}: {margin:+.3g} [{low:+.3g}, {high:+.3g}]")
    other = metrics["beside"]
    print(f"  ({other['split']}, {other['n_events']} events: MSE " + " / ".join(fmt(other[n]["mse"]) for n in names)
          + ", CSI-M " + " / ".join(fmt(other[n]["csi_m"]) for n in names) + f", {' / '.join(names)})")


# A run's files in OUT_DIR: any of them means the folder already holds a run.
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "history.csv")
RUN_MARKER = ".stormfusion_run"   # marks OUT_DIR as a run's folder and lists what else the run and visualize.py wrote
# Config keys that may change when a run is resumed; every other key must match the checkpoint.
RESUMABLE_KEYS = {"EPOCHS", "RESUME", "OVERWRITE", "NUM_WORKERS", "DEVICE", "OUT_DIR", "CATALOG_PATH", "SEVIR_ROOT"}


def check_out_dir(cfg):
    """Check, before any data is read and without writing anything, that OUT_DIR can take this run:
    writable, and not holding an earlier run unless RESUME or OVERWRITE says what to do with it."""
    out = Path(cfg.OUT_DIR).resolve()          # (~ expanded by parse_config; an empty OUT_DIR refused there)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write to OUT_DIR {out}: it is a file")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to OUT_DIR {out}: {existing} is not a writable folder")
    if cfg.RESUME and not (out / "last.pt").exists():
        raise UserError(f"--resume=true but there is no checkpoint {out / 'last.pt'}"
                        + (": it holds no finished epoch; --overwrite=true starts it again" if out.is_dir() else ""))
    check_run_folder(out, cfg)
    return out


def check_run_folder(out, cfg):
    """A run writes in OUT_DIR only when the folder is new or empty, is a run's (RUN_MARKER), or OVERWRITE says
    so; a run there is continued only with RESUME and replaced only with OVERWRITE. Checked before any data is
    read, and again under the lock (another run may have written there in between)."""
    if cfg.RESUME or cfg.OVERWRITE or not out.is_dir():
        return
    how = ("--resume=true continues it, --overwrite=true replaces it, --out_dir=... starts elsewhere"
           if started_from_file() else                   # a notebook cell: the Config is edited in the cell
           "RESUME = True in the Config continues it, OVERWRITE = True replaces it, another OUT_DIR starts elsewhere")
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise UserError(f"{out} already holds a run ({', '.join(held)}): {how}")
    others = sorted(p.name for p in out.iterdir() if p.name not in (".lock", RUN_MARKER))
    if others and not (out / RUN_MARKER).exists():
        raise UserError(f"{out} holds files that are not a run's ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder, or --overwrite=true "
                        f"to write the run there (only its own files are replaced)")


@contextlib.contextmanager
def locked(out):
    """Hold the folder `out` (a run's OUT_DIR, a tool's --out) for this process: a second run or tool there
    stops with one line. The lock is an exclusive flock on out/.lock, a file that is never deleted: taking it is
    atomic, and the kernel drops it when its process ends, however it ends. Rank 0 alone writes, so only it
    locks; under torchrun every process learns whether it could, and all stop together if not."""
    fd, problem = None, None
    if is_main():
        try:
            fd = _take_lock(Path(out))
        except RunError as e:
            problem = e
    try:
        try:
            stop_together(None if problem is None else str(problem))
        except RunError as e:
            raise (problem or e) from None
        yield out
    finally:
        if fd is not None:
            os.close(fd)                                         # releases the lock; the file stays


def _take_lock(out):
    """The open, flock-ed out/.lock (holding this process's id, for the message a second run shows)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    if lock.is_dir() or lock.is_symlink():
        raise UserError(f"{lock} is not this tool's lock file (a folder or a link): remove it")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except PermissionError:                                      # e.g. visualize.py on a read-only run folder
        raise UserError(f"cannot write in {out} (permission denied): copy the run folder somewhere writable "
                        f"and point at the copy") from None
    except OSError as e:
        raise RunError(f"could not write {lock} ({e.strerror}); nothing was written") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UserError(f"{out} is in use by another run or tool (process {pid or '?'}, in {lock}); wait for it "
                        f"or use another folder") from None
    try:                                                         # who holds it, for the line above; a full disk
        os.ftruncate(fd, 0)                                      # leaves it empty, the lock held all the same
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass
    return fd


def start_or_resume(model, optimizer, scheduler, cfg):
    """(first epoch, best validation value, history): from last.pt with --resume=true (model, optimizer,
    scheduler and random state restored, after checking the config matches), else a fresh run whose
    config.json is written and whose earlier run files (--overwrite=true) are removed."""
    out = Path(cfg.OUT_DIR)
    if not cfg.RESUME:
        if is_main():
            check_run_folder(out, cfg)               # again, under the lock: nothing written there meanwhile
            marker = out / RUN_MARKER                # --overwrite=true: the files the earlier run wrote go, no others
            for name in {*RUN_FILES, *(marker.read_text().splitlines() if marker.is_file() else [])}:
                if name and Path(name).name == name and not name.startswith("."):
                    (out / name).unlink(missing_ok=True)
            write_atomically(marker, lambda tmp: Path(tmp).write_text("config.json\n"))
            write_json(out / "config.json", config_dict(cfg))
        return 1, float("inf"), []
    ckpt = check_run_checkpoint(load_checkpoint(out / "last.pt"), out / "last.pt",
                                needs=("model", "optimizer", "config", "epoch", "best_val", "history", "rng"))
    check_same_config(ckpt["config"], config_dict(cfg), out / "last.pt")
    then, now = ckpt.get("events") or {}, getattr(cfg, "events", None) or {}
    differ = [split for split in now if then.get(split) != now[split]]
    if differ:
        raise UserError(f"cannot resume {out / 'last.pt'}: it trained on other data (its {', '.join(differ)} "
                        f"events are not those of {cfg.CATALOG_PATH} now); give the data it trained on, or start "
                        f"again with --overwrite=true")
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    start, best_val = ckpt["epoch"] + 1, ckpt["best_val"]
    print(f"resumed from {out / 'last.pt'} after epoch {ckpt['epoch']} (best val {best_val:.5f})"
          + (f"; nothing left to train (--epochs={cfg.EPOCHS}): reporting best.pt" if start > cfg.EPOCHS else ""))
    return start, best_val, ckpt["history"]


def save_epoch(model, optimizer, scheduler, cfg, epoch, best_val, metrics, history, extra, improved):
    """The run's files after each epoch (rank 0 writes): history.csv, last.pt (everything to resume) and, when
    the epoch improved, best.pt (the same without the training state: optimizer, scheduler, rng)."""
    if not is_main():
        return
    weights = unwrap(model).state_dict()
    for name, p in weights.items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise RunError(f"model weight {name} is not finite after epoch {epoch}: not saved; "
                           f"checkpoints are as they were")
    best = {"model": weights, "config": config_dict(cfg), "epoch": epoch, "best_val": best_val, "metrics": metrics,
            "history": [dict(row) for row in history], "extra": extra or {}, "script": cfg.script,
            "events": getattr(cfg, "events", None)}                   # what it trained and chose on (load_events)
    training_state = {"optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict() if scheduler is not None else None,
                      "rng": {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    out = Path(cfg.OUT_DIR)
    write_csv(out / "history.csv", history)
    save_checkpoint({**best, **training_state}, out / "last.pt")    # written at once; loaded onto the CPU
    if improved:
        save_checkpoint(best, out / "best.pt")


def stopped(cfg, saved):
    """The Interrupted error that ends a run stopped by Ctrl-C or SIGTERM: what last.pt holds (epoch `saved`, 0 for
    none), how to resume."""
    if not is_main():
        return Interrupted("stopped; rank 0 saves the run and says how to resume")
    if not saved:
        return Interrupted("before the first epoch ended: nothing was saved; run the same command again")
    return Interrupted(f"{Path(cfg.OUT_DIR) / 'last.pt'} holds epoch {saved}. {resume_hint(cfg)}")


def check_run_checkpoint(ckpt, path, needs=("model", "config", "epoch", "history")):
    """Refuse a checkpoint that lacks what a run wrote into it (an edited or foreign file), in one line."""
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of a run: it has no {', '.join(missing)}")
    history, events = ckpt.get("history", []), ckpt.get("events") or {}
    record = {"n", "first", "last", "ids_sha1"}                 # event_record's keys
    well_formed = (isinstance(ckpt.get("config", {}), dict) and isinstance(ckpt.get("epoch", 0), int)
                   and isinstance(history, list) and all(isinstance(row, dict) for row in history)
                   and isinstance(events, dict) and all(isinstance(v, dict) and set(v) == record
                                                        for v in events.values()))
    if not well_formed:
        raise UserError(f"{path} is not a checkpoint of a run: its config, epoch, history or events record "
                        f"is malformed")
    return ckpt


def config_from_checkpoint(config_cls, ckpt, path, script):
    """The Config a checkpoint was trained with, checked as the command line is (a checkpoint may come from
    anyone): every key one the script knows, every value of its type and in range."""
    check_run_checkpoint(ckpt, path)

    def text(value):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    saved = ckpt["config"]
    missing = [k for k in vars(config_cls) if k.isupper() and k not in saved]
    if missing:
        raise UserError(f"{path} was made by an older version of the scripts (its config lacks "
                        f"{', '.join(missing).lower()}): train it again")
    try:
        return parse_config(config_cls, [f"--{k.lower()}={text(v)}" for k, v in saved.items()], script=script)
    except HelpShown:
        raise UserError(f"{path}: its config is not one {script}.py accepts") from None
    except UserError as e:
        raise UserError(f"{path}: its config is not one {script}.py accepts ({e})") from None


def check_same_config(saved, current, path):
    if set(current) - set(saved):
        raise UserError(f"cannot resume {path}: it was made by an older version of the scripts (its config lacks "
                        f"{', '.join(sorted(set(current) - set(saved))).lower()}); start again with --overwrite=true")
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
    if differ:
        detail = ", ".join(f"{k.lower()}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
        raise UserError(f"cannot resume {path}: it was made with another configuration ({detail})")


def write_csv(path, rows):
    """Rows (dicts with the same keys, in column order) as a CSV file with a header, atomically."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomically(path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))


def write_atomically(path, write):
    """Write a file by `write(tmp)` to a new temporary file beside it, fsync, then rename: a full disk, a stop or a
    crash mid-write leaves the previous file (or none), never a partial one; a failed write is one RunError line.
    The temporary file is created here (O_EXCL: never an existing file, nor through a link left there) under a
    random name that keeps the suffix, which some writers choose the format by: .metrics.3f9a1c2e.tmp.json."""
    path, tmp = Path(path), None
    try:
        while tmp is None:
            name = path.with_name(f".{path.stem}.{os.urandom(4).hex()}.tmp{path.suffix}")
            with contextlib.suppress(FileExistsError):
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
                tmp = name
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise RunError(f"could not write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}); "
                           f"{kept}") from None
        raise


def save_checkpoint(obj, path):
    """torch.save, atomically (write_atomically): an interruption leaves the previous file intact."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:                 # what torch.save raises on a full disk: "unexpected pos ..."
            raise OSError(f"torch.save failed: {str(e).splitlines()[0]}") from None
    write_atomically(path, save)


def load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint holding code is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    import zipfile
    if not zipfile.is_zipfile(path):                     # torch.save writes a zip archive
        raise UserError(f"{path} is not a checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} holds more than tensors and plain values; refused "
                            f"(loaded with weights_only=True)") from None
        raise UserError(f"{path} is not a checkpoint of these scripts ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a checkpoint of these scripts (no model weights in it)")
    return ckpt


def load_weights(model, path):
    """Load a checkpoint's model weights into a (possibly wrapped) model; returns the checkpoint."""
    ckpt = load_checkpoint(path)
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit {type(unwrap(model)).__name__} as configured "
                        f"({str(e).splitlines()[0].strip()}...)") from None
    return ckpt


def write_json(path, obj):
    """JSON with NaN written as null, atomically."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(clean(obj), indent=2) + "\n"))


# ======================================================================================
# 9. Configuration and command line, devices, torchrun
# ======================================================================================

class RunError(Exception):
    """A run cannot go on; shown as one line, exit status 1."""
    code, label = 1, "error"


class UserError(RunError):
    """A mistake the user can fix (path, config value, file); one line, exit status 2."""
    code = 2


class Interrupted(RunError):
    """Ctrl-C or SIGTERM; one line (with how to resume), exit status 130."""
    code, label = 130, "interrupted"


class HelpShown(RunError):
    """--help was printed; exit status 0."""
    code = 0


def run_with_exit_status(main):
    """Call main(); a RunError or Ctrl-C becomes one line on stderr and its exit status.

    SIGTERM (what schedulers and Colab send) and SIGHUP (a closed terminal or ssh session; unless nohup made
    the process ignore it) are handled like Ctrl-C. Inside IPython or Jupyter the line is printed and the call
    returns: no SystemExit banner under the message.
    """
    if not in_ipython() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)         # not SIGINT's handler: `cmd &` starts with SIGINT ignored
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, _stop)
    try:
        main()
    except KeyboardInterrupt:
        error = Interrupted("stopped")
    except RunError as e:
        error = e
    except OSError as e:                             # a full disk anywhere: one line, whatever was writing
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left" not in str(e):
            raise
        error = RunError(f"the disk is full ({e.filename or str(e).splitlines()[0]}): free space and run the same "
                         f"command again (what was finished is kept)")
    else:
        return
    if error.code:
        print(f"{error.label}: {error}", file=sys.stderr)
    if not in_ipython():
        sys.exit(error.code)


def _stop(signum, frame):
    raise KeyboardInterrupt


def in_ipython():
    """True inside IPython or a Jupyter kernel (a pasted cell or %run)."""
    shell = sys.modules.get("IPython")
    return shell is not None and shell.get_ipython() is not None


def started_from_file():
    """True when the running program is a file with its command line in sys.argv (python script.py, %run,
    torchrun); False for code pasted into a notebook cell, whose sys.argv is the kernel's own."""
    return getattr(sys.modules.get("__main__"), "__file__", None) is not None


def resume_hint(cfg):
    """How to continue this run: the same command plus --resume=true, ready to paste."""
    if not started_from_file():
        return "To continue, set RESUME = True in the Config of the cell and run it again."
    args = [a for a in sys.argv[1:] if not a.lower().startswith("--resume")] + ["--resume=true"]
    launcher = "torchrun ..." if dist_info()[1] > 1 else "python"
    return f"Resume with:\n  {launcher} {shlex.join([sys.argv[0], *args])}"


def parse_config(config_cls, argv=None, size_multiple=1, script=None):
    """Return a Config instance with `--key=value` overrides applied and checked.

    argv: the overrides; by default the command line, read only when the program runs from a file
    (python script.py, %run script.py --epochs=1, torchrun): code pasted into a notebook cell takes its
    Config as edited there and never reads the kernel's own flags. Keys are case-insensitive;
    `--help` prints every key with its default and meaning. TARGET_SIZE must be a multiple of
    `size_multiple` (a U-Net of L levels halves it L times: 2^L), or of size_multiple[MODEL] when it is
    a dict. PROTOCOL="sevir" sets SEVIR_PROTOCOL's values, except those given on the command line.
    `script` (e.g. "train_synthetic") is kept as cfg.script and recorded in checkpoints.
    """
    if argv is None:
        argv = sys.argv[1:] if started_from_file() else []
        if sys.argv[0] == "-c" and sys.argv[1:]:                # python -c "exec(open(...).read())" --epochs=1
            print(f"note: the command line ({' '.join(sys.argv[1:])}) is ignored by code that is not run from its "
                  f"file: edit Config, or run python {script or 'script'}.py with the flags", file=sys.stderr)
    cfg = config_cls()
    cfg.script = script or config_cls.__module__
    keys = {k for k in dir(config_cls) if k.isupper()}
    given = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            docs = _config_docs(config_cls)
            print(f"usage: python {cfg.script}.py [--key=value ...]\n")
            names = [k for k in vars(config_cls) if k.isupper()]
            width = max(map(len, names))
            for k in names:
                print(f"  --{k.lower():<{width}} {getattr(config_cls, k)!r:<28} {docs.get(k, '')}")
            raise HelpShown("help shown")
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r}: expected --key=value (see --help)")
        key, value = arg[2:].split("=", 1)
        key = key.upper().replace("-", "_")
        if key not in keys:
            raise UserError(f"unknown key --{key.lower()}; known keys: "
                            + ", ".join(sorted(k.lower() for k in keys)))
        setattr(cfg, key, _parse_value(key, value, getattr(config_cls, key)))
        given.add(key)
    for key in PATH_KEYS & keys:
        setattr(cfg, key, path_option(getattr(cfg, key), f"--{key.lower()}"))
    if getattr(cfg, "PROTOCOL", None) == "sevir":
        for key, value in SEVIR_PROTOCOL.items():
            if key not in given:
                setattr(cfg, key, value)
        if tuple(cfg.SPLIT_DATES) != EARTHFORMER_SPLIT:
            raise UserError(f"--split_dates={','.join(cfg.SPLIT_DATES)}: --protocol=sevir uses Earthformer's "
                            f"{','.join(EARTHFORMER_SPLIT)}; leave --split_dates out")
    check_config(cfg, size_multiple)
    return cfg


def path_option(value, option):
    """A path as given on a command line: ~ expanded (for the checks and the writes alike); a name part longer
    than file systems allow (255 bytes) is a UserError naming the option."""
    path = os.path.expanduser(str(value))
    if any(len(part.encode()) > 255 for part in Path(path).parts):
        raise UserError(f"{option}={str(value)[:60]}...: a part of the path is longer than 255 bytes")
    return path


def _parse_value(key, text, default):
    """Convert a command-line string to the type of the default, or raise UserError."""
    def convert(t, kind):
        if kind is bool:
            if t.lower() in ("true", "1", "yes"):
                return True
            if t.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return kind(t)
    try:
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(convert(p.strip(), kind) for p in text.split(",") if p.strip())
        if isinstance(default, float):
            return float(text)                # an int is fine for a float
        return convert(text, type(default))
    except ValueError:
        what = "true or false" if isinstance(default, bool) else \
            f"comma-separated {type(default[0]).__name__ if default else 'str'}" if isinstance(default, tuple) else \
            type(default).__name__
        raise UserError(f"--{key.lower()}={text}: expected {what}") from None


def _config_docs(cls):
    """{KEY: comment} from the `KEY = value  # comment` lines of a Config class, with the indented comment
    lines that continue one."""
    docs, key = {}, None
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):          # no source (a class pasted into a notebook cell): defaults only
        return docs
    for line in lines:
        text = line.strip()
        name, sep, rest = text.partition("=")
        if sep and name.strip().isupper() and "#" in rest:
            key = name.strip()
            docs[key] = rest.split("#", 1)[1].strip()
        elif key and text.startswith("#") and len(line) - len(text) > 8:     # aligned under the comment above
            docs[key] += " " + text[1:].strip()
        else:
            key = None
    return docs


# The training scripts: the only modules a checkpoint's "script" may name (visualize.py).
PATH_KEYS = {"OUT_DIR", "CATALOG_PATH", "SEVIR_ROOT"}        # Config keys that name files or folders
SCRIPTS = ("train_baseline", "train_multimodal", "train_synthetic", "train_advanced")
KNOWN_MODS = ("vil", "ir069", "ir107", "lght")
# The SEVIR nowcasting benchmark (SEVIR paper, Earthformer): 13 frames in, 12 out, 384 x 384, windows at
# frames 0, 12, 24 (the held-out stride), on Earthformer's split (the default SPLIT_DATES of every script); and a
# model for a GPU run at 1 km pixels (README): the notebooks' width, about 10^5 steps of 16 windows (Earthformer's
# length). Not measured on real SEVIR here.
SEVIR_PROTOCOL = {"T_IN": 13, "T_OUT": 12, "TARGET_SIZE": 384, "BASE": 32, "EPOCHS": 5, "BATCH_SIZE": 16, "LR": 1e-3}


def check_config(cfg, size_multiple=1):
    """Refuse impossible values before any data is read."""
    def need(ok, key, allowed):
        if not ok:
            raise UserError(f"--{key.lower()}={getattr(cfg, key)!r}: {allowed}")
    if isinstance(size_multiple, dict):
        need(cfg.MODEL in size_multiple, "MODEL", f"one of {', '.join(size_multiple)}")
        size_multiple = size_multiple[cfg.MODEL]
    if hasattr(cfg, "LOSS"):
        need(cfg.LOSS in LOSSES, "LOSS", f"one of {', '.join(LOSSES)}")
    if hasattr(cfg, "PROTOCOL"):
        need(cfg.PROTOCOL in ("none", "sevir"), "PROTOCOL", "none or sevir")
    for key in ("EPOCHS", "BATCH_SIZE"):
        if hasattr(cfg, key):
            need(getattr(cfg, key) > 0, key, "must be > 0")
            need(getattr(cfg, key) < 2 ** 31, key, "must be below 2^31")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)                   # set by torchrun
    if hasattr(cfg, "BATCH_SIZE"):
        need(cfg.BATCH_SIZE % world == 0, "BATCH_SIZE", f"the global batch must divide by the {world} processes")
    for key in ("MAX_TRAIN", "MAX_VAL", "MAX_TEST", "NUM_WORKERS"):
        if hasattr(cfg, key):
            need(getattr(cfg, key) >= 0, key, "must be >= 0 (0 = all)" if key != "NUM_WORKERS" else "must be >= 0")
    if hasattr(cfg, "LR"):
        need(0 < cfg.LR < math.inf, "LR", "must be > 0")
    for key, low in (("SEED", 0), ("BASE", 1), ("LR_PATIENCE", 0), ("BN_BATCHES", 0), ("BOTTLENECK_BLOCKS", 0),
                     ("HALF_RES_EPOCHS", 0)):
        if hasattr(cfg, key):
            need(low <= getattr(cfg, key) < 2 ** 32, key, f"must be >= {low}")
    if hasattr(cfg, "BASE"):                       # a width the allocator could never hold is a typo
        need(cfg.BASE <= 1024, "BASE", "must be <= 1024 (the notebooks' width is 32)")
    if hasattr(cfg, "PERCEPTUAL_WEIGHT"):
        need(0 <= cfg.PERCEPTUAL_WEIGHT < math.inf, "PERCEPTUAL_WEIGHT", "must be >= 0")
    if hasattr(cfg, "PERCEPTUAL_POOL"):
        need(cfg.PERCEPTUAL_POOL in (1, 2, 4, 8), "PERCEPTUAL_POOL", "one of 1, 2, 4, 8")
    if hasattr(cfg, "VGG_WEIGHTS"):
        need(cfg.VGG_WEIGHTS in ("imagenet", "none"), "VGG_WEIGHTS", "one of imagenet, none")
    if hasattr(cfg, "OUT_DIR"):
        need(str(cfg.OUT_DIR).strip() != "", "OUT_DIR", "must name a folder")
    if hasattr(cfg, "T_IN"):
        need(cfg.T_IN >= 1 and cfg.T_OUT >= 1, "T_IN" if cfg.T_IN < 1 else "T_OUT", "must be >= 1")
        need(cfg.T_IN + cfg.T_OUT <= N_FRAMES, "T_OUT", f"T_IN + T_OUT must be <= {N_FRAMES} (frames per event)")
    for key in ("MODALITIES", "INPUT_MODS"):
        mods = getattr(cfg, key, None)
        if mods is not None:
            need(len(mods) > 0 and all(m in KNOWN_MODS for m in mods), key, f"each one of {', '.join(KNOWN_MODS)}")
            need(len(set(mods)) == len(mods), key, "a modality may appear once")
    if hasattr(cfg, "MODALITIES"):
        need("vil" in cfg.MODALITIES, "MODALITIES", "must include vil (the forecast target)")
    if hasattr(cfg, "INPUT_MODS"):
        need("vil" not in cfg.INPUT_MODS, "INPUT_MODS", "satellite inputs only (ir069, ir107, lght): vil is the target")
        need("ir069" in cfg.INPUT_MODS or "ir107" in cfg.INPUT_MODS, "INPUT_MODS",
             "needs ir069 or ir107 (the reference forecast is an IR lookup table)")
    if hasattr(cfg, "TARGET_SIZE"):
        need(cfg.TARGET_SIZE >= max(16, 2 * size_multiple) and cfg.TARGET_SIZE % size_multiple == 0, "TARGET_SIZE",
             f"must be a multiple of {size_multiple}, at least {max(16, 2 * size_multiple)} (the U-Net halves it "
             f"{int(math.log2(size_multiple))} times and BatchNorm needs 2 x 2 at the bottom; pooled CSI needs "
             f"16 x 16)" if size_multiple > 1 else "must be >= 16 (pooled CSI takes 16 x 16 tiles)")
        if getattr(cfg, "HALF_RES_EPOCHS", 0):          # those epochs halve the grid before the U-Net does
            need(cfg.TARGET_SIZE % (2 * size_multiple) == 0 and cfg.TARGET_SIZE >= 4 * size_multiple, "TARGET_SIZE",
                 f"must be a multiple of {2 * size_multiple} and at least {4 * size_multiple} with "
                 f"--half_res_epochs > 0 (those epochs halve the grid), or set --half_res_epochs=0")
        need(cfg.TARGET_SIZE <= 4 * NATIVE_SIZE["vil"], "TARGET_SIZE",
             f"must be <= {4 * NATIVE_SIZE['vil']} (SEVIR's VIL is {NATIVE_SIZE['vil']} x {NATIVE_SIZE['vil']})")
    if hasattr(cfg, "IR_NORM"):
        need(cfg.IR_NORM in IR_NORMS, "IR_NORM", f"one of {', '.join(IR_NORMS)}")
    if hasattr(cfg, "SPLIT_DATES"):
        dates = [_parse_date(d) for d in cfg.SPLIT_DATES]
        need(len(dates) == 2 and None not in dates and dates[0] < dates[1], "SPLIT_DATES",
             "two dates in time order, like 2019-01-01,2019-06-01 (train <= first < validation <= second < test)")
    if hasattr(cfg, "DEVICE"):
        need(cfg.DEVICE in ("auto", "cpu", "cuda", "mps") or cfg.DEVICE.startswith("cuda:"), "DEVICE",
             "one of auto, cpu, cuda, cuda:N, mps")


def _parse_date(text):
    """A pandas Timestamp from "YYYY-MM-DD" or "YYYY-MM-DD HH:MM[:SS]" (no time zone); None if it is not one."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?", str(text).strip()):
        return None
    try:
        return pd.Timestamp(str(text).strip())
    except ValueError:
        return None


def config_dict(cfg):
    """The Config as a plain dict (for config.json and checkpoints); tuples become lists."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k in dir(cfg) if k.isupper() for v in [getattr(cfg, k)]}


def seed_everything(seed):
    """Seed Python, NumPy and PyTorch (the data pipeline derives its own randomness from SEED and epoch)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """'auto' means cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps: MPS is not available on this machine")
    return torch.device(name)


def init_device(name):
    """The device to run on. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) this also joins the
    process group, nccl on CUDA and gloo on CPU, takes GPU LOCAL_RANK, and silences other ranks' stdout."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return pick_device(name)
    import atexit
    import gc
    import torch.distributed as dist
    device = pick_device(name)
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # at exit, first free what still uses the group (a stopped run's model, held by its traceback's frames):
        # a group destroyed under a live DistributedDataParallel aborts the process
        atexit.register(lambda: gc.collect() or dist.destroy_process_group())
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def dist_info():
    """(rank, world size): (0, 1) unless launched by torchrun."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def is_main():
    """True in the process that writes checkpoints, figures and logs (rank 0)."""
    return dist_info()[0] == 0


def barrier():
    """Wait for every process (a no-op in one process)."""
    if dist_info()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(t):
    """Sum a tensor over processes, in place (a no-op in one process). NCCL reduces only CUDA tensors: a CPU
    tensor goes through this process's GPU and back."""
    if dist_info()[1] > 1:
        import torch.distributed as dist
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)
    return t


# ======================================================================================
# 10. Tools: sample data (python common.py sample)
# ======================================================================================

SEVIR_PROJ = "+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere "
STORM_TYPES = ("Thunderstorm Wind", "Hail", "Flash Flood", "Heavy Rain", "Tornado")


def make_sample_sevir(root, n_events=SAMPLE_EVENTS, seed=0):
    """Write a small SEVIR-format dataset in `root`; return the path of its CATALOG.csv.

    Same layout, file names, dataset names, dtypes and grids as SEVIR: vil uint8 (N, 384, 384, 49),
    ir069 / ir107 int16 (N, 192, 192, 49) in deg C x 100, `id` datasets, lght files with one
    (n, 5) flash list per event id, and a 21-column catalog. Events fall in the three periods of
    Earthformer's split: half in 2018 H2 (train), a quarter each in 2019 H1 (validation) and
    2019 June-August (test); the last train and validation events are stamped exactly 2019-01-01
    00:00:00 and 2019-06-01 00:00:00, as many SEVIR events are. The weather is generated, not real.
    Same seed, same bytes. The folder is marked (GENERATED_SAMPLE.txt) before anything else and the catalog
    is written last, so a sample stopped half-way is recognised as one and written again.
    """
    if not 3 <= n_events <= 200:
        raise UserError(f"--events={n_events}: from 3 (train, validation, test) to 200 (2.9 GB)")
    if seed < 0:
        raise UserError(f"--seed={seed}: must be >= 0")
    root = Path(root)
    with tool_folder(root, SAMPLE_MARKER, SAMPLE_MARKER_TEXT, "sample --out"):
        (root / "CATALOG.csv").unlink(missing_ok=True)      # unfinished until the catalog is written, last
        for stale in root.rglob("*.h5.tmp"):                # left by a process killed mid-write
            stale.unlink()
        return _write_sample(root, n_events, seed)


def _write_sample(root, n_events, seed):
    """make_sample_sevir's files, each written under a temporary name and renamed when whole; the catalog last."""
    rng = np.random.default_rng(seed)
    n_val = n_test = max(1, round(0.25 * n_events))
    spans = [(dt.date(2018, 7, 2), dt.date(2018, 12, 31), n_events - n_val - n_test, dt.datetime(2019, 1, 1)),
             (dt.date(2019, 1, 2), dt.date(2019, 5, 31), n_val, dt.datetime(2019, 6, 1)),
             (dt.date(2019, 6, 2), dt.date(2019, 8, 30), n_test, None)]
    times = []
    for first, last, n, boundary in spans:
        days = first.toordinal() + np.sort(rng.choice((last - first).days, n, replace=False))
        period = [dt.datetime.fromordinal(int(d)) + dt.timedelta(minutes=5 * int(rng.integers(0, 288))) for d in days]
        if boundary is not None and n >= 3:
            period[-1] = boundary                          # on the split date: the earlier side (Earthformer)
        times += period
    events = []
    for i, when in enumerate(times):
        storm = i % 5 != 4                                        # every fifth event is a random one
        eid = f"S{830000 + 37 * i}" if storm else f"R{when:%y%m%d%H%M}{rng.integers(0, 10000):04d}"
        span = f"{when.year}_{'0101_0630' if when.month <= 6 else '0701_1231'}"
        kind = "STORMEVENTS" if storm else "RANDOMEVENTS"
        month = f"{when.year}_{when.month:02d}01_{when.month % 12 + 1:02d}01"
        lat0, lon0 = rng.uniform(28, 45), rng.uniform(-105, -82)
        events.append({"id": eid, "time": when, "storm": storm, "lat0": lat0, "lon0": lon0,
                       "files": {m: f"{m}/{when.year}/SEVIR_{m.upper()}_{kind}_{span}.h5" for m in ("vil", "ir069", "ir107")}
                       | {"lght": f"lght/{when.year}/SEVIR_LGHT_ALLEVENTS_{month}.h5"},
                       "missing": storm and i == 3 and n_events >= 10})   # one event with missing radar pixels
    layout = {}                                                   # file -> list of event numbers
    for i, e in enumerate(events):
        for m, f in e["files"].items():
            layout.setdefault(f, []).append(i)

    rows, handles = [], {}
    try:
        for f in layout:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            handles[f] = h5py.File(root / (f + ".tmp"), "w")
        for f, members in layout.items():
            mod = f.split("/")[0]
            if mod != "lght":
                n, size = len(members), NATIVE_SIZE[mod]
                ids = [events[i]["id"].encode() for i in members]
                handles[f].create_dataset("id", data=np.array(ids, dtype=f"S{max(map(len, ids))}"))
                handles[f].create_dataset(mod, shape=(n, size, size, N_FRAMES),
                                          dtype=np.uint8 if mod == "vil" else np.int16)
        offsets = ":".join(str(m) for m in range(-120, 125, 5))
        for i, e in enumerate(events):
            vil, ir069, ir107, flashes = _make_event(rng, e["storm"], e["lat0"], e["lon0"])
            pct = {"vil": 0.0, "ir069": 0.0, "ir107": 0.0, "lght": 0.0}
            if e["missing"]:
                vil[30:, :48, :] = 255                            # a radar outage: 255 = missing
                pct["vil"] = float((vil == 255).mean())
            for mod, arr in (("vil", vil), ("ir069", ir069), ("ir107", ir107)):
                f = e["files"][mod]
                handles[f][mod][layout[f].index(i)] = arr.transpose(1, 2, 0)        # stored (H, W, T)
            handles[e["files"]["lght"]].create_dataset(e["id"], data=flashes)
            for mod in ("vil", "ir069", "ir107", "lght"):
                f = e["files"][mod]
                if mod == "vil":
                    lo, hi = int(vil.min()), int(vil.max())
                elif mod == "lght":
                    lo, hi = 0, len(flashes)
                else:
                    arr = ir069 if mod == "ir069" else ir107
                    lo, hi = float(arr.min()) / 100, float(arr.max()) / 100
                rows.append({
                    "id": e["id"], "file_name": f, "file_index": 0 if mod == "lght" else layout[f].index(i),
                    "img_type": mod, "time_utc": f"{e['time']:%Y-%m-%d %H:%M:%S}",
                    "minute_offsets": "" if mod == "lght" else offsets,
                    "episode_id": 100000 + i if e["storm"] else "", "event_id": e["id"][1:] if e["storm"] else "",
                    "event_type": STORM_TYPES[i % len(STORM_TYPES)] if e["storm"] else "",
                    "llcrnrlat": round(e["lat0"], 6), "llcrnrlon": round(e["lon0"], 6),
                    "urcrnrlat": round(e["lat0"] + 3.45, 6), "urcrnrlon": round(e["lon0"] + 4.2, 6),
                    "proj": SEVIR_PROJ, "size_x": NATIVE_SIZE[mod], "size_y": NATIVE_SIZE[mod],
                    "height_m": 384000, "width_m": 384000, "data_min": lo, "data_max": hi,
                    "pct_missing": pct[mod]})
    except BaseException:
        for f, h in handles.items():
            h.close()
            (root / (f + ".tmp")).unlink(missing_ok=True)
        raise
    for f, h in handles.items():
        h.close()
        os.replace(root / (f + ".tmp"), root / f)
    write_csv(root / "CATALOG.csv", rows)                        # each row's keys are CATALOG_COLUMNS, in order
    return str(root / "CATALOG.csv")


TOPS_LEAD = 2                    # frames (10 min) by which a cell's cold cloud top comes before its rain


def _make_event(rng, storm, lat0, lon0):
    """One event: vil (49, 384, 384) uint8 codes, ir069 / ir107 (49, 192, 192) int16 deg C x 100, flashes (n, 5)
    float32. Weather a nowcaster has to learn: two to four systems per storm scene, each steered by a west-to-east
    drift plus its own deviation (so they move differently); their cells are born at random times all through the
    event, rise within a few frames, live 3 to 25 frames, and are stretched and turned as they go; each cell's
    cold cloud top (IR) comes TOPS_LEAD frames before its rain and outlasts it, as an anvil does."""
    drift = np.array([rng.uniform(1.0, 3.0), rng.normal(0, 0.7)])            # km per 5-min frame, eastward
    cells = []
    for _ in range(rng.integers(2, 5) if storm else rng.integers(1, 3)):
        velocity = drift + rng.normal(0, 1.0, 2)                              # this system's steering
        start = rng.uniform(40, 344, 2) - velocity * 24                       # in the scene mid-event
        for _ in range(rng.poisson(rng.uniform(10, 30) if storm else rng.uniform(2, 8))):
            cells.append({"x": start[0] + rng.normal(0, 35), "y": start[1] + rng.normal(0, 35),
                          "u": velocity[0] + rng.normal(0, 0.3), "v": velocity[1] + rng.normal(0, 0.3),
                          "born": rng.uniform(-20, 48), "life": rng.uniform(3, 25),
                          "amp": rng.uniform(60, 300) if storm else rng.uniform(10, 80),
                          "size": rng.uniform(4, 10), "aspect": rng.uniform(1, 2), "angle": rng.uniform(0, np.pi),
                          "spin": rng.normal(0, 0.04), "stretch": rng.normal(0, 0.02)})
    cells.append({"x": rng.uniform(100, 284) - drift[0] * 24, "y": rng.uniform(100, 284) - drift[1] * 24,
                  "u": drift[0], "v": drift[1], "born": -200, "life": 400,        # a slow stratiform shield
                  "amp": rng.uniform(15, 35) if storm else rng.uniform(0, 15),
                  "size": rng.uniform(40, 70), "aspect": 1.0, "angle": 0.0, "spin": 0.0, "stretch": 0.0})
    texture = _smooth_noise(rng, 512, 4.0)
    warm = 18 + 4 * _smooth_noise(rng, 192, 20.0)                             # clear-sky IR107, deg C
    wv = -30 + 3 * _smooth_noise(rng, 192, 30.0)                              # clear-sky IR069
    vil = np.empty((N_FRAMES, 384, 384), np.uint8)
    ir069 = np.empty((N_FRAMES, 192, 192), np.int16)
    ir107 = np.empty((N_FRAMES, 192, 192), np.int16)
    flashes = []
    for t in range(N_FRAMES):
        dx, dy = int(round(drift[0] * t)), int(round(drift[1] * t))          # texture moves with the drift
        tex = np.roll(texture, (dy, dx), axis=(0, 1))[:384, :384]
        code = _cells_field(cells, t, 384, 1.0) * np.exp(0.35 * tex)
        code[code < 3] = 0
        vil[t] = np.clip(code, 0, 254).astype(np.uint8)
        tops = _cells_field(cells, t, 192, 2.0, widen=2.0, tops=True)          # anvils wider than the rain
        ir107[t] = np.round(100 * (warm - (warm + 70) * (1 - np.exp(-tops / 40)) + rng.normal(0, 0.4, (192, 192))))
        ir069[t] = np.round(100 * (wv - (wv + 72) * (1 - np.exp(-tops / 25))))      # water vapour: wider, smoother
        rows, cols = np.nonzero(vil[t] >= 160)                                 # lightning where VIL is intense
        n = rng.poisson(0.01 * len(rows))
        if n:
            pick = rng.integers(0, len(rows), n)
            r, c = rows[pick] + rng.uniform(0, 1, n), cols[pick] + rng.uniform(0, 1, n)
            secs = FRAME_TIMES_S[t] - rng.uniform(0, 300, n)                    # the 5 minutes up to frame t
            flashes.append(np.stack([secs, lat0 + 3.45 * (1 - r / 384), lon0 + 4.2 * c / 384, c / 8, r / 8], 1))
    flashes = np.concatenate(flashes).astype(np.float32) if flashes else np.zeros((0, 5), np.float32)
    return vil, ir069, ir107, flashes


def _cells_field(cells, t, n, px_km, widen=1.0, tops=False):
    """Sum of the cells at frame t on an n x n grid of `px_km` km pixels, each an elliptical Gaussian computed on
    the pixels within 3 of its widths. tops=True: the cloud tops, TOPS_LEAD frames ahead of the rain and held
    while the rain decays. (n, n) float32."""
    field = np.zeros((n, n), np.float32)
    for c in cells:
        def envelope(age):                        # a fast rise (half in ~1 frame), then a decay over the life
            return c["amp"] * (1 - np.exp(-age / 1.5)) * np.exp(-(age / c["life"]) ** 2) if age > 0 else 0.0
        age = t - c["born"]
        env = max(envelope(age + TOPS_LEAD), envelope(age)) if tops else envelope(age)
        if env < 0.5:
            continue
        x, y = c["x"] + c["u"] * t, c["y"] + c["v"] * t
        shape = c["aspect"] * np.exp(c["stretch"] * min(max(age, 0), c["life"]))  # stretched as it ages, and turned
        a, b = c["size"] * widen * np.sqrt(shape), c["size"] * widen / np.sqrt(shape)
        cos, sin = np.cos(c["angle"] + c["spin"] * t), np.sin(c["angle"] + c["spin"] * t)
        reach = 3 * max(a, b)
        i0, i1 = max(int((y - reach) / px_km), 0), min(int((y + reach) / px_km) + 1, n)
        j0, j1 = max(int((x - reach) / px_km), 0), min(int((x + reach) / px_km) + 1, n)
        if i0 >= i1 or j0 >= j1:
            continue
        dy = ((np.arange(i0, i1, dtype=np.float32) + 0.5) * px_km - y)[:, None]
        dx = ((np.arange(j0, j1, dtype=np.float32) + 0.5) * px_km - x)[None, :]
        along, across = dx * cos + dy * sin, dy * cos - dx * sin
        field[i0:i1, j0:j1] += env * np.exp(-0.5 * ((along / a) ** 2 + (across / b) ** 2))
    return field


def _smooth_noise(rng, size, scale):
    """Periodic Gaussian-filtered noise with unit standard deviation; `scale` is the blob size in pixels."""
    k = np.fft.fftfreq(size)
    filt = np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) * (2 * np.pi * scale) ** 2)
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * filt).real
    return (field / field.std()).astype(np.float32)


# ======================================================================================
# 11. Tools: a SEVIR subset over HTTP range requests (python common.py download), a prepared copy (prepare)
# ======================================================================================

SEVIR_URL = "https://sevir.s3.us-east-1.amazonaws.com"   # the public bucket s3://sevir: CATALOG.csv, data/<type>/...
EVENT_BYTES = {"vil": 384 * 384 * 49, "ir069": 192 * 192 * 49 * 2, "ir107": 192 * 192 * 49 * 2, "lght": 0}
MAX_CATALOG_BYTES = 1 << 30       # SEVIR's CATALOG.csv is about 32 MB: a "catalog" above 1 GiB is refused
ASK_ABOVE_BYTES = 50e9            # a download above this asks first (or needs --yes off a terminal)
SUBSET_MARKER = "DOWNLOADED_SUBSET.txt"           # marks a folder written by download
PREPARED_MARKER = "PREPARED_COPY.txt"             # marks a folder written by prepare
PREPARED_COMPRESSION = None       # measured: lzf saves 18% of the bytes and halves the warm read speed
GENERATED_COPY = "a copy of the GENERATED sample (synthetic weather, not real data)"   # in PREPARED_MARKER


def download(out, types=("vil", "ir069", "ir107"), max_events=None, since=None, until=None, event_type=None,
             base_url=SEVIR_URL, backoff=1.0, yes=False, size=None):
    """Write a local SEVIR subset in `out`: the chosen events' bytes only, same file names, `id`
    datasets and a matching CATALOG.csv. Resumable: finished files are not fetched again and an
    interrupted file continues from its last event. Every argument is checked before any request;
    `out` must be new, empty or an earlier download (marked by DOWNLOADED_SUBSET.txt); above
    ASK_ABOVE_BYTES it asks (or needs yes=True off a terminal). With `size`, what lands on disk is a
    prepared copy at that grid (see prepare): each event is fetched once and shrunk in memory.
    Returns the local catalog's path."""
    from urllib.parse import quote
    out, base_url = Path(out), base_url.rstrip("/")
    _check_selection(types, max_events, since, until)
    if size is not None and not 8 <= size <= 768:
        raise UserError(f"--size={size}: a grid from 8 to 768 pixels (the datasets' TARGET_SIZE)")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", base_url):
        raise UserError(f"--base-url={base_url}: expected http://HOST/... or https://HOST/...")
    writable_folder(out, SUBSET_MARKER, "download --out")          # before any request
    if (out / SUBSET_MARKER).is_file():                             # going on: as the first run found the mirror
        marker_text = (out / SUBSET_MARKER).read_text()
    else:                                        # a mirror of the generated sample says so: keep saying it
        try:
            http_get(f"{base_url}/data/{SAMPLE_MARKER}", tries=1, limit=4096)
            generated = f", {GENERATED_COPY}"
        except UserError:
            generated = ""
        marker_text = f"Written by python common.py download: a subset of SEVIR{generated}.\n"
    with tool_folder(out, SUBSET_MARKER, marker_text, "download --out"):
        remote_catalog = out / "CATALOG.remote.csv"                   # the full catalog, fetched once
        if not remote_catalog.exists():
            body, _ = http_get(f"{base_url}/CATALOG.csv", backoff=backoff)
            write_atomically(remote_catalog, lambda tmp: tmp.write_bytes(body))
        ids = choose_events(remote_catalog, types, max_events, since, until, event_type)
        if not ids:
            raise UserError("no event in the catalog matches --types, --since, --until and --event-type")
        raw = raw_catalog(remote_catalog)
        raw["img_type"] = raw["img_type"].str.lower()
        usable = pd.to_numeric(raw["pct_missing"], errors="coerce") == 0          # the rows choose_events kept
        rows = raw[raw["id"].isin(ids) & raw["img_type"].isin(types) & usable].copy()
        rows["order"] = rows["id"].map({e: i for i, e in enumerate(ids)})
        rows = rows.sort_values(["file_name", "order"])
        total = sum(EVENT_BYTES[t] for t in rows["img_type"])
        print(f"downloading {len(ids)} events ({', '.join(types)}) from {len(set(rows['file_name']))} files: "
              f"{total / 1e9:.2f} GB")
        if total > ASK_ABOVE_BYTES and not yes:
            if not sys.stdin.isatty():
                raise UserError(f"this would download {total / 1e9:.0f} GB: add --yes to go on, or fewer --max-events")
            if input(f"download {total / 1e9:.0f} GB? [y/N] ").strip().lower() not in ("y", "yes"):
                raise UserError("download cancelled")

        @contextlib.contextmanager
        def remote(file_name):                               # the bucket's HDF5 file, read by range requests
            with HTTPRangeFile(f"{base_url}/data/{quote(file_name)}", backoff=backoff) as f, h5py.File(f, "r") as h5:
                yield h5
        catalog, _ = _write_copy(out, rows, remote, size, "download")
        print(f"wrote {catalog}: use --catalog_path={catalog} --sevir_root={out}")
    return str(catalog)


def choose_events(catalog, types, max_events=None, since=None, until=None, event_type=None):
    """Ids of events that pass load_catalog's catalog rules (one row per type, pct_missing 0, a valid
    time), in time order, filtered and cut."""
    df = read_catalog(catalog)
    df = df[df["img_type"].isin(types)]
    df, rejects = _catalog_rejects(df, len(types), 0.0)                        # as load_catalog
    gone = set().union(*(set(ids) for _, ids in rejects))
    events = df[~df["id"].isin(gone)].drop_duplicates("id")
    return _select(events, max_events, since, until, event_type)["id"].tolist()


def _holds(path, wanted):
    """Whether a local HDF5 file exists, opens, and was written by download or prepare for exactly these
    event ids (for any events when wanted is None)."""
    try:
        with h5py.File(path, "r") as f:
            return "events" in f.attrs if wanted is None else f.attrs.get("events") == wanted
    except OSError:
        return False


def _write_copy(out, rows, open_source, size, desc):
    """Write the events of catalog `rows` (in the order of their "order" column) into `out` as SEVIR does:
    the same file names, an `id` dataset and (N, H, W, 49) images in the stored dtype per file, lightning
    lists unchanged, and a matching CATALOG.csv. With `size`, images larger than size x size are shrunk to
    it (antialiased, rounded to the stored dtype) and stored one frame per HDF5 chunk, so a window reads
    only its frames: a prepared copy. Sources are checked before their bytes are read (dataset_problem, events
    never written). Resumable: finished files are kept, a file in progress (.part) goes on from its last
    event (or starts anew if it no longer reads back). Returns (catalog path, bytes of event data read)."""
    from tqdm import tqdm
    rows, bytes_in = rows.sort_values(["file_name", "order"]).copy(), 0
    bar = tqdm(total=len(rows), unit="event", desc=desc, dynamic_ncols=True)
    for file_name, group in rows.groupby("file_name", sort=False):
        final, part = out / file_name, out / f"{file_name}.part"
        if not (inside(final, out) and inside(part, out)):           # a link inside --out pointing elsewhere
            raise UserError(f"{final} leads outside --out {out} (a symbolic link?); refused")
        if final.exists() and not _holds(final, None):
            raise UserError(f"{final} was not written by this tool; refused to replace it")
        mod = group["img_type"].iloc[0]
        wanted = ",".join(group["id"]) + (f" at {size}" if size else "")
        if _holds(final, wanted):                                   # finished earlier: not read again
            bar.update(len(group))
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        with _open_part(part, wanted) as dst, open_source(file_name) as src:
            for name in ([mod] if mod != "lght" else list(group["id"])) + (["id"] if "id" in src else []):
                if problem := (dataset_problem(src, name) if name in src else ("", f"{name} is not in it")):
                    raise RunError(f"{file_name}: {problem[1]}; refused")     # before any of its bytes are read
            if mod == "lght":
                for event in group["id"]:
                    if event not in dst:
                        flashes = src[event][()]
                        if flashes.ndim != 2 or flashes.shape[1] != 5:
                            raise RunError(f"{file_name}: {event} has shape {flashes.shape}, expected (n, 5)")
                        dst.create_dataset(event, data=flashes)
                    bar.update(1)
            else:
                native, n = src[mod].shape[1], len(group)             # SEVIR's grid, or an earlier copy's
                grid = min(size, native) if size else native
                images = dst.require_dataset(mod, (n, grid, grid, N_FRAMES), dtype=EVENT_DTYPE[mod],
                                             chunks=(1, grid, grid, 1) if size else None,
                                             compression=PREPARED_COMPRESSION if size else None)
                ids = group["id"].str.encode("ascii").to_numpy()            # the catalog's, as the check found them
                id_ds = dst.require_dataset("id", (n,), dtype=f"S{max(map(len, ids))}")
                done = dst.require_dataset("done", (n,), dtype=bool)
                written = written_events(src[mod])
                for k, index in enumerate(group["file_index"].astype(int)):
                    if not written[index]:
                        raise RunError(f"{file_name}[{index}]: never written (it would read as zeros); refused")
                    if not done[k]:
                        event = src[mod][index]                     # only this event's bytes travel
                        if event.shape != (native, native, N_FRAMES) or event.dtype != EVENT_DTYPE[mod]:
                            raise RunError(f"{file_name}[{index}]: {event.dtype} {event.shape}, expected "
                                           f"{np.dtype(EVENT_DTYPE[mod])} {(native, native, N_FRAMES)}")
                        images[k], id_ds[k], done[k] = shrink_event(event, grid), ids[k], True
                        dst.flush()
                        bytes_in += event.nbytes
                    bar.update(1)
                del dst["done"]
        os.replace(part, final)
    bar.close()
    rows["file_index"] = np.where(rows["img_type"] == "lght", "0", rows.groupby("file_name").cumcount().astype(str))
    if size:                                                        # the catalog describes the new grid
        images = rows["img_type"] != "lght"
        grid = [str(min(size, whole_number(n) or NATIVE_SIZE[m]))
                for n, m in zip(rows.loc[images, "size_x"], rows.loc[images, "img_type"])]
        rows.loc[images, "size_x"], rows.loc[images, "size_y"] = grid, grid
    catalog = out / "CATALOG.csv"
    write_atomically(catalog, lambda tmp: rows.sort_values(["order", "img_type"]).drop(columns="order")
                     .to_csv(tmp, index=False))
    return catalog, bytes_in


@contextlib.contextmanager
def _open_part(part, wanted):
    """The unfinished file `part` opened to go on writing `wanted`: as left when it holds that selection and
    opens cleanly, else started anew (absent, another selection, or broken by a crash or a full disk)."""
    dst = None
    try:
        if _holds(part, wanted):
            dst = h5py.File(part, "a")
            for name in dst:                                # its structure must read back: the bookkeeping,
                if name in ("id", "done"):                  # and each chunk index (written_events walks it)
                    dst[name][()]
                elif dst[name].chunks:
                    written_events(dst[name])
    except (OSError, RuntimeError, KeyError, ValueError, AttributeError):
        with contextlib.suppress(Exception):
            dst.close()
        dst = None
    if dst is None:
        part.unlink(missing_ok=True)
        dst = h5py.File(part, "w")
        dst.attrs["events"] = wanted
    try:
        yield dst
    finally:
        dst.close()


def shrink_event(event, grid):
    """An (H, W, 49) event as stored, shrunk to (grid, grid, 49) like the datasets shrink it, rounded back
    to the stored dtype; unchanged when already that size."""
    if event.shape[0] == grid:
        return event
    frames = resize_frames(torch.from_numpy(event).float().permute(2, 0, 1), grid)        # (49, grid, grid)
    info = np.iinfo(event.dtype)
    return frames.round().clamp(info.min, info.max).permute(1, 2, 0).numpy().astype(event.dtype)


def prepare(catalog, root, out, size, types=("vil", "ir069", "ir107"), max_events=None, since=None, until=None,
            event_type=None):
    """A prepared copy of the usable events of a local SEVIR (load_catalog's rules) in `out`, at size x size,
    one frame per chunk, that every SEVIR reader still reads. Returns the new catalog's path."""
    out = Path(out)
    _check_selection(types, max_events, since, until)
    if not (isinstance(size, int) and 8 <= size <= 768):
        raise UserError(f"--size={size}: a grid from 8 to 768 pixels (the datasets' TARGET_SIZE)")
    writable_folder(out, PREPARED_MARKER, "prepare --out")
    marker = out / PREPARED_MARKER                                 # the same command continues; another size stops
    if marker.is_file() and f" at {size} x {size}" not in marker.read_text():
        raise UserError(f"prepare --out {out}: it holds a prepared copy of another size ({marker.read_text().strip()}); "
                        f"choose a new folder for --size={size}")
    root = files_root(catalog, [Path(root), Path(root) / "data"]) or Path(root)     # or the bucket's top
    events = load_catalog(catalog, root, mods=types)                # usable events, files checked
    chosen = _select(events, max_events, since, until, event_type)
    if chosen.empty:                                                # before anything in `out` is touched
        raise UserError("no usable event in the catalog matches --types, --since, --until and --event-type")
    raw = raw_catalog(catalog)
    raw["img_type"] = raw["img_type"].str.strip().str.lower()
    keys = {(e, m, f, str(i)) for m in types for e, f, i in zip(chosen["id"], chosen[f"{m}_file"], chosen[f"{m}_index"])}
    rows = raw[[k in keys for k in zip(raw["id"], raw["img_type"], raw["file_name"], raw["file_index"].str.strip())]].copy()
    rows["order"] = rows["id"].map({e: i for i, e in enumerate(chosen["id"])})
    marker_text = (f"Written by python common.py prepare: SEVIR events at {size} x {size}"
                   + (f", {GENERATED_COPY}.\n" if is_generated(root) else ".\n"))
    t0 = time.time()
    with tool_folder(out, PREPARED_MARKER, marker_text, "prepare --out"):
        new_catalog, bytes_in = _write_copy(out, rows, lambda name: h5py.File(Path(root) / name, "r"), size, "prepare")
    bytes_out = sum(p.stat().st_size for p in out.rglob("*.h5"))
    print(f"prepared {len(chosen)} events ({', '.join(types)}) at {size} x {size} in {time.time() - t0:.0f} s: "
          f"{bytes_in / 1e9:.2f} GB read, {bytes_out / 1e9:.2f} GB in {out}. "
          f"Use --catalog_path={new_catalog} --sevir_root={out}")
    return str(new_catalog)


def _check_selection(types, max_events, since, until):
    """The event-choice arguments of download and prepare, checked before anything is read or fetched."""
    unknown = [t for t in types if t not in EVENT_BYTES]
    if unknown or not types:
        raise UserError(f"--types: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(EVENT_BYTES)}")
    if max_events is not None and max_events < 1:
        raise UserError(f"--max-events={max_events}: must be >= 1 (leave it out for every matching event)")
    for flag, value in (("--since", since), ("--until", until)):
        if value is not None and _parse_date(value) is None:
            raise UserError(f"{flag}={value}: expected a date like 2019-06-01")


def _select(events, max_events=None, since=None, until=None, event_type=None):
    """Events (one row each, with time_utc) filtered by the split's rule since < time_utc <= until and the
    event type, in time order, the earliest max_events."""
    if since:
        events = events[events["time_utc"] > _parse_date(since)]
    if until:
        events = events[events["time_utc"] <= _parse_date(until)]
    if event_type:
        events = events[events["event_type"].str.lower() == event_type.lower()]
    events = events.sort_values(["time_utc", "id"])
    return events.iloc[:max_events] if max_events else events


def http_get(url, start=None, stop=None, tries=5, backoff=1.0, limit=MAX_CATALOG_BYTES):
    """(body, total size) of GET url, bytes [start, stop) when given, with retries and backoff on
    transient errors (5xx, 429, timeouts, dropped connections); UserError for 403, 404 and no network.

    A mirror may come from anyone: a body longer than the range asked for (or than `limit` without a
    range), or than its own Content-Length, is an error, never an unbounded read into memory."""
    import socket
    import urllib.error
    import urllib.request
    headers = {"Range": f"bytes={start}-{stop - 1}"} if start is not None else {}
    why = ""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                cap = stop - start if start is not None else limit
                if start is not None and r.status == 200:
                    raise UserError(f"{url}: the server ignores HTTP range requests; use another --base-url")
                announced = r.headers.get("Content-Length")
                if announced is not None and int(announced) > cap:
                    raise UserError(f"{url}: the server sends {int(announced):,} bytes, more than the {cap:,} "
                                    f"asked for; refused")
                body = r.read(cap + 1)
                if len(body) > cap or (announced is not None and len(body) > int(announced)):
                    raise UserError(f"{url}: the server sent more than the {cap:,} bytes asked for; refused")
                total = r.headers.get("Content-Range", "").rpartition("/")[2] or announced
                return body, int(total) if total else len(body)
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                raise UserError(f"{url}: HTTP {e.code} ({'access denied' if e.code == 403 else 'no such file'})") from None
            if e.code < 500 and e.code != 429:
                raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
            why = f"HTTP {e.code}"
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                raise UserError(f"cannot reach {url.split('/')[2]}: no network or unknown host") from None
            why = str(e.reason)
        except (TimeoutError, ConnectionError, OSError) as e:
            why = type(e).__name__
        if attempt < tries - 1:
            time.sleep(backoff * 2 ** attempt)
    raise UserError(f"cannot fetch {url} after {tries} tries ({why})")


class HTTPRangeFile(io.RawIOBase):
    """A read-only file over HTTP range requests, for h5py.File: reads go by 256 KiB blocks, cached."""

    def __init__(self, url, block=1 << 18, cache_blocks=64, backoff=1.0):
        super().__init__()
        self.url, self.block, self.cache_blocks, self.backoff, self.pos = url, block, cache_blocks, backoff, 0
        self.cache = {}                                             # block number -> bytes, insertion-ordered
        first, self.size = http_get(url, 0, block, backoff=backoff)
        self.cache[0] = first

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self.size - self.pos))
        if n == 0:
            return 0
        first, last = self.pos // self.block, (self.pos + n - 1) // self.block
        missing = [k for k in range(first, last + 1) if k not in self.cache]
        if missing:                                                 # one request for the whole gap
            lo, hi = missing[0] * self.block, min((missing[-1] + 1) * self.block, self.size)
            body, _ = http_get(self.url, lo, hi, backoff=self.backoff)
            for k in range(missing[0], missing[-1] + 1):
                self.cache[k] = body[(k - missing[0]) * self.block:(k - missing[0] + 1) * self.block]
            while len(self.cache) > max(self.cache_blocks, last - first + 1):
                self.cache.pop(next(iter(self.cache)))
        data = b"".join(self.cache[k] for k in range(first, last + 1))
        offset = self.pos - first * self.block
        buffer[:n] = data[offset:offset + n]
        self.pos += n
        return n


# ======================================================================================
# 12. The command line: python common.py sample | download | prepare
# ======================================================================================

def _cli(argv=None):
    parser = argparse.ArgumentParser(prog="common.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write a generated SEVIR-format sample dataset")
    s.add_argument("--out", default=SAMPLE_ROOT, help=f"folder to write (default {SAMPLE_ROOT})")
    s.add_argument("--events", type=int, default=SAMPLE_EVENTS, help=f"number of events (default {SAMPLE_EVENTS})")
    s.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("download", help="fetch a SEVIR subset: only the chosen events' bytes")
    d.add_argument("--out", required=True, help="local folder for CATALOG.csv and the HDF5 files")
    d.add_argument("--types", default="vil,ir069,ir107", help="comma-separated: vil, ir069, ir107, lght")
    d.add_argument("--max-events", type=int, default=None, help="at most this many events (earliest first)")
    d.add_argument("--since", default=None, help="events with time_utc after this date (YYYY-MM-DD)")
    d.add_argument("--until", default=None, help="events with time_utc up to this date (the split's rule)")
    d.add_argument("--event-type", default=None, help='NWS event type, e.g. "Hail" or "Thunderstorm Wind"')
    d.add_argument("--base-url", default=SEVIR_URL, help=f"bucket or mirror (default {SEVIR_URL})")
    d.add_argument("--yes", action="store_true", help=f"go on without asking above {ASK_ABOVE_BYTES / 1e9:.0f} GB")
    d.add_argument("--size", type=int, default=None, help="write a prepared copy at this grid (see prepare)")
    p = sub.add_parser("prepare", help="a copy of local SEVIR events at one grid, one frame per chunk")
    p.add_argument("--catalog", required=True, help="the SEVIR CATALOG.csv")
    p.add_argument("--root", required=True, help="the folder of its vil/, ir069/, ... files")
    p.add_argument("--out", required=True, help="a new or empty folder for the copy")
    p.add_argument("--size", type=int, required=True, help="grid in pixels: the TARGET_SIZE you will train at")
    p.add_argument("--types", default="vil,ir069,ir107", help="comma-separated: vil, ir069, ir107, lght")
    p.add_argument("--max-events", type=int, default=None, help="at most this many events (earliest first)")
    p.add_argument("--since", default=None, help="events with time_utc after this date (YYYY-MM-DD)")
    p.add_argument("--until", default=None, help="events with time_utc up to this date")
    p.add_argument("--event-type", default=None, help='NWS event type, e.g. "Hail"')
    args = parser.parse_args(argv)
    for option in ("out", "catalog", "root"):
        if getattr(args, option, None) is not None:
            setattr(args, option, path_option(getattr(args, option), f"--{option}"))
    if args.command == "sample":
        t0 = time.time()
        path = make_sample_sevir(args.out, n_events=args.events, seed=args.seed)
        print(f"wrote {path} and its HDF5 files in {time.time() - t0:.1f}s")
    elif args.command == "download":
        download(args.out, tuple(t.strip() for t in args.types.split(",") if t.strip()), args.max_events,
                 args.since, args.until, args.event_type, args.base_url, yes=args.yes, size=args.size)
    elif args.command == "prepare":
        prepare(args.catalog, args.root, args.out, args.size, tuple(t.strip() for t in args.types.split(",") if t.strip()),
                args.max_events, args.since, args.until, args.event_type)


if __name__ == "__main__":
    run_with_exit_status(_cli)
