"""torchrun with DDP and FSDP2 (gloo, 2 CPU processes) on tiny-moe reproduces the single-process loss curve and the
expert load for the same global batch (tests/test_train_distributed.py's check, for the MoE family).

The training router samples from torch's global RNG (tests/test_phimoe_router.py). Two ranks cut the global batch
into other micro-batches than one process and so would draw other numbers for the same tokens: these runs train
with `router_sampling: false` and `input_jitter_noise: 0` (model_args), the deterministic inference routing with
its band-softmax gradient, so that one process and two ranks must agree to rounding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phiforge.train import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_phimoe_train import moe_args, records  # noqa: E402
from test_train import REPO, data, losses  # noqa: E402,F401  (data is a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

DIST_STEPS = 6
KW = dict(max_steps=DIST_STEPS, ckpt_every=DIST_STEPS, eval_every=DIST_STEPS,
          model_args={"router_sampling": False, "input_jitter_noise": 0.0})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain.main(moe_args(data, out, batch_size=4, grad_accum=1, **KW))
    return out


@pytest.mark.parametrize("parallel,batch_size,grad_accum", [("ddp", 1, 2), ("fsdp2", 2, 1)])
def test_moe_torchrun_matches_single_process(tmp_path, data, single, parallel, batch_size, grad_accum):
    """Two gloo ranks against one process on the same global batch of 4, deterministic routing (module doc).
    FSDP2 shards per block: train/__init__.wrap_model finds PhiMoE's blocks at model.model.layers as Phi-3's."""
    out = tmp_path / "run"
    args = moe_args(data, out, batch_size=batch_size, grad_accum=grad_accum, parallel=parallel, export=True, **KW)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "phiforge.train.pretrain", *args], env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"world 2 ({parallel})" in r.stderr
    got, want = losses(out), losses(single)
    err = max(abs(a - b) for a, b in zip(got, want))
    print(f"{parallel}: max abs loss difference to one process {err:.1e} over {DIST_STEPS} steps")
    assert len(got) == len(want) == DIST_STEPS and err <= 1e-5, (got, want)
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "phimoe"
    rng = [load_file(str(out / "ckpt" / f"step_{DIST_STEPS:08d}" / f"rng_rank{r}.safetensors"))["torch_cpu"]
           for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank its own torch RNG stream (seed + rank): the router's draws differ
    load = lambda p: torch.tensor([x["moe/load"] for x in records(p) if "loss" in x])  # noqa: E731
    assert (load(out) - load(single)).abs().max() <= 1e-6  # pooled over ranks: the same routing as one process
