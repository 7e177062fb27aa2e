"""torchrun with DDP and with FSDP2 (gloo, 2 CPU processes) reproduces the single-process loss curve for the
same global batch. Each rank reads its own slice of every global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phiforge.train import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, data, losses, tiny_args  # noqa: E402,F401  (data is a fixture)

STEPS = 10


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain.main(tiny_args(data, out, **common(data), batch_size=4, grad_accum=1))
    return losses(out)


def common(data):
    return dict(max_steps=STEPS, seq_len=32, ckpt_every=STEPS, eval_every=STEPS, threads=1,
                sources={"a": str(data / "a"), "b": str(data / "b")}, phases=[{"weights": {"a": 0.5, "b": 0.5}}])


@pytest.mark.parametrize("parallel,batch_size,grad_accum", [("ddp", 1, 2), ("fsdp2", 2, 1)])
def test_torchrun_matches_single_process(tmp_path, data, single, parallel, batch_size, grad_accum):
    out = tmp_path / "run"
    args = tiny_args(data, out, **common(data), batch_size=batch_size, grad_accum=grad_accum, parallel=parallel,
                     export=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "phiforge.train.pretrain", *args], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"world 2 ({parallel})" in r.stderr
    got = losses(out)
    assert len(got) == len(single) == STEPS
    assert max(abs(a - b) for a, b in zip(got, single)) <= 1e-5, (got, single)
    assert got[-1] < got[0] - 0.5  # it trained
    assert sorted(p.name for p in (out / "ckpt" / f"step_{STEPS:08d}").glob("rng_rank*")) == \
        ["rng_rank0.safetensors", "rng_rank1.safetensors"]
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "phi3"
