"""One-shot GPU check: correctness, training and the speed targets on one CUDA device.

    python -m experiments.gpu_check                       # on a machine with a GPU, < 6 minutes
    python -m experiments.gpu_check --quick               # fewer points and runs, < 3 minutes
    python -m experiments.gpu_check --device cpu --reduced --out /tmp/check   # smoke run

Before anything else it names, in one line, every package it needs that this Python lacks (the
project's dependencies and pytest; a GPU node often has torch, Lightning and torchmetrics only),
and stops: install them from a wheelhouse (README, "Offline install"). Each section starts only
while the time budget (``--budget-s``: 330 s, ``--quick`` 165 s) lasts; a section left out is
reported as skipped, and the subprocesses (pytest, run.py) stop at the budget's end.

In order, each section's rows going into one CSV and one markdown table under ``--out``:

1. ``tests``: every test file that touches the kernels (those importing ``dblock.functional``
   or ``dblock.nn``, found by reading tests/: the kernel equivalence tests against the
   step-by-step reference, the sparse-input and the mixed-precision tests), their tensors on the
   device (``DBLOCK_TEST_DEVICE``), but for those marked slow (CPU trainings: section 2 trains
   on the device).
2. ``train``: ``python run.py trainer.accelerator=gpu``, a subprocess as a user runs it, for a
   few epochs on the embedded dataset (the event store lives on the device; batches are built
   there), in float32, bf16-mixed and 16-mixed (``--quick`` and the CPU: float32 and
   bf16-mixed).
3. ``fig3``: the Fig. 3 points T in {512, 2048} x d in {5, 10, 30}, feedforward and recurrent
   (batch 128, 1000 -> 100): the d-block layer (kernel ``auto``) against dblock's standard layer,
   with the paper's speedup (Fig. 3a, feedforward) as the target, the launching ops and bytes moved
   per fwd+bwd (``experiments/dispatch_count.py``) and the bytes over the floor's.
4. ``shd_layer``: one SHD-shaped layer (batch 128, 700 -> 128, T 500, d 10) against its
   projection floor (target: <= 1.3x) and against snnTorch / Norse (compiled) when installed.
5. ``shd_step``: the whole training step of the SHD network (layer, readout, cross-entropy,
   backward, Adam) against the same step with the neurons removed (two projections only), in
   float32 and under bf16 autocast.

Times are medians of interleaved rounds (wall clock, synchronised). Exit code 1 if a test or a
training run failed or a section was skipped for time, 2 if a package is missing; the speed and
op-count targets are reported (``met``), not enforced, and only on a GPU (on the CPU ``auto``
runs the loop kernel, which the targets are not for).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# What the check needs, import name -> pip name: the project's dependencies (pyproject.toml; a
# test keeps the two lists equal) and pytest, which runs the kernel tests.
NEEDS = {
    "torch": "torch", "pytorch_lightning": "pytorch-lightning", "hydra": "hydra-core",
    "omegaconf": "omegaconf", "tonic": "tonic", "torchmetrics": "torchmetrics", "wandb": "wandb",
    "h5py": "h5py", "matplotlib": "matplotlib", "pytest": "pytest",
}  # fmt: skip


def missing_packages(needs: dict[str, str] = NEEDS) -> list[str]:
    """The pip names of the packages in ``needs`` that this Python cannot import (looked up,
    not imported)."""
    missing = []
    for module, package in needs.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def refuse_if_missing() -> None:
    """Stop with one ``error:`` line naming every missing package and how to install them."""
    missing = missing_packages()
    if missing:
        sys.stderr.write(
            f"error: gpu_check needs {', '.join(missing)}, which {sys.executable} cannot "
            "import; without network install them from a wheelhouse built on a connected machine "
            "(README, Offline install): pip install --no-index --find-links WHEELHOUSE dblock "
            "pytest\n"
        )
        raise SystemExit(2)


if __name__ == "__main__":  # before the imports below, which need some of them
    refuse_if_missing()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim import Adam  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from dblock.files import atomic_write  # noqa: E402
from dblock.models import SNNClassifier  # noqa: E402
from experiments.bench_impls import (  # noqa: E402
    PEERS,
    build,
    dispatch_counts,
    interleaved_medians,
    run_once,
    train_step,
    warmed_up,
)
from experiments.figtools import markdown_table  # noqa: E402
from experiments.paper_values import FIG3A  # noqa: E402
from experiments.points import poisson_input  # noqa: E402

log = logging.getLogger("gpu_check")
COLUMNS = [
    "section", "case", "mode", "t_len", "d", "time_ms", "launching_ops", "bytes_moved",
    "speedup", "paper", "over_floor", "bytes_over_floor", "result", "target", "met",
]  # fmt: skip
SECTIONS = ("tests", "train", "fig3", "shd_layer", "shd_step")
MODES = ("feedforward", "recurrent")
# a test file touches the kernels when it imports them or the layers that call them
KERNEL_IMPORT = re.compile(
    r"^\s*(from dblock\.(functional|nn)\b|from dblock import .*\b(functional|nn)\b|"
    r"import dblock\.(functional|nn)\b)",
    re.M,
)
TINY_RUN = ["dataset.n_train=256", "dataset.n_test=128", "dataset.batch_size=64", "n_hidden=16"]


@dataclass
class Sizes:
    """Problem sizes: the real ones, or a reduced set for a CPU smoke run."""

    batch: int = 128
    n_in: int = 1000
    n: int = 100
    t_values: tuple = (512, 2048)
    d_values: tuple = (5, 10, 30)
    shd: tuple = (128, 700, 128, 500, 10, 20)  # batch, n_in, n, T, d, classes
    rounds: int = 5
    warmup: int = 2
    epochs: int = 3
    run_args: list = field(default_factory=list)
    test_filter: str = "not aten_ops"
    # pytest -m: the tests marked slow are CPU training runs, which ``train`` does on the device
    test_marks: str = "not slow"
    half_16: bool = True  # train in 16-mixed too (on a GPU)
    budget_s: float = 330.0  # sections start only while this lasts (6 minutes with the start)

    @classmethod
    def reduced(cls) -> Sizes:
        return cls(
            batch=4, n_in=20, n=8, t_values=(64,), d_values=(2, 4), shd=(4, 12, 6, 40, 4, 5),
            rounds=1, warmup=1, epochs=1, run_args=TINY_RUN,
            test_filter="beta_at_the_clamp_edges or expanded_grad",
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Sizes:
        """Half the full check: one Fig. 3 length and d, two training runs of 2 epochs; the
        same tests."""
        return cls(
            t_values=(512,), d_values=(10,), rounds=3, warmup=1, epochs=2, half_16=False,
            budget_s=165.0,
        )  # fmt: skip


def kernel_test_files(root: Path = ROOT) -> list[str]:
    """tests/test_*.py files that import ``dblock.functional`` or ``dblock.nn``, sorted."""
    return sorted(
        str(path.relative_to(root))
        for path in (root / "tests").glob("test_*.py")
        if KERNEL_IMPORT.search(path.read_text())
    )


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def row(section: str, case: str, **kw) -> dict:
    return {"section": section, "case": case, **kw}


def _fmt(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# --- 1. tests ------------------------------------------------------------------------------


def run_tests(sizes: Sizes, device: str, deadline: float) -> list[dict]:
    """The kernel tests with ``DBLOCK_TEST_DEVICE=device``, in a pytest subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *kernel_test_files()]
    cmd += ["-k", sizes.test_filter] + (["-m", sizes.test_marks] if sizes.test_marks else [])
    env = dict(os.environ, DBLOCK_TEST_DEVICE=device, PYTHONPATH=str(ROOT))
    log.info("tests: %s (DBLOCK_TEST_DEVICE=%s)", " ".join(cmd[3:]), device)
    proc = _run(cmd, cwd=ROOT, env=env, deadline=deadline)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    if proc.returncode != 0:
        log.error("tests failed:\n%s", proc.stdout[-5000:] + proc.stderr[-2000:])
    return [
        row(
            "tests",
            f"kernel equivalence on {device}",
            result=summary.strip("= "),
            target="all pass",
            met="yes" if proc.returncode == 0 else "no",
        )
    ]


# --- 2. training ---------------------------------------------------------------------------


def _run(cmd: list[str], deadline: float, **kw) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured, stopped at ``deadline`` (then exit code 124)."""
    try:
        left = remaining(deadline)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=left, **kw)
    except subprocess.TimeoutExpired as exc:
        out, err = (
            x.decode() if isinstance(x, bytes) else x or "" for x in (exc.output, exc.stderr)
        )
        return subprocess.CompletedProcess(cmd, 124, out, err + "\ntimed out (time budget)")


def run_training(sizes: Sizes, device: str, out: Path, deadline: float) -> list[dict]:
    """``python run.py`` for ``sizes.epochs`` epochs per precision, as a user runs it (a
    subprocess, its settings as overrides); reads each results.json."""
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    half_16 = accelerator == "gpu" and sizes.half_16
    precisions = ["32", "bf16-mixed"] + (["16-mixed"] if half_16 else [])
    rows = []
    for precision in precisions:
        run_dir = out / f"train_{precision}"
        args = [
            f"trainer.accelerator={accelerator}",
            f"trainer.precision={precision}",
            f"trainer.max_epochs={sizes.epochs}",
            "logger=none",
            f"hydra.run.dir={run_dir}",
            *sizes.run_args,
        ]
        log.info("train: python run.py %s", " ".join(args))
        env = dict(os.environ, DBLOCK_DATA=str(out / "data"), PYTHONPATH=str(ROOT))
        proc = _run([sys.executable, str(ROOT / "run.py"), *args], deadline, cwd=out, env=env)
        results = run_dir / "results.json"
        if proc.returncode != 0 or not results.is_file():
            log.error("run.py failed (%s):\n%s", precision, proc.stderr[-3000:])
            result, met = f"failed (exit {proc.returncode})", "no"
        else:
            res = json.loads(results.read_text())
            result = (
                f"test acc {res['test/acc']:.4f}, {res['train/epoch_time_s']:.2f} s/epoch, "
                f"{res['epoch']} epochs"
            )
            met = "yes" if res["status"] == "ok" else "no"
        rows.append(row("train", precision, result=result, target="trains", met=met))
    return rows


# --- 3. Fig. 3 -----------------------------------------------------------------------------


def _timed(calls: dict, device: str, sizes: Sizes) -> dict:
    """{key: (median ms, launching ops, bytes moved)} for ``calls`` {key: zero-argument
    callable}: warmed up, then timed in interleaved rounds."""
    for go in calls.values():
        for _ in range(sizes.warmup):
            go()
    medians = interleaved_medians(calls, sizes.rounds, device)
    return {k: (medians[k] * 1e3, *dispatch_counts(go)) for k, go in calls.items()}


def layer_runner(impl: str, d: int | None, x, **shape) -> Callable[[], None]:
    """One forward + backward of the layer ``impl`` (``build``'s layer scope, ``shape`` its mode,
    n_in, n and device) on ``x``, as a zero-argument callable."""
    fn = build(impl, "layer", d=d, **shape)
    return partial(run_once, fn, x, list(fn.parameters()))


def fig3(sizes: Sizes, device: str) -> list[dict]:
    rows = []
    judge = not device.startswith("cpu")
    for mode in MODES:
        for t_len in sizes.t_values:
            log.info("fig3: %s T=%d", mode, t_len)
            x = poisson_input(sizes.batch, sizes.n_in, t_len, device)
            make = partial(layer_runner, x=x, mode=mode, n_in=sizes.n_in, n=sizes.n, device=device)
            cases = {(impl, None): make(impl, None) for impl in ("floor", "standard")}
            for d in sizes.d_values:
                cases[("dblock", d)] = make("dblock", d)
            timed = _timed(cases, device, sizes)
            std_ms = timed[("standard", None)][0]
            floor_ms, _, floor_bytes = timed[("floor", None)]
            for (impl, d), (ms, ops, moved) in timed.items():
                r = row("fig3", impl, mode=mode, t_len=t_len, d=d, time_ms=_fmt(ms, 3))
                r.update(launching_ops=ops, bytes_moved=moved, over_floor=_fmt(ms / floor_ms))
                r["bytes_over_floor"] = _fmt(moved / floor_bytes)
                if impl == "dblock":
                    speedup = std_ms / ms
                    want = FIG3A.get(d, {}).get(t_len) if mode == "feedforward" else None
                    r.update(speedup=_fmt(speedup), paper=_fmt(want, 1))
                    if judge:  # the targets are for the kernel auto picks on a GPU
                        limit = 200 if mode == "feedforward" else 200 + 20 * d
                        ok = ops <= limit and (want is None or speedup >= want)
                        r["target"] = f"ops <= {limit}" + (", speedup >= paper" if want else "")
                        r["met"] = "yes" if ok else "no"
                rows.append(r)
    return rows


# --- 4. SHD layer --------------------------------------------------------------------------


def shd_layer(sizes: Sizes, device: str) -> list[dict]:
    batch, n_in, n, t_len, d, _ = sizes.shd
    rows = []
    judge = not device.startswith("cpu")
    x = poisson_input(batch, n_in, t_len, device)
    for mode in MODES:
        log.info("shd_layer: %s", mode)
        make = partial(layer_runner, x=x, mode=mode, n_in=n_in, n=n, device=device)
        cases = {"floor": make("floor", None), "dblock": make("dblock", d)}
        for peer in ("snntorch", "norse_compiled"):
            go = warmed_up(partial(make, peer, None), 1, f"shd_layer {peer} ({mode})")
            if go is not None:
                cases[peer] = go
        timed = _timed(cases, device, sizes)
        (floor_ms, _, floor_bytes), db_ms = timed["floor"], timed["dblock"][0]
        for impl, (ms, ops, moved) in timed.items():
            r = row("shd_layer", impl, mode=mode, t_len=t_len, d=d if impl == "dblock" else None)
            r.update(time_ms=_fmt(ms, 3), launching_ops=ops, bytes_moved=moved)
            r.update(over_floor=_fmt(ms / floor_ms), bytes_over_floor=_fmt(moved / floor_bytes))
            if impl == "dblock" and judge:
                r.update(target="<= 1.30 x floor", met="yes" if ms <= 1.3 * floor_ms else "no")
            elif impl in PEERS:
                r.update(speedup=_fmt(ms / db_ms), target="d-block faster")
                r["met"] = "yes" if ms > db_ms else "no"
            rows.append(r)
    return rows


# --- 5. SHD training step ------------------------------------------------------------------


class ProjectionsOnly(nn.Module):
    """The SHD network with the neurons removed: hidden and readout projections, logits summed
    over time. The floor of a whole training step."""

    def __init__(self, n_in: int, n: int, n_classes: int) -> None:
        super().__init__()
        self.hidden, self.readout = nn.Linear(n_in, n), nn.Linear(n, n_classes)

    def forward(self, x):
        return self.readout(self.hidden(x)).sum(0)


def shd_step(sizes: Sizes, device: str) -> list[dict]:
    batch, n_in, n, t_len, d, n_classes = sizes.shd
    x = poisson_input(batch, n_in, t_len, device)
    labels = torch.randint(0, n_classes, (batch,), generator=torch.Generator().manual_seed(0))
    labels = labels.to(device)
    rows = []
    for precision, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        log.info("shd_step: %s", precision)
        nets = {"floor": ProjectionsOnly(n_in, n, n_classes).to(device)}
        for mode in MODES:
            nets[f"dblock {mode}"] = SNNClassifier(
                n_in, n, 1, n_classes, "dblock", d, mode == "recurrent", t_len=t_len
            ).to(device)
        cases = {  # one training step each (forward, cross-entropy, backward, Adam)
            k: partial(train_step, net, Adam(net.parameters(), lr=1e-3), x, labels, dtype)
            for k, net in nets.items()
        }
        timed = _timed(cases, device, sizes)
        floor_ms, _, floor_bytes = timed["floor"]
        for case, (ms, ops, moved) in timed.items():
            r = row("shd_step", f"{case}, {precision}", t_len=t_len, time_ms=_fmt(ms, 3))
            r.update(launching_ops=ops, bytes_moved=moved, over_floor=_fmt(ms / floor_ms))
            r["bytes_over_floor"] = _fmt(moved / floor_bytes)
            r["d"] = d if case != "floor" else None
            rows.append(r)
    return rows


# --- output --------------------------------------------------------------------------------


def markdown(rows: list[dict], header: str) -> str:
    text = header + "\n"
    for section in SECTIONS:
        sub = [r for r in rows if r["section"] == section]
        if not sub:
            continue
        cols = [c for c in COLUMNS[1:] if any(r.get(c) not in (None, "") for r in sub)]
        table = markdown_table(cols, [[r.get(c) or "" for c in cols] for r in sub])
        text += f"\n## {section}\n\n{table}"
    return text


def write(rows: list[dict], out: Path, header: str) -> tuple[Path, Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS} for r in rows)
    csv_path, md_path = out / "gpu_check.csv", out / "gpu_check.md"
    for path, text in ((csv_path, buf.getvalue()), (md_path, markdown(rows, header))):
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
    return csv_path, md_path


def environment(device: str) -> str:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"# dblock GPU check\n\n{time.strftime('%Y-%m-%d %H:%M:%S')}, device {device} "
        f"({name or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, load average {load:.2f}\n"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--reduced", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer points and runs (< 3 minutes)")
    p.add_argument(
        "--budget-s", type=float, default=None,
        help="sections start only while this lasts (default 330 s; --quick 165 s)",
    )  # fmt: skip
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS)
    )
    p.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.csv and .md")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False; on a CPU run "
                "--device cpu --reduced (a smoke run)")  # fmt: skip
    return args


def main(argv=None) -> int:
    refuse_if_missing()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    sizes = Sizes.reduced() if args.reduced else Sizes.quick() if args.quick else Sizes()
    budget = sizes.budget_s if args.budget_s is None else args.budget_s
    deadline = time.monotonic() + budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    header = environment(args.device)
    start = time.perf_counter()
    rows: list[dict] = []
    steps = {
        "tests": lambda: run_tests(sizes, args.device, deadline),
        "train": lambda: run_training(sizes, args.device, out, deadline),
        "fig3": lambda: fig3(sizes, args.device),
        "shd_layer": lambda: shd_layer(sizes, args.device),
        "shd_step": lambda: shd_step(sizes, args.device),
    }
    for section in args.sections:
        if remaining(deadline) <= 0:
            log.error("%s: skipped, the %.0f s budget is spent", section, budget)
            rows.append(row(section, "skipped", result=f"{budget:.0f} s budget spent", met="no"))
            continue
        rows += steps[section]()
        write(rows, out, header)  # what ran so far is kept if a later section dies
    elapsed = time.perf_counter() - start
    csv_path, md_path = write(rows, out, header + f"\n{elapsed:.0f} s in all\n")
    sys.stdout.write(md_path.read_text())
    log.info("wrote %s and %s (%.0f s)", csv_path, md_path, elapsed)
    failed = [
        r
        for r in rows
        if (r["section"] in ("tests", "train") or r["case"] == "skipped") and r.get("met") == "no"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
