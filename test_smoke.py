"""Smoke tests: tiny generated SEVIR data in temporary folders, no network, no GPU.

    pytest test_smoke.py
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --------------------------------------------------------------------------------------
# Shared fakes: tiny generated data, scripts run in this process, figures not built (placeholders)
# --------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


TINY = ["--target_size=32", "--base=4", "--epochs=1", "--batch_size=8", "--max_train=1", "--max_val=1"]


# Genuine rows of SEVIR's CATALOG.csv (from the 2019 H1 excerpt in shared/data): one event with
# vil, ir069 and ir107, and a vil row with pct_missing > 0.
REAL_ROWS = """\
id,file_name,file_index,img_type,time_utc,minute_offsets,episode_id,event_id,event_type,llcrnrlat,llcrnrlon,urcrnrlat,urcrnrlon,proj,size_x,size_y,height_m,width_m,data_min,data_max,pct_missing
S834603,vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5,0,vil,2019-05-12 18:30:00,-120:-115:-110:-105:-100:-95:-90:-85:-80:-75:-70:-65:-60:-55:-50:-45:-40:-35:-30:-25:-20:-15:-10:-5:0:5:10:15:20:25:30:35:40:45:50:55:60:65:70:75:80:85:90:95:100:105:110:115:120,138793,834603,Flood,29.86291091,-100.8555301,33.35231856,-96.83814671,+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere ,384,384,384000,384000,0,112,0
S821019,vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5,2,vil,2019-06-17 01:00:00,-120:-115:-110:-105:-100:-95:-90:-85:-80:-75:-70:-65:-60:-55:-50:-45:-40:-35:-30:-25:-20:-15:-10:-5:0:5:10:15:20:25:30:35:40:45:50:55:60:65:70:75:80:85:90:95:100:105:110:115:120,136841,821019,Thunderstorm Wind,28.83119954,-91.9161975,31.98198081,-87.61673625,+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere ,384,384,384000,384000,0,254,0.249134712
S834603,ir107/2019/SEVIR_IR107_STORMEVENTS_2019_0101_0630.h5,0,ir107,2019-05-12 18:30:00,-121:-116:-111:-106:-101:-96:-91:-86:-81:-76:-71:-66:-61:-56:-51:-46:-41:-36:-31:-26:-21:-16:-11:-6:-1:4:9:14:19:24:29:34:39:44:49:54:59:64:69:74:79:84:89:94:99:104:109:114:119,138793,834603,Flood,29.86291091,-100.8555301,33.35231856,-96.83814671,+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere ,192,192,384000,384000,-26.26375961,32.82101059,0
S834603,ir069/2019/SEVIR_IR069_STORMEVENTS_2019_0101_0630.h5,0,ir069,2019-05-12 18:30:00,-121:-116:-111:-106:-101:-96:-91:-86:-81:-76:-71:-66:-61:-56:-51:-46:-41:-36:-31:-26:-21:-16:-11:-6:-1:4:9:14:19:24:29:34:39:44:49:54:59:64:69:74:79:84:89:94:99:104:109:114:119,138793,834603,Flood,29.86291091,-100.8555301,33.35231856,-96.83814671,+proj=laea +lat_0=38 +lon_0=-98 +units=m +a=6370997.0 +ellps=sphere ,192,192,384000,384000,-34.65353394,-16.16814232,0
"""


VIL_FILE = "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5"


ALL_MODS = ("vil", "ir069", "ir107", "lght")


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """A 5-event generated sample (3 before 2019-06-01, 2 after): (catalog, root)."""
    root = tmp_path_factory.mktemp("sample")
    return common.make_sample_sevir(root, n_events=5, seed=0), root


def copy_sample(sample, root):
    """make_sample_sevir(root), made faster: a copy of the session's sample (its HDF5 files linked: only read)."""
    import shutil
    shutil.copytree(sample[1], root, dirs_exist_ok=True, copy_function=lambda src, dst: os.path.exists(dst) or (
        os.link if src.endswith(".h5") else shutil.copy)(src, dst))
    return Path(root) / "CATALOG.csv"


@pytest.fixture
def own_sample(tmp_path, sample):
    """A copy of the session's sample that the test may change: (catalog, root)."""
    import shutil
    shutil.copytree(sample[1], tmp_path / "own")
    return tmp_path / "own" / "CATALOG.csv", tmp_path / "own"


FIGURES = ("visualize_predictions", "visualize_multimodal", "plot_loss", "plot_skill", "plot_spectrum", "forecast_gif")
DRAW = {name: getattr(common, name) for name in FIGURES}                 # as the scripts draw


@pytest.fixture(autouse=True)
def quick_figures(monkeypatch):
    """Figures are not built: each figure function writes a placeholder at its path (building and drawing are
    half of a tiny run's time). The tests of the figures, and one run of each script, ask for `drawn_figures`;
    the scripts that run_alone runs draw theirs."""
    figure_placeholders(monkeypatch)


def undo(monkeypatch):
    """monkeypatch.undo(), the figures still placeholders."""
    monkeypatch.undo()
    figure_placeholders(monkeypatch)


def figure_placeholders(monkeypatch):
    monkeypatch.setattr(common, "FIGURE_DPI", 20)

    def placeholder(*args, path=None, **kwargs):                        # the path: a keyword or the last argument
        common.write_atomically(path or args[-1], lambda tmp: Path(tmp).write_bytes(b"figure not drawn"))
    for name in FIGURES:
        monkeypatch.setattr(common, name, placeholder)


@pytest.fixture
def drawn_figures(monkeypatch):
    """Figures drawn as the scripts draw them (at a quarter of their resolution)."""
    for name, draw in DRAW.items():
        monkeypatch.setattr(common, name, draw)


def run_script(script, *args, cwd):
    """`python script args` as common.run runs it, in this process (no second import of torch): the exit
    status, stdout and stderr, as subprocess.run gives them. A bug's exception propagates as it is."""
    import importlib
    module = importlib.import_module(script[:-3])
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                common.run_with_exit_status(lambda: module.main(list(args)))
                code = 0
            except SystemExit as e:
                code = e.code or 0
    finally:
        os.chdir(here)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_alone(script, *args, cwd, beside=("common.py",)):
    """`python script args` for a copy of script in a folder that holds only it and `beside` (as in Colab), in
    this process: that folder alone on sys.path in place of this one, common imported from it anew."""
    import runpy
    import shutil
    alone = Path(cwd) / f"alone_{Path(script).stem}"
    alone.mkdir(exist_ok=True)
    for name in (script, *beside):
        shutil.copy(HERE / name, alone / name)
    ours = [n for n in sys.modules if n in ("common", "visualize") or n.startswith("train_")]
    saved = {n: sys.modules.pop(n) for n in ours}, list(sys.path), sys.argv, os.getcwd()
    sys.path[:] = [str(alone)] + [p for p in sys.path if p and Path(p).resolve() != HERE]
    sys.argv = [str(alone / script), *args]
    out, err = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(alone / script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code or 0
        loaded = sys.modules.get("common")
        assert loaded is not None and Path(loaded.__file__).parent == alone     # common came from beside it
    finally:
        for n in [n for n in sys.modules if n in ("common", "visualize") or n.startswith("train_")]:
            del sys.modules[n]
        sys.modules.update(saved[0])
        sys.path[:], sys.argv = saved[1], saved[2]
        os.chdir(saved[3])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def one_line_error(fn, capsys):
    """Run fn as a script's command line runs it; return (exit status, stderr) and check it is one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_with_exit_status(fn)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return e.value.code, err


def bytes_read_per_item(dataset, n):
    """Bytes this process reads from files (Linux /proc/self/io rchar) per item, over items 1..n (item 0 opens
    the files)."""
    def rchar():
        return int(next(line.split()[1] for line in open("/proc/self/io") if line.startswith("rchar")))
    dataset[0]
    before = rchar()
    for i in range(1, n + 1):
        dataset[i]
    return (rchar() - before) / n


def data_args(sample):
    catalog, root = sample
    return [f"--catalog_path={catalog}", f"--sevir_root={root}"]


def write_vil_file(path, n, frame_fn=None, ids=None):
    """A SEVIR-layout VIL file: `vil` (n, 384, 384, 49) uint8, `id` byte strings (S0, S1, ... by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["id"] = np.array([(ids[i] if ids else f"S{i}").encode() for i in range(n)])
        if frame_fn is None:                         # storage allocated (so not "never written"), left sparse
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            h5py.h5d.create(f.id, b"vil", h5py.h5t.NATIVE_UINT8, h5py.h5s.create_simple((n, 384, 384, 49)), dcpl=dcpl)
            return
        d = f.create_dataset("vil", (n, 384, 384, 49), dtype=np.uint8)
        for i in range(n):
            d[i] = frame_fn(i)


def vil_catalog(tmp_path, rows, frame_fn=None):
    """CATALOG.csv of VIL rows made from a genuine row with changed fields, and the VIL file they index."""
    good = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False).iloc[0]
    table = pd.DataFrame([{**good.to_dict(), **changes} for changes in rows])
    table.to_csv(tmp_path / "CATALOG.csv", index=False)
    ids = {int(r.get("file_index", good["file_index"])): r["id"] for r in rows}
    write_vil_file(tmp_path / VIL_FILE, max(ids) + 1, frame_fn, [ids.get(i, "?") for i in range(max(ids) + 1)])
    return tmp_path / "CATALOG.csv"


@pytest.fixture()
def indexed_files(tmp_path):
    """Files whose every frame encodes its own time index; the top half of each image is marked.

    vil code = 2 t + 1 (top rows) or 2 t (bottom rows); ir = 100 t + 50 (top) or 100 t (bottom).
    """
    rows = np.arange(384)[:, None, None] < 192                       # (H, 1, 1)
    t = np.arange(49)[None, None, :]                                 # (1, 1, T)
    write_vil_file(tmp_path / VIL_FILE, 2, lambda i: np.broadcast_to(2 * t + rows, (384, 384, 49)),
                   ids=["S834603", "S821019"])
    base = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False)
    for mod in ("ir069", "ir107"):
        path = tmp_path / f"{mod}/2019/SEVIR_{mod.upper()}_STORMEVENTS_2019_0101_0630.h5"
        path.parent.mkdir(parents=True)
        top = np.arange(192)[:, None, None] < 96
        with h5py.File(path, "w") as f:
            f["id"] = np.array([b"S834603"])
            f[mod] = np.broadcast_to(100 * t + 50 * top, (1, 192, 192, 49)).astype(np.int16)
    base.to_csv(tmp_path / "CATALOG.csv", index=False)
    return common.load_catalog(tmp_path / "CATALOG.csv", tmp_path), tmp_path


def moving_blob(t_in, t_out, step=(1, 2), size=48, channels=1, vil_channel=0):
    """x (1, channels, t_in, S, S), y (1, 1, t_out, S, S): a Gaussian blob moving `step` = (dx, dy) pixels
    a frame, VIL at vil_channel."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    def frame(k):
        cx, cy = 12 + step[0] * k, 14 + step[1] * k
        return 0.9 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0 ** 2))
    frames = torch.stack([frame(k) for k in range(t_in + t_out)])
    x = torch.zeros(1, channels, t_in, size, size)
    x[0, vil_channel] = frames[:t_in]
    return x, frames[None, None, t_in:]


def centre(field):
    """(x, y) centre of mass of a (H, W) field."""
    yy, xx = torch.meshgrid(torch.arange(field.shape[0]).float(), torch.arange(field.shape[1]).float(), indexing="ij")
    return float((field * xx).sum() / field.sum()), float((field * yy).sum() / field.sum())


class Cfg:
    EPOCHS = 3             # passes
    LR = 1e-3              # learning rate
    RESUME = False         # continue
    MODALITIES = ("vil", "ir069")  # inputs
    T_IN = 12              # frames in
    T_OUT = 1              # frames out
    TARGET_SIZE = 128      # grid
    BATCH_SIZE = 4         # batch


class FitCfg:
    EPOCHS, BATCH_SIZE, NUM_WORKERS, SEED, RESUME, OVERWRITE = 3, 2, 0, 0, False, False
    script = "train_synthetic"


REFERENCE = {"train_baseline.py": "persistence", "train_multimodal.py": "persistence",
             "train_synthetic.py": "ir_lookup", "train_advanced.py": "ir_lookup"}


KERNEL_ARGV = ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f", "/root/.local/kernel-7.json",
               "--HistoryManager.hist_file=:memory:", "--IPKernelApp.parent_handle=12", "--Session.key=b''"]


def edit_config(text, **values):
    """The script's text with Config values replaced, as a user edits them in a notebook cell."""
    import re
    for key, value in values.items():
        text, n = re.subn(rf"^(    {key} = ).*?(\s+#)", lambda m: m.group(1) + repr(value) + m.group(2), text,
                          count=1, flags=re.M)
        assert n == 1, key
    return text


def run_in_cell(text, argv=KERNEL_ARGV):
    """Execute text as a notebook cell does: as __main__, with no file behind it and the kernel's sys.argv."""
    import types
    cell = types.ModuleType("__main__")
    saved = sys.modules["__main__"], sys.argv
    sys.modules["__main__"], sys.argv = cell, list(argv)
    try:
        exec(compile(text, "<cell>", "exec"), cell.__dict__)
    finally:
        sys.modules["__main__"], sys.argv = saved
    return cell.__dict__


@pytest.fixture(scope="session")
def bucket_files(tmp_path_factory, sample):
    """The session sample's files laid out as a bucket: CATALOG.csv and data/<type>/... (hard links: only read)."""
    import shutil
    root = tmp_path_factory.mktemp("bucket")
    shutil.copytree(sample[1], root / "data", copy_function=os.link)
    (root / "data" / "CATALOG.csv").rename(root / "CATALOG.csv")
    return root


@pytest.fixture()
def bucket(tmp_path, bucket_files):
    """A SEVIR-like bucket (CATALOG.csv, data/<type>/...) served on 127.0.0.1, counting bytes. Its HDF5 files
    are hard links to the session's (only read); its catalog is a copy each test may edit."""
    import http.server
    import shutil
    import threading
    root = tmp_path / "bucket"
    shutil.copytree(bucket_files / "data", root / "data", copy_function=os.link)
    shutil.copy(bucket_files / "CATALOG.csv", root / "CATALOG.csv")
    state = {"served": 0, "fail_next": 0, "limit": None, "paths": [], "extra": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["paths"].append(self.path)
            path = root / self.path.lstrip("/")
            if state["fail_next"] > 0:
                state["fail_next"] -= 1
                return self.send_error(503)
            if not path.is_file():
                return self.send_error(404)
            size = path.stat().st_size
            start, stop = 0, size
            if "Range" in self.headers:
                a, b = self.headers["Range"].split("=")[1].split("-")
                start, stop = int(a), min(int(b) + 1, size)
            if state["limit"] is not None and state["served"] + stop - start > state["limit"]:
                return self.send_error(403)
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read(stop - start) + b"x" * state["extra"]          # a mirror that sends too much
            self.send_response(206 if "Range" in self.headers else 200)
            if "Range" in self.headers:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            state["served"] += len(body)                                # counted before the client can have it
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, state
    server.shutdown()


def earthformer_events(catalog, start, end):
    """Earthformer's SEVIRDataLoader event selection for VIL, restated from its documented rules:
    start < time_utc <= end, then pct_missing == 0, then ids with exactly one row per type."""
    c = pd.read_csv(catalog, parse_dates=["time_utc"], low_memory=False)
    if start is not None:
        c = c[c.time_utc > pd.Timestamp(start)]
    if end is not None:
        c = c[c.time_utc <= pd.Timestamp(end)]
    c = c[(c.pct_missing == 0) & (c.img_type == "vil")]
    return sorted(c.groupby("id").filter(lambda g: len(g) == 1)["id"])


# --------------------------------------------------------------------------------------
# 1. Data: what one item is (SEVIRVIL, SEVIRMultimodal, SyntheticRadarDataset), the loaders
# --------------------------------------------------------------------------------------

def test_the_notebooks_dataset_calls_run_as_written_and_give_the_scripts_items(sample):
    catalog, root = sample
    events = common.load_catalog(catalog, root)
    notebook = common.SEVIRVIL(str(catalog), str(root), t_in=12, t_out=1, limit=2, start_idx=1)   # notebook 05
    ours = common.SEVIRVIL(events.iloc[1:3], root, t_in=12, t_out=1)                      # as the scripts build it
    x, y = notebook[40]                                                   # event 2, frames 3-14
    assert x.shape == (1, 12, 384, 384) and y.shape == (1, 1, 384, 384) and len(notebook) == len(ours) == 2 * 37
    assert all(torch.equal(a, b) for a, b in zip((x, y), ours[40])) and not torch.equal(x, notebook[41][0])
    df = pd.read_csv(catalog, low_memory=False, dtype={"minute_offsets": "string"})   # as notebooks 06 and 07
    table = events.iloc[[3, 0, 4]].reset_index(drop=True)                  # in the order the ids are given
    ids = list(table["id"])
    mods = ("vil", "ir069", "ir107")
    notebook = common.SEVIRMultimodal(df, root, ids, mods=mods, t_in=12, t_out=1, target_size=64)
    ours = common.SEVIRMultimodal(table, root, mods=mods, t_in=12, t_out=1, target_size=64)
    x, y = notebook[37 + 5]                                                # event 0, frames 5-17
    assert x.shape == (3, 12, 64, 64) and y.shape == (1, 1, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip((x, y), ours[37 + 5])) and not torch.equal(y, notebook[5][1])
    notebook = common.SyntheticRadarDataset(df, root, ids, input_mods=mods[1:], t_sample=24, target_size=64)
    ours = common.SyntheticRadarDataset(table, root, input_mods=mods[1:], t_sample=None, target_size=64)
    x, y = notebook[1]                                                     # event 0, frame 24: one per event
    assert len(notebook) == 3 and x.shape == (2, 64, 64) and y.shape == (1, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip((x, y), ours[49 + 24])) and not torch.equal(y, ours[49 + 23][1])


def test_sevirvil_returns_true_time_order_and_image_rows(indexed_files):
    events, root = indexed_files
    ds = common.SEVIRVIL(events, root, t_in=12, t_out=3, target_size=None, train=False)
    assert len(ds) == 3                                              # windows start at 0, 12, 24
    for i, start in enumerate([0, 12, 24]):
        x, y = ds[i]
        assert x.shape == (1, 12, 384, 384) and y.shape == (1, 3, 384, 384)
        codes = torch.cat([x, y], 1)[0] * 255                       # (T, H, W)
        for k in range(15):
            assert torch.allclose(codes[k, :192], torch.tensor(2.0 * (start + k) + 1))   # top rows
            assert torch.allclose(codes[k, 192:], torch.tensor(2.0 * (start + k)))       # bottom rows


def test_training_takes_every_window_in_a_seeded_order(indexed_files):
    events, root = indexed_files
    ds = common.SEVIRVIL(events, root, t_in=4, t_out=1, target_size=48, train=True)
    assert len(ds) == len(events) * (49 - 5 + 1)                    # every window of every event
    x, y = ds[7]                                                     # event 0, window starting at frame 7
    assert round(float(x[0, 0, -1, 0]) * 255 / 2) == 7 and round(float(y[0, 0, -1, 0]) * 255 / 2) == 11
    sampler = common.EpochSampler(len(ds), shuffle=True, seed=0, batch_size=4)
    orders = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(len(ds))) and orders[0] != orders[1] and orders[0] == orders[2]
    other = common.EpochSampler(len(ds), shuffle=True, seed=1, batch_size=4)
    other.set_epoch(1)
    assert list(other) != orders[0]


def test_multimodal_and_synthetic_read_the_same_time(indexed_files):
    events, root = indexed_files
    shift, scale = common.SEVIR_ZSCORE["ir107"]
    mm = common.SEVIRMultimodal(events, root, mods=("vil", "ir069", "ir107"), t_in=12, t_out=1,
                                target_size=192, train=False)
    x, y = mm[1]                                                     # window starting at frame 12
    assert x.shape == (3, 12, 192, 192) and y.shape == (1, 1, 192, 192)
    raw_ir = x[2] * scale + shift                                    # back to deg C x 100
    for k in range(12):
        assert abs(float(raw_ir[k, 0, 0]) - (100 * (12 + k) + 50)) < 0.5      # top row
        assert abs(float(raw_ir[k, -1, 0]) - 100 * (12 + k)) < 0.5           # bottom row
        assert abs(float(x[0, k, -1, 0]) * 255 - 2 * (12 + k)) < 1e-3        # VIL resized 384 -> 192
    assert abs(float(y[0, 0, -1, 0]) * 255 - 2 * 24) < 1e-3

    syn = common.SyntheticRadarDataset(events, root, input_mods=("ir069", "ir107"), t_sample=None, target_size=96, train=False)
    assert [syn.windows[i][1] for i in range(len(syn))] == list(range(0, 49, 4))
    x, y = syn[6]                                                     # frame 24
    assert x.shape == (2, 96, 96) and y.shape == (1, 96, 96)
    assert abs(float(x[1, -1, 0]) * scale + shift - 2400) < 0.5
    assert abs(float(y[0, -1, 0]) * 255 - 48) < 1e-3
    minmax = common.SEVIRMultimodal(events, root, mods=("vil", "ir107"), t_in=2, t_out=1, target_size=96,
                                    train=False, ir_norm="minmax")
    assert float(minmax[0][0][1].min()) == 0.0 and float(minmax[0][0][1].max()) == pytest.approx(1.0)


def test_lightning_rasterisation_is_causal():
    t0 = -120 * 60                                 # time of frame 0; frame k is at t0 + 300 k seconds
    flashes = np.array([
        # t (s),          lat, lon,  x,    y
        [t0 - 600, 0, 0, 3.5, 2.2],          # before frame 0: frame 0
        [t0, 0, 0, 3.9, 2.0],                # exactly at frame 0's time: frame 0
        [t0 + 1, 0, 0, 3.9, 2.0],            # one second later: frame 1, not 0
        [t0 + 300, 0, 0, 0.0, 47.99],        # exactly at frame 1's time: frame 1, bottom-left corner
        [0, 0, 0, 10.0, 10.0],               # at time_utc (frame 24)
        [1, 0, 0, 11.0, 10.0],               # one second after time_utc: frame 25
        [7200, 0, 0, 47.5, 0.0],             # +120 min: the last frame, top-right corner
        [7201, 0, 0, 47.5, 0.0],             # after the last frame: in no frame
        [0, 0, 0, 48.0, 5.0],                # off the grid (x = 48)
        [0, 0, 0, -0.5, 5.0],                # off the grid (x < 0)
    ], dtype=np.float32)
    grid = common.lightning_to_grid(flashes)
    assert grid.shape == (49, 48, 48) and grid.sum() == 7
    assert grid[0, 2, 3] == 2 and grid[1, 2, 3] == 1 and grid[1, 47, 0] == 1 and grid[48, 0, 47] == 1
    assert grid[24, 10, 10] == 1 and grid[24, 10, 11] == 0 and grid[25, 10, 11] == 1
    assert common.lightning_to_grid(np.zeros((0, 5))).sum() == 0


def test_downsampling_keeps_the_mean_and_a_single_bright_pixel(tmp_path):
    rng = np.random.default_rng(0)
    field = rng.integers(0, 200, (384, 384, 1), dtype=np.uint8).repeat(49, axis=2)
    spike = np.zeros((384, 384, 49), np.uint8)
    spike[201, 202] = 254                                           # one bright pixel between the 4 x 4 blocks' centres
    catalog = vil_catalog(tmp_path, [{"id": "S1"}, {"id": "S2", "file_index": "1"}],
                          lambda i: field if i == 0 else spike)
    events = common.load_catalog(catalog, tmp_path, mods=("vil",))
    ds = common.SEVIRVIL(events, tmp_path, t_in=1, t_out=1, target_size=96, train=False)
    noisy, bright = ds[0][0], ds[len(ds) // 2][0]                        # (1, 1, 96, 96)
    assert float(noisy.mean()) * 255 == pytest.approx(float(field.mean()), rel=0.01)
    assert float(bright.sum()) * 255 * 16 == pytest.approx(254, rel=0.01)            # its mass is kept
    assert float(bright.max()) > 0


def test_events_that_fit_in_memory_are_read_once_and_give_the_same_items(sample, monkeypatch):
    catalog, root = sample
    events = common.load_catalog(catalog, root)
    for make in (lambda: common.SEVIRVIL(events, root, t_in=4, t_out=2, target_size=48),
                 lambda: common.SEVIRMultimodal(events, root, mods=ALL_MODS[:3], t_in=3, target_size=48, ir_norm="minmax", train=False),
                 lambda: common.SyntheticRadarDataset(events, root, t_sample=None, target_size=48)):
        kept, read = make(), make()
        read.reader.cache_mb = 0                                         # each item read from its file
        for i in range(0, len(kept), 3):
            assert all(torch.equal(a, b) for a, b in zip(kept[i], read[i])), (type(kept).__name__, i)
        assert len(kept.reader._events) == len(kept.reader.paths) * len(events) and not read.reader._events
    native = common.SEVIRMultimodal(events, root, mods=ALL_MODS[:3], t_in=3, target_size=192, train=False)    # IR is not resized
    native[0]
    assert list(native.reader._events) == [("vil", 0)]
    kept, read = (common.SEVIRVIL(events, root, t_in=4, t_out=2, target_size=48) for _ in range(2))
    read.reader.cache_mb = 0
    assert bytes_read_per_item(kept, 40) < 0.01 * bytes_read_per_item(read, 40)   # event 0's windows
    too_many = common.SEVIRVIL(events, root, t_in=4, t_out=2, target_size=48)
    too_many.reader.cache_mb = 5 * 49 * 48 * 48 * 4 / 2 ** 20 * 0.99                          # just below the five events
    too_many[0]
    assert not too_many.reader._events
    too_many.reader.cache_mb *= 1.5                                          # room for them, but not in each of 2 workers
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(num_workers=2))
    too_many[0]
    assert not too_many.reader._events
    undo(monkeypatch)
    too_many[0]
    assert list(too_many.reader._events) == [("vil", 0)]


def test_a_file_truncated_during_a_run_is_skipped_not_read_as_zeros(tmp_path, capsys):
    catalog = vil_catalog(tmp_path, [{"id": "S0", "file_index": "0"}, {"id": "S1", "file_index": "1"}],
                          lambda i: np.full((384, 384, 49), 100, np.uint8))
    events = common.load_catalog(catalog, tmp_path, mods=("vil",))
    ds = common.SEVIRVIL(events, tmp_path, t_in=2, t_out=1, target_size=32, train=False)
    assert float(ds[0][0].mean()) * 255 == pytest.approx(100)
    with open(tmp_path / VIL_FILE, "r+b") as f:                       # cut while the dataset has it open
        f.truncate(os.path.getsize(tmp_path / VIL_FILE) - 7_000_000)
    assert ds[len(ds) - 1] is None and "truncated" in capsys.readouterr().err
    write_vil_file(tmp_path / VIL_FILE, 1, lambda i: np.full((384, 384, 49), 100, np.uint8), ids=["S0"])   # fewer events
    assert ds[len(ds) - 1] is None and "now holds 1 events, not event 1" in capsys.readouterr().err
    assert ds[0] is not None


def test_a_file_that_goes_bad_is_skipped_then_stops_past_ten_percent(own_sample, capsys):
    catalog, root = own_sample
    events = common.load_catalog(catalog, root, mods=("vil",))
    ds = common.SEVIRVIL(events, root, t_in=2, t_out=1, target_size=16, train=True)
    ids = ds.reader.ids
    random_event = int(np.flatnonzero(ids == next(i for i in ids if i.startswith("R")))[0])
    broken = Path(ds.reader.paths["vil"][ds.reader.file_idx["vil"][random_event]])
    broken.write_bytes(b"truncated" * 10)                         # valid at indexing, bad now
    item = int(np.flatnonzero(ds.windows[:, 0] == random_event)[0])
    assert ds[item] is None and ds[0] is not None
    assert "skipped event R" in capsys.readouterr().err

    def loader(items):
        return torch.utils.data.DataLoader(items, batch_size=4, collate_fn=common.collate_skipping)
    good = (torch.zeros(1), torch.zeros(1))
    got = list(common.batches(loader([good] * 19 + [None]), "training"))     # 5%: goes on
    assert sum(len(x) for x, _ in got) == 19
    with pytest.raises(common.RunError, match="3 of 20 training samples could not be read"):
        list(common.batches(loader([None] * 3 + [good] * 17), "training"))


def test_a_file_swapped_for_one_of_other_events_is_skipped_not_read(tmp_path, own_sample, capsys):
    import shutil
    catalog, root = own_sample
    ds = common.SEVIRVIL(common.load_catalog(catalog, root, mods=("vil",)), root, t_in=2, t_out=1, target_size=16)
    assert ds[0] is not None
    path = Path(ds.reader.paths["vil"][ds.reader.file_idx["vil"][0]])
    shutil.copy(path, tmp_path / "swap.h5")
    with h5py.File(tmp_path / "swap.h5", "r+") as f:                    # the same shape, other events' ids
        f["id"][...] = np.array([f"X{i}" for i in range(len(f["id"]))], dtype=f["id"].dtype)
    os.replace(tmp_path / "swap.h5", path)
    ds.reader._forget(pid=None)                                          # as a new DataLoader worker opens it
    assert ds[0] is None
    err = capsys.readouterr().err
    assert f"skipped event {ds.reader.ids[0]}" in err and f"not {ds.reader.ids[0]} (replaced since?)" in err


def test_an_event_allocated_but_never_written_is_skipped_not_read_as_zeros(tmp_path, capsys):
    path = tmp_path / VIL_FILE
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:                                    # a writer that stopped after event 0
        f["id"] = np.array([b"S0", b"S1"])
        f.create_dataset("vil", (2, 384, 384, 49), dtype=np.uint8)[0] = np.full((384, 384, 49), 7, np.uint8)
    events = pd.DataFrame({"id": ["S0", "S1"], "vil_file": [VIL_FILE] * 2, "vil_index": [0, 1]})
    ds = common.SEVIRVIL(events, tmp_path, t_in=2, t_out=1, target_size=16, train=False)
    x, _ = ds[0]
    assert torch.allclose(x, torch.full_like(x, 7 / 255)) and ds[len(ds) - 1] is None
    assert "skipped event S1" in capsys.readouterr().err


def test_workers_give_the_same_metrics(tmp_path, sample):
    import train_baseline
    args = TINY + ["--t_in=3"] + data_args(sample)
    train_baseline.main(args + [f"--out_dir={tmp_path / 'w0'}"])
    train_baseline.main(args + [f"--out_dir={tmp_path / 'w2'}", "--num_workers=1"])
    w0 = json.loads((tmp_path / "w0/metrics.json").read_text())
    w2 = json.loads((tmp_path / "w2/metrics.json").read_text())
    assert w0["model"] == w2["model"] and w0["persistence"] == w2["persistence"]


# --------------------------------------------------------------------------------------
# 2. Models: the notebooks' networks, then the nowcasters added
# --------------------------------------------------------------------------------------

def test_the_notebooks_calls_build_the_same_networks_and_figures(tmp_path, sample, monkeypatch, capsys,
                                                                  drawn_figures):
    """Each class and figure function called exactly as notebooks 05, 06, 07 and 07A call them."""
    model = common.NowcastNet(12, 1)                                   # NowcastNet(Config.T_IN, Config.T_OUT)
    assert model(torch.rand(2, 1, 12, 16, 16)).shape == (2, 1, 1, 16, 16)
    notebook = {f"{name}.{p}": torch.randn(shape if p == "weight" else shape[:1])   # notebook 05's layers
                for name, shape in (("enc1", (32, 1, 3, 3, 3)), ("enc2", (64, 32, 3, 3, 3)), ("enc3", (128, 64, 3, 3, 3)),
                                    ("dec1", (64, 128, 3, 3, 3)), ("dec2", (32, 64, 3, 3, 3)), ("out", (1, 32, 1, 1, 1)))
                for p in ("weight", "bias")}
    model.load_state_dict(notebook)                                    # strict: the same names and shapes
    assert common.count_parameters(model) == pytest.approx(555e3, rel=0.01)           # base 32
    mm = common.MultimodalNowcastNet(3, 12, 1)                         # in_channels=3, t_in=12, t_out=1
    assert mm(torch.rand(2, 3, 12, 16, 16)).shape == (2, 1, 1, 16, 16) and mm.enc1.in_channels == 3
    assert mm.enc1.out_channels == 32                                  # base stays 32
    assert common.MultimodalNowcastNet(in_channels=1, t_in=12, t_out=3, base=8)(
        torch.rand(1, 1, 12, 8, 8)).shape == (1, 1, 3, 8, 8)
    unet = common.SyntheticRadarUNet(in_channels=2, out_channels=1, base=32)
    assert unet(torch.rand(2, 2, 32, 32)).shape == (2, 1, 32, 32)
    deep = common.AdvancedUNet(in_channels=2, out_channels=1)
    assert deep(torch.rand(2, 2, 64, 64)).shape == (2, 1, 64, 64)
    for net, levels in ((unet, 4), (deep, 5)):                         # the notebooks' layer names: their weights load
        names = {k.split(".")[0] for k in net.state_dict()}
        assert names == {"bottleneck", "out", *(f"{n}{i}" for n in ("enc", "up", "dec") for i in range(1, levels + 1))}
    assert {k for k in deep.state_dict() if k.startswith("bottleneck.3.")} and "enc5.1.conv2.weight" in deep.state_dict()

    def offline(*args, **kwargs):                                      # never download weights in a test
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    vgg = common.VGGPerceptualLoss()
    assert vgg.backbone == "untrained" and "VGG16 ImageNet weights unavailable" in capsys.readouterr().out
    assert vgg(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).ndim == 0

    monkeypatch.chdir(tmp_path)
    events = common.load_catalog(sample[0], sample[1])
    val_dataset = common.SEVIRVIL(events, sample[1], t_in=12, t_out=1, target_size=16, train=False)
    common.visualize_predictions(model, val_dataset, torch.device("cpu"), num_samples=3)
    assert (tmp_path / "predictions.png").stat().st_size > 0
    (tmp_path / "predictions.png").unlink()

    class config:                                                      # notebook 06's Config
        MODALITIES = ("vil", "ir069", "ir107")
    val_mm = common.SEVIRMultimodal(events, sample[1], mods=config.MODALITIES, t_in=12, t_out=1, target_size=16,
                                    train=False)
    common.visualize_multimodal(mm, val_mm, torch.device("cpu"), config, num_samples=2)
    assert (tmp_path / "predictions.png").stat().st_size > 0


def test_models_shapes_and_parameter_counts():
    assert common.NowcastNet(6, t_out=3, base=4)(torch.rand(2, 1, 6, 16, 16)).shape == (2, 1, 3, 16, 16)
    assert common.MultimodalNowcastNet(3, 6, t_out=1, base=4)(torch.rand(1, 3, 6, 16, 16)).shape == (1, 1, 1, 16, 16)
    assert common.SyntheticRadarUNet(2, 1, base=4)(torch.rand(1, 2, 32, 32)).shape == (1, 1, 32, 32)
    assert common.AdvancedUNet(3, 1, base=4)(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert common.count_parameters(common.SyntheticRadarUNet(2, 1, 32)) == pytest.approx(7.77e6, rel=0.01)
    assert common.count_parameters(common.AdvancedUNet(2, 1, 32)) == pytest.approx(94.0e6, rel=0.01)
    def residual_blocks(net):
        return sum(isinstance(m, common.ResidualBlock) for m in net.modules())
    assert residual_blocks(common.AdvancedUNet(2, 1, 4)) == 5 + 3                            # notebook 07A
    import train_advanced
    cfg = common.parse_config(train_advanced.Config, ["--bottleneck_blocks=1"])
    assert residual_blocks(train_advanced.build_model(cfg)) == 5 + 1
    assert common.count_parameters(common.NowcastNet(12, 1, 32)) == pytest.approx(555e3, rel=0.01)


def test_advanced_unet_output_is_clipped_with_the_gradient_passed_through():
    """Values in [0, 1] with exact zeros (no sigmoid haze); a pixel clipped at 0 whose truth is rain still
    gets a gradient (a plain clamp would give none), and one whose truth is 0 gets none."""
    torch.manual_seed(0)
    net = common.AdvancedUNet(2, 1, base=4)
    with torch.no_grad():
        net.out.bias.fill_(-0.5)                         # most pixels below 0 before the clip
    out = net(torch.rand(2, 2, 64, 64))
    assert out.min() == 0 and out.max() <= 1 and (out == 0).float().mean() > 0.5
    with torch.no_grad():
        net.out.weight.zero_()                           # now every pixel is clipped at 0
    x = torch.rand(1, 2, 64, 64)
    for truth, pushed_up in ((0.5, True), (0.0, False)):
        net.zero_grad()
        pred = net(x)
        common.LOSSES["mae"](pred, torch.full_like(pred, truth)).backward()
        assert pred.abs().sum() == 0
        assert (net.out.bias.grad.item() < 0) == pushed_up and (net.out.bias.grad.item() == 0) != pushed_up


@pytest.mark.parametrize("name", ["evolution", "nowcastnet", "unet", "convlstm"])
def test_nowcasters_forecast_twelve_frames(name):
    model = common.build_nowcaster(name, 2, 13, 12, base=4)
    x = torch.rand(2, 2, 13, 32, 32)
    y = model(x)
    assert y.shape == (2, 1, 12, 32, 32)
    y.mean().backward()                                              # trains end to end
    assert all(p.grad is not None for p in model.parameters())


def test_warp_moves_a_frame_by_its_displacement():
    frame = torch.zeros(1, 16, 16)
    frame[0, 5, 4] = 1.0
    d = torch.zeros(1, 2, 2, 16, 16)
    d[:, 0, 0], d[:, 1, 0], d[:, 1, 1] = 3.0, -2.0, 1.0               # (dx, dy) = (3, 0) and (-2, 1)
    out = common.warp(frame, d)
    assert out[0, 0, 5, 7] == pytest.approx(1.0) and out[0, 1, 6, 2] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(2.0)
    d[:, 0, 0] = 20.0                                                 # moved off the grid: no rain left
    assert common.warp(frame, d)[0, 0].sum() == 0


def test_evolution_net_starts_as_the_dense_flow_and_learns_growth_and_motion():
    torch.manual_seed(0)
    x, y = moving_blob(t_in=4, t_out=2, step=(1, 0), size=32, channels=2, vil_channel=1)
    y = y * torch.tensor([1.3, 1.6]).view(1, 1, 2, 1, 1)              # the cell grows as it moves
    y[..., 20:, 20:] = y[..., :12, :12].flip(-1)                      # and a second one moves the other way
    model = common.EvolutionNet(in_channels=2, t_in=4, t_out=2, base=4, vil_channel=1)
    assert torch.allclose(model(x), common.DenseFlow(1, t_out=2)(x))   # untrained: the dense-flow reference
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


# --------------------------------------------------------------------------------------
# 3. Losses
# --------------------------------------------------------------------------------------

def test_vgg_perceptual_loss_without_weights():
    loss = common.VGGPerceptualLoss(weights="none")
    assert loss.backbone == "untrained" and len(loss.slices) == 4
    assert sum(p.numel() for p in loss.parameters()) == 7_635_264          # VGG16 conv1_1 .. conv4_3
    a = torch.rand(1, 1, 32, 32, requires_grad=True)
    value = loss(a, torch.rand(1, 1, 32, 32))
    value.backward()
    assert value.item() > 0 and a.grad is not None and loss(a, a).item() == 0


def test_vgg_perceptual_loss_uses_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    from torchvision.models import VGG16_Weights
    assert common.VGG16_URL == VGG16_Weights.IMAGENET1K_V1.url
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))                     # nothing here: untrained, said once
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert common.VGGPerceptualLoss().backbone == "untrained" and "weights unavailable" in capsys.readouterr().out
    layers = [m for block in common.VGGPerceptualLoss(weights="none").slices for m in block]
    state = {f"features.{i}.{k}": torch.randn_like(v) for i, m in enumerate(layers)   # torchvision's names
             for k, v in m.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)                    # the rest of VGG16 is not loaded
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)             # the failed download made it
    torch.save(state, cache / Path(common.VGG16_URL).name)
    loss = common.VGGPerceptualLoss()
    assert loss.backbone == "imagenet" and torch.equal(loss.slices[3][-2].weight, state["features.21.weight"])


def test_balanced_mse_weights_rise_with_intensity():
    codes = torch.tensor([0.0, 15.9, 16.0, 73.0, 74.0, 133.0, 180.0, 181.0, 254.0])
    assert common.bmse_weights(codes / 255).tolist() == [1, 1, 2, 2, 5, 10, 10, 30, 30]
    y, pred = torch.tensor([0.0, 200 / 255]), torch.tensor([0.1, 200 / 255 - 0.1])
    assert common.balanced_mse(pred, y).item() == pytest.approx((1 * 0.01 + 30 * 0.01) / 2)
    assert common.LOSSES["mae"](pred, y).item() == pytest.approx(0.1)


# --------------------------------------------------------------------------------------
# 4. The loop: train_epoch, evaluate, fit
# --------------------------------------------------------------------------------------

def test_flip_rotate_turns_inputs_and_targets_alike():
    x = torch.arange(2 * 3 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 3, 4, 8, 8)
    y = x[:, :1, -2:].clone()
    views = set()
    torch.manual_seed(0)
    for _ in range(64):
        tx, ty = common.flip_rotate(x, y)
        assert torch.equal(tx[:, :1, -2:], ty)                       # the same transform for both
        assert torch.equal(tx.flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values)   # pixels moved, not changed
        views.add(tuple(tx[0, 0, 0].flatten()[:3].tolist()))
    assert len(views) == 8                                            # all 8 turns and flips of the square


def test_the_first_half_res_epochs_train_on_frames_pooled_2x2(tmp_path, sample):
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert common.half_resolution(x, x + 1)[0].flatten().tolist() == [2.5, 4.5, 10.5, 12.5]      # 2 x 2 means
    assert common.half_resolution(x, x + 1)[1].flatten().tolist() == [3.5, 5.5, 11.5, 13.5]

    class Recorder(nn.Conv2d):                          # remembers the grid of every batch it sees
        def forward(self, x):
            self.seen.append((self.training, x.shape[-1]))
            return super().forward(x)
    events = common.load_catalog(sample[0], sample[1])
    train = common.SyntheticRadarDataset(events.iloc[:1], sample[1], t_sample=None, target_size=32, train=True)
    val = common.SyntheticRadarDataset(events.iloc[1:2], sample[1], t_sample=None, target_size=32, train=False)
    cfg = FitCfg()
    cfg.OUT_DIR, cfg.HALF_RES_EPOCHS, cfg.BN_BATCHES = str(tmp_path), 2, 0
    model = Recorder(2, 1, 1)
    model.seen = []
    train_loader = common.make_loader(train, cfg, torch.device("cpu"), shuffle=True)
    val_loader = common.make_loader(val, cfg, torch.device("cpu"), shuffle=False)

    def loss_fn(pred, y):                                # the targets are halved too, or the loss fails
        return {"loss": F.l1_loss(pred, y), "mse": F.mse_loss(pred, y)}
    common.fit(model, train_loader, val_loader, loss_fn, torch.optim.Adam(model.parameters()), cfg,
               torch.device("cpu"), advanced=True)
    n, m = len(train_loader), len(val_loader)
    assert model.seen == ([(True, 16)] * n + [(False, 32)] * m) * 2 + [(True, 32)] * n + [(False, 32)] * m


def test_batchnorm_statistics_are_re_estimated_from_training_batches():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    x = torch.randn(12, 1, 4, 4) * 3 + 5
    loader = torch.utils.data.DataLoader(list(zip(x, x)), batch_size=4, collate_fn=common.collate_skipping)
    net[1].running_mean.fill_(100.0)                                   # stale, as after fast-moving weights
    common.recompute_batchnorm(net, loader, torch.device("cpu"), n_batches=2)
    with torch.no_grad():
        first = net[0](x[:8])                                          # the two batches it may use
        var = torch.stack([first[:4].var((0, 2, 3)), first[4:].var((0, 2, 3))]).mean(0)
    assert torch.allclose(net[1].running_mean, first.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(net[1].running_var, var, rtol=1e-4) and net[1].momentum == 0.1


def test_nonfinite_loss_stops_and_keeps_checkpoints(tmp_path, sample):
    events = common.load_catalog(sample[0], sample[1])
    train = common.SyntheticRadarDataset(events.iloc[:3], sample[1], t_sample=None, target_size=32, train=True)
    val = common.SyntheticRadarDataset(events.iloc[3:], sample[1], t_sample=None, target_size=32, train=False)
    cfg = FitCfg()
    cfg.OUT_DIR = str(tmp_path)
    model = common.SyntheticRadarUNet(2, 1, base=2)
    train_loader = common.make_loader(train, cfg, torch.device("cpu"), shuffle=True)
    val_loader = common.make_loader(val, cfg, torch.device("cpu"), shuffle=False)
    calls = []

    def loss_fn(pred, y):                              # finite for epoch 1, NaN from epoch 2's first batch
        calls.append(1)
        loss = torch.nn.functional.mse_loss(pred, y)
        return loss * float("nan") if len(calls) > len(train_loader) + len(val_loader) else loss
    with pytest.raises(common.RunError, match="loss is nan at epoch 2, batch 1"):
        common.fit(model, train_loader, val_loader, loss_fn, torch.optim.Adam(model.parameters()), cfg,
                   torch.device("cpu"))
    for name in ("last.pt", "best.pt"):
        ckpt = common.load_checkpoint(tmp_path / name)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                          if v.is_floating_point())


def test_a_dataloader_worker_killed_is_one_line_that_says_what_was_saved(tmp_path):
    class Killer(torch.utils.data.Dataset):                           # as the out-of-memory killer would
        def __len__(self):
            return 4

        def __getitem__(self, i):
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = FitCfg()
    cfg.OUT_DIR, cfg.NUM_WORKERS = str(tmp_path), 1
    loader = common.make_loader(Killer(), cfg, torch.device("cpu"), shuffle=True)
    model = nn.Conv2d(1, 1, 1)
    with pytest.raises(common.RunError, match="DataLoader worker .*out of memory.*nothing was saved") as e:
        common.fit(model, loader, loader, F.mse_loss, torch.optim.Adam(model.parameters()), cfg, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_best_model_is_chosen_on_validation_and_scored_on_test(tmp_path, sample):
    import train_synthetic
    out = tmp_path / "run"
    train_synthetic.main(TINY[:-3] + ["--epochs=3", "--batch_size=4", "--max_train=1", "--loss=mse"]
                         + data_args(sample) + [f"--out_dir={out}"])
    cfg = common.parse_config(train_synthetic.Config, data_args(sample))
    data = train_synthetic.build_data(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    best = torch.load(out / "best.pt", weights_only=True)
    assert metrics["split"] == "test" and metrics["checkpoint"] == "best.pt" and metrics["epoch"] == best["epoch"]
    assert metrics["n_events"] == len(data.test_events) and metrics["n_samples"] == len(data.test)
    assert pd.Timestamp(metrics["period"][0]) > pd.Timestamp("2019-06-01")         # only events after the split
    assert metrics["beside"]["split"] == "val" and metrics["beside"]["n_events"] == len(data.val_events)
    history = pd.read_csv(out / "history.csv")
    assert best["epoch"] == history.loc[history["val_loss"].idxmin(), "epoch"]       # chosen on validation
    # the validation loss of the chosen epoch is the model's validation MSE, scored again beside the test
    assert metrics["beside"]["model"]["mse"] == pytest.approx(history["val_loss"].min(), rel=1e-4)


def test_scores_are_in_float32_even_where_training_uses_bf16(monkeypatch):
    monkeypatch.setattr(common, "amp_dtype", lambda device: torch.bfloat16)      # as on a CUDA GPU
    identity = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.ones_(identity.weight)
    y = 0.5 + 0.5 * torch.rand(8, 1, 16, 16)                                      # values where bf16 steps are coarse
    loader = torch.utils.data.DataLoader([(v, v) for v in y], batch_size=4, collate_fn=common.collate_skipping)
    _, m = common.evaluate(identity, loader, torch.device("cpu"))
    assert m["mse"] == 0 and m["csi_219"] == 1


# --------------------------------------------------------------------------------------
# 5. Skill scores and reference forecasts
# --------------------------------------------------------------------------------------

def test_skill_score_against_hand_counts():
    # codes: truth and forecast on 4 pixels; threshold 74: truth >= 74 at px 0, 1; forecast at px 0, 2
    truth = torch.tensor([100.0, 80.0, 10.0, 0.0]).view(1, 1, 2, 2) / 255
    pred = torch.tensor([200.0, 20.0, 74.0, 0.0]).view(1, 1, 2, 2) / 255
    s = common.SkillScore(thresholds=(16, 74, 133), pools=())
    s.update(pred, truth)
    m = s.compute()
    # t=74: H=1 (px0), M=1 (px1), F=1 (px2)
    assert m["csi_74"] == pytest.approx(1 / 3) and m["pod_74"] == pytest.approx(0.5)
    assert m["sucr_74"] == pytest.approx(0.5) and m["bias_74"] == pytest.approx(1.0)
    # t=16: truth px0, px1; forecast px0, px1? no: 20 >= 16 yes -> px0, px1, px2 -> H=2, M=0, F=1
    assert m["csi_16"] == pytest.approx(2 / 3) and m["bias_16"] == pytest.approx(1.5)
    # t=133: truth none; forecast px0 -> H=0, M=0, F=1: CSI 0, POD 0/0 undefined
    assert m["csi_133"] == 0 and np.isnan(m["pod_133"]) and m["sucr_133"] == 0
    assert m["csi_m"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    err = (pred - truth).flatten()
    assert m["mse"] == pytest.approx(float((err ** 2).mean())) and m["mae"] == pytest.approx(float(err.abs().mean()))


def test_skill_score_perfect_never_reached_and_leads():
    truth = torch.zeros(2, 1, 3, 16, 16)
    truth[:, :, :, 4:8, 4:8] = 150 / 255                           # reaches 16, 74, 133, never 160+
    s = common.SkillScore()
    s.update(truth.clone(), truth)
    m = s.compute()
    assert m["mse"] == 0 and m["csi_16"] == 1 and m["csi_133"] == 1 and m["bias_74"] == 1
    assert np.isnan(m["csi_160"]) and np.isnan(m["csi_219"])          # 0/0: undefined, printed n/a
    # CSI-M as Earthformer: the undefined thresholds count as 0 in the mean over all six
    assert m["csi_m"] == 0.5 and m["csi_pool4_m"] == 0.5 and m["csi_pool16_m"] == 0.5
    assert m["csi_m_per_lead"] == [0.5, 0.5, 0.5]
    alarm = truth.clone()
    alarm[0, 0, 0, 0, 0] = 1.0                                          # one false-alarm pixel at every threshold
    s2 = common.SkillScore()
    s2.update(alarm, truth)
    m2 = s2.compute()
    assert m2["csi_219"] == 0 and m2["csi_m"] == pytest.approx(0.5, abs=0.01)    # the same six thresholds
    assert len(m["csi_m_per_lead"]) == 3 and m["mse_per_lead"] == [0, 0, 0]
    s.update(torch.zeros_like(truth), truth)                           # counts accumulate
    m = s.compute()
    assert m["csi_16"] == pytest.approx(0.5) and m["pod_16"] == pytest.approx(0.5) and m["sucr_16"] == 1


def test_skill_score_any_leading_dims_and_pooling():
    truth = torch.zeros(3, 2, 8, 8)
    truth[..., 0, 0] = 1.0                                          # one intense pixel per image
    shifted = torch.zeros_like(truth)
    shifted[..., 1, 1] = 1.0                                        # one pixel off: a miss and a false alarm
    s = common.SkillScore(pools=(4,))
    s.update(shifted, truth)
    m = s.compute()
    assert m["csi_219"] == 0 and m["csi_pool4_m"] == 1                # pooled 4 x 4, the cells coincide


def test_bootstrap_margins_say_beats_only_where_the_events_agree():
    torch.manual_seed(0)
    truth = [torch.rand(2, 1, 16, 16) for _ in range(8)]                  # 8 events whose fields differ

    def counts(forecasts):
        per_event = []
        for f, y in zip(forecasts, truth):
            s = common.SkillScore()
            s.update(f.clamp(0, 1), y)
            per_event.append(s.counts)
        return per_event
    near, far = [y + 0.02 for y in truth], [y + 0.2 for y in truth]
    mixed = [n if e < 4 else f for e, (n, f) in enumerate(zip(near, far))]      # better on 4 events, worse on 4
    flipped = [f if e < 4 else n for e, (n, f) in enumerate(zip(near, far))]
    better = common.bootstrap_margins(counts(near), counts(far))
    whole = {}
    for name, forecasts in (("near", near), ("far", far)):
        s = common.SkillScore()
        for f, y in zip(forecasts, truth):
            s.update(f.clamp(0, 1), y)
        whole[name] = s.compute()
    assert np.isclose(better["mse"][0], whole["far"]["mse"] - whole["near"]["mse"])
    assert np.isclose(better["csi_m"][0], whole["near"]["csi_m"] - whole["far"]["csi_m"])
    assert all(better[k][1] > 0 for k in ("mse", "mae", "csi_m"))             # better on every event: beats
    worse = common.bootstrap_margins(counts(far), counts(near))
    assert all(worse[k][2] < 0 for k in ("mse", "mae", "csi_m"))
    level = common.bootstrap_margins(counts(mixed), counts(flipped))
    assert all(level[k][1] < 0 < level[k][2] for k in ("mse", "mae"))        # the interval straddles zero


def test_a_sine_wave_puts_its_power_at_its_wavelength():
    n, waves = 64, 8                                                    # 8 cycles across the grid: 8 pixels each
    x = torch.arange(n, dtype=torch.float64)
    for field in (torch.sin(2 * np.pi * waves * x / n)[None, :].expand(n, n),            # waves along x
                  torch.sin(2 * np.pi * waves * x / n)[:, None].expand(n, n)):           # and along y
        spectrum = common.radial_power_spectrum(torch.fft.fft2(field).abs() ** 2 / field.numel())
        assert spectrum.shape == (n // 2,)
        assert int(spectrum.argmax()) + 1 == waves and spectrum[waves - 1] > 1e6 * spectrum[waves + 1]
    assert common.radial_power_spectrum(torch.zeros(n, n)).abs().max() == 0
    # through the loader: wavelengths in km, blur removes power at small scales only
    y = (0.5 + 0.5 * torch.sin(2 * np.pi * 16 * x / n))[None, None, None, :].expand(4, 1, n, n).float()
    blurred = lambda t: F.avg_pool2d(t, 5, 1, 2, count_include_pad=False)
    loader = torch.utils.data.DataLoader(list(zip(y, y)), batch_size=2, collate_fn=common.collate_skipping)
    spectra = common.power_spectra({"model": lambda t: t, "blurred": blurred}, loader, torch.device("cpu"),
                                   pixel_km=3.0)
    assert spectra["wavelength_km"][0] == n * 3.0 and spectra["wavelength_km"][15] == 12.0       # 16 cycles: 12 km
    assert np.allclose(spectra["model"], spectra["truth"])
    peak = int(np.argmax(spectra["truth"]))
    assert peak == 15 and spectra["blurred"][peak] < 0.5 * spectra["truth"][peak]


def test_persistence_on_a_steady_field_scores_csi_1():
    field = torch.rand(1, 1, 1, 32, 32)
    x, y = field.expand(2, 1, 12, 32, 32), field.expand(2, 1, 3, 32, 32)
    s = common.SkillScore()
    s.update(common.Persistence(0, t_out=3)(x), y)
    m = s.compute()
    assert m["mse"] == 0 and all(m[f"csi_{t}"] == 1 for t in common.SEVIR_THRESHOLDS if (field * 255 >= t).any())


def test_shift_reference_finds_the_one_motion_vector():
    x, y = moving_blob(t_in=12, t_out=3, step=(1, -1), size=64)
    x[..., 40:, :] = 0                                                 # keep the blob away from the edges
    pred = common.ShiftExtrapolation(0, t_out=3)(x)
    for k in range(3):
        px, py = centre(pred[0, 0, k])
        tx, ty = centre(y[0, 0, k])
        assert abs(px - tx) < 0.3 and abs(py - ty) < 0.3


def test_dense_flow_moves_two_storms_their_own_ways_where_one_shift_cannot():
    east, east_y = moving_blob(t_in=3, t_out=2, step=(2, 0), size=64)
    south, south_y = moving_blob(t_in=3, t_out=2, step=(0, 2), size=64)
    x, y = east + south.flip(-1), east_y + south_y.flip(-1)            # one at the left moving east, one at the right south
    for flow, most in ((common.DenseFlow(t_out=2), 0.35), (common.ShiftExtrapolation(t_out=2), None)):
        error = (flow(x) - y).abs().mean() / (common.Persistence(t_out=2)(x) - y).abs().mean()
        assert error < most if most else error > 0.7, (flow.name, error)


@pytest.mark.skipif(common.pysteps_methods() is None, reason="needs pysteps and opencv-python-headless")
def test_optical_flow_moves_a_shifted_blob_to_where_it_goes():
    x, y = moving_blob(t_in=6, t_out=4, channels=2, vil_channel=1)
    persistence = common.Persistence(1, t_out=4)(x)
    edge, _ = moving_blob(t_in=6, t_out=1, step=(-6, 0), size=32)
    for flow in (common.OpticalFlow(common.pysteps_methods(), vil_channel=1, t_out=4),
                 common.DenseFlow(vil_channel=1, t_out=4)):                # pysteps' LK, the SEVIR paper's DIS
        pred = flow(x)
        assert pred.shape == y.shape and pred.dtype == x.dtype and torch.isfinite(pred).all()
        for k in range(4):                                           # +k+1 frames: (1, 2) pixels a frame
            px, py = centre(pred[0, 0, k])
            tx, ty = centre(y[0, 0, k])
            assert abs(px - tx) < 0.5 and abs(py - ty) < 0.5, (flow.name, k, px, py, tx, ty)
        assert (pred - y).abs().mean() < 0.3 * (persistence - y).abs().mean()
        flow.vil_channel, flow.t_out = 0, 8                          # from outside the grid: no rain, not NaN
        assert torch.isfinite(flow(edge)).all()


def test_optical_flow_is_skipped_with_one_line_when_pysteps_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pysteps", None)               # import pysteps -> ImportError
    assert common.pysteps_methods() is None
    refs = common.nowcast_references(vil_channel=0, t_out=2)
    assert [r.name for r in refs] == ["persistence", "shift"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install pysteps opencv-python-headless" in out
    undo(monkeypatch)
    import pysteps.exceptions
    import pysteps.motion

    def no_opencv(name):                                          # pysteps there, OpenCV not: what LK raises then
        def lk(frames):
            raise pysteps.exceptions.MissingOptionalDependency("opencv package is required for the LK method")
        return lk
    monkeypatch.setattr(pysteps.motion, "get_method", no_opencv)
    assert common.pysteps_methods() is None


def test_ir_lookup_learns_a_monotone_relation():
    shift, scale = common.SEVIR_ZSCORE["ir107"]
    temps = torch.linspace(-7000, 2000, 64)                            # deg C x 100
    x = ((temps - shift) / scale).view(1, 1, 8, 8).repeat(4, 2, 1, 1)
    y = ((2000 - temps) / 9000).clamp(0, 1).view(1, 1, 8, 8).repeat(4, 1, 1, 1)   # colder, more VIL
    lookup = common.IRLookup(channels=[1]).fit([(x, y)])
    pred = lookup(x)
    assert pred.shape == y.shape and (pred - y).abs().max() < 0.03


def test_ir_lookup_on_both_channels_and_with_the_median():
    (s69, k69), (s107, k107) = common.SEVIR_ZSCORE["ir069"], common.SEVIR_ZSCORE["ir107"]
    t69, t107 = torch.meshgrid(torch.linspace(-7000, 0, 16), torch.linspace(-7000, 2000, 16), indexing="ij")
    x = torch.stack([(t69 - s69) / k69, (t107 - s107) / k107])[None].repeat(5, 1, 1, 1)     # (5, 2, 16, 16)
    y = ((t69 < -3500) & (t107 < -2000)).float().mul(0.7).add(0.1)[None, None].repeat(5, 1, 1, 1)
    one = common.IRLookup([1], mods=["ir107"]).fit([(x, y)])                    # IR107 alone cannot tell
    both = common.IRLookup([0, 1], mods=("ir069", "ir107")).fit([(x, y)])
    assert (one(x) - y).abs().max() > 0.2 and torch.allclose(both(x), y) and both.name == "ir2_lookup_mean"
    spiked = y.clone()
    spiked[0] += 0.5                                                             # one sample in five far off
    median = common.IRLookup([0, 1], mods=("ir069", "ir107"), statistic="median").fit([(x, spiked)])
    mean = common.IRLookup([0, 1], mods=("ir069", "ir107")).fit([(x, spiked)])
    assert torch.allclose(median(x), y) and torch.allclose(mean(x), y + 0.1)


def test_ir_lookup_streams_batches_to_the_exact_median_of_vil_codes():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 16, 16)                                                 # 6 batches of one frame
    y = torch.randint(0, 255, (6, 1, 16, 16)).float() / 255                      # VIL codes
    y[:, :, :4] = 0                                                              # a quarter of the pixels dry
    lookup = common.IRLookup([0], ir_norm="minmax", bins=4, statistic="median").fit(zip(x[:, None], y[:, None]))
    key = (x[:, 0] * 4).long().flatten()
    exact = torch.stack([y[:, 0].flatten()[key == k].median() for k in range(4)])   # the lower middle value
    assert torch.equal(lookup.table, exact) and len(set(exact.tolist())) == 4
    mean = common.IRLookup([0], ir_norm="minmax", bins=4).fit(zip(x[:, None], y[:, None]))
    assert torch.allclose(mean.table, torch.stack([y[:, 0].flatten()[key == k].mean() for k in range(4)]))


def test_ir069_alone_gets_an_honestly_named_reference(tmp_path, sample):
    import train_synthetic
    train_synthetic.main(TINY + ["--input_mods=ir069"] + data_args(sample) + [f"--out_dir={tmp_path}"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["reference"] == "ir069_lookup" and "ir069_lookup" in metrics and "ir_lookup" not in metrics


# --------------------------------------------------------------------------------------
# 6. Figures
# --------------------------------------------------------------------------------------

def test_the_skill_figure_shows_every_forecast(tmp_path, monkeypatch, drawn_figures):
    drawn = []

    def look(fig, path):
        drawn.append([line.get_label() for line in fig.axes[0].get_lines()])
        common._plt().close(fig)
    monkeypatch.setattr(common, "_save_figure", look)
    names = ["persistence", "optical_flow", "dense_flow", "shift"]                  # the nowcasters' four
    scores = {f"{s}_{t}": 0.5 for s in ("csi", "pod", "sucr") for t in common.SEVIR_THRESHOLDS}
    common.plot_skill({"references": names, "model": scores, **{n: scores for n in names}}, tmp_path / "skill.png")
    assert drawn == [["model"] + names]


def test_figure_rows_come_from_different_events():
    class Held:                                  # 3 events x 4 windows; event 0 is the rainiest in every window
        windows = [(e, s) for e in range(3) for s in range(4)]

        def __len__(self):
            return len(self.windows)

        def __getitem__(self, i):
            e, s = self.windows[i]
            return torch.zeros(1), torch.full((1,), 10.0 * (e == 0) + s)
    picked = common._samples(Held(), 3)
    assert [Held.windows[i][0] for i in picked] == [0, 1, 2]               # one storm per row
    assert len(common._samples(Held(), 5)) == 5                          # more rows than events: the next rainiest


# --------------------------------------------------------------------------------------
# 7. Events: catalog, usable events, split by date
# --------------------------------------------------------------------------------------

def test_links_in_the_sevir_root_are_followed_as_the_readme_says(tmp_path, sample):
    catalog, root = sample
    linked_root = tmp_path / "sevir"
    linked_root.symlink_to(root)                                       # the whole root on another disk
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    mixed = tmp_path / "mixed"                                          # one type folder linked in
    for part in Path(root).iterdir():
        if part.name == "vil":
            (elsewhere / "vil").symlink_to(part)
            (mixed / "vil").parent.mkdir(exist_ok=True)
            (mixed / "vil").symlink_to(elsewhere / "vil")
        else:
            (mixed / part.name).parent.mkdir(exist_ok=True)
            (mixed / part.name).symlink_to(part)
    direct = common.load_catalog(catalog, root)
    for where in (linked_root, mixed):
        events = common.load_catalog(catalog, where)
        assert list(events["id"]) == list(direct["id"])
        item = common.SEVIRVIL(events, where, t_in=2, t_out=1, target_size=32)[3]
        assert torch.equal(item[1], common.SEVIRVIL(direct, root, t_in=2, t_out=1, target_size=32)[3][1])


def test_a_catalog_cut_mid_row_or_with_a_column_twice_is_one_line(tmp_path, sample):
    text = Path(sample[0]).read_text()
    cut = tmp_path / "cut.csv"
    cut.write_text(text[:len(text) * 2 // 3].rstrip("\n").rsplit(",", 3)[0])      # a download stopped mid-row
    with pytest.raises(common.UserError, match="ends in the middle of a row.*cut short"):
        common.load_catalog(cut, sample[1])
    header, rest = text.split("\n", 1)
    twice = tmp_path / "twice.csv"
    twice.write_text(header.rstrip("\r") + ",time_utc\n" + "".join(line.rstrip("\r") + ",2030-01-01 00:00:00\n"
                                                                 for line in rest.splitlines()))
    with pytest.raises(common.UserError, match="has the column time_utc twice"):
        common.load_catalog(twice, sample[1])
    assert len(common.load_catalog(sample[0], sample[1])) == 5                 # the whole catalog reads


def test_load_catalog_drop_reasons(tmp_path, capsys):
    base = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False)
    vil = base[(base["img_type"] == "vil")]
    good, pct = vil.iloc[0], vil.iloc[1]

    def row(src, **changes):
        r = src.copy()
        for k, v in changes.items():
            r[k] = v
        return r
    rows = [good, pct,
            row(good, id="S900001"), row(good, id="S900001", file_index="1"),      # duplicated id
            row(good, id="S900002", file_index="7"),                                # index past the end
            row(good, id="S900003", file_name="vil/2019/NOPE.h5"),                  # missing file
            row(good, id="S900004", file_name="vil/2019/BROKEN.h5"),                # not HDF5
            row(good, id="S900005", file_name="vil/2019/EMPTY.h5"),                 # no vil dataset
            row(good, id="S900006", time_utc="not a time"),
            row(good, id="S900007", file_index="1"),
            row(good, id="S900008", file_name="vil/2019/BROKEN.h5", file_index="1"),  # same bad file again
            row(good, id="S900009", file_name="vil/2019/TRUNCATED.h5")]              # cut off mid-download
    catalog = tmp_path / "CATALOG.csv"
    pd.DataFrame(rows).to_csv(catalog, index=False)
    write_vil_file(tmp_path / VIL_FILE, 3, ids=["S834603", "S900007", "S821019"])
    (tmp_path / "vil/2019/BROKEN.h5").write_bytes(b"this is not HDF5" * 100)
    write_vil_file(tmp_path / "vil/2019/TRUNCATED.h5", 2, lambda i: np.ones((384, 384, 49), np.uint8))
    with open(tmp_path / "vil/2019/TRUNCATED.h5", "r+b") as f:
        f.truncate(50_000)
    with h5py.File(tmp_path / "vil/2019/EMPTY.h5", "w") as f:
        f["id"] = np.array([b"S1"])

    events = common.load_catalog(catalog, tmp_path, mods=("vil",))
    captured = capsys.readouterr()
    assert set(events["id"]) == {"S834603", "S900007"}
    summary = captured.out.strip().splitlines()[-1]
    for reason in ("duplicated id: 1", "pct_missing > 0: 1", "file_index out of range: 1", "missing file: 1",
                   "unreadable file: 3", "no dataset in file: 1", "bad time_utc: 1"):
        assert reason in summary, summary
    assert captured.err.count("BROKEN.h5") == 1                      # each unreadable file named once
    assert captured.err.count("TRUNCATED.h5") == 1
    assert list(events.columns[:2]) == ["id", "time_utc"] and events["vil_index"].tolist() == [0, 1]

    # pct_missing is a fraction: allowing 0.3 keeps the event with 0.249
    assert "S821019" in set(common.load_catalog(catalog, tmp_path, mods=("vil",), max_pct_missing=0.3)["id"])
    # an event lacking a requested modality is dropped; lght and vis rows are ignored unless asked for
    with pytest.raises(common.UserError, match="missing modality"):
        common.load_catalog(catalog, tmp_path, mods=("vil", "ir069"))


def test_a_catalog_must_be_sevirs_csv_and_its_times_sevirs_form(tmp_path, capsys):
    table = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False)
    write_vil_file(tmp_path / VIL_FILE, 3, ids=["S834603", "S1", "S821019"])
    table.to_csv(tmp_path / "sheet.csv", sep=";", index=False)          # as a spreadsheet may save it
    with pytest.raises(common.UserError, match="not SEVIR's comma-separated CSV catalog"):
        common.load_catalog(tmp_path / "sheet.csv", tmp_path, mods=("vil",))
    table["time_utc"] = ["5/12/2019 18:30", "2019-06-17 01:00:00", "5/12/2019 18:30", "5/12/2019 18:30"]
    table.to_csv(tmp_path / "CATALOG.csv", index=False)
    events = common.load_catalog(tmp_path / "CATALOG.csv", tmp_path, mods=("vil",), max_pct_missing=1)
    assert events["id"].tolist() == ["S821019"] and "dropped bad time_utc: 1" in capsys.readouterr().out


def test_numbers_no_sevir_catalog_holds_are_dropped_not_a_traceback(tmp_path, capsys):
    table = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False)
    write_vil_file(tmp_path / VIL_FILE, 3, ids=["S834603", "S1", "S821019"])
    table.loc[0, "file_index"] = "12345678901234567890"                 # 20 digits
    table.loc[1, "size_x"] = "\u00b2"                                   # a superscript two: a digit, not a number
    table.to_csv(tmp_path / "CATALOG.csv", index=False)
    events = common.load_catalog(tmp_path / "CATALOG.csv", tmp_path, mods=("vil",), max_pct_missing=1)
    assert events["id"].tolist() == ["S821019"] and events["vil_grid"].tolist() == [384]
    assert "bad file_index: 1" in capsys.readouterr().out


@pytest.mark.parametrize("content, words", [
    (None, "catalog not found"),
    ("", "not SEVIR's comma-separated CSV catalog"),
    ("id,file_name,img_type\nS1,a.h5,vil\n", "lacks SEVIR catalog columns: file_index, time_utc, pct_missing"),
    (REAL_ROWS.splitlines()[0] + "\n", "has no rows"),
])
def test_bad_catalogs_are_user_errors(tmp_path, content, words):
    path = tmp_path / "CATALOG.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(common.UserError, match=words):
        common.load_catalog(path, tmp_path)


def test_files_that_do_not_hold_what_the_catalog_says_are_dropped(tmp_path, capsys):
    rows = [{"id": "S0", "file_index": "0"}, {"id": "S1", "file_index": "1"}, {"id": "S2", "file_index": "3.7"},
            {"id": "S3", "file_index": "2", "file_name": "vil/2019/TIME_FIRST.h5"},
            {"id": "S4", "file_index": "0", "file_name": "vil/2019/FLOAT.h5"},
            {"id": "S5", "file_index": "0", "file_name": "vil/2019/FRAMES48.h5"},
            {"id": "S6", "file_index": "0", "file_name": "vil/2019/SHUFFLED.h5"}]
    catalog = vil_catalog(tmp_path, rows[:2])
    pd.read_csv(catalog, dtype=str).pipe(lambda d: pd.concat([d] + [d.iloc[:1].assign(**r) for r in rows[2:]])) \
        .to_csv(catalog, index=False)
    for name, shape, dtype in (("TIME_FIRST", (3, 49, 384, 384), np.uint8), ("FLOAT", (1, 384, 384, 49), np.float32),
                               ("FRAMES48", (1, 384, 384, 48), np.uint8)):
        with h5py.File(tmp_path / f"vil/2019/{name}.h5", "w") as f:
            f.create_dataset("vil", shape, dtype=dtype)
            f["id"] = np.array([b"S3", b"S4", b"S3"])
    write_vil_file(tmp_path / "vil/2019/SHUFFLED.h5", 1, ids=["S9"])          # events stored in another order
    events = common.load_catalog(catalog, tmp_path, mods=("vil",))
    out, err = capsys.readouterr()
    assert events["id"].tolist() == ["S0", "S1"]
    assert "bad file_index: 1" in out and "bad shape or dtype: 3" in out and "id differs from the catalog: 1" in out
    assert err.count("FLOAT.h5") == 1 and "float32" in err and "not the catalog's S6" in err


def test_data_kept_outside_a_file_is_refused_before_it_is_read(tmp_path, capsys):
    secret = tmp_path / "elsewhere" / "secret.bin"                      # a file nobody named as data
    secret.parent.mkdir()
    secret.write_bytes(bytes(range(256)) * (384 * 384 * 49 // 256))
    outside = tmp_path / "elsewhere" / "other.h5"
    write_vil_file(outside, 1)
    names = {"LINKED": "link", "EXTERNAL": "external storage", "VIRTUAL": "virtual", "GROUPED": "group"}
    rows = [{"id": "S0", "file_index": "0"}] + [{"id": f"S{k}", "file_index": "0", "file_name": f"vil/2019/{n}.h5"}
                                                 for k, n in enumerate(names, start=1)]
    catalog = vil_catalog(tmp_path, rows[:1])
    pd.read_csv(catalog, dtype=str).pipe(lambda d: pd.concat([d] + [d.iloc[:1].assign(**r) for r in rows[1:]])) \
        .to_csv(catalog, index=False)
    shape = (1, 384, 384, 49)
    for k, name in enumerate(names, start=1):
        with h5py.File(tmp_path / f"vil/2019/{name}.h5", "w") as f:
            f["id"] = np.array([f"S{k}".encode()])
            if name == "LINKED":
                f["vil"] = h5py.ExternalLink(str(outside), "vil")
            elif name == "EXTERNAL":
                f.create_dataset("vil", shape, dtype=np.uint8, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
            elif name == "VIRTUAL":
                layout = h5py.VirtualLayout(shape, dtype=np.uint8)
                layout[:] = h5py.VirtualSource(str(outside), "vil", shape=shape)
                f.create_virtual_dataset("vil", layout)
            else:
                f.create_group("vil")
    events = common.load_catalog(catalog, tmp_path, mods=("vil",))
    out, err = capsys.readouterr()
    assert len(events) == 1 and "data outside the file: 3, not a dataset: 1" in out      # only the plain file's event
    for words in ("a link to another file", "keeps its data in another file", "virtual dataset", "not a dataset"):
        assert words in err
    for name in names:                                                  # and the copying tools refuse them too
        with pytest.raises(common.RunError, match="refused"):
            rows_ = pd.read_csv(catalog, dtype=str).iloc[:1].assign(file_name=f"vil/2019/{name}.h5", order=0)
            common._write_copy(tmp_path / f"copy_{name}", rows_, lambda n: h5py.File(tmp_path / n, "r"), 32, "t")
    assert not list(tmp_path.glob("copy_*/**/*.h5"))


def test_lightning_lists_and_images_of_the_wrong_shape_are_dropped(own_sample, capsys):
    catalog, root = own_sample
    df = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    lght, vil = df[df.img_type == "lght"].iloc[-1], df[df.img_type == "vil"].iloc[1]     # in other files
    with h5py.File(root / lght["file_name"], "a") as f:
        del f[lght["id"]]
        f[lght["id"]] = np.zeros((3, 4), np.float32)                     # (n, 4): not a flash list
    with h5py.File(root / vil["file_name"], "a") as f:
        del f["vil"]
        f["vil"] = np.zeros((f["id"].shape[0], 384, 384), np.uint8)       # 3-D: no time axis
    events = common.load_catalog(catalog, root, mods=("vil", "lght"))
    out = capsys.readouterr().out
    assert "bad lightning data: 1" in out and "bad shape or dtype" in out
    assert lght["id"] not in set(events["id"]) and vil["id"] not in set(events["id"])


def test_odd_structure_missing_filters_and_data_never_written_are_dropped(tmp_path, capsys, monkeypatch):
    good = pd.read_csv(io.StringIO(REAL_ROWS), dtype=str, keep_default_na=False).iloc[0]
    files = {"PLAIN": 1, "ID_GROUP": 1, "VIL_GROUP": 1, "UNWRITTEN": 1, "HALF": 2, "GZIP": 1, "SHUFFLE": 1, "NO_ID": 1}
    rows, k = [], 0
    for name, n in files.items():
        for i in range(n):
            rows.append({**good.to_dict(), "id": f"S{k}", "file_name": f"vil/{name}.h5", "file_index": str(i),
                         "size_x": "16", "size_y": "16"})
            k += 1
    frames = np.full((16, 16, 49), 7, np.uint8)
    (tmp_path / "vil").mkdir()
    k = 0
    for name, n in files.items():
        with h5py.File(tmp_path / f"vil/{name}.h5", "w") as f:
            ids = np.array([f"S{k + i}".encode() for i in range(n)])
            if name != "NO_ID":
                f.create_group("id") if name == "ID_GROUP" else f.create_dataset("id", data=ids)
            if name == "VIL_GROUP":
                f.create_group("vil")
            else:
                kw = {"HALF": dict(chunks=(1, 16, 16, 1)), "GZIP": dict(compression="gzip"),
                      "SHUFFLE": dict(shuffle=True)}.get(name, {})
                d = f.create_dataset("vil", (n, 16, 16, 49), dtype=np.uint8, **kw)
                if name == "HALF":
                    d[0], d[1, :, :, :10] = frames, frames[:, :, :10]   # the second event cut off mid-write
                elif name != "UNWRITTEN":
                    d[...] = frames
        k += n
    (tmp_path / "CATALOG.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    real_avail = h5py.h5z.filter_avail
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda code: code != h5py.h5z.FILTER_DEFLATE and real_avail(code))
    events = common.load_catalog(tmp_path / "CATALOG.csv", tmp_path, mods=("vil",))
    out, err = capsys.readouterr()
    assert sorted(events["id"]) == ["S0", "S4", "S7", "S8"]      # PLAIN, HALF's first, SHUFFLE (available), NO_ID
    for words in ("not a dataset: 2", "never written: 2", "missing HDF5 filter: 1"):
        assert words in out, out
    assert "id is a group, not a dataset" in err and "filter 1 (deflate)" in err and "never written" in err
    ds = common.SEVIRVIL(events, tmp_path, t_in=2, t_out=1, target_size=16, train=False)
    assert all(float(ds[i][0].max()) == pytest.approx(7 / 255) for i in range(len(ds)))     # none read as zeros

    with h5py.File(tmp_path / "lght.h5", "w") as f:                    # lightning: a group, text, never written
        f.create_group("L1")
        f["L2"] = np.array([["a"] * 5], dtype="S1")
        f.create_dataset("L3", (4, 5), dtype=np.float32)
        f["L4"] = np.zeros((2, 5), np.float32)
    lght = [{**good.to_dict(), "id": f"L{i}", "img_type": "lght", "file_name": "lght.h5", "file_index": "0"}
            for i in range(1, 5)]
    (tmp_path / "LGHT.csv").write_text(pd.DataFrame(lght).to_csv(index=False))
    events = common.load_catalog(tmp_path / "LGHT.csv", tmp_path, mods=("lght",))
    out = capsys.readouterr().out
    assert events["id"].tolist() == ["L4"] and "not a dataset: 1" in out and "bad lightning data: 1" in out \
        and "never written: 1" in out

    no_id = pd.DataFrame(rows).iloc[8:9].assign(order=[0])             # a file without `id`: the catalog's ids
    common._write_copy(tmp_path / "copy", no_id, lambda n: h5py.File(tmp_path / n, "r"), 8, "t")
    with h5py.File(tmp_path / "copy/vil/NO_ID.h5") as f:
        assert f["id"][()].tolist() == [b"S8"] and f["vil"].shape == (1, 8, 8, 49)
    rows_ = pd.DataFrame(rows).iloc[4:6].assign(order=[0, 1])          # the copying tools refuse unwritten events
    with pytest.raises(common.RunError, match=r"HALF.h5\[1\]: never written"):
        common._write_copy(tmp_path / "copy", rows_, lambda n: h5py.File(tmp_path / n, "r"), 16, "t")


def test_split_by_time_and_empty_side(sample):
    events = common.load_catalog(sample[0], sample[1])
    before, after = common.split_by_dates(events, ["2019-06-01"])
    assert len(before) == 4 and len(after) == 1
    assert before["time_utc"].max() <= pd.Timestamp("2019-06-01") < after["time_utc"].min()
    assert not set(before["id"]) & set(after["id"])
    train, val, test = common.split_by_dates(events, ("2019-01-01", "2019-06-01"))
    assert (len(train), len(val), len(test)) == (3, 1, 1)
    assert pd.Timestamp("2019-01-01") in set(train["time_utc"])        # on the date: the earlier side
    with pytest.raises(common.UserError, match=r"no validation events \(2019-01-01 00:00 < time_utc <= 2019-01-02"
                                               r" 00:00; the 5 events run 2018-.* \.\. 2019-0"):
        common.split_by_dates(events, ("2019-01-01", "2019-01-02"))
    with pytest.raises(common.UserError, match="no second events"):
        common.split_by_dates(events, ["2030-01-01"])
    with pytest.raises(common.UserError, match=r"no train events \(time_utc <= 2000-01-01 00:00; the 5 events"):
        common.split_by_dates(events, ("2000-01-01", "2019-06-01"))        # an empty first side is said too


@pytest.mark.parametrize("value", ["2019-06-01", "2019-06-01,2019-01-01", "2019-06-01T00:00+02:00,2019-07-01",
                                   "09/07/2018,2019-01-01", "a,b"])
def test_split_dates_must_be_two_dates_in_order(value):
    import train_synthetic
    with pytest.raises(common.UserError, match="--split_dates"):
        common.parse_config(train_synthetic.Config, [f"--split_dates={value}"])


def test_subsets_are_spread_over_their_period(tmp_path):
    rows = [{"id": f"S{i}", "time_utc": f"2019-06-{i + 2:02d} 00:00:00", "file_index": str(i)} for i in range(10)]
    events = common.load_catalog(vil_catalog(tmp_path, rows), tmp_path, mods=("vil",))
    assert common.spread(events, 3)["id"].tolist() == ["S0", "S3", "S6"]
    assert common.spread(events, 5)["id"].tolist() == ["S0", "S2", "S4", "S6", "S8"]
    assert common.spread(events, 0)["id"].tolist() == common.spread(events, 10)["id"].tolist() == events["id"].tolist()


def test_protocol_selects_earthformers_events_and_windows(tmp_path):
    import train_baseline
    rows = [{"id": "S1", "time_utc": "2018-12-31 23:55:00"},
            {"id": "S2", "time_utc": "2019-01-01 00:00:00"},                    # on the first date: train
            {"id": "S3", "time_utc": "2019-01-01 00:05:00"},
            {"id": "S4", "time_utc": "2019-06-01 00:00:00"},                    # on the second date: validation
            {"id": "S5", "time_utc": "2019-06-01 00:00:01"},
            {"id": "S6", "time_utc": "2019-07-01 12:00:00"},
            {"id": "S7", "time_utc": "2019-03-01 00:00:00"}, {"id": "S7", "time_utc": "2019-03-01 00:00:00"},
            {"id": "S8", "time_utc": "2019-04-01 00:00:00", "pct_missing": "0.01"},     # missing pixels
            {"id": "S9", "time_utc": "2019-07-02 00:00:00"},                        # two rows, one with
            {"id": "S9", "time_utc": "2019-07-02 00:00:00", "pct_missing": "0.2"},   # missing pixels: kept
            {"id": "S10", "time_utc": "2018-08-01 10:00:00"}]
    rows = [{**r, "file_index": str(i)} for i, r in enumerate(rows)]
    catalog = vil_catalog(tmp_path, rows)
    cfg = common.parse_config(train_baseline.Config, ["--protocol=sevir", f"--catalog_path={catalog}",
                                                      f"--sevir_root={tmp_path}"], size_multiple=common.NOWCASTER_GRID)
    data = common.load_events(cfg, mods=("vil",))
    dates = [None, *common.EARTHFORMER_SPLIT, None]
    for events, start, end in zip((data.train_events, data.val_events, data.test_events), dates[:-1], dates[1:]):
        assert sorted(events["id"]) == earthformer_events(catalog, start, end)
    assert sorted(data.train_events["id"]) == ["S1", "S10", "S2"] and sorted(data.test_events["id"]) == ["S5", "S6", "S9"]
    assert sorted(data.val_events["id"]) == ["S3", "S4"]
    ds = common.SEVIRVIL(data.test_events, data.root, t_in=13, t_out=12, target_size=32, train=False)
    assert [tuple(w) for w in ds.windows.tolist()] == [(e, s) for e in range(3) for s in (0, 12, 24)]
    with pytest.raises(common.UserError, match="uses Earthformer's 2019-01-01,2019-06-01"):
        common.parse_config(train_baseline.Config, ["--protocol=sevir", "--split_dates=2019-02-01,2019-06-01"])


def test_default_paths_make_the_sample_once(tmp_path, sample, monkeypatch, capsys):
    import train_synthetic
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(common, "make_sample_sevir", lambda root: made.append(root) or copy_sample(sample, root))
    cfg = train_synthetic.Config()
    for _ in range(2):
        catalog, root, kind = common.resolve_data(cfg)
    assert made == [common.SAMPLE_ROOT] and kind == "sample" and catalog.exists()
    (tmp_path / common.SAMPLE_ROOT / common.SAMPLE_MARKER).write_text("a sample of another version\n")
    with pytest.raises(common.UserError, match="made by an older version of the scripts: delete the folder"):
        common.resolve_data(cfg)
    assert "GENERATED sample data, not real weather" in capsys.readouterr().out
    cfg.CATALOG_PATH = "elsewhere/CATALOG.csv"                     # a path the user named: no sample
    with pytest.raises(common.UserError, match="catalog not found: elsewhere/CATALOG.csv"):
        common.resolve_data(cfg)
    cfg.CATALOG_PATH, cfg.SEVIR_ROOT = str(catalog), "no/such/folder"
    with pytest.raises(common.UserError, match="SEVIR root folder not found: no/such/folder"):
        common.resolve_data(cfg)


def sevir_copy(sample, catalog, files):
    """The sample laid out as a user keeps SEVIR: its catalog at `catalog`, its type folders in `files` (hard
    links: nothing is copied), with no mark of a generated sample."""
    Path(catalog).parent.mkdir(parents=True, exist_ok=True)
    Path(catalog).write_text(Path(sample[0]).read_text())
    for f in Path(sample[1]).rglob("*.h5"):
        link = Path(files) / f.relative_to(sample[1])
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, link)


@pytest.mark.parametrize("catalog, files, flags", [
    ("data/sevir/CATALOG.csv", "data/sevir", []),                       # these scripts' default place
    ("data/SEVIR_CATALOG.csv", "data/sevir", []),                       # the notebooks'
    ("data/sevir/CATALOG.csv", "data/sevir/data", []),                  # the bucket (aws s3 sync) into data/sevir
    ("sevir/CATALOG.csv", "sevir/data", []),                            # ... into sevir
    ("datasets/sevir/CATALOG.csv", "datasets/sevir/data", []),          # Earthformer's
    ("b/CATALOG.csv", "b/data", ["--catalog_path=b/CATALOG.csv", "--sevir_root=b"]),   # the bucket's top named
    ("b/CATALOG.csv", "b/data", ["--catalog_path=b/CATALOG.csv"]),      # only the catalog
    ("b/CATALOG.csv", "b/data", ["--sevir_root=b"]),                    # only the root: the bucket's top
    ("b/CATALOG.csv", "b/data", ["--sevir_root=b/data"]),               # only the root: the type folders' parent
    ("nb/SEVIR_CATALOG.csv", "data/sevir", ["--catalog_path=nb/SEVIR_CATALOG.csv"]),
])
def test_sevir_is_found_in_each_layout_its_users_keep(tmp_path, sample, monkeypatch, capsys, catalog, files, flags):
    import train_baseline
    monkeypatch.chdir(tmp_path)
    sevir_copy(sample, catalog, files)
    found = common.resolve_data(common.parse_config(train_baseline.Config, flags))
    assert found == (Path(catalog), Path(files), "sevir")
    assert f"SEVIR: {catalog}, files under {files}" in capsys.readouterr().out      # the line names both
    assert len(common.load_catalog(found[0], found[1], mods=("vil",))) == 5
    assert not (tmp_path / common.SAMPLE_ROOT).exists()


def test_a_root_that_misses_the_files_names_one_and_the_flag_that_finds_them(tmp_path, sample, capsys):
    sevir_copy(sample, tmp_path / "b/CATALOG.csv", tmp_path / "b/data")
    for wrong, right in ((tmp_path / "b/data/vil", tmp_path / "b/data"), (tmp_path / "b/data/vil/2018", None)):
        with pytest.raises(common.UserError, match="no usable events") as e:
            common.load_catalog(tmp_path / "b/CATALOG.csv", wrong, mods=("vil",))
        assert f"{wrong}/vil/" in str(e.value) and "is missing" in str(e.value)
        assert (f"--sevir_root={right}" in str(e.value)) == (right is not None), str(e.value)
    copy = common.prepare(tmp_path / "b/CATALOG.csv", tmp_path / "b", tmp_path / "copy", 16, types=("vil",))
    assert len(common.load_catalog(copy, tmp_path / "copy", mods=("vil",))) == 5        # prepare takes the top too
    (tmp_path / "nowhere").mkdir()                                      # a catalog whose files exist nowhere
    (tmp_path / "nowhere/CATALOG.csv").write_text(Path(sample[0]).read_text())
    cfg = SimpleNamespace(CATALOG_PATH=str(tmp_path / "nowhere/CATALOG.csv"), SEVIR_ROOT=common.DEFAULT_ROOT)
    catalog, root, kind = common.resolve_data(cfg)
    with pytest.raises(common.UserError, match="dropped missing file: 5 .*nowhere/vil/.* is missing\\)$"):
        common.load_catalog(catalog, root, mods=("vil",))


# --------------------------------------------------------------------------------------
# 8. Run files: the report, checkpoints, one run per folder, resume
# --------------------------------------------------------------------------------------

def test_the_table_prints_small_scores_with_three_significant_digits(capsys):
    scores = {"mse": 3.54e-5, "mae": 0.00154, "csi_m": 0.638, "csi_pool4_m": 0.801, "csi_pool16_m": 0.873,
              **{f"{k}_{t}": float("nan") for k in ("csi", "pod", "sucr", "bias") for t in common.SEVIR_THRESHOLDS}}
    metrics = {"reference": "persistence", "references": ["persistence", "ir2_lookup_median"], "split": "test", "checkpoint": "best.pt",
               "epoch": 3, "n_events": 8, "n_samples": 32, "data": "sample", "pixel_km": 4.0,
               "model": {**scores, "mse": 1.52e-5}, "persistence": scores, "ir2_lookup_median": {**scores, "mse": 6.2e-6},
               "no_rain": {"mse": 1.42e-3, "mae": 0.0128},
               "beside": {"split": "val", "n_events": 8, "model": {"mse": 2.98e-4, "csi_m": 0.5},
                          "persistence": {"mse": 4.34e-4, "csi_m": 0.4}, "ir2_lookup_median": {"mse": 1e-4, "csi_m": 0.45}}}
    common.print_table(metrics)
    out = capsys.readouterr().out
    assert "0.0000" not in out and "0.0003" not in out
    header = next(line for line in out.splitlines() if line.strip().startswith("score"))
    assert header.split() == ["score", "model", "persistence", "ir2_lookup_median", "no", "rain"]   # a long name too
    mse_row = next(line for line in out.splitlines() if line.strip().startswith("mse"))
    assert mse_row.split()[1:] == ["1.52e-05", "3.54e-05", "6.2e-06", "0.00142"]
    assert "MSE 0.000298 / 0.000434 / 0.0001" in out                  # the validation line too
    assert "4 km pixels: pool4 = 16 km tiles, pool16 = 64 km" in out
    assert "POD and bias when the truth never did" in out and "sucr when the forecast never did" in out


def test_resume_matches_an_uninterrupted_run_and_visualize_rebuilds(tmp_path, sample, monkeypatch):
    import train_synthetic
    args = TINY[:-3] + ["--batch_size=8", "--max_train=1", "--max_val=1"] + data_args(sample)
    train_synthetic.main(args + ["--epochs=2", f"--out_dir={tmp_path / 'straight'}"])
    real_epoch = common.train_epoch

    def ctrl_c_in_epoch_2(model, loader, loss_fn, optimizer, device, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(model, loader, loss_fn, optimizer, device, epoch, *rest)
    monkeypatch.setattr(common, "train_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(common.Interrupted, match="holds epoch 1"):
        train_synthetic.main(args + ["--epochs=2", f"--out_dir={tmp_path / 'split'}"])
    undo(monkeypatch)
    train_synthetic.main(args + ["--epochs=2", f"--out_dir={tmp_path / 'split'}", "--resume=true"])
    straight = json.loads((tmp_path / "straight/metrics.json").read_text())
    split = json.loads((tmp_path / "split/metrics.json").read_text())
    assert split["model"] == straight["model"]
    last = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert len((tmp_path / "split/history.csv").read_text().strip().splitlines()) == 3
    lr = pd.read_csv(tmp_path / "straight/history.csv")["lr"]
    assert lr.iloc[-1] > 0 and lr.iloc[0] > 0            # the rate each epoch trained at, not the one after it

    with pytest.raises(common.UserError, match="already holds a run"):
        train_synthetic.main(args + ["--epochs=1", f"--out_dir={tmp_path / 'split'}"])
    with pytest.raises(common.UserError, match="base: 4 there, 8 now"):
        train_synthetic.main(args + ["--epochs=3", "--base=8", f"--out_dir={tmp_path / 'split'}", "--resume=true"])
    with pytest.raises(common.UserError, match="no checkpoint"):
        train_synthetic.main(args + [f"--out_dir={tmp_path / 'fresh'}", "--resume=true"])

    figures = ("predictions.png", "skill.png", "loss.png", "spectrum.png")
    for name in ("metrics.json", *figures):
        (tmp_path / "straight" / name).unlink()
    drawn, real_plot_loss = [], common.plot_loss    # the whole run's curve, whichever checkpoint is rescored
    monkeypatch.setattr(common, "plot_loss", lambda history, path: drawn.append((len(history), Path(path).name))
                        or real_plot_loss(history, path))
    r = run_script("visualize.py", str(tmp_path / "straight"), "--num_samples=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "straight/metrics.json").read_text())
    assert again["model"] == straight["model"] and again["ir_lookup"] == straight["ir_lookup"]
    assert again["spectrum"] == straight["spectrum"]
    assert all((tmp_path / "straight" / n).exists() for n in figures)
    assert run_script("visualize.py", str(tmp_path / "straight/last.pt"), cwd=tmp_path).returncode == 0
    assert drawn == [(2, "loss.png"), (2, "loss_last.png")]
    assert "loss_last.png" in (tmp_path / "straight" / common.RUN_MARKER).read_text().split()   # --overwrite's list


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": print}, path)                    # a pickled callable
    with pytest.raises(common.UserError, match="refused"):
        common.load_checkpoint(path)
    r = run_script("visualize.py", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr


def test_a_run_from_an_older_version_is_one_line_saying_to_start_again():
    import train_advanced
    current = common.config_dict(common.parse_config(train_advanced.Config, []))
    saved = {k: v for k, v in current.items() if k != "HALF_RES_EPOCHS"}         # a run made before the key
    with pytest.raises(common.UserError, match="older version of the scripts .its config lacks half_res_epochs"):
        common.check_same_config(saved, current, "last.pt")
    with pytest.raises(common.UserError, match="older version of the scripts .its config lacks half_res_epochs"):
        common.config_from_checkpoint(train_advanced.Config, {"model": {}, "config": saved, "epoch": 1,
                                                              "history": []}, "best.pt", "train_advanced")
    common.check_same_config(dict(current), current, "last.pt")                   # the same version resumes


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_checkpoint({"model": {}, "epoch": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(common.RunError, match="No space left on device.*previous last.pt is kept"):
        common.save_checkpoint({"model": {}, "epoch": 2}, path)
    undo(monkeypatch)
    assert common.load_checkpoint(path) == {"model": {}, "epoch": 1} and list(tmp_path.iterdir()) == [path]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                                  drawn_figures):
    import errno
    (tmp_path / "metrics.json").write_text("earlier")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    for write, name in ((lambda p: common.write_json(p, {"mse": 1.0}), "metrics.json"),
                        (lambda p: common.write_csv(p, [{"epoch": 1}]), "history.csv"),
                        (lambda p: common.save_checkpoint({"w": torch.zeros(2)}, p), "last.pt"),
                        (lambda p: common._save_figure(common._plt().figure(), p), "loss.png")):
        with pytest.raises(common.RunError, match=rf"could not write .*{name} \(No space left on device\)"):
            write(tmp_path / name)
    assert (tmp_path / "metrics.json").read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]          # no partial or temporary file
    undo(monkeypatch)

    run = tmp_path / "run"                                             # the lock: a full disk, a folder in its place
    run.mkdir()
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: full(fd))
    with common.locked(run):                                           # no room for its pid: held all the same
        with pytest.raises(common.UserError, match="in use by another run or tool .process \\?"):
            with common.locked(run):
                pass
    undo(monkeypatch)
    (run / ".lock").unlink()
    (run / ".lock").mkdir()
    with pytest.raises(common.UserError, match="not this tool's lock"):
        with common.locked(run):
            pass
    (run / ".lock").rmdir()
    real_open = os.open

    def read_only(path, *args):                                        # a read-only run folder (root ignores chmod)
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(common.UserError, match="cannot write in .*copy the run folder somewhere writable"):
        with common.locked(run):
            pass
    undo(monkeypatch)
    (run / ".lock").write_bytes(b"\xff\xfe not a pid")                  # left by a process that ended: free
    with common.locked(run):
        assert (run / ".lock").read_text() == str(os.getpid())


def test_temporary_files_never_go_through_a_link_left_in_the_folder(tmp_path, monkeypatch):
    outside = tmp_path / "outside.json"
    outside.write_text("theirs")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".metrics.00000000.tmp.json").symlink_to(outside)          # at the name the first draw gives
    draws = iter([b"\0" * 4, b"\1" * 4])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    common.write_json(run / "metrics.json", {"mse": 1.0})
    assert outside.read_text() == "theirs" and json.loads((run / "metrics.json").read_text()) == {"mse": 1.0}
    assert sorted(p.name for p in run.iterdir()) == [".metrics.00000000.tmp.json", "metrics.json"]


def test_resume_on_other_data_is_refused(tmp_path, sample):
    import train_synthetic
    rows = pd.read_csv(sample[0], dtype=str, keep_default_na=False)
    other = tmp_path / "CATALOG.csv"                                   # the sample without its first event
    rows[rows["id"] != rows["id"].iloc[0]].to_csv(other, index=False)
    args = TINY + [f"--out_dir={tmp_path / 'run'}"]
    train_synthetic.main(args + data_args(sample))
    with pytest.raises(common.UserError, match="it trained on other data .its train events"):
        train_synthetic.main(args + [f"--catalog_path={other}", f"--sevir_root={sample[1]}", "--epochs=2",
                                     "--resume=true"])
    train_synthetic.main(args + data_args(sample) + ["--epochs=2", "--resume=true"])       # its own data: resumes
    assert common.load_checkpoint(tmp_path / "run/last.pt")["epoch"] == 2


def test_torch_save_on_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    tiny = tmp_path / "tiny"                                           # a real 64 kB filesystem
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("needs a small filesystem: mount -t tmpfs (as root)")
    try:
        common.save_checkpoint({"model": {"w": torch.zeros(10)}}, tiny / "last.pt")
        with pytest.raises(common.RunError, match="could not write .*last.pt .torch.save failed.*previous last.pt is kept"):
            common.save_checkpoint({"model": {"w": torch.zeros(100_000)}}, tiny / "last.pt")
        assert torch.equal(common.load_checkpoint(tiny / "last.pt")["model"]["w"], torch.zeros(10))
        assert [p.name for p in tiny.iterdir()] == ["last.pt"]
    finally:
        subprocess.run(["umount", str(tiny)], capture_output=True)


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "last.pt"
    writer = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); import common\n"
              f"common.save_checkpoint({{'model': {{}}, 'epoch': 0, 'w': torch.zeros(1)}}, {str(path)!r}); print('ready', flush=True)\n"
              f"for e in range(1, 10**6): common.save_checkpoint({{'model': {{}}, 'epoch': e, 'w': torch.rand(4_000_000)}}, {str(path)!r})\n")
    for delay in (0.3,):
        p = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.kill()                                                  # SIGKILL, most likely mid-write
        p.wait()
        assert common.load_checkpoint(path)["epoch"] >= 0


def test_unwritable_out_dir_is_found_before_any_data(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run_script("train_baseline.py", f"--out_dir={blocker / 'run'}", "--catalog_path=/nowhere.csv",
                   cwd=tmp_path)
    assert r.returncode == 2 and "cannot write to OUT_DIR" in r.stderr and "Traceback" not in r.stderr


def test_an_earlier_run_is_never_replaced_silently_and_checks_come_first(tmp_path, sample, capsys):
    import train_synthetic
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "metrics.json"):                          # a run without last.pt
        (out / name).write_text("mine")
    code, err = one_line_error(lambda: train_synthetic.main(data_args(sample) + [f"--out_dir={out}"]), capsys)
    assert code == 2 and "already holds a run (best.pt, metrics.json)" in err
    (out / "config.json").write_text("the earlier run's")
    code, err = one_line_error(lambda: train_synthetic.main(
        [f"--out_dir={out}", "--overwrite=true", "--catalog_path=/typo/CATALOG.csv", "--sevir_root=/typo"]), capsys)
    assert code == 2 and "catalog not found" in err
    assert (out / "config.json").read_text() == "the earlier run's" and (out / "best.pt").read_text() == "mine"
    earlier = ["metrics_val.json", "skill_last_val.png", "predictions_last.png", "loss_last.png", "spectrum_val.png"]
    for name in earlier + ["notes.txt"]:                                  # visualize.py's tagged files, and mine
        (out / name).write_text("the earlier run's")
    (out / common.RUN_MARKER).write_text("\n".join(["config.json", *earlier]) + "\n")   # as they were written
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}", "--overwrite=true"])
    assert not [name for name in earlier if (out / name).exists()]       # the whole earlier run is replaced
    assert (out / "notes.txt").exists() and common.load_checkpoint(out / "best.pt")["epoch"] == 1


def test_a_run_never_deletes_files_of_a_folder_that_is_not_a_runs(tmp_path, sample, capsys):
    import train_synthetic
    mine = tmp_path / "mine"                                          # someone's folder: no run in it
    mine.mkdir()
    names = ["config.json", "loss_landscape_figure1.png", "skill_vs_lead_paper.png", "metrics_paper_table.json"]
    for name in names:
        (mine / name).write_text("mine")
    code, err = one_line_error(lambda: train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={mine}"]), capsys)
    assert code == 2 and "holds files that are not a run's (config.json, loss_landscape_figure1.png" in err
    assert all((mine / n).read_text() == "mine" for n in names)
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={mine}", "--overwrite=true"])
    assert all((mine / n).read_text() == "mine" for n in names[1:]) and (mine / "best.pt").exists()
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={mine}", "--overwrite=true"])     # now a run's
    assert all((mine / n).read_text() == "mine" for n in names[1:])  # only what a run wrote is replaced


def test_a_run_killed_before_its_first_epoch_starts_again_and_resume_says_how(tmp_path, sample, capsys):
    import train_synthetic
    out = tmp_path / "run"                                            # what kill -9 leaves before the first last.pt
    out.mkdir()
    (out / common.RUN_MARKER).write_text("config.json\n")
    (out / "config.json").write_text("{}")
    code, err = one_line_error(lambda: train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}",
                                                                                        "--resume=true"]), capsys)
    assert code == 2 and "no finished epoch; --overwrite=true starts it again" in err
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}"])           # the same command starts it
    assert common.load_checkpoint(out / "last.pt")["epoch"] == 1


def test_a_run_written_while_another_loaded_its_data_is_not_replaced(tmp_path, sample):
    import train_synthetic
    out = tmp_path / "run"
    cfg = common.parse_config(train_synthetic.Config, TINY + data_args(sample) + [f"--out_dir={out}"])
    common.check_out_dir(cfg)                                          # empty: this run may start
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}", "--seed=5"])   # another finishes first
    model = train_synthetic.build_model(cfg)
    with pytest.raises(common.UserError, match="already holds a run"):
        common.start_or_resume(model, torch.optim.Adam(model.parameters()), None, cfg)
    assert json.loads((out / "config.json").read_text())["SEED"] == 5


def test_one_run_at_a_time_in_an_out_dir(tmp_path, sample, capsys):
    import train_synthetic
    out = tmp_path / "run"
    out.mkdir()
    args = TINY + data_args(sample) + [f"--out_dir={out}"]
    with common.locked(out):                                           # another run holds it
        code, err = one_line_error(lambda: train_synthetic.main(args), capsys)
    assert code == 2 and f"in use by another run or tool (process {os.getpid()}, in {out / '.lock'})" in err
    assert not (out / "config.json").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())                    # left by a process that is gone: free
    train_synthetic.main(args)
    assert (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_a_stopped_run_saves_and_prints_a_pasteable_resume_command(tmp_path, sample):
    out = tmp_path / "out dir"                                        # a space: the command must quote it
    args = [sys.executable, "-u", str(HERE / "train_synthetic.py"), *TINY[:-3], "--epochs=500", "--max_train=1",
            "--max_val=1", *data_args(sample), f"--out_dir={out}"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("epoch 1/500"):
            break
    p.send_signal(signal.SIGINT)                                       # Ctrl-C in a terminal
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"{HERE / 'train_synthetic.py'} " in err and f"'--out_dir={out}'" in err and "--resume=true" in err
    epoch = common.load_checkpoint(out / "last.pt")["epoch"]
    assert epoch >= 1
    r = run_script("train_synthetic.py", *TINY[:-3], f"--epochs={epoch}", "--max_train=1", "--max_val=1",
                   *data_args(sample), f"--out_dir={out}", "--resume=true", cwd=tmp_path)
    assert r.returncode == 0 and "nothing left to train" in r.stdout


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_a_closed_terminal_saves_like_ctrl_c_unless_nohup_ignores_it(tmp_path, sample, monkeypatch, stop):
    real_epoch = common.train_epoch                    # SIGTERM: a scheduler or Colab, also to a job run as `cmd &`
                                                       # (SIGINT ignored); SIGHUP: the terminal closes

    def stop_in_epoch_2(model, loader, loss_fn, optimizer, device, epoch, *rest):
        if epoch == 2:
            os.kill(os.getpid(), getattr(signal, stop))
        return real_epoch(model, loader, loss_fn, optimizer, device, epoch, *rest)
    monkeypatch.setattr(common, "train_epoch", stop_in_epoch_2)
    args = [*TINY[:-3], "--epochs=3", "--max_train=1", "--max_val=1", *data_args(sample)]
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN if stop == "SIGTERM" else signal.default_int_handler)
    try:
        r = run_script("train_synthetic.py", *args, f"--out_dir={tmp_path / 'stopped'}", cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert r.returncode == 130 and "holds epoch 1" in r.stderr and "--resume=true" in r.stderr
    assert common.load_checkpoint(tmp_path / "stopped/last.pt")["epoch"] == 1
    if stop == "SIGHUP":
        seen = []
        signal.signal(signal.SIGHUP, signal.SIG_IGN)                     # started under nohup: keep going
        try:
            common.run_with_exit_status(lambda: seen.append(signal.getsignal(signal.SIGHUP)))
        finally:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert seen == [signal.SIG_IGN]


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    def stop():
        raise KeyboardInterrupt
    code, err = one_line_error(stop, capsys)
    assert code == 130 and err == "interrupted: stopped"


def test_visualize_mistakes_and_other_checkpoints(tmp_path, sample, capsys):
    import train_synthetic
    import visualize
    out = tmp_path / "run"
    train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}"])
    before = (out / "metrics.json").read_text()
    for args, words in ((["--num_samples=0"], "--num_samples=0: from 1 to 20"), (["--num_samples=-3"], "from 1 to 20"),
                        (["--split=train"], "--split='train': one of test, val"), ([], "usage:")):
        code, err = one_line_error(lambda: visualize.main(([str(out)] if args else []) + args), capsys)
        assert code == 2 and words in err
    history = (out / "history.csv").read_text()
    (out / "history.csv").write_text(history.replace(",", ";"))           # re-saved by a spreadsheet
    r = run_script("visualize.py", str(out), "--split=val", cwd=tmp_path)
    assert r.returncode == 0 and "not the run's history as it wrote it" in r.stderr
    (out / "history.csv").write_text(history)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, err = one_line_error(lambda: visualize.main([str(tmp_path / "notes.txt")]), capsys)
    assert code == 2 and "is not a checkpoint" in err and "more than tensors" not in err
    with pytest.raises(SystemExit) as e:
        common.run_with_exit_status(lambda: visualize.main(["--help"]))
    assert e.value.code == 0 and "--num_samples" in capsys.readouterr().out

    visualize.main([str(out / "last.pt")])                             # another checkpoint: its own files
    assert (out / "metrics.json").read_text() == before
    assert "data changed" not in capsys.readouterr().err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["events"]["test"].update(n=9, ids_sha1="0")                    # scored on other test events then
    torch.save(ckpt, out / "older.pt")
    visualize.main([str(out / "older.pt")])
    assert f"its test events were 9 ({ckpt['events']['test']['first']} .." in capsys.readouterr().err
    last = json.loads((out / "metrics_last.json").read_text())
    assert last["checkpoint"] == "last.pt" and last["epoch"] == 1 and last["split"] == "test"

    edits = [(lambda c: c["config"].update(BATCH_SIZE=0), "--batch_size=0: must be > 0"),
             (lambda c: c["config"].update(TARGET_SIZE=-32), "--target_size=-32"),
             (lambda c: c["config"].update(TARGET_SIZE="big"), "--target_size=big: expected int"),
             (lambda c: c["config"].update(HACK=1), "unknown key --hack"),
             (lambda c: c.pop("config"), "it has no config"), (lambda c: c.pop("epoch"), "it has no epoch"),
             (lambda c: c.update(history="all good"), "malformed"), (lambda c: c.update(events={"test": 3}), "malformed"),
             (lambda c: c["config"].update(CATALOG_PATH=str(tmp_path / "moved.csv")), "if the data moved, give those")]
    for edit, words in edits:                                           # edited or foreign checkpoints
        ckpt = torch.load(out / "best.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, tmp_path / "edited.pt")
        code, err = one_line_error(lambda: visualize.main([str(tmp_path / "edited.pt")]), capsys)
        assert code == 2 and words in err, err
    last = torch.load(out / "last.pt", weights_only=True)
    del last["model"]
    torch.save(last, out / "last.pt")
    code, err = one_line_error(lambda: train_synthetic.main(TINY + data_args(sample) + [f"--out_dir={out}",
                                                                                        "--resume=true"]), capsys)
    assert code == 2 and "last.pt is not a checkpoint of these scripts (no model weights" in err

    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["script"] = "train_advanced"                                   # weights of another script's network
    import train_advanced
    ckpt["config"] = {**common.config_dict(common.parse_config(train_advanced.Config, [])), **ckpt["config"]}
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    code, err = one_line_error(lambda: visualize.main([str(tmp_path / "mislabelled.pt")]), capsys)
    assert code == 2 and "does not fit AdvancedUNet" in err


def test_visualize_imports_only_the_training_scripts(tmp_path):
    for name in ("os", "../evil", "test_smoke"):
        path = tmp_path / "best.pt"
        torch.save({"model": {}, "script": name, "config": {}, "epoch": 1, "history": []}, path)
        r = run_script("visualize.py", str(path), cwd=tmp_path)
        assert r.returncode == 2 and f"its script {name!r} is not one of" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------
# 9. Configuration, devices, torchrun
# --------------------------------------------------------------------------------------

def test_overrides_are_typed_and_case_insensitive():
    cfg = common.parse_config(Cfg, ["--EPOCHS=5", "--lr=1", "--resume=TRUE", "--modalities=vil,ir107"])
    assert (cfg.EPOCHS, cfg.LR, cfg.RESUME, cfg.MODALITIES) == (5, 1.0, True, ("vil", "ir107"))
    assert isinstance(cfg.LR, float)
    assert Cfg.EPOCHS == 3                               # the class keeps its defaults


@pytest.mark.parametrize("args, words", [
    (["--epochs=2.5"], "--epochs=2.5: expected int"),
    (["--resume=maybe"], "expected true or false"),
    (["--nope=1"], "unknown key --nope"),
    (["epochs=1"], "expected --key=value"),
    (["--epochs=0"], "--epochs=0: must be > 0"),
    (["--batch_size=-1"], "must be > 0"),
    (["--t_in=40", "--t_out=10"], "T_IN + T_OUT must be <= 49"),
    (["--modalities=vil,radar"], "--modalities=('vil', 'radar')"),
    (["--modalities=ir069"], "must include vil"),
])
def test_bad_overrides_are_one_line_errors(args, words):
    with pytest.raises(common.UserError, match=None) as e:
        common.parse_config(Cfg, args)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["--seed=-1"], "--seed=-1: must be >= 0"),
    (["--base=0"], "--base=0: must be >= 1"),
    (["--base=-1"], "--base=-1: must be >= 1"),
    (["--lr=nan"], "--lr=nan: must be > 0"),
    (["--lr=-1e-3"], "must be > 0"),
    (["--max_val=-2"], "--max_val=-2: must be >= 0"),
    (["--split_dates=2019-06-01T00:00+02:00,2019-07-01"], "--split_dates"),
    (["--split_dates=2019-06-01"], "two dates in time order"),
    (["--input_mods=lght"], "needs ir069 or ir107"),
    (["--input_mods=vil,ir107"], "vil is the target"),
    (["--out_dir="], "--out_dir='': must name a folder"),
    (["--catalog_path="], "--catalog_path is empty"),
    (["--target_size=40"], "multiple of 16"),
    (["--target_size=1048576"], "must be <= 1536"),
    (["--base=2147483647"], "must be <= 1024"),
    (["--batch_size=99999999999999999999"], "must be below 2^31"),
    (["--device=tpu"], "one of auto, cpu, cuda"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, sample, capsys, args, words):
    import train_synthetic
    out = tmp_path / "run"
    code, err = one_line_error(lambda: train_synthetic.main(data_args(sample) + [f"--out_dir={out}"] + args), capsys)
    assert code == 2 and err.startswith("error: ") and words in err
    assert not out.exists()


def test_a_tilde_in_a_path_means_home_for_every_path(tmp_path, monkeypatch, capsys):
    import train_synthetic
    import visualize
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = common.parse_config(train_synthetic.Config, ["--out_dir=~/runs/a", "--catalog_path=~/c.csv",
                                                       "--sevir_root=~/sevir"])
    assert (cfg.OUT_DIR, cfg.CATALOG_PATH, cfg.SEVIR_ROOT) == (
        f"{tmp_path}/runs/a", f"{tmp_path}/c.csv", f"{tmp_path}/sevir")
    assert common.check_out_dir(cfg) == tmp_path / "runs/a"             # checked where it will be written
    code, err = one_line_error(lambda: visualize.main(["~/nowhere"]), capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err
    code, err = one_line_error(lambda: common._cli(["prepare", "--catalog", "~/c.csv", "--root", "~/r",
                                                    "--out", "~/p", "--size", "32"]), capsys)
    assert code == 2 and str(tmp_path / "c.csv") in err
    long = "x" * 256                                                    # a name no file system takes
    with pytest.raises(common.UserError, match="--out_dir=.*longer than 255 bytes"):
        common.parse_config(train_synthetic.Config, [f"--out_dir={tmp_path / long / 'run'}"])
    with pytest.raises(common.UserError, match="--catalog_path=.*longer than 255"):
        common.parse_config(train_synthetic.Config, [f"--catalog_path={long}.csv"])
    for fn in (lambda: visualize.main([str(tmp_path / long)]), lambda: common._cli(["sample", "--out", long])):
        code, err = one_line_error(fn, capsys)
        assert code == 2 and "longer than 255 bytes" in err


def test_target_size_must_halve():
    with pytest.raises(common.UserError, match="pooled CSI takes 16 x 16"):     # checked before any training
        common.parse_config(Cfg, ["--target_size=12"])
    with pytest.raises(common.UserError, match="multiple of 32"):
        common.parse_config(Cfg, ["--target_size=48"], size_multiple=32)
    with pytest.raises(common.UserError, match="at least 64"):
        common.parse_config(Cfg, ["--target_size=32"], size_multiple=32)
    assert common.parse_config(Cfg, ["--target_size=64"], size_multiple=32).TARGET_SIZE == 64


def test_half_res_epochs_need_a_grid_that_halves_once_more(tmp_path):
    r = run_script("train_advanced.py", "--target_size=96", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "--target_size=96: must be a multiple of 64 and at least 128 with --half_res_epochs > 0" in r.stderr
    r = run_script("train_advanced.py", "--half_res_epochs=-1", cwd=tmp_path)
    assert r.returncode == 2 and "--half_res_epochs=-1: must be >= 0" in r.stderr


def test_help_and_cli_error_exit_status(tmp_path):
    r = run_script("train_synthetic.py", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--input_mods" in r.stdout and "satellite inputs" in r.stdout
    r = run_script("train_advanced.py", "--help", cwd=tmp_path)                  # a comment continued below it
    assert "if unavailable the perceptual term is left out), or none: use untrained VGG16" in r.stdout
    r = run_script("train_synthetic.py", "--epochz=3", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown key --epochz" in r.stderr
    r = run_script("train_synthetic.py", "--catalog_path=/nowhere/CATALOG.csv", cwd=tmp_path)
    assert r.returncode == 2 and "catalog not found: /nowhere/CATALOG.csv" in r.stderr and "Traceback" not in r.stderr


def test_protocol_sets_the_benchmark_and_its_windows_and_split(sample):
    import train_baseline
    cfg = common.parse_config(train_baseline.Config, ["--protocol=sevir", "--model=unet"],
                              size_multiple=common.NOWCASTER_GRID)
    assert (cfg.T_IN, cfg.T_OUT, cfg.TARGET_SIZE, cfg.BASE, cfg.EPOCHS) == (13, 12, 384, 32, 5)
    cfg = common.parse_config(train_baseline.Config, ["--protocol=sevir", "--target_size=64"])
    assert cfg.TARGET_SIZE == 64 and cfg.T_OUT == 12                 # an explicit flag wins
    with pytest.raises(common.UserError, match="multiple of 16"):
        common.parse_config(train_baseline.Config, ["--model=unet", "--target_size=40"],
                            size_multiple=common.NOWCASTER_GRID)

    cfg.CATALOG_PATH, cfg.SEVIR_ROOT = sample[0], str(sample[1])
    data = common.load_events(cfg, mods=("vil",))
    t = lambda d: d["time_utc"]
    assert t(data.train_events).max() <= pd.Timestamp("2019-01-01") < t(data.val_events).min()
    assert t(data.val_events).max() <= pd.Timestamp("2019-06-01") < t(data.test_events).min()
    ds = common.SEVIRVIL(data.test_events, data.root, t_in=13, t_out=12, target_size=32, train=False)
    assert [ds.windows[i][1] for i in range(3)] == [0, 12, 24]       # frames 0-24, 12-36, 24-48
    assert len(ds) == 3 * len(data.test_events)


def test_torchrun_batches_are_checked_first_and_rank_1_defers_to_rank_0(tmp_path, monkeypatch):
    import train_baseline
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.UserError, match="--batch_size=3: the global batch must divide by the 2 processes"):
        common.parse_config(train_baseline.Config, ["--batch_size=3"])
    monkeypatch.delenv("WORLD_SIZE")
    cfg = common.parse_config(train_baseline.Config, [f"--out_dir={tmp_path}"])
    monkeypatch.setattr(common, "is_main", lambda: False)
    assert "rank 0 saves the run" in str(common.stopped(cfg, 1))


TORCHRUN_DRIVER = """
import json, sys, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import common, train_baseline
common.pysteps_methods = lambda: None                      # optical flow: tested elsewhere
for name in json.loads(sys.argv[4]):                       # figures: placeholders, as in this file
    setattr(common, name, lambda *a, path=None, **k: open(path or a[-1], "wb").close())
args = json.loads(sys.argv[3])
common.run_with_exit_status(lambda: train_baseline.main(args + ["--epochs=1"]))
print("FIRST RUN ENDED", flush=True)
common.run_with_exit_status(lambda: train_baseline.main(args + ["--resume=true"]))

device = common.init_device("cpu")                        # the gloo group torchrun's environment names
rank = common.dist_info()[0]


class Cfg:
    SEED, BATCH_SIZE, NUM_WORKERS, TORCH_COMPILE = 0, 2, 0, False


class Items(torch.utils.data.Dataset):                     # item 5 unreadable: one process has a batch fewer
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return None if i == 5 else (torch.full((1, 4, 4), i / 40), torch.full((1, 4, 4), i / 40))


class Many(Items):                                         # rank 1's share (odd items) 30% unreadable
    def __getitem__(self, i):
        return None if i % 2 and i < 12 else super().__getitem__(i)


def epoch(nan_on_rank=None, data=Items, shuffle=True):
    model = common.prepare_model(nn.Conv2d(1, 1, 3, padding=1), Cfg, device)
    seen = []

    def loss_fn(pred, y):
        seen.append(1)
        return F.mse_loss(pred, y) * (float("nan") if rank == nan_on_rank and len(seen) == 3 else 1)
    loader = common.make_loader(data(), Cfg, device, shuffle=shuffle)
    common.train_epoch(model, common.loader_epoch(loader, 1), loss_fn, torch.optim.SGD(model.parameters(), 0.1),
                       device, 1)


def bn():                                                  # BatchNorm re-estimated on Many: rank 1 stops in it
    model = common.prepare_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), Cfg, device)
    common.recompute_batchnorm(model, common.make_loader(Many(), Cfg, device, shuffle=False), device, 2)


def small(n, shuffle):
    Cfg.BATCH_SIZE = 4
    common.make_loader(torch.utils.data.TensorDataset(torch.zeros(n, 1)), Cfg, device, shuffle=shuffle)


def locked():
    with common.locked(sys.argv[2]):
        pass


for name, case in (("skip", epoch), ("nan", lambda: epoch(nan_on_rank=1)), ("many", lambda: epoch(None, Many, False)),
                   ("bn", bn), ("lock", locked),
                   ("batch", lambda: small(3, True)), ("val", lambda: small(1, False))):
    try:
        case()
        print(f"{rank} {name}: ok", file=sys.stderr, flush=True)
    except common.RunError as e:
        print(f"{rank} {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
"""


def test_under_torchrun_two_processes_match_one_and_every_stop_is_agreed(tmp_path, sample):
    """Two processes under gloo, started as torchrun starts them: its environment, and its agent's store served
    from this process (as the agent serves it: no process's exit takes it from the others), without a third
    import of torch. A run and its resume match one process; then every stop that one process meets stops both,
    and a check that can fail in one fails in both before training."""
    args = ["--target_size=32", "--base=4", "--epochs=2", "--batch_size=4", "--max_train=1", "--max_val=1",
            "--t_in=5", "--t_out=1", "--model=nowcastnet", *data_args(sample)]  # no BatchNorm, 44 windows: equal sums
    for more in (["--epochs=1"], ["--resume=true"]):                # the same history as the two processes'
        one = run_script("train_baseline.py", *args, f"--out_dir={tmp_path / 'one'}", *more, cwd=tmp_path)
        assert one.returncode == 0, one.stderr[-2000:]
    driver = tmp_path / "driver.py"
    driver.write_text(TORCHRUN_DRIVER)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    held = tmp_path / "held"
    with common.locked(held):                                          # another run holds this OUT_DIR
        workers = [subprocess.Popen([sys.executable, str(driver), str(HERE), str(held),
                                     json.dumps(args + [f"--out_dir={tmp_path / 'two'}"]), json.dumps(FIGURES)],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                         "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"})
                   for rank in (0, 1)]
        outputs = [w.communicate(timeout=300) for w in workers]      # a process left waiting: the timeout fails it
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    stdout = "".join(out for out, _ in outputs)
    first, resumed = stdout.split("FIRST RUN ENDED")
    assert "epoch 1/1" in first and "resumed from" in resumed               # interrupted, then resumed
    assert stdout.count("epoch 2/2") == 1 and stdout.count("FIRST RUN ENDED") == 1   # only rank 0 prints
    a = json.loads((tmp_path / "one/metrics.json").read_text())
    b = json.loads((tmp_path / "two/metrics.json").read_text())
    assert a["n_samples"] == b["n_samples"]
    for key in ("mse", "mae", "csi_16", "csi_m"):
        assert b["model"][key] == pytest.approx(a["model"][key], rel=1e-4, abs=1e-7), key
    scalars = lambda d: {k: float("nan") if v is None else v for k, v in d.items() if not isinstance(v, list)}
    assert scalars(b["persistence"]) == pytest.approx(scalars(a["persistence"]), rel=1e-9, nan_ok=True)

    said = {line.split(":")[0]: line for _, err in outputs for line in err.splitlines() if line[:2] in ("0 ", "1 ")}
    assert said["0 skip"] == "0 skip: ok" and said["1 skip"] == "1 skip: ok", outputs      # uneven batches: joined
    assert "loss is nan at epoch 1, batch 3" in said["1 nan"] and "RunError" in said["0 nan"]    # (its weights too)
    assert "could not be read (over 10%)" in said["1 many"] and "stopped with another process" in said["0 many"]
    assert "could not be read (over 10%)" in said["1 bn"] and "stopped with another process" in said["0 bn"]
    assert "UserError" in said["0 lock"] and "in use by another run" in said["0 lock"]
    assert "stopped with another process" in said["1 lock"]
    for rank in "01":                                                  # the same check fails in both, before training
        assert "cannot fill one global batch of --batch_size=4" in said[f"{rank} batch"]
        assert "1 held-out samples cannot fill 2 processes" in said[f"{rank} val"]


def test_collectives_under_nccl_reach_it_on_the_gpu(monkeypatch):
    """NCCL reduces CUDA tensors only: whatever the loop sums over processes (loss terms of an epoch, skill
    counts, spectra) must reach all_reduce on the GPU, also when it was built on the CPU. No GPU here: a
    CPU copy stands for the tensor moved to CUDA, and all_reduce checks that it got one."""
    import torch.distributed as dist
    on_gpu, reached = set(), []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (torch.device, str)) and torch.device(target).type == "cuda":
            moved = self.clone()
            on_gpu.add(id(moved))
            return moved
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(common, "dist_info", lambda: (0, 2))              # two processes ...
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")          # ... under NCCL
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reached.append(id(t) in on_gpu) or t.mul_(2))
    assert common._mean_terms({"loss": None}, [3.0], 2) == {"loss": 1.5}     # both processes: 6 over 4 samples
    skill = common.SkillScore()
    skill.update(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    skill.all_reduce()
    y = torch.rand(2, 1, 8, 8)
    loader = torch.utils.data.DataLoader(list(zip(y, y)), batch_size=2, collate_fn=common.collate_skipping)
    common.power_spectra({}, loader, torch.device("cpu"), pixel_km=1.0)
    assert len(reached) > 5 and all(reached)


# --------------------------------------------------------------------------------------
# 10. The generated sample
# --------------------------------------------------------------------------------------

def test_sample_has_sevir_layout_and_is_reproducible(tmp_path, sample):
    catalog, root = sample
    df = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    assert list(df.columns) == common.CATALOG_COLUMNS
    assert set(df["img_type"]) == {"vil", "ir069", "ir107", "lght"}
    with h5py.File(Path(root) / df[df.img_type == "vil"].iloc[0]["file_name"]) as f:
        assert f["vil"].dtype == np.uint8 and f["vil"].shape[1:] == (384, 384, 49)
        assert f["id"][0].decode() == df[df.img_type == "vil"].iloc[0]["id"]
    with h5py.File(Path(root) / df[df.img_type == "ir107"].iloc[0]["file_name"]) as f:
        assert f["ir107"].dtype == np.int16 and f["ir107"].shape[1:] == (192, 192, 49)
    lght = df[df.img_type == "lght"].iloc[0]
    with h5py.File(Path(root) / lght["file_name"]) as f:
        assert f[lght["id"]].shape[1] == 5
    times = pd.to_datetime(df["time_utc"])
    assert (times <= "2019-01-01").any() and times.between("2019-01-01 00:00:01", "2019-06-01").any()
    assert (times > "2019-06-01").any()

    a, b = tmp_path / "a", Path(root)                                 # the session's: the same arguments
    common.make_sample_sevir(a, n_events=5, seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".lock")
    assert len(files) >= 7                                           # catalog, marker, 3 image files, lght
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)


def test_sample_never_replaces_real_data(tmp_path, capsys):
    real = tmp_path / "sevir"
    real.mkdir()
    (real / "CATALOG.csv").write_text("someone's real catalog")
    for args, words in ((["--out", str(real)], "holds files this tool did not write"),
                        (["--out", str(real / "CATALOG.csv")], "it is a file"),
                        (["--out", str(tmp_path / "s"), "--events", "299"], "--events=299: from 3"),
                        (["--out", str(tmp_path / "s"), "--events", "2"], "from 3"),
                        (["--out", str(tmp_path / "s"), "--seed", "-1"], "--seed=-1")):
        code, err = one_line_error(lambda: common._cli(["sample", *args]), capsys)
        assert code == 2 and words in err
    assert (real / "CATALOG.csv").read_text() == "someone's real catalog" and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------
# 11. download and prepare (download against a local HTTP server that honours Range)
# --------------------------------------------------------------------------------------

def test_download_reads_only_the_chosen_events_and_resumes(tmp_path, bucket, capsys):
    url, root, state = bucket
    out = tmp_path / "subset"
    files = sum(p.stat().st_size for t in ("vil", "ir107") for p in (root / "data" / t).rglob("*.h5"))
    state["fail_next"] = 2                                        # transient errors: retried
    catalog = common.download(out, types=("vil", "ir107"), max_events=2, since="2019-01-01", base_url=url,
                              backoff=0.01)
    catalog_bytes = (root / "CATALOG.csv").stat().st_size
    event_bytes = 384 * 384 * 49 + 192 * 192 * 49 * 2                 # one event's VIL and IR107 frames
    assert state["served"] - catalog_bytes < 2 * event_bytes + 2e6 < 0.5 * files   # 2 of 5 events (and metadata)
    events = common.load_catalog(catalog, out, mods=("vil", "ir107"))
    assert len(events) == 2 and (events["time_utc"] >= pd.Timestamp("2019-01-01")).all()
    remote = pd.read_csv(root / "CATALOG.csv", dtype=str, keep_default_na=False)
    for e in events.itertuples():                                  # same bytes as the source event
        src = remote[(remote["id"] == e.id) & (remote["img_type"] == "vil")].iloc[0]
        with h5py.File(root / "data" / src["file_name"]) as a, h5py.File(out / e.vil_file) as b:
            assert np.array_equal(a["vil"][int(src["file_index"])], b["vil"][e.vil_index])
            assert b["id"][e.vil_index].decode() == e.id
    state["served"] = 0
    common.download(out, types=("vil", "ir107"), max_events=2, since="2019-01-01", base_url=url)
    assert state["served"] == 0                                   # finished files are not fetched again

    out2 = tmp_path / "interrupted"
    state.update(served=0, limit=int(8e6))                        # the connection is refused past 8 MB
    with pytest.raises(common.UserError, match="HTTP 403"):
        common.download(out2, types=("vil",), max_events=3, base_url=url, backoff=0.01)
    assert list(out2.rglob("*.part"))
    first = state["served"]
    state.update(served=0, limit=None)
    common.download(out2, types=("vil",), max_events=3, base_url=url, backoff=0.01)
    assert state["served"] < 3 * 7_225_344 - 0.5 * first + 1e6     # went on from the events it had
    assert not list(out2.rglob("*.part")) and len(common.load_catalog(out2 / "CATALOG.csv", out2, ("vil",))) == 3

    with pytest.raises(common.UserError, match="HTTP 404"):
        common.download(tmp_path / "x", base_url=url + "/nothing-here", backoff=0.01)
    with pytest.raises(common.UserError, match="no network or unknown host"):
        common.download(tmp_path / "y", base_url="http://sevir.invalid", backoff=0.01)


def test_unsafe_file_names_are_refused_by_load_catalog_and_download(tmp_path, bucket, capsys):
    url, root, state = bucket
    unsafe = [str(tmp_path / "escaped.h5"), "../escaped.h5", "vil\\2019\\a.h5", "C:/sevir/a.h5", ""]
    rows = [{"id": f"S9{i}", "file_name": name, "file_index": "0"} for i, name in enumerate(unsafe)]
    local = tmp_path / "local"
    local.mkdir()
    catalog = vil_catalog(local, rows + [{"id": "S1", "file_index": "0"}])
    events = common.load_catalog(catalog, local, mods=("vil",))
    captured = capsys.readouterr()
    assert events["id"].tolist() == ["S1"] and "unsafe file_name: 5" in captured.out
    assert "unsafe file_name are refused, e.g." in captured.err and "escaped.h5" in captured.err

    remote = pd.read_csv(root / "CATALOG.csv", dtype=str, keep_default_na=False)
    vil = remote[remote["img_type"] == "vil"].iloc[0]
    extra = pd.DataFrame([{**vil.to_dict(), "id": f"S8{i}", "time_utc": "2018-07-01 00:00:00", "file_name": name}
                          for i, name in enumerate(unsafe)])
    pd.concat([extra, remote]).to_csv(root / "CATALOG.csv", index=False)    # the earliest events are unsafe
    (root / "data" / ".." / "escaped.h5").write_bytes((root / "data" / vil["file_name"]).read_bytes())
    out = tmp_path / "subset"
    catalog = common.download(out, types=("vil",), max_events=2, base_url=url, backoff=0.01)
    assert not (tmp_path / "escaped.h5").exists() and not (out.parent / "escaped.h5").exists()
    assert not any("escaped" in p or "\\" in p for p in state["paths"])      # never even asked for
    assert "unsafe file_name" in capsys.readouterr().err
    assert len(common.load_catalog(catalog, out, ("vil",))) == 2

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / common.SUBSET_MARKER).write_text("an earlier download\n")
    (linked / "vil").symlink_to(elsewhere)                               # a link inside --out
    with pytest.raises(common.UserError, match="leads outside --out"):
        common.download(linked, types=("vil",), max_events=1, base_url=url, backoff=0.01)
    assert not any(elsewhere.rglob("*"))


def test_a_mirror_that_sends_too_much_is_refused(bucket):
    url, root, state = bucket
    body, size = common.http_get(f"{url}/CATALOG.csv", 0, 100)
    assert len(body) == 100 and size == (root / "CATALOG.csv").stat().st_size
    with pytest.raises(common.UserError, match="more than the 1,000 asked for"):
        common.http_get(f"{url}/CATALOG.csv", limit=1000)                 # a "catalog" above the limit
    state["extra"] = 50
    with pytest.raises(common.UserError, match="more than the 100 asked for"):
        common.http_get(f"{url}/CATALOG.csv", 0, 100, backoff=0.01)


def test_download_checks_everything_before_the_network_and_never_replaces_real_data(tmp_path, bucket, capsys,
                                                                                   monkeypatch):
    url, root, state = bucket
    real = tmp_path / "sevir"
    real.mkdir()
    (real / "CATALOG.csv").write_text("someone's real catalog")
    for args, words in ((["--out", str(real)], "holds files this tool did not write"),
                        (["--out", str(real / "CATALOG.csv")], "it is a file"),
                        (["--max-events", "0"], "--max-events=0: must be >= 1"),
                        (["--max-events", "-3"], "must be >= 1"),
                        (["--since", "yesterday"], "--since=yesterday: expected a date"),
                        (["--until", "06/01/2019"], "--until=06/01/2019"),
                        (["--base-url", "notaurl"], "--base-url=notaurl"),
                        (["--types", "vil,radar"], "unknown radar")):
        full = ["download", "--out", str(tmp_path / "new"), "--base-url", url] + args
        code, err = one_line_error(lambda: common._cli(full), capsys)
        assert code == 2 and words in err
    assert state["paths"] == [] and not (tmp_path / "new").exists()
    assert (real / "CATALOG.csv").read_text() == "someone's real catalog"

    monkeypatch.setattr(common, "ASK_ABOVE_BYTES", 1e6)                 # pretend this is a terabyte
    code, err = one_line_error(lambda: common._cli(["download", "--out", str(tmp_path / "big"), "--base-url", url,
                                                    "--types", "vil"]), capsys)
    assert code == 2 and "add --yes" in err and state["paths"] == [f"/data/{common.SAMPLE_MARKER}", "/CATALOG.csv"]
    common._cli(["download", "--out", str(tmp_path / "big"), "--base-url", url, "--types", "vil", "--max-events", "1",
                 "--yes"])
    assert len(common.load_catalog(tmp_path / "big" / "CATALOG.csv", tmp_path / "big", ("vil",))) == 1


def test_a_prepared_copy_gives_the_same_items_and_reads_only_its_frames(tmp_path, sample, capsys):
    catalog, root = sample
    copy = tmp_path / "prepared"
    new_catalog = common.prepare(catalog, root, copy, 32, types=ALL_MODS)
    assert "prepared 5 events" in capsys.readouterr().out
    df = pd.read_csv(new_catalog, dtype=str, keep_default_na=False)
    assert list(df.columns) == common.CATALOG_COLUMNS and set(df["img_type"]) == set(ALL_MODS)
    assert set(df.loc[df.img_type != "lght", "size_x"]) == {"32"} and set(df.loc[df.img_type == "lght", "size_x"]) == {"48"}
    vil = df[df.img_type == "vil"].iloc[0]
    with h5py.File(copy / vil["file_name"]) as f:
        assert f["vil"].dtype == np.uint8 and f["vil"].shape[1:] == (32, 32, 49) and f["vil"].chunks == (1, 32, 32, 1)
        assert f["id"][int(vil["file_index"])].decode() == vil["id"]

    a = common.load_catalog(catalog, root, ALL_MODS)
    b = common.load_catalog(new_catalog, copy, ALL_MODS)
    assert a["id"].tolist() == b["id"].tolist()
    ir = common.SEVIR_ZSCORE["ir069"][1]
    half_unit = {"vil": 0.5 / 255, "ir069": 0.5 / ir, "ir107": 0.5 / common.SEVIR_ZSCORE["ir107"][1], "lght": 1e-6}
    for make in (lambda ev, r: common.SEVIRVIL(ev, r, t_in=3, t_out=2, target_size=32, train=False),
                 lambda ev, r: common.SEVIRMultimodal(ev, r, mods=ALL_MODS, t_in=3, t_out=1, target_size=32, train=False),
                 lambda ev, r: common.SyntheticRadarDataset(ev, r, input_mods=("ir069", "ir107", "lght"), t_sample=None,
                                                            target_size=32, train=False)):
        original, prepared = make(a, root), make(b, copy)
        mods = original.mods if not hasattr(original, "input_mods") else original.input_mods + ("vil",)
        for i in range(len(original)):
            (xa, ya), (xb, yb) = original[i], prepared[i]
            assert (ya - yb).abs().max() <= half_unit["vil"] + 1e-6            # y is VIL
            for c in range(xa.shape[0]):
                assert (xa[c] - xb[c]).abs().max() <= half_unit[mods[c]] + 1e-6, (type(original).__name__, mods[c])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read with Linux's /proc/self/io")
def test_a_prepared_copy_reads_little_more_than_the_frames_of_an_item(tmp_path, sample):
    catalog, root = sample
    copy = common.prepare(catalog, root, tmp_path / "prepared", 128)
    for path, base in ((catalog, root), (copy, tmp_path / "prepared")):
        events = common.load_catalog(path, base)
        ds = common.SyntheticRadarDataset(events, base, t_sample=None, target_size=128, train=True)
        ds.reader.cache_mb = 0                                          # as for events too many to keep
        per_item = bytes_read_per_item(ds, 60)
        if base == root:
            original = per_item
    stored = 128 * 128 * (1 + 2 + 2)                                    # 80 KB: 1 VIL + 2 IR frames at 128 as stored
    assert per_item <= 1.5 * stored and original >= 50 * per_item


def test_prepare_resumes_and_refuses_bad_arguments(tmp_path, sample, monkeypatch, capsys):
    catalog, root = sample
    copy = tmp_path / "prepared"
    calls, real = [], common.shrink_event

    def interrupted(event, grid):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(event, grid)
    monkeypatch.setattr(common, "shrink_event", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.prepare(catalog, root, copy, 32)
    assert list(copy.rglob("*.part"))
    calls.clear()
    monkeypatch.setattr(common, "shrink_event", lambda event, grid: calls.append(1) or real(event, grid))
    common.prepare(catalog, root, copy, 32)
    assert len(calls) == 3 * 5 - 3 and not list(copy.rglob("*.part"))     # went on from the 4th of 15 events
    full = tmp_path / "full"
    common.prepare(catalog, root, full, 32)
    assert common.is_generated(full) and common.is_generated(copy)      # still reported as generated data
    assert (full / common.PREPARED_MARKER).read_text().endswith("not real data).\n")   # a newline, not "\\n"
    (full / common.PREPARED_MARKER).write_text("Written by python common.py prepare: SEVIR events at 32 x 32.\n")
    assert not common.is_generated(full)                                 # a copy of real SEVIR is real
    (full / common.PREPARED_MARKER).write_text((copy / common.PREPARED_MARKER).read_text())
    before = sorted((p, p.stat().st_mtime_ns) for p in full.rglob("*"))
    with pytest.raises(common.UserError, match="holds a prepared copy of another size .*at 32 x 32.*--size=16"):
        common.prepare(catalog, root, full, 16)                         # never replaced without a word
    assert sorted((p, p.stat().st_mtime_ns) for p in full.rglob("*")) == before
    for p in full.rglob("*.h5"):
        with h5py.File(p) as f, h5py.File(copy / p.relative_to(full)) as g:
            for name in f:
                assert np.array_equal(f[name][()], g[name][()])

    for args, words in ((["--size", "5"], "--size=5"), (["--size", "32", "--types", "vil,radar"], "unknown radar"),
                        (["--size", "32", "--max-events", "0"], "--max-events=0"),
                        (["--size", "32", "--since", "soon"], "--since=soon")):
        code, err = one_line_error(lambda: common._cli(["prepare", "--catalog", str(catalog), "--root", str(root),
                                                        "--out", str(tmp_path / "new"), *args]), capsys)
        assert code == 2 and words in err
    code, err = one_line_error(lambda: common._cli(["prepare", "--catalog", str(catalog), "--root", str(root),
                                                    "--out", str(root), "--size", "32"]), capsys)
    assert code == 2 and "holds files this tool did not write" in err
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for selection in (["--event-type", "Hial"], ["--since", "2030-01-01"]):      # a typo, an empty period
        code, err = one_line_error(lambda: common._cli(["prepare", "--catalog", str(catalog), "--root", str(root),
                                                        "--out", str(copy), "--size", "32", *selection]), capsys)
        assert code == 2 and "no usable event in the catalog matches" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before       # the copy untouched


def test_download_with_size_writes_the_prepared_form(tmp_path, bucket):
    url, root, state = bucket
    got = common.download(tmp_path / "dl", types=("vil", "ir107"), max_events=2, base_url=url, size=32, backoff=0.01)
    made = common.prepare(root / "CATALOG.csv", root / "data", tmp_path / "prep", 32, types=("vil", "ir107"),
                          max_events=2)
    a, b = pd.read_csv(got, dtype=str), pd.read_csv(made, dtype=str)
    assert a.drop(columns=[]).equals(b)
    assert common.is_generated(tmp_path / "dl") and common.is_generated(tmp_path / "prep")   # still the sample
    (root / "data" / common.SAMPLE_MARKER).unlink()                     # a bucket of real SEVIR has no such mark
    common.download(tmp_path / "real", types=("vil",), max_events=1, base_url=url, size=32, backoff=0.01)
    assert not common.is_generated(tmp_path / "real")
    for p in (tmp_path / "prep").rglob("*.h5"):
        with h5py.File(p) as f, h5py.File(tmp_path / "dl" / p.relative_to(tmp_path / "prep")) as g:
            assert all(np.array_equal(f[n][()], g[n][()]) for n in f) and set(f) == set(g)


def test_an_interrupted_tool_starts_its_own_folder_again(tmp_path, sample, monkeypatch, capsys):
    def stop_at(n_calls, fn):                                          # fn, stopped as Ctrl-C or SIGTERM stop it
        calls = []

        def stopped(*args):
            calls.append(1)
            if len(calls) == n_calls:
                raise KeyboardInterrupt
            return fn(*args)
        return stopped
    monkeypatch.setattr(common, "_make_event", stop_at(2, common._make_event))
    with pytest.raises(KeyboardInterrupt):
        common.make_sample_sevir(tmp_path / "s", n_events=3)
    undo(monkeypatch)
    assert (tmp_path / "s" / common.SAMPLE_MARKER).exists() and not (tmp_path / "s" / "CATALOG.csv").exists()
    assert not list((tmp_path / "s").rglob("*.tmp"))
    stale = tmp_path / "s" / "vil" / "2018" / "SEVIR_VIL_X.h5.tmp"      # what kill -9 leaves: files and a lock
    stale.write_bytes(b"half")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "s" / ".lock").write_text(dead.stdout.strip())
    catalog = common.make_sample_sevir(tmp_path / "s", n_events=3)      # the same command starts it again
    assert len(common.load_catalog(catalog, tmp_path / "s")) == 3 and not stale.exists()

    monkeypatch.chdir(tmp_path)                                         # a default run stopped while it made the sample
    (tmp_path / common.SAMPLE_ROOT / "vil").mkdir(parents=True)
    (tmp_path / common.SAMPLE_ROOT / common.SAMPLE_MARKER).write_text(common.SAMPLE_MARKER_TEXT)
    made = []
    monkeypatch.setattr(common, "make_sample_sevir", lambda root: made.append(root) or copy_sample(sample, root))
    cfg = type("Cfg", (), {"CATALOG_PATH": common.DEFAULT_CATALOG, "SEVIR_ROOT": common.DEFAULT_ROOT})
    catalog, root, kind = common.resolve_data(cfg)
    assert made == [common.SAMPLE_ROOT] and kind == "sample" and catalog.exists()
    (tmp_path / common.SAMPLE_ROOT / common.SAMPLE_MARKER).write_text("a sample of another version\n")
    with pytest.raises(common.UserError, match="made by an older version of the scripts: delete the folder"):
        common.resolve_data(cfg)
    (tmp_path / common.SAMPLE_ROOT / "CATALOG.csv").unlink()             # under torchrun only rank 0 makes it
    waited = []
    monkeypatch.setattr(common, "is_main", lambda: False)
    monkeypatch.setattr(common, "barrier", lambda: waited.append(1) or copy_sample(sample, common.SAMPLE_ROOT))
    assert common.resolve_data(cfg)[2] == "sample" and made == [common.SAMPLE_ROOT] and waited == [1]
    undo(monkeypatch)

    copy = tmp_path / "prepared"                                        # prepare: a .part broken by a crash
    monkeypatch.setattr(common, "shrink_event", stop_at(2, common.shrink_event))
    with pytest.raises(KeyboardInterrupt):
        common.prepare(sample[0], sample[1], copy, 32)
    undo(monkeypatch)
    part = next(copy.rglob("*.part"))
    broken = bytearray(part.read_bytes())
    broken[1024:1536] = b"\xff" * 512                                 # its metadata overwritten, its mark intact
    part.write_bytes(bytes(broken))
    assert common._holds(part, None)
    done = common.prepare(sample[0], sample[1], copy, 32)
    assert len(common.load_catalog(done, copy)) == 5 and not list(copy.rglob("*.part"))

    code, err = one_line_error(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "/d/x.h5")), capsys)
    assert code == 1 and "the disk is full (/d/x.h5): free space and run the same command again" in err


def test_a_tool_holds_its_folder_and_a_small_copy_is_named(tmp_path, sample, capsys):
    catalog, root = sample
    copy = tmp_path / "prepared"
    copy.mkdir()
    with common.locked(copy):                                           # another prepare is writing there
        code, err = one_line_error(lambda: common._cli(["prepare", "--catalog", str(catalog), "--root", str(root),
                                                        "--out", str(copy), "--size", "16"]), capsys)
    assert code == 2 and "in use by another run or tool" in err and not (copy / common.PREPARED_MARKER).exists()
    small = common.prepare(catalog, root, copy, 16)
    cfg = SimpleNamespace(CATALOG_PATH=small, SEVIR_ROOT=str(copy), SPLIT_DATES=("2019-01-01", "2019-06-01"),
                          MAX_TRAIN=0, MAX_VAL=0, MAX_TEST=0, TARGET_SIZE=32)
    capsys.readouterr()
    common.load_events(cfg, ("vil", "ir069"))
    err = capsys.readouterr().err
    assert err.count("below --target_size=32") == 2 and "vil in" in err and "16 x 16" in err
    cfg.TARGET_SIZE = 16
    common.load_events(cfg, ("vil", "ir069"))
    assert "below" not in capsys.readouterr().err
    again = common.prepare(small, copy, tmp_path / "again", 8)           # a copy of a copy, at its own grid
    assert set(pd.read_csv(again)["size_x"].dropna().astype(int)) <= {8, 48}


# --------------------------------------------------------------------------------------
# The scripts end to end: the command line, a cell in Colab or Jupyter, %run
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra", [
    ("train_baseline.py", ["--t_in=4", "--t_out=2"]),
    ("train_multimodal.py", ["--t_in=3", "--modalities=vil,ir107,lght"]),
    ("train_synthetic.py", ["--input_mods=ir069,ir107,lght"]),
    ("train_advanced.py", ["--target_size=64", "--half_res_epochs=0", "--max_train=1", "--batch_size=7"]),
])
def test_script_end_to_end(tmp_path, sample, script, extra, monkeypatch):
    def offline(*args, **kwargs):                                      # never download weights in a test
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    out = tmp_path / "out"                                           # the script and common.py, nothing else
    r = run_alone(script, *TINY, *extra, *data_args(sample), f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.json", "history.csv", "last.pt", "best.pt", "metrics.json", "predictions.png",
                 "loss.png", "skill.png"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert set(ckpt) >= {"model", "config", "epoch", "best_val", "metrics", "script"} and ckpt["epoch"] == 1
    assert "optimizer" not in ckpt and "optimizer" in torch.load(out / "last.pt", weights_only=True)
    assert ckpt["script"] == script[:-3]
    metrics = json.loads((out / "metrics.json").read_text())
    ref = REFERENCE[script]
    keys = {"mse", "mae", "csi_m", "csi_pool4_m", "csi_pool16_m"} | {
        f"{s}_{t}" for s in ("csi", "pod", "sucr", "bias") for t in common.SEVIR_THRESHOLDS}
    assert keys <= set(metrics["model"]) and keys <= set(metrics[ref])
    assert metrics["data"] == "sample" and metrics["n_samples"] > 0 and metrics["split"] == "test"
    size = 64 if script == "train_advanced.py" else 32
    assert metrics["pixel_km"] == 384 / size and f"{384 // size} km pixels: pool4 = {4 * 384 // size} km" in r.stdout
    assert "model" in r.stdout and ref in r.stdout                   # the table printed at the end
    margin, low, high = metrics["intervals"][ref]["mse"]             # model over reference, paired bootstrap
    assert low <= margin <= high and np.isclose(margin, metrics[ref]["mse"] - metrics["model"]["mse"], rtol=1e-6)
    assert "95% interval from a paired bootstrap" in r.stdout
    if script == "train_advanced.py":                                # said, recorded, and the term left out
        assert metrics["perceptual_backbone"] == "off" and "weights unavailable" in r.stdout
        assert "train_perceptual" not in pd.read_csv(out / "history.csv").columns
    if ref == "ir_lookup":                                           # synthetic radar: how sharp is it?
        spectrum = metrics["spectrum"]
        assert (out / "spectrum.png").stat().st_size > 0 and set(spectrum) == {"wavelength_km", "truth", "model", *metrics["references"]}
        assert spectrum["wavelength_km"][0] == 384.0 and len(spectrum["model"]) == size // 2
    else:
        assert "spectrum" not in metrics and not (out / "spectrum.png").exists()
    if "--t_out=2" in extra:
        assert (out / "forecast.gif").stat().st_size > 0 and len(metrics["model"]["csi_m_per_lead"]) == 2


def test_advanced_logs_mse_and_perceptual_and_selects_on_validation_mse(tmp_path, sample, monkeypatch):
    import train_advanced
    out = tmp_path / "adv"
    calls = []
    real_fit, real_bn = common.fit, common.recompute_batchnorm
    monkeypatch.setattr(common, "fit", lambda *a, **k: calls.append(k.get("advanced")) or real_fit(*a, **k))
    monkeypatch.setattr(common, "recompute_batchnorm", lambda *a: calls.append(a[-1]) or real_bn(*a))
    halved = []                                         # the grid each training batch had before and after
    real_half = common.half_resolution
    monkeypatch.setattr(common, "half_resolution", lambda x, y: halved.append(x.shape[-1]) or real_half(x, y))
    train_advanced.main(TINY[:-4] + ["--target_size=128", "--epochs=2", "--vgg_weights=none", "--max_train=1",
                                     "--max_val=1", "--batch_size=7", "--loss=mse", "--perceptual_pool=4",
                                     "--half_res_epochs=1"] + data_args(sample) + [f"--out_dir={out}"])
    assert calls == [True, 2, 2]                        # 07A's recipe; BatchNorm re-estimated each epoch
    assert halved == [128] * 7                          # epoch 1's 7 batches (49 frames) halved, epoch 2's not
    history = pd.read_csv(out / "history.csv")
    assert {"train_mse", "train_perceptual", "val_mse", "val_perceptual", "val_loss"} <= set(history.columns)
    assert np.allclose(history["val_loss"], history["val_mse"] + 0.1 * history["val_perceptual"], rtol=1e-5)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == history.loc[history["val_mse"].idxmin(), "epoch"]


def test_protocol_run_on_the_cpu_writes_per_lead_metrics_and_the_val_split(tmp_path, sample):
    out = tmp_path / "out"                  # the protocol's 13 -> 12 frames and windows, on a tiny grid
    r = run_script("train_baseline.py", "--protocol=sevir", "--max_train=1", "--max_val=1",
                   "--epochs=1", "--target_size=32", "--base=4", "--batch_size=3", *data_args(sample),
                   f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["references"] == ["persistence"] + (["optical_flow", "dense_flow"] if common.pysteps_methods()
                                                       else []) + ["shift"]
    for name in ["model"] + metrics["references"]:
        assert len(metrics[name]["csi_m_per_lead"]) == 12 and len(metrics[name]["mse_per_lead"]) == 12
    assert metrics["n_samples"] == 3 and (out / "forecast.gif").stat().st_size > 0
    r = run_script("visualize.py", str(out), "--split=val", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    val = json.loads((out / "metrics_val.json").read_text())
    assert val["split"] == "val" and (out / "forecast_val.gif").exists() and (out / "skill_val.png").exists()
    assert val["beside"]["model"] == metrics["model"] and val["model"] == metrics["beside"]["model"]
    assert val["references"] == metrics["references"] and all(val["beside"][n] == metrics[n] for n in val["references"])


@pytest.mark.parametrize("script", ["train_baseline.py", "train_multimodal.py", "train_synthetic.py",
                                    "train_advanced.py"])
def test_a_script_pasted_into_a_cell_runs_with_its_edited_config(tmp_path, sample, script, capsys):
    out = tmp_path / "out"
    size = 64 if script == "train_advanced.py" else 32
    text = edit_config((HERE / script).read_text(), CATALOG_PATH=str(sample[0]), SEVIR_ROOT=str(sample[1]),
                       OUT_DIR=str(out), TARGET_SIZE=size, BASE=4, EPOCHS=1, BATCH_SIZE=8, MAX_TRAIN=1,
                       MAX_VAL=1, **({"VGG_WEIGHTS": "none", "PERCEPTUAL_POOL": 4, "HALF_RES_EPOCHS": 0}
                                     if script == "train_advanced.py" else {}))
    run_in_cell(text)
    assert (out / "metrics.json").exists() and (out / "predictions.png").exists()
    assert torch.load(out / "best.pt", weights_only=True)["script"] == script[:-3]
    assert json.loads((out / "config.json").read_text())["TARGET_SIZE"] == size      # the cell's Config

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                               # the same cell again
        run_in_cell(text)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already holds a run" in err and "OVERWRITE = True" in err


def test_a_pasted_cell_resumes_shows_help_and_errors_without_a_banner(tmp_path, sample, capsys, monkeypatch):
    out = tmp_path / "out"
    config = dict(CATALOG_PATH=str(sample[0]), SEVIR_ROOT=str(sample[1]), OUT_DIR=str(out), TARGET_SIZE=32, BASE=4,
                  BATCH_SIZE=8, MAX_TRAIN=1, MAX_VAL=1)
    text = (HERE / "train_synthetic.py").read_text()
    run_in_cell(edit_config(text, EPOCHS=1, **config))
    run_in_cell(edit_config(text, EPOCHS=2, RESUME=True, **config))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert "resumed from" in capsys.readouterr().out

    cell = run_in_cell(text.replace('if __name__ == "__main__":', "if False:"))    # define, do not run
    with pytest.raises(SystemExit) as e:
        common.run_with_exit_status(lambda: cell["main"](["--help"]))
    assert e.value.code == 0 and "--input_mods" in capsys.readouterr().out

    monkeypatch.setattr(common, "in_ipython", lambda: True)                # inside Jupyter: no SystemExit
    run_in_cell(edit_config(text, EPOCHS=0, **config))
    assert capsys.readouterr().err.strip() == "error: --epochs=0: must be > 0"

    # visualize.py rebuilds the pasted run from the script beside it, and says what it needs without it
    r = run_script("visualize.py", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_alone("visualize.py", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "put train_synthetic.py beside visualize.py" in r.stderr and "Traceback" not in r.stderr


def test_run_style_argv_reads_the_flags(tmp_path, sample, monkeypatch):
    import runpy
    out = tmp_path / "out"
    saved = sys.argv
    sys.argv = ["train_baseline.py", *TINY, "--t_in=3", *data_args(sample), f"--out_dir={out}"]   # %run script.py ...
    try:
        runpy.run_path(str(HERE / "train_baseline.py"), run_name="__main__")
    finally:
        sys.argv = saved
    assert json.loads((out / "config.json").read_text())["T_IN"] == 3
    sys.argv = ["-c", "--epochs=7"]                     # python -c "exec(open('train_synthetic.py').read())" ...
    monkeypatch.setattr(common, "started_from_file", lambda: False)    # its __main__ has no file
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            cfg = common.parse_config(Cfg)
    finally:
        sys.argv = saved
    assert cfg.EPOCHS == Cfg.EPOCHS and "command line (--epochs=7) is ignored" in err.getvalue()
