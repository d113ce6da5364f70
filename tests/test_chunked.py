"""The chunked (constant-depth) d-block kernel: chunk sizes, memory bound, kernel choice, and the
ATen op counts that make it fit a GPU. Its exactness against the reference runs in
test_kernels.py and test_functional.py (the ``kernel`` fixture)."""

from __future__ import annotations

import pytest
import torch

from dblock import functional as F
from dblock.errors import ConfigError
from dblock.functional import reference as R
from dblock.functional.blocks.chunked import SINGLE, chunk_plan
from dblock.nn import DBlockLayer
from experiments.bench_impls import build, count_launching_ops, run_once
from experiments.points import poisson_input
from tests.conftest import DEVICE
from tests.test_kernels import check, make

FIG3_T = (32, 64, 128, 256, 512, 1024, 2048)
FIG3_D = (5, 10, 15, 20, 25, 30)


@pytest.mark.parametrize("chunk", [1, 2, 7, None, 10**6])
@pytest.mark.parametrize("b,n,t,d", [(2, 5, 300, 2), (1, 4, 97, 10), (2, 3, 11, 4)])
def test_any_chunk_size_matches_reference(chunk, b, n, t, d):
    """c = 1 (a carry Toeplitz over every step) to c >= L (one Toeplitz per block)."""
    current, beta, weight, bias = make(b, n, t, seed=t * d)
    spikes = check(
        lambda: F.dblock_neurons(current, beta, d, weight, bias, kernel="chunked", chunk=chunk),
        lambda: R.dblock_neurons(current, beta, d, weight, bias),
        [current, beta, weight, bias],
    )
    assert spikes.sum() > 0


@pytest.mark.parametrize("longest", [1, 2, 16, 17, 409, 2048, 100_000])
def test_chunk_plan_bounds_memory(longest):
    """The two Toeplitz matrices hold N (c^2 + M^2) values, about 2 N L, not N L^2; a block of
    at most ``SINGLE`` steps is one chunk (one (L, L) Toeplitz: no carry, no padding)."""
    c, m = chunk_plan([longest])
    assert c * m >= longest > c * (m - 1)  # M chunks of c cover the block, none wasted
    if longest <= SINGLE:
        assert (c, m) == (longest, 1)
    else:
        assert c * c + m * m <= 2 * longest + 4 * c
    assert chunk_plan([longest], 8) == (min(8, longest), -(-longest // min(8, longest)))


def test_pick_kernel_per_device():
    assert F.pick_kernel("auto", torch.device("cpu")) == "loop"
    assert F.pick_kernel("auto", torch.device("cuda")) == "chunked"
    assert F.pick_kernel("chunked", torch.device("cpu")) == "chunked"
    assert F.pick_kernel("loop", torch.device("cuda")) == "loop"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(kernel="gpu"), "unknown d-block kernel 'gpu'; valid: auto, loop, chunked"),
        (dict(kernel="chunked", chunk=0), "chunk=0 is not allowed: chunk must be an integer >= 1"),
        (dict(kernel="chunked", chunk=2.5), "chunk=2.5 is not allowed: chunk must be an integer"),
    ],
)
def test_bad_kernel_settings_are_clear_errors(kw, message):
    current, beta, _, _ = make(1, 2, 20, seed=0)
    with pytest.raises(ValueError, match=message):
        F.dblock_neurons(current, beta, 4, **kw)
    with pytest.raises(ValueError, match=message):
        DBlockLayer(3, 2, 4, **kw)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.kernel=gpu", "model.kernel='gpu' is unknown; choose one of: auto, loop, chunked"),
        ("model.chunk=0", "model.chunk=0 is not allowed"),
    ],
)
def test_config_rejects_bad_kernel(tmp_path, override, message):
    # imported here: the file is collected on GPU nodes without Hydra (experiments/gpu_check.py)
    from dblock.launch.config import check_config
    from tests.test_reliability import composed

    check_config(composed(tmp_path, "model.kernel=chunked", "model.chunk=8"))
    with pytest.raises(ConfigError, match=message):
        check_config(composed(tmp_path, override))


def test_layers_with_either_kernel_agree():
    torch.manual_seed(0)
    x = poisson_input(3, 20, 90, str(DEVICE)).double()
    layers = {k: DBlockLayer(20, 6, 9, kernel=k).double().to(DEVICE) for k in ("loop", "chunked")}
    layers["chunked"].load_state_dict(layers["loop"].state_dict())
    out = {k: layer(x) for k, layer in layers.items()}
    assert torch.equal(out["loop"], out["chunked"]) and out["loop"].sum() > 0
    for k in out:
        out[k].sum().backward()
    for (name, p), q in zip(
        layers["loop"].named_parameters(), layers["chunked"].parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)


def _ops(mode: str, t: int, d: int, batch: int = 2, n_in: int = 12, n: int = 5) -> int:
    """ATen ops of one fwd+bwd of a d-block layer with the kernel ``auto`` picks on CUDA."""
    torch.manual_seed(0)
    layer = build("dblock_chunked", "layer", mode, n_in, n, d, "cpu")
    x, params = poisson_input(batch, n_in, t, "cpu"), list(layer.parameters())
    run_once(layer, x, params)  # warm-up
    return count_launching_ops(layer, x, params)[0]


@pytest.mark.parametrize("mode", ["feedforward", "recurrent"])
def test_aten_ops_meet_the_gpu_targets_at_every_fig3_point(mode):
    """<= 200 ops per fwd+bwd of a feedforward layer whatever T and d; <= 200 + 20 d for a
    recurrent one (the loop kernel: 1,575 to 11,738 at T 512-2048)."""
    counts = {(t, d): _ops(mode, t, d) for t in FIG3_T for d in FIG3_D}
    for (t, d), ops in counts.items():
        assert ops <= (200 if mode == "feedforward" else 200 + 20 * d), (t, d, ops)
    if mode == "feedforward":  # no growth with T or d (a remainder block adds a few ops;
        # blocks of at most SINGLE steps are one chunk and skip the carry's)
        assert max(counts[2048, d] for d in FIG3_D) <= max(counts[512, d] for d in FIG3_D)
    else:  # a fixed number per block
        per_block = [(counts[t, 30] - counts[t, 5]) / 25 for t in FIG3_T if t >= 512]
        assert max(per_block) <= 15


@pytest.mark.slow
def test_aten_ops_at_the_measured_shape():
    """The same targets at the shape the counts are quoted for (batch 16, 1000 -> 100); the
    tiny shape above differs only by a few internal ops of the larger reductions."""
    for mode, t, d in (("feedforward", 2048, 5), ("recurrent", 2048, 30)):
        ops = _ops(mode, t, d, batch=16, n_in=1000, n=100)
        assert ops <= (200 if mode == "feedforward" else 200 + 20 * d)
        assert abs(ops - _ops(mode, t, d)) <= 10


def test_chunked_keeps_float32_matmuls_when_tf32_is_allowed():
    """The Toeplitz matmuls are the membrane: they run at full float32 precision whatever the
    global matmul precision, which they leave as they found it."""
    current, beta, weight, bias = make(2, 6, 200, seed=3, dtype=torch.float32)
    want = F.dblock_neurons(current, beta, 4, weight, bias, kernel="chunked")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = F.dblock_neurons(current, beta, 4, weight, bias, kernel="chunked")
        got.sum().backward()
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["cuda", "mkldnn"])
def test_chunked_runs_after_the_per_backend_tf32_setting(backend):
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the API torch documents now)
    made every chunked forward raise "mix of the legacy and new APIs": the kernel read
    ``torch.get_float32_matmul_precision()``. It now keeps IEEE float32 through the per-backend
    API and leaves the setting as it found it."""
    current, beta, weight, bias = make(2, 6, 200, seed=3, dtype=torch.float32)
    want = F.dblock_neurons(current, beta, 4, weight, bias, kernel="chunked")
    matmul = getattr(torch.backends, backend).matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        got = F.dblock_neurons(current, beta, 4, weight, bias, kernel="chunked")
        got.sum().backward()
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = old
    assert torch.equal(got, want)
