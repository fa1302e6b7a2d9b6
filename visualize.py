"""Regenerate the scores and every figure of a run from its checkpoint alone.

    python visualize.py outputs/train_synthetic              # best.pt in that folder, test events
    python visualize.py outputs/train_baseline/last.pt --num_samples=5
    python visualize.py outputs/train_baseline --split=val      # the validation events instead

The checkpoint names its script (one of the four train_*.py, which must lie beside this file) and holds
its Config; the script's build_data, build_model and build_reference rebuild the data, the network and
the reference forecast. Outputs go beside the checkpoint: best.pt on the test events writes metrics.json,
predictions.png, ...; another split or checkpoint tags every name (metrics_val.json, metrics_last.json),
so the run's own results are never replaced.
"""
import importlib
import sys
from pathlib import Path

import common


class Config:
    NUM_SAMPLES = 3       # rows in predictions.png (1 to 20)
    SPLIT = "test"        # test (the reported events) or val (the events that chose best.pt)
    CMAP = "sevir"        # VIL colours: sevir (the SEVIR colour map) or turbo
    DEVICE = "auto"       # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    CATALOG_PATH = ""     # data location, if not where the checkpoint's run found it
    SEVIR_ROOT = ""       # (both empty: as recorded in the checkpoint)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:] if common.started_from_file() else []
    paths = [a for a in argv if not a.startswith("-")]
    opts = common.parse_config(Config, [a for a in argv if a.startswith("-")], script="visualize")
    if len(paths) != 1:
        raise common.UserError("usage: python visualize.py OUT_DIR_or_CHECKPOINT [--split=test|val] "
                               "[--num_samples=N] [--device=cpu] (see --help)")
    if not 1 <= opts.NUM_SAMPLES <= 20:
        raise common.UserError(f"--num_samples={opts.NUM_SAMPLES}: from 1 to 20")
    for key, allowed in (("SPLIT", ("test", "val")), ("CMAP", ("sevir", "turbo"))):
        if getattr(opts, key) not in allowed:
            raise common.UserError(f"--{key.lower()}={getattr(opts, key)!r}: one of {', '.join(allowed)}")
    path = Path(common.path_option(paths[0], "the run folder or checkpoint"))
    ckpt_path = path / "best.pt" if path.is_dir() else path
    ckpt = common.load_checkpoint(ckpt_path)
    name = ckpt.get("script")
    if name not in common.SCRIPTS:                 # a checkpoint must not choose which code runs
        raise common.UserError(f"{ckpt_path}: its script {name!r} is not one of {', '.join(common.SCRIPTS)}; refused")
    here = str(Path(__file__).resolve().parent)
    if not (Path(here) / f"{name}.py").is_file():
        raise common.UserError(f"{ckpt_path} was made by {name}.py: put {name}.py beside {Path(__file__).name} "
                               f"(in {here}) to rebuild its model and data")
    sys.path.insert(0, here)
    script = importlib.import_module(name)

    cfg = common.config_from_checkpoint(script.Config, ckpt, ckpt_path, name)    # checked as a command line is
    cfg.OUT_DIR, cfg.NUM_WORKERS = str(ckpt_path.parent), 0
    cfg.CATALOG_PATH = opts.CATALOG_PATH or cfg.CATALOG_PATH
    cfg.SEVIR_ROOT = opts.SEVIR_ROOT or cfg.SEVIR_ROOT
    device = common.pick_device(opts.DEVICE)

    try:
        data = script.build_data(cfg)
    except common.UserError as e:                  # a moved data folder: say where the run read it
        at_defaults = (cfg.CATALOG_PATH, cfg.SEVIR_ROOT) == (common.DEFAULT_CATALOG, common.DEFAULT_ROOT)
        if at_defaults or (Path(cfg.CATALOG_PATH).exists() and Path(cfg.SEVIR_ROOT).is_dir()):
            raise
        raise common.UserError(f"{e}; the run read --catalog_path={cfg.CATALOG_PATH} --sevir_root={cfg.SEVIR_ROOT}: "
                               f"if the data moved, give those two flags with where it is now") from None
    then = ckpt.get("events") or {}
    for split in [s for s in ("test", "val", "train") if s in then and then[s] != cfg.events[s]]:
        old, now = then[split], cfg.events[split]
        print(f"warning: the data changed since this run: its {split} events were {old['n']} "
              f"({old['first']} .. {old['last']}), now {now['n']} ({now['first']} .. {now['last']})"
              + (", other events" if (old["n"], old["first"], old["last"]) == (now["n"], now["first"], now["last"])
                 else "") + "; the scores below are on the data as it is now", file=sys.stderr)
    model = script.build_model(cfg).to(device)
    common.load_weights(model, ckpt_path)
    print(f"{name}: epoch {ckpt['epoch']} of {ckpt_path}, {opts.SPLIT} events")
    history = ckpt["history"]                      # up to the checkpoint's epoch; the run's own curve is longer
    run_history = ckpt_path.parent / "history.csv"
    if run_history.is_file():                      # the whole run's curve, if the file is still the run's own
        import pandas as pd
        columns = ("epoch", "train_loss", "val_loss")
        try:
            table = pd.read_csv(run_history)
            numeric = all(pd.api.types.is_numeric_dtype(table.get(c, "")) for c in columns)
            rows = table.to_dict("records") if numeric else []
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
            rows = []
        if rows and len(rows) >= len(history):
            history = rows
        else:
            print(f"warning: {run_history} is not the run's history as it wrote it: the curve is the checkpoint's",
                  file=sys.stderr)
    with common.locked(ckpt_path.parent):          # not while a run writes there
        common.test_and_report(model, script.build_reference(cfg, data), data, cfg, device, history=history,
                      extra=ckpt.get("extra"), num_samples=opts.NUM_SAMPLES, split=opts.SPLIT, cmap=opts.CMAP,
                      checkpoint=ckpt_path.name, epoch=ckpt["epoch"])


if __name__ == "__main__":
    common.run_with_exit_status(main)
