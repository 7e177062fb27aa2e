"""Pretraining: packed token shards -> a Phi-3-architecture model, in phases with per-phase source mixtures.

    phiforge pretrain --config recipes/tinystories.yaml
    phiforge pretrain --config recipes/tinystories.yaml --set max_steps=200 --out runs/ts2  # flags override YAML
    phiforge pretrain --config recipes/tinystories.yaml --out runs/ts2 --resume             # continue exactly
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m phiforge.train.pretrain \\
        --config recipes/tinystories.yaml --set parallel=ddp                                 # or fsdp2

Config precedence: PretrainConfig defaults < the --config YAML < flags (--set key=value; train/config.py). The
resolved config is printed at start and saved as config.yaml in the run directory and in every checkpoint. Run
directory layout:
  config.yaml, metrics.jsonl (one JSON record per step; validation records carry "val/<source>"),
  ckpt/step_XXXXXXXX/ (exact-resume state, see state.py), final/ (HF folder: transformers loads it).

Data: every optimizer step draws `batch_size * grad_accum * world_size` windows of seq_len+1 tokens. Which source
each window comes from is drawn from the current phase's mixture weights by an RNG seeded with (seed, step); each
source walks its windows in a per-epoch permutation, and its (epoch, index) cursor is checkpointed. All ranks draw
the same global batch and each reads only its own slice, so ranks see disjoint data and the loss curve does not
depend on the number of ranks for a fixed global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phiforge.perplexity import document_stream, evaluate_rolling, read_last_documents
from phiforge.train import all_reduce_mean, cleanup_distributed, init_distributed, wrap_model
from phiforge.train.common import (MetricsLog, check_choice, check_positive, expert_load_record, parse_stage_args,
                                   start)
from phiforge.train.config import save_config
from phiforge.train.schedule import check_schedule, lr_at, make_optimizer, set_lr
from phiforge.train.shards import open_shard, read_meta, shard_paths
from phiforge.train.state import load_checkpoint, save_checkpoint
from phiforge.utils import UserError


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    seed: int = 0
    # model: a preset (phiforge inspect lists them) plus optional Phi3Config field overrides (custom dimensions).
    # vocab_size and the bos/eos/pad ids come from the tokenizer of the data unless model_args sets them.
    model: str = "tiny"
    model_args: dict = field(default_factory=dict)
    # data: name -> token directory (from `phiforge tokenize`); paths are relative to the working directory.
    sources: dict = field(default_factory=dict)
    # [{name, weights: {source: weight}, until_step or until_tokens}, ...]; the last phase runs to the end.
    # Weights are normalised per phase. A source with weight 0 in every phase is evaluated but never trained on.
    phases: list = field(default_factory=list)
    tokenizer: str | None = None  # default: the tokenizer copy inside the first source's token directory
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1
    # optimizer and schedule
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_steps: int = 0  # wsd only: length of the final decay
    max_steps: int = 100
    max_minutes: float | None = None  # wall-clock budget: stop early (checkpoint + export) when reached
    # steps: the lr schedule and until_step phase switches follow the optimizer step (bit-exact resume).
    # time (needs max_minutes): they follow the share of the time budget used, "schedule step" =
    # elapsed / budget * max_steps, so a budgeted run always warms up, switches phase and decays in time whatever
    # the machine's speed; training runs until the budget is spent. Not bit-reproducible (it depends on speed).
    clock: str = "steps"
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # precision and speed
    dtype: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (bf16 where it is fast)
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "none"  # none | ddp | fsdp2 (under torchrun)
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    peak_flops: float | None = None  # for MFU; default: see peak_flops_default()
    # evaluation, checkpoints, logs
    eval_every: int = 50
    eval_batches: int = 4  # per source and rank, of batch_size sequences each
    ckpt_every: int = 50
    keep_last: int = 3
    log_every: int = 1
    export: bool = True  # write out/final (HF folder) at the end
    # held-out documents scored at every evaluation by `phiforge perplexity --docs SEP --last-docs N --rolling`'s
    # rule, logged as heldout_bpb: {data: FILE, docs: eot, last_docs: 87, ctx: 256}
    heldout: dict = field(default_factory=dict)


def cpu_flags(cpuinfo: str | None = None) -> tuple[set[str], list[float]]:
    """The CPU's feature flags and clocks (MHz) from /proc/cpuinfo (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags, mhz = set(), []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
        elif key.strip() == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    return flags, mhz


def resolve_dtype(dtype: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """`auto` -> bf16 on CUDA and on CPUs with bf16 dot products (avx512_bf16, AMX), else fp32: without them
    oneDNN emulates bf16 matmuls, measured 20x slower than fp32 on a 2-core AVX2 EPYC."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_flags(cpuinfo)[0] & {"avx512_bf16", "amx_bf16"} else "fp32"


def peak_flops_default(device: torch.device, dtype: str, cpuinfo: str | None = None) -> float:
    """The MFU denominator when --peak_flops is not given: NVIDIA H100 SXM dense (989e12 bf16, 495e12 tf32/fp32
    path); on CPU, per torch thread, FLOP per cycle x the clock /proc/cpuinfo reports (3 GHz if it says none).
    FLOP per cycle: 32 in fp32 (two 256-bit FMA units x 8 lanes x 2; parts with two full 512-bit FMA units reach
    64: pass --peak_flops), and in bf16 64 with avx512_bf16 (a bf16 pair dot product per fp32 lane) or 1024 with
    AMX tiles, else the fp32 figure (bf16 matmuls then run through fp32 units)."""
    if device.type == "cuda":
        return 989e12 if dtype == "bf16" else 495e12
    flags, mhz = cpu_flags(cpuinfo)
    ghz = max(mhz) / 1e3 if mhz else 3.0
    per_cycle = 32
    if dtype == "bf16" and "amx_bf16" in flags:
        per_cycle = 1024
    elif dtype == "bf16" and "avx512_bf16" in flags:
        per_cycle = 64
    return per_cycle * ghz * 1e9 * torch.get_num_threads()


# ----------------------------------------------------------------------------------------------------------------
# Data: token sources (memory-mapped shards) and the deterministic mixture


class TokenSource:
    """The shards of one split as one token stream, cut into windows of seq_len+1 tokens with stride seq_len."""

    def __init__(self, paths: list[Path], seq_len: int):
        self.arrays = [open_shard(p)[1] for p in paths]  # verify=True: CRC + id range checked before training
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.starts[-1])
        self.seq_len = seq_len
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def window(self, j: int) -> np.ndarray:
        lo, hi = j * self.seq_len, j * self.seq_len + self.seq_len + 1
        out, pos = [], lo
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while pos < hi:
            a, base = self.arrays[i], int(self.starts[i])
            take = a[pos - base: min(hi, base + len(a)) - base]
            out.append(take)
            pos += len(take)
            i += 1
        return np.concatenate(out).astype(np.int64)


@functools.lru_cache(maxsize=64)
def epoch_order(seed: int, source_idx: int, epoch: int, n: int) -> np.ndarray:
    """The window order of one source in one epoch (a fixed permutation: resumable from (epoch, index))."""
    return np.random.default_rng([seed, source_idx, epoch]).permutation(n)


def draw_sources(seed: int, step: int, weights: np.ndarray, n: int) -> np.ndarray:
    """Which source each of the n sequences of optimizer step `step` comes from (same on every rank)."""
    return np.random.default_rng([seed, 1_000_003, step]).choice(len(weights), size=n, p=weights)


def phase_at(phases: list[dict], step: int, tokens: int) -> int:
    for i, ph in enumerate(phases[:-1]):
        if ("until_step" in ph and step < ph["until_step"]) or ("until_tokens" in ph and tokens < ph["until_tokens"]):
            return i
    return len(phases) - 1


def check_phases(phases: list, names: list[str]) -> list[dict]:
    """Validate the mixture; return phases with normalised numpy weight vectors (in `names` order)."""
    if not phases:
        if len(names) == 1:
            phases = [{"name": "main", "weights": {names[0]: 1.0}}]
        else:
            raise UserError(f"{len(names)} sources but no phases: give `phases: [{{weights: {{source: w}}}}]`")
    out, last_bound = [], {"until_step": -1, "until_tokens": -1}
    for i, ph in enumerate(phases):
        label = f"phase {i} ({ph.get('name', i)})" if isinstance(ph, dict) else f"phase {i}"
        if not isinstance(ph, dict) or not isinstance(ph.get("weights"), dict) or not ph["weights"]:
            raise UserError(f"{label}: needs `weights: {{source: weight, ...}}`")
        unknown = [s for s in ph["weights"] if s not in names]
        if unknown:
            raise UserError(f"{label}: unknown source {unknown[0]!r}; sources are {', '.join(names)}")
        w = []
        for s in names:
            v = ph["weights"].get(s, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"{label}: weight of {s!r} is {v!r}; weights must be finite numbers >= 0")
            w.append(float(v))
        if sum(w) <= 0:
            raise UserError(f"{label}: all weights are zero; at least one source needs a positive weight")
        bounds = [k for k in ("until_step", "until_tokens") if k in ph]
        if i < len(phases) - 1:
            if len(bounds) != 1:
                raise UserError(f"{label}: every phase but the last needs exactly one of until_step / until_tokens")
            k = bounds[0]
            v = ph[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= last_bound[k]:
                raise UserError(f"{label}: {k} must be an integer larger than the previous phase's ({v!r})")
            last_bound[k] = v
        elif bounds:
            raise UserError(f"{label}: the last phase runs to the end; remove its {bounds[0]}")
        out.append({**ph, "name": ph.get("name", f"phase{i}"), "w": np.array(w) / sum(w)})
    kinds = {k for ph in out[:-1] for k in ("until_step", "until_tokens") if k in ph}
    if len(kinds) > 1:
        raise UserError("phases mix until_step and until_tokens; use one kind")
    return out


def fit_warmup(cfg: PretrainConfig) -> PretrainConfig:
    """cfg with a warmup that fits the run. The default warmup (20 steps) is longer than a short run
    (`--max-steps 5`), so a default that does not fit becomes 10% of max_steps, with a notice; a warmup the user
    chose that is longer than the run stays an error (check_schedule)."""
    if cfg.warmup_steps <= cfg.max_steps or cfg.warmup_steps != PretrainConfig.warmup_steps:
        return cfg
    warmup = cfg.max_steps // 10
    print(f"pretrain: warmup_steps {warmup} (10% of max_steps {cfg.max_steps}; the default {cfg.warmup_steps} is "
          "longer than the run)", file=sys.stderr)
    return dataclasses.replace(cfg, warmup_steps=warmup)


def check_heldout(spec: dict) -> dict:
    """The `heldout` setting, read and checked before training: {} or {ids, bytes, ctx} of the document stream."""
    if not spec:
        return {}
    unknown = set(spec) - {"data", "docs", "last_docs", "ctx"}
    if unknown or "data" not in spec:
        raise UserError(f"heldout: expected {{data: FILE, docs: eot, last_docs: N, ctx: 256}}, got {spec}")
    return {"spec": spec, "ctx": int(spec.get("ctx", 256))}


# ----------------------------------------------------------------------------------------------------------------


def _without_resume(argv: list[str], value: str | None) -> list[str]:
    """argv minus any --resume [DIR]: the printed command resumes from the latest checkpoint, the one just saved."""
    out, skip = [], False
    for a in argv:
        if skip and a == value:
            skip = False
            continue
        skip = a == "--resume"
        if a != "--resume" and not a.startswith("--resume="):
            out.append(a)
    return out


class _GracefulInterrupt:
    """The first SIGINT only sets a flag: the loop ends the step it is in (a step cut in half cannot be saved
    exactly), checkpoints and exits. A second SIGINT interrupts at once, as usual."""

    def __init__(self):
        self.hit = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.hit:
            self.restore()
            raise KeyboardInterrupt
        self.hit = True
        print("\npretrain: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        return float(all_reduce_mean(torch.tensor(float(self.hit)))) > 0

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse_stage_args("phiforge pretrain", __doc__, PretrainConfig, argv)
    return train(cfg, args.resume, argv)


def train(cfg: PretrainConfig, resume: str | None = None, argv: list[str] | None = None) -> int:
    """Pretrain as `cfg` says; `resume`: None (fresh), "latest" or a checkpoint directory; `argv`: the command line,
    for the resume command printed after a Ctrl-C. `phiforge recipe` calls this with the config it built."""
    if not cfg.sources:
        raise UserError("no data sources: set `sources: {name: token_dir}` in the config")
    check_positive(cfg, "seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "ckpt_every", "log_every")
    check_choice(cfg, "dtype", ("fp32", "bf16", "auto"))
    heldout = check_heldout(cfg.heldout)
    cfg = fit_warmup(cfg)
    check_schedule(cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.decay_steps)
    check_choice(cfg, "clock", ("steps", "time"))
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise UserError(f"max_minutes must be > 0 (got {cfg.max_minutes})")
    if cfg.clock == "time" and cfg.max_minutes is None:
        raise UserError("clock: time needs max_minutes (the budget the schedule is spread over)")
    for n, d in cfg.sources.items():
        if not isinstance(d, str) or not d:
            raise UserError(f"source {n!r} needs a token directory path, got {d!r} (on the command line write "
                            "--set 'sources={name: path}', with a space after the colon)")
    names = list(cfg.sources)
    phases = check_phases(cfg.phases, names)

    # -- data: every shard is opened and verified before anything else happens
    source_dirs = {n: str(d) for n, d in cfg.sources.items()}
    metas = {n: read_meta(d) for n, d in source_dirs.items()}
    vocab = {m["vocab_size"] for m in metas.values()}
    eos = {m["eos_id"] for m in metas.values()}
    if len(vocab) > 1 or len(eos) > 1:
        raise UserError("sources were tokenized with different tokenizers (vocab sizes "
                        f"{sorted(vocab)}, eos ids {sorted(eos)}); tokenize them all with one tokenizer")
    vocab_size, eos_id = vocab.pop(), eos.pop()
    train_src = {n: TokenSource(shard_paths(d, "train"), cfg.seq_len) for n, d in source_dirs.items()}
    val_src = {n: TokenSource(shard_paths(d, "val"), cfg.seq_len) for n, d in source_dirs.items()}
    for i, n in enumerate(names):
        if any(ph["w"][i] > 0 for ph in phases) and train_src[n].num_windows < 1:
            raise UserError(f"source {n!r} ({source_dirs[n]}) has {train_src[n].num_tokens} train tokens, fewer "
                            f"than one window of seq_len+1 = {cfg.seq_len + 1}")

    # -- processes, threads, seeds
    rank, world, device = init_distributed(cfg.parallel)
    master = rank == 0
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    out = Path(cfg.out)
    ckpt_path = start(cfg, resume, rank)

    # -- model
    from phiforge import models
    from phiforge.checkpoint import build_model
    from phiforge.tokenizer import Tokenizer

    tok_dir = cfg.tokenizer if cfg.tokenizer else str(Path(source_dirs[names[0]]) / "tokenizer")
    tokenizer = Tokenizer.from_folder(tok_dir)
    if heldout:
        spec = heldout["spec"]
        docs = read_last_documents(spec["data"], spec.get("docs", "eot"), spec.get("last_docs"))
        heldout["ids"], heldout["bytes"] = document_stream(tokenizer, docs)
    ids = {"vocab_size": vocab_size, "eos_token_id": eos_id, "bos_token_id": tokenizer.bos_id or 0,
           "pad_token_id": tokenizer.pad_id}
    try:
        mcfg = dataclasses.replace(models.config_from_name(cfg.model), **{**ids, **cfg.model_args})
    except TypeError as e:
        raise UserError(f"model_args: {e}") from None
    if mcfg.vocab_size < vocab_size:
        raise UserError(f"model vocab_size {mcfg.vocab_size} < tokenizer vocab {vocab_size}")
    if mcfg.max_position_embeddings < cfg.seq_len:
        raise UserError(f"seq_len {cfg.seq_len} > max_position_embeddings {mcfg.max_position_embeddings}")
    model = build_model(mcfg, torch.float32, "cpu", init=False)
    # the one explicit init (the model file's init_weights), on CPU: its seeded generator is a CPU one, and the initial weights are
    # then the same on every device and rank
    model.init_weights(seed=cfg.seed)
    model.to(device)
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.train()
    n_params = model.num_params()
    embed = mcfg.vocab_size * mcfg.hidden_size
    flops_per_token = 6 * (n_params - embed + (embed if mcfg.tie_word_embeddings else 0))  # the lookup is free
    # per rank (one GPU, or this process's CPU threads); tokens/s below are the whole job's, so the peak is world x
    peak = world * (cfg.peak_flops or peak_flops_default(device, cfg.dtype))
    wrapped = wrap_model(model, cfg.parallel, device)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)

    # -- state: fresh or resumed
    step, tokens_seen, seconds_before = 0, 0, 0.0
    clock_t0 = None  # clock: time: training seconds after the first (compiling) step; the schedule starts there
    cursors = {n: [0, 0] for n in names}  # per source: [epoch, index within the epoch's permutation]
    if ckpt_path is not None:
        meta = load_checkpoint(ckpt_path, model, optimizer)
        step, tokens_seen, cursors = meta["step"], meta["tokens_seen"], meta["cursors"]
        seconds_before = float(meta.get("train_seconds", 0.0))
        clock_t0 = meta.get("schedule", {}).get("t0")
        if set(cursors) != set(names):
            raise UserError(f"checkpoint {ckpt_path} has sources {sorted(cursors)}, the config {sorted(names)}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", step, ckpt_path is not None, master)
    if master:
        print(f"pretrain: {n_params / 1e6:.2f}M parameters, world {world} ({cfg.parallel}), device {device}, "
              f"global batch {cfg.batch_size * cfg.grad_accum * world} x {cfg.seq_len} tokens"
              + (f", resumed from {ckpt_path} at step {step}" if ckpt_path else ""), file=sys.stderr)

    def forward_loss(batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            return forward(x, targets=y)  # LM head fused into the loss (models/loss.py)

    @torch.no_grad()
    def evaluate() -> dict:
        """Mean validation loss per source over the first windows of its val split (disjoint across ranks)."""
        model.eval()
        result = {}
        for n in names:
            src = val_src[n]
            per_rank = min(src.num_windows // world, cfg.eval_batches * cfg.batch_size)
            if per_rank == 0:
                continue
            idx = [rank + world * i for i in range(per_rank)]
            total = torch.zeros((), dtype=torch.float64)
            for i in range(0, per_rank, cfg.batch_size):
                batch = torch.from_numpy(np.stack([src.window(j) for j in idx[i:i + cfg.batch_size]]))
                total += forward_loss(batch).double().cpu() * len(batch)
            result[f"val/{n}"] = float(all_reduce_mean(total / per_rank))
        if heldout:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
                res = evaluate_rolling(lambda x: model(x.to(device)), heldout["ids"], heldout["ctx"])
            result["heldout_bpb"] = res["nll"] / math.log(2) / heldout["bytes"]
        model.train()
        return result

    def next_batch(step: int, phase: dict) -> torch.Tensor:
        """This rank's (grad_accum * batch_size, seq_len+1) windows of optimizer step `step`; advances cursors."""
        per_rank = cfg.batch_size * cfg.grad_accum
        choice = draw_sources(cfg.seed, step, phase["w"], per_rank * world)
        rows = []
        for k, s in enumerate(choice):
            n = names[s]
            src, (epoch, index) = train_src[n], cursors[n]
            if k // per_rank == rank:
                rows.append(src.window(int(epoch_order(cfg.seed, s, epoch, src.num_windows)[index])))
            index += 1
            if index == src.num_windows:
                epoch, index = epoch + 1, 0
            cursors[n] = [epoch, index]
        return torch.from_numpy(np.stack(rows))

    def elapsed() -> float:
        """Training seconds so far, resumed runs included; the same value on every rank."""
        return float(all_reduce_mean(torch.tensor(seconds_before + time.time() - t_start, dtype=torch.float64)))

    def schedule_step(step: int, seconds: float) -> int:
        """clock: time spreads the schedule over the budget left after the first step, so the seconds the first step
        spends compiling (40 s on 2 CPU threads) count against the budget but do not eat the warmup."""
        if cfg.clock == "time":
            if clock_t0 is None:
                return 0
            budget = 60 * cfg.max_minutes
            frac = 1.0 if clock_t0 >= budget else max(0.0, seconds - clock_t0) / (budget - clock_t0)
            return min(cfg.max_steps, int(frac * cfg.max_steps))
        return step

    def checkpoint(step: int, sched: int, seconds: float) -> None:
        meta = {"tokens_seen": tokens_seen, "cursors": cursors, "train_seconds": seconds,
                "phase": phases[phase_at(phases, sched, tokens_seen)]["name"],
                "schedule": {"name": cfg.schedule, "clock": cfg.clock, "schedule_step": sched, "t0": clock_t0}}
        save_checkpoint(out, step, model, optimizer, meta, config=cfg, keep_last=cfg.keep_last)

    # -- the loop
    from tqdm import tqdm

    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not master)
    t_start = t_last = time.time()
    tokens_last = tokens_seen
    stop, seconds = False, seconds_before
    interrupt = _GracefulInterrupt()  # Ctrl-C: finish this step, save a checkpoint, say how to resume
    try:
        while not stop and (step < cfg.max_steps or cfg.clock == "time"):
            sched = schedule_step(step, seconds)
            phase = phases[phase_at(phases, sched, tokens_seen)]
            lr = lr_at(sched, cfg.schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.decay_steps)
            set_lr(optimizer, lr)
            batch = next_batch(step, phase)
            loss_sum = torch.zeros(())
            for m in range(cfg.grad_accum):
                last = m == cfg.grad_accum - 1
                if cfg.parallel == "fsdp2":
                    wrapped.set_requires_gradient_sync(last)
                micro = batch[m * cfg.batch_size:(m + 1) * cfg.batch_size]
                if cfg.parallel == "ddp" and not last:
                    with wrapped.no_sync():
                        loss = forward_loss(micro)
                        (loss / cfg.grad_accum).backward()
                else:
                    loss = forward_loss(micro)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().cpu()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            loss_value = float(all_reduce_mean(loss_sum / cfg.grad_accum))
            if not math.isfinite(loss_value):
                raise UserError(f"loss is {loss_value} at step {step}; lower lr or use dtype fp32")

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.time()
                tok_s = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens_seen, "phase": phase["name"],
                          "tok_per_s": round(tok_s, 1), "mfu": round(flops_per_token * tok_s / peak, 5),
                          "grad_norm": grad_norm, "elapsed_s": round(seconds_before + now - t_start, 2),
                          **expert_load_record(model)}
                if cfg.clock == "time":
                    record["schedule_step"] = sched
                log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                mfu=f"{100 * record['mfu']:.1f}%", phase=phase["name"])
            if cfg.max_minutes is not None:
                seconds = elapsed()  # agreed across ranks: every rank stops at the same step
                stop = seconds >= 60 * cfg.max_minutes
                if clock_t0 is None:
                    clock_t0 = seconds
            bar.update(schedule_step(step, seconds) - bar.n if cfg.clock == "time" else 1)
            if interrupt.agreed():  # every rank saw the same answer: all stop at this step
                checkpoint(step, schedule_step(step, seconds), seconds if cfg.max_minutes else elapsed())
                bar.close()
                interrupt.restore()
                if master:
                    again = (shlex.join(_without_resume(argv, resume)) if argv is not None
                             else f"--config {shlex.quote(str(out / 'config.yaml'))}")
                    print(f"\npretrain: interrupted; saved a checkpoint at step {step} in {out / 'ckpt'}. "
                          "Continue with:\n"
                          f"  phiforge pretrain {again} --resume", file=sys.stderr)
                cleanup_distributed()
                return 130
            if step % cfg.eval_every == 0 or step == cfg.max_steps or stop:
                val = evaluate()
                if val:
                    log({"step": step, "tokens": tokens_seen, "elapsed_s": round(elapsed(), 2), **val})
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()), file=sys.stderr)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop:
                checkpoint(step, schedule_step(step, seconds), seconds if cfg.max_minutes else elapsed())
    finally:
        interrupt.restore()
    bar.close()

    # -- export: an HF folder every downstream tool (and transformers) loads
    if cfg.export:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from phiforge.checkpoint import save_hf_folder
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            plain = build_model(mcfg, torch.float32, "cpu", init=False)
            plain.load_state_dict(full)
            save_hf_folder(plain.eval(), out / "final", tokenizer)
            print(f"pretrain: exported {out / 'final'} (step {step}, {tokens_seen:,} tokens)", file=sys.stderr)
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
