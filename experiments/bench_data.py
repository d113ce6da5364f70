"""Data-path benchmark: one epoch of SHD-sized batches through dblock's loader vs tonic's.

Generates SHD-sized data (8156 training samples by default, several thousand events each over
700 units in about 1 s) in the real layout (``<dir>/SHD/shd_{train,test}.h5``, vlen float16
times, vlen uint16 units), then, in one run on one machine:

- dblock: bulk read + binning + cache write (once), cached reload (later runs), and one epoch of
  batches built on the device by ``SHDDataModule.on_after_batch_transfer``, as dense (T, B, 700)
  tensors (``dataset.input=dense``, what tonic's frames are) and as sparse COO tensors
  (``sparse``, what training on the CPU uses by default);
- tonic: ``tonic.datasets.SHD`` with ``tonic.transforms.ToFrame`` (dt bins up to T) and a torch
  ``DataLoader``, batches moved to the same device;
- a d-block training epoch of the default SHD model (fwd + bwd + Adam) on the batches the
  device uses by default (``dataset.input=auto``), estimated from a few batches and extrapolated
  to the epoch's batch count.

    python -m experiments.bench_data
    python -m experiments.bench_data --samples 64 --mean-events 300   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from datamodules.tonic_datasets import SHDDataModule
from experiments.bench_impls import endless, parse_with_malloc, train_step
from experiments.points import N_CLASSES, N_IN, SHD_EVENTS, generate_shd_like


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_dblock(root: Path, args, device: torch.device) -> dict:
    def module():
        return SHDDataModule(root, n_in=N_IN, n_classes=N_CLASSES, t_len=args.t_len,
                             dt_ms=args.dt_ms, batch_size=args.batch, val_fraction=0.0,
                             download=False, max_dropped_fraction=1.0)  # timing only: any T

    shutil.rmtree(root / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    module().setup()  # bulk read, bin, write the cache
    cold = time.perf_counter() - t0
    dm = module()
    t0 = time.perf_counter()
    dm.setup()  # from the cache
    cached = time.perf_counter() - t0
    dm.store_on("train", device)  # held on the device for the whole run
    epochs = {}
    for inp in ("dense", "sparse"):
        dm.input = inp
        sync(device)
        n_batches, total = 0, 0.0
        t0 = time.perf_counter()
        for batch in dm.train_dataloader():
            batch["idx"] = batch["idx"].to(device)
            x, y = dm.on_after_batch_transfer(batch, 0)
            if n_batches == 0:
                total = float(x.sum()) if inp == "dense" else float(x._values().sum())
            n_batches += 1
        sync(device)
        epochs[inp] = time.perf_counter() - t0
    dm.input = "auto"
    return {"cold_load_s": cold, "cached_load_s": cached, "epoch_s": epochs["dense"],
            "sparse_epoch_s": epochs["sparse"], "batches": n_batches,
            "first_batch_events": total, "dm": dm}


def time_tonic(root: Path, args, device: torch.device) -> dict:
    import tonic
    from tonic.transforms import ToFrame
    from torch.utils.data import DataLoader

    # tonic checks that its archive exists before using the extracted file: an empty stand-in
    (root / "SHD" / "shd_train.h5.zip").touch()
    window_us = args.dt_ms * 1000.0
    frame = ToFrame(sensor_size=(N_IN, 1, 1), time_window=window_us, start_time=0,
                    end_time=args.t_len * window_us)
    ds = tonic.datasets.SHD(save_to=str(root), train=True, transform=frame)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.tonic_workers)
    n_batches = 0
    t0 = time.perf_counter()
    for x, y in loader:
        # (B, T, 1, 700) -> the model's contiguous time-major (T, B, 700)
        x = x.to(device).float().squeeze(2).transpose(0, 1).contiguous()
        y = y.to(device)
        n_batches += 1
    sync(device)
    return {"epoch_s": time.perf_counter() - t0, "batches": n_batches, "shape": tuple(x.shape)}


def time_model(dm: SHDDataModule, args, device: torch.device) -> dict:
    from dblock.models import SNNClassifier

    net = SNNClassifier(n_in=N_IN, n_hidden=128, n_layers=1, n_classes=N_CLASSES, model="dblock",
                        d=10, t_len=args.t_len).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = endless(dm)

    def step() -> None:
        batch = next(batches)
        batch["idx"] = batch["idx"].to(device)
        train_step(net, opt, *dm.on_after_batch_transfer(batch, 0))

    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.model_batches):
        step()
    sync(device)
    return {"per_batch_s": (time.perf_counter() - t0) / args.model_batches}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=8156, help="training samples (SHD: 8156)")
    p.add_argument("--mean-events", type=float, default=SHD_EVENTS, help="mean events per sample")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--t-len", type=int, default=500)
    p.add_argument("--dt-ms", type=float, default=2.0)
    p.add_argument("--model-batches", type=int, default=3, help="timed d-block training batches")
    p.add_argument("--tonic-workers", type=int, default=0, help="DataLoader workers for tonic")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", type=Path, default=None, help="data directory (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parse_with_malloc(p, argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        t0 = time.perf_counter()
        n_events = generate_shd_like(root / "SHD" / "shd_train.h5", args.samples,
                                     args.mean_events, 0)
        generate_shd_like(root / "SHD" / "shd_test.h5", max(1, args.samples // 32),
                          args.mean_events, 1)
        print(f"generated {args.samples} samples, {n_events} events "
              f"({n_events / args.samples:.0f}/sample) in {time.perf_counter() - t0:.1f} s "
              f"under {root}; device {device}, {torch.get_num_threads()} torch threads")
        ours = time_dblock(root, args, device)
        theirs = time_tonic(root, args, device)
        sparse = ours["dm"].sparse_on(device)
        model = time_model(ours.pop("dm"), args, device)

    model_epoch = model["per_batch_s"] * ours["batches"]
    used = "sparse_epoch_s" if sparse else "epoch_s"  # the batches dataset.input=auto builds
    res = {
        "samples": args.samples, "events": n_events, "batch": args.batch, "t_len": args.t_len,
        "dt_ms": args.dt_ms, "device": str(device),
        "dblock_epoch_s": ours["epoch_s"], "dblock_sparse_epoch_s": ours["sparse_epoch_s"],
        "dblock_cold_load_s": ours["cold_load_s"],
        "dblock_cached_load_s": ours["cached_load_s"], "tonic_epoch_s": theirs["epoch_s"],
        "speedup_epoch": theirs["epoch_s"] / ours["epoch_s"],
        "speedup_epoch_incl_cached_load": theirs["epoch_s"]
        / (ours["epoch_s"] + ours["cached_load_s"]),
        "speedup_epoch_incl_cold_load": theirs["epoch_s"] / (ours["epoch_s"] + ours["cold_load_s"]),
        "speedup_epoch_sparse": theirs["epoch_s"] / ours["sparse_epoch_s"],
        "model_input": "sparse" if sparse else "dense",
        "model_epoch_s_estimated": model_epoch,
        "data_fraction_of_dblock_epoch": ours[used] / model_epoch,
    }
    print(f"dblock: cold load {ours['cold_load_s']:.2f} s (once), cached load "
          f"{ours['cached_load_s']:.2f} s (per run), epoch of {ours['batches']} batches "
          f"{ours['epoch_s']:.3f} s dense, {ours['sparse_epoch_s']:.3f} s sparse")
    print(f"tonic : SHD + ToFrame + DataLoader({args.tonic_workers} workers), epoch of "
          f"{theirs['batches']} batches {theirs['epoch_s']:.2f} s")
    print(f"ratio tonic / dblock per epoch: {res['speedup_epoch']:.1f}x dense, "
          f"{res['speedup_epoch_sparse']:.1f}x sparse "
          f"(with dblock's cached load: {res['speedup_epoch_incl_cached_load']:.1f}x, "
          f"with its cold first load: {res['speedup_epoch_incl_cold_load']:.1f}x)")
    print(f"d-block training epoch (default SHD model, {res['model_input']} batches, estimated "
          f"from {args.model_batches} batches x {ours['batches']}): {model_epoch:.2f} s; dblock's "
          f"data path ({res['model_input']}) is {100 * res['data_fraction_of_dblock_epoch']:.2f} "
          "% of it")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
