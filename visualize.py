"""Regenerate metrics.json and every figure of a run from its checkpoint alone.

    python visualize.py outputs/train_synthetic              # best.pt in that folder, test events
    python visualize.py outputs/train_baseline/last.pt --num_samples=5
    python visualize.py outputs/train_baseline --split=val      # the validation events instead

The checkpoint names its script and holds its Config; the script's build_data, build_model and
build_reference rebuild the data, the network and the reference forecast. Outputs go beside the
checkpoint: best.pt on the test events writes metrics.json, predictions.png, ...; another split or
checkpoint tags every name (metrics_val.json, metrics_last.json), so the run's own results stay.
"""
import importlib
import sys
from pathlib import Path

import common


class Config:
    NUM_SAMPLES = 3       # rows in predictions.png
    SPLIT = "test"        # test (the reported events) or val (the events that chose best.pt)
    CMAP = "sevir"        # VIL colours: sevir (the SEVIR colour map) or turbo
    DEVICE = "auto"       # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    CATALOG_PATH = ""     # data location, if not where the checkpoint's run found it
    SEVIR_ROOT = ""       # (both empty: as recorded in the checkpoint)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    paths = [a for a in argv if not a.startswith("-")]
    if len(paths) != 1:
        raise common.UserError("usage: python visualize.py OUT_DIR_or_CHECKPOINT [--num_samples=N] [--device=cpu]")
    opts = common.parse_config(Config, [a for a in argv if a.startswith("-")])
    if opts.CMAP not in ("sevir", "turbo"):
        raise common.UserError(f"--cmap={opts.CMAP!r}: sevir or turbo")
    path = Path(paths[0])
    ckpt_path = path / "best.pt" if path.is_dir() else path
    ckpt = common.load_checkpoint(ckpt_path)
    if ckpt.get("script") not in common.SCRIPTS:          # a checkpoint must not choose which code runs
        raise common.UserError(f"{ckpt_path}: its script {ckpt.get('script')!r} is not one of "
                               f"{', '.join(common.SCRIPTS)}; refused")
    sys.path.insert(0, str(Path(__file__).resolve().parent))       # the scripts beside this file
    script = importlib.import_module(ckpt["script"])

    cfg = script.Config()
    for key, value in ckpt["config"].items():
        setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
    cfg.OUT_DIR, cfg.NUM_WORKERS = str(ckpt_path.parent), 0
    cfg.CATALOG_PATH = opts.CATALOG_PATH or cfg.CATALOG_PATH
    cfg.SEVIR_ROOT = opts.SEVIR_ROOT or cfg.SEVIR_ROOT
    device = common.pick_device(opts.DEVICE)

    if opts.SPLIT not in ("val", "test"):
        raise common.UserError(f"--split={opts.SPLIT!r}: val or test")
    data = script.build_data(cfg)
    model = script.build_model(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    print(f"{ckpt['script']}: epoch {ckpt['epoch']} of {ckpt_path}, {opts.SPLIT} split")
    common.report(model, script.build_reference(cfg, data), data, cfg, device, history=ckpt["history"],
                  extra=ckpt.get("extra"), num_samples=opts.NUM_SAMPLES, split=opts.SPLIT, cmap=opts.CMAP,
                  checkpoint=ckpt_path.name, epoch=ckpt["epoch"])


if __name__ == "__main__":
    common.run(main)
