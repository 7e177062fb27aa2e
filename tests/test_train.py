"""Pretraining: schedules, config precedence, every parameter learns, a tiny batch overfits, phases switch,
the HF export loads in transformers, bad data stops before training, and a SIGKILLed run resumes exactly."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from phiforge.train import pretrain, tokenize
from phiforge.train.config import parse_overrides, resolve_config
from phiforge.train.schedule import lr_at
from phiforge.train.state import latest_checkpoint, read_checkpoint_state
from phiforge.utils import UserError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tokenize import make_stories  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two token directories ("a": stories, "b": other stories) sharing one tokenizer trained here."""
    from phiforge.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("data")
    train_bpe(make_stories(200, seed=1), vocab_size=300).save(root / "tok")
    for name, seed in (("a", 2), ("b", 3)):
        src = root / f"{name}.txt"
        src.write_text("<|endoftext|>".join(make_stories(150, seed=seed)))
        tokenize.main([str(src), "--tokenizer", str(root / "tok"), "--out", str(root / name), "--workers", "1",
                       "--val-fraction", "0.1"])
    return root


def tiny_args(data, out, **kw) -> list[str]:
    cfg = {"out": str(out), "model": "tiny", "sources": {"a": str(data / "a")}, "seq_len": 32, "batch_size": 4,
           "max_steps": 6, "warmup_steps": 2, "lr": 3e-3, "eval_every": 3, "ckpt_every": 3, "export": False}
    cfg.update(kw)
    argv = []
    for k, v in cfg.items():
        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return argv


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- pure pieces -------------------------------------------------------------------------------------------------
def test_schedules():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    cos = [lr_at(s, "cosine", **kw) for s in range(120)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(cos[9:], cos[10:]))  # then non-increasing
    assert cos[60] == pytest.approx(0.55) and cos[110] == cos[119] == 0.1
    wsd = [lr_at(s, "wsd", decay_steps=20, **kw) for s in range(120)]
    assert wsd[10:90] == [1.0] * 80  # stable plateau
    assert wsd[100] == pytest.approx(0.55) and wsd[110] == 0.1  # linear decay over the last 20 steps
    with pytest.raises(UserError):
        lr_at(0, "linear", **kw)


def test_cpu_peak_flops_follow_the_cpu_flags_and_clock():
    from phiforge.train.pretrain import peak_flops_default
    cpu, n = torch.device("cpu"), torch.get_num_threads()
    info = "flags\t: fpu avx2 fma avx512f avx512_bf16\ncpu MHz\t\t: 2500.000\n"
    assert peak_flops_default(cpu, "fp32", info) == pytest.approx(32 * 2.5e9 * n)
    assert peak_flops_default(cpu, "bf16", info) == pytest.approx(64 * 2.5e9 * n)
    assert peak_flops_default(cpu, "bf16", info + "flags\t: amx_bf16\n") == pytest.approx(1024 * 2.5e9 * n)
    assert peak_flops_default(cpu, "bf16", "flags\t: avx2 fma\n") == pytest.approx(32 * 3e9 * n)  # no clock: 3 GHz
    assert peak_flops_default(torch.device("cuda"), "bf16", "") == 989e12


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_native():
    from phiforge.train.pretrain import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "flags\t: avx2 fma avx512f\n") == "fp32"  # bf16 emulated: 20x slower here
    assert resolve_dtype("auto", cpu, "flags\t: avx2 avx512_bf16\n") == "bf16"
    assert resolve_dtype("auto", cpu, "flags\t: amx_bf16\n") == "bf16"
    assert resolve_dtype("auto", torch.device("cuda"), "") == "bf16"
    assert resolve_dtype("fp32", torch.device("cuda"), "") == "fp32"


def test_config_precedence(tmp_path):
    @dataclass
    class Cfg:
        lr: float = 1.0
        steps: int = 10
        name: str = "x"
        flag: bool = False
        betas: list = field(default_factory=lambda: [0.9, 0.95])
        extra: dict | None = None

    y = tmp_path / "c.yaml"
    y.write_text("lr: 2.0e-3\nsteps: 20\nname: from-yaml\n")
    cfg = resolve_config(Cfg, y, ["--steps", "30", "--betas=[0.8, 0.9]", "--flag", "--extra", "{a: 1}"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.flag, cfg.betas, cfg.extra) == (2e-3, 30, "from-yaml", True,
                                                                             [0.8, 0.9], {"a": 1})
    assert resolve_config(Cfg).lr == 1.0
    assert parse_overrides(["--a-b=5", "--c", "--d", "x"]) == {"a_b": 5, "c": True, "d": "x"}
    with pytest.raises(UserError, match="did you mean 'steps'"):
        resolve_config(Cfg, None, ["--stepz", "3"])
    with pytest.raises(UserError, match="expected an integer"):
        resolve_config(Cfg, None, ["--steps", "many"])



def test_one_override_syntax_and_the_deprecated_spelling(capsys):
    """Every training command takes `--set key=value` (dotted inside a mapping), in command-line order; the old
    `--key value` spelling gives the same config plus one deprecation line naming the --set spelling."""
    from phiforge.train.common import parse_stage_args
    from phiforge.train.pretrain import PretrainConfig
    from phiforge.train.sft import SFTConfig

    new, _ = parse_stage_args("phiforge sft", "", SFTConfig, ["--model", "m", "--set", "max_steps=3", "--set",
                                                              "betas=[0.8, 0.9]", "--set", "lora=true"],
                              named=("model", "data"))
    assert capsys.readouterr().err == ""
    old, _ = parse_stage_args("phiforge sft", "", SFTConfig, ["--model", "m", "--max_steps", "3", "--betas=[0.8, 0.9]",
                                                              "--lora"], named=("model", "data"))
    assert old == new and (new.max_steps, new.betas, new.lora) == (3, [0.8, 0.9], True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("phiforge sft: deprecated: --max_steps 3")
    assert "--set max_steps=3 --set 'betas=[0.8, 0.9]' --set lora=true" in err[0]
    cfg, args = parse_stage_args("phiforge pretrain", "", PretrainConfig,
                                 ["--set", "model_args={hidden_size: 64, num_hidden_layers: 2}", "--set",
                                  "model_args.hidden_size=32", "--set", "max_steps=5", "--max_steps", "6", "--resume"])
    assert cfg.model_args == {"hidden_size": 32, "num_hidden_layers": 2} and cfg.max_steps == 6  # the last flag wins
    assert args.resume == "latest"
    for argv, message in ((["--set", "max_steps=many"], "config max_steps: expected an integer, got 'many'"),
                          (["--set", "compile=1"], "config compile: expected true/false, got 1"),
                          (["--set", "threads=x"], "config threads: expected an integer or null, got 'x'"),
                          (["--set", "max_step=3"], "unknown config key 'max_step' in command-line flags; did you "
                                                    "mean 'max_steps'?"),
                          (["--set", "max_steps"], "use --set key=value")):
        with pytest.raises(UserError, match=re.escape(message)):
            parse_stage_args("phiforge pretrain", "", PretrainConfig, argv)


# -- training behaviour ------------------------------------------------------------------------------------------
def test_every_parameter_learns_and_export_loads_in_transformers(tmp_path, data):
    from transformers import AutoModelForCausalLM

    from phiforge.checkpoint import build_model, load_hf_folder
    out = tmp_path / "run"
    assert pretrain.main(tiny_args(data, out, max_steps=3, export=True, seed=7)) == 0
    trained = load_hf_folder(out / "final")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["seed"] == 7 and cfg["max_steps"] == 3  # resolved config saved beside the run and checkpoints
    assert (latest_checkpoint(out) / "config.yaml").exists()
    init = build_model(trained.config, init=False)
    init.init_weights(seed=7)  # the run's starting point
    init_params = dict(init.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, init_params[name]), f"{name} did not change"
    hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    x = torch.randint(0, trained.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trained(x), rtol=1e-4, atol=1e-4)


def test_tiny_batch_overfits(tmp_path, data):
    """A source holding exactly one window: every step sees the same batch and the loss must go to ~0."""
    from phiforge.train.shards import open_shard, write_shard
    one = tmp_path / "one"
    one.mkdir()
    for f in ("meta.json", "tokenizer"):
        os.symlink(data / "a" / f, one / f)
    _, toks = open_shard(data / "a" / "train_00000.bin")
    write_shard(one / "train_00000.bin", toks[:33], 300, 0, 1)
    write_shard(one / "val_00000.bin", toks[:33], 300, 0, 1)
    out = tmp_path / "run"
    pretrain.main(tiny_args(data, out, sources={"one": str(one)}, max_steps=80, batch_size=1, warmup_steps=5,
                            lr=1e-2, min_lr=1e-3, weight_decay=0.0, eval_every=80, ckpt_every=80))
    ls = losses(out)
    assert ls[0] > 5.0 and ls[-1] < 0.05, (ls[0], ls[-1])


def test_phases_switch_and_eval_only_source(tmp_path, data):
    out = tmp_path / "run"
    phases = [{"name": "web", "weights": {"a": 1.0}, "until_step": 3}, {"name": "clean", "weights": {"b": 1.0}}]
    pretrain.main(tiny_args(data, out, sources={"a": str(data / "a"), "b": str(data / "b")}, phases=phases,
                            max_steps=5, ckpt_every=3))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records if "loss" in r] == ["web"] * 3 + ["clean"] * 2
    assert {"val/a", "val/b"} <= {k for r in records for k in r}  # validation loss per source
    cursors = read_checkpoint_state(out / "ckpt" / "step_00000003")["meta"]["cursors"]
    assert cursors["b"] == [0, 0] and cursors["a"] == [0, 12]  # phase 1 drew only from a: 3 steps x 4 sequences
    cursors = read_checkpoint_state(latest_checkpoint(out))["meta"]["cursors"]
    assert cursors["a"] == [0, 12] and cursors["b"] == [0, 8]
    # a source weighted 0 everywhere is still evaluated (eval-only)
    out2 = tmp_path / "run2"
    pretrain.main(tiny_args(data, out2, sources={"a": str(data / "a"), "b": str(data / "b")},
                            phases=[{"weights": {"a": 1, "b": 0}}], max_steps=3))
    assert "val/b" in (out2 / "metrics.jsonl").read_text()


def _damaged(tmp_path, data, kind):
    import shutil
    d = tmp_path / kind
    shutil.copytree(data / "a", d)
    p = d / "train_00000.bin"
    raw = p.read_bytes()
    p.write_bytes(raw[:-7] if kind == "truncated" else raw[:200] + bytes([raw[200] ^ 0x55]) + raw[201:])
    return d


@pytest.mark.parametrize("case,message", [
    ("corrupt", "checksum"), ("truncated", "truncated"), ("missing", "does not exist"),
    ("negative", "must be finite numbers >= 0"), ("zero", "all weights are zero"), ("nan", "finite"),
    ("unknown", "unknown source 'c'"), ("bounds", "until_step must be an integer larger"),
    ("nobound", "exactly one of until_step"),
])
def test_bad_data_and_mixtures_stop_before_training(tmp_path, data, case, message):
    sources = {"a": str(data / "a"), "b": str(data / "b")}
    phases = [{"weights": {"a": 0.5, "b": 0.5}}]
    if case in ("corrupt", "truncated"):
        sources["b"] = str(_damaged(tmp_path, data, case))
    elif case == "missing":
        sources["b"] = str(tmp_path / "nowhere")
    else:
        phases = {"negative": [{"weights": {"a": 1.0, "b": -0.5}}], "zero": [{"weights": {"a": 0, "b": 0}}],
                  "nan": [{"weights": {"a": float("nan")}}], "unknown": [{"weights": {"a": 1, "c": 1}}],
                  "bounds": [{"weights": {"a": 1}, "until_step": 5}, {"weights": {"b": 1}, "until_step": 3},
                             {"weights": {"a": 1}}],
                  "nobound": [{"weights": {"a": 1}}, {"weights": {"b": 1}}]}[case]
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        pretrain.main(tiny_args(data, out, sources=sources, phases=phases))
    assert not out.exists()  # nothing was written: it stopped before training


def test_plot(tmp_path, data):
    from phiforge.train import plot
    out = tmp_path / "run"
    pretrain.main(tiny_args(data, out, max_steps=3))
    assert plot.main([str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_bpb_equals_the_perplexity_command_on_the_exported_model(tmp_path, data, capsys):
    """pretrain's `heldout` score at the last step is `phiforge perplexity --docs --last-docs --rolling` on the
    exported weights, to the printed digit; the plot gains the held-out panel with a reference line."""
    from phiforge import perplexity
    from phiforge.train import plot

    stories = make_stories(40, seed=9)
    held = tmp_path / "held.txt"
    held.write_text("\n<|endoftext|>\n".join(stories))
    out = tmp_path / "run"
    spec = {"data": str(held), "docs": "eot", "last_docs": 7, "ctx": 32}
    pretrain.main(tiny_args(data, out, max_steps=4, heldout=spec, export=True))
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in recs if "heldout_bpb" in r]
    assert [r["step"] for r in scored] == [3, 4] and all(r["elapsed_s"] > 0 for r in scored)
    capsys.readouterr()
    perplexity.main([str(out / "final"), "--data", str(held), "--docs", "eot", "--last-docs", "7", "--rolling",
                     "--ctx", "32"])
    assert f"{scored[-1]['heldout_bpb']:.4f} bits per byte" in capsys.readouterr().out
    assert plot.main([str(out), "--hline", "baseline=1.5"]) == 0
    with pytest.raises(UserError, match="LABEL=NUMBER"):
        plot.main([str(out), "--hline", "baseline=x"])
    with pytest.raises(UserError, match="heldout"):
        pretrain.main(tiny_args(data, tmp_path / "bad", heldout={"file": str(held)}))


# -- exact resume ------------------------------------------------------------------------------------------------
def assert_resume_is_exact(args_for, tmp_path: Path, steps: int, kill_at: tuple[int, int]):
    """Run `phiforge pretrain args_for(out)` twice: uninterrupted (in process), and in a subprocess SIGKILLed at a
    random step in `kill_at` once a checkpoint exists, then resumed to the end. Require exactly (bit for bit, fp32
    CPU) the same loss sequence. Returns (uninterrupted run dir, resumed run dir, the resume's CompletedProcess,
    the step it resumed from)."""
    ref = tmp_path / "ref"
    pretrain.main(args_for(ref))
    expected = losses(ref)
    assert len(expected) == steps

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "phiforge.train.pretrain", *args_for(run)]
    kill_at = random.Random().randint(*kill_at)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, done = run / "metrics.jsonl", 0
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            done = len(losses(run))
            if done >= kill_at and latest_checkpoint(run) is not None:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"the run was not killed mid-training (rc {rc}): {proc.stderr.read()[-2000:]}"
    resumed_from = read_checkpoint_state(latest_checkpoint(run))["step"]
    assert 0 < resumed_from < steps
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    assert losses(run) == expected, f"killed after step ~{done}, resumed from {resumed_from}"
    return ref, run, r, resumed_from


def test_sigkill_at_random_step_then_resume_is_exact(tmp_path, data):
    """Kill a training subprocess with SIGKILL at a random step after its first checkpoint, resume it, and
    require exactly (bit for bit, fp32 CPU) the loss sequence of an uninterrupted run."""
    steps = 40
    kw = dict(max_steps=steps, ckpt_every=4, eval_every=8, seq_len=64, batch_size=8, grad_accum=2, threads=1,
              sources={"a": str(data / "a"), "b": str(data / "b")},
              phases=[{"weights": {"a": 0.7, "b": 0.3}, "until_step": 10}, {"weights": {"a": 0.2, "b": 0.8}}])
    ref, run, _, _ = assert_resume_is_exact(lambda out: tiny_args(data, out, **kw), tmp_path, steps, (5, 20))
    val = lambda p: [(x["step"], x["val/a"]) for x in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                     if "val/a" in x]  # noqa: E731
    assert val(run) == val(ref)


def test_refuses_to_overwrite_and_resume_without_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint"):
        pretrain.main(tiny_args(data, out) + ["--resume"])
    pretrain.main(tiny_args(data, out, max_steps=3))
    with pytest.raises(UserError, match="already holds checkpoints"):
        pretrain.main(tiny_args(data, out, max_steps=3))


def test_time_clock_spreads_schedule_over_the_budget(tmp_path, data):
    """clock: time: warmup, phase switch and decay follow the share of max_minutes used; the run stops on time."""
    out = tmp_path / "run"
    phases = [{"name": "p1", "weights": {"a": 1.0}, "until_step": 50}, {"name": "p2", "weights": {"b": 1.0}}]
    pretrain.main(tiny_args(data, out, sources={"a": str(data / "a"), "b": str(data / "b")}, phases=phases,
                            clock="time", max_minutes=0.04, max_steps=100, warmup_steps=10, schedule="wsd",
                            decay_steps=30, eval_every=10_000, ckpt_every=10_000))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    sched = [r["schedule_step"] for r in recs]
    assert sched == sorted(sched) and sched[0] < 10 and sched[-1] >= 90  # the whole schedule was traversed
    # the schedule starts after the first step, so a slow first step (compiling) does not eat the warmup
    assert recs[0]["lr"] < 3e-3 and read_checkpoint_state(latest_checkpoint(out))["meta"]["schedule"]["t0"] > 0
    assert recs[-1]["elapsed_s"] >= 0.04 * 60
    assert {r["phase"] for r in recs} == {"p1", "p2"}
    assert min(r["lr"] for r in recs if r["schedule_step"] >= 95) < 3e-3 * 0.3  # decayed before the budget ran out
    assert read_checkpoint_state(latest_checkpoint(out))["meta"]["train_seconds"] >= 0.04 * 60
    with pytest.raises(UserError, match="clock: time needs max_minutes"):
        pretrain.main(tiny_args(data, tmp_path / "x", clock="time"))
