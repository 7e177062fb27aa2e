"""What pretrain, SFT and DPO share: the command line and config preamble, the device, model + tokenizer loading,
the value checks, the metrics log, and the export of the trained model.

    cfg, args = parse_stage_args("phiforge sft", __doc__, SFTConfig, argv, named=("model", "data"))
    ckpt = start(cfg, args.resume)            # print the config, threads, seed; the checkpoint to resume from
    device = pick_device(cfg.device)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phiforge.train.config import format_config, old_pairs, parse_set, resolve_config, warn_old_spelling
from phiforge.utils import ArgumentParser, UserError, atomic_write_text, set_module


@dataclass
class PostTrainConfig:
    """The settings SFT and DPO share; SFTConfig and DPOConfig add their own and change some defaults."""
    out: str = "runs/posttrain"
    seed: int = 0
    model: str = ""  # the model to start from: an HF folder with tokenizer files (e.g. a pretrain run's final/)
    data: list = field(default_factory=list)  # files; formats auto-detected per record
    max_records: int = 0  # 0 = all (per file, first N)
    val_frac: float = 0.05
    val_max: int = 200
    seq_len: int = 1024  # the context: longer records are skipped, never truncated
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_steps: int = 0
    max_steps: int = 0  # 0 = `epochs` passes over the training data
    epochs: float = 1.0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    # LoRA (module swap, phiforge.lora); qlora puts it over a 4-bit base (phiforge.quant)
    lora: bool = False
    qlora: bool = False
    qlora_group_size: int = 64
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list | None = None  # None: the model file's lora_targets (Phi-3: qkv_proj, o_proj, gate_up/down_proj)
    eval_every: int = 50
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    export: bool = True


# ----------------------------------------------------------------------------------------------------------------
# Command line: --config FILE, --resume, --out (and --model / --data), every other field with --set key=value

NAMED_HELP = {"out": "run directory (= --set out=DIR)",
              "model": "the model to start from: an HF folder with tokenizer files (= --set model=DIR)",
              "data": "data files (.json / .jsonl, optionally .gz) (= --set data=[...])"}


class _InOrder(argparse.Action):
    """--set KEY=VALUE and the named flags, kept in command-line order: a later flag wins, as with argparse."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = list(parse_set([values]).items()) if self.dest == "set" else [(self.dest, values)]
        namespace.overrides = [*namespace.overrides, *new]


def stage_parser(prog: str, doc: str, cls: type, named: tuple[str, ...] = ()) -> ArgumentParser:
    ap = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                        allow_abbrev=False,
                        epilog=f"Any {cls.__name__} field can be set with --set key=value (repeatable; dotted for a "
                        "key inside a mapping, e.g. --set model_args.hidden_size=64). The old spelling --key value "
                        "still works, with a deprecation line.")
    ap.set_defaults(overrides=[])
    ap.add_argument("--config", help="YAML settings (between the defaults and the flags)")
    ap.add_argument("--set", action=_InOrder, metavar="KEY=VALUE",
                    help="override one config value, e.g. --set lr=1e-4 (repeatable)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the latest checkpoint in --out (or the given checkpoint directory)")
    for name in ("out", *named):
        ap.add_argument(f"--{name}", action=_InOrder, nargs="+" if name == "data" else None, help=NAMED_HELP[name])
    return ap


def parse_stage_args(prog: str, doc: str, cls: type, argv: list[str], named: tuple[str, ...] = ()):
    """(config, args): the defaults of `cls` < --config YAML < the flags, in command-line order. A flag the parser
    does not know (the old spelling `--lr 1e-4`) is read as `--set lr=1e-4`, with one deprecation line."""
    ap = stage_parser(prog, doc, cls, named)
    own = {"--help", "--config", "--set", "--resume", "--out", *(f"--{n}" for n in named)}
    argv, old = list(argv), []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and flag not in own:
            n = 1 if "=" in argv[i] or i + 1 == len(argv) or argv[i + 1].startswith("--") else 2
            (key, value), = old_pairs(argv[i:i + n])
            old.append(argv[i:i + n])
            argv[i:i + n] = ["--set", f"{key}={value}"]
            i += 2
        else:
            i += 1
    if old:
        warn_old_spelling(prog, old)
    args = ap.parse_args(argv)
    return resolve_config(cls, args.config, dict(args.overrides)), args


def start(cfg, resume: str | None, rank: int = 0) -> Path | None:
    """The preamble of a training run: torch threads and seed, the resolved config printed (rank 0), and the
    checkpoint to resume from (None for a fresh run)."""
    from phiforge.train.state import resume_point

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # one torch RNG stream per rank, rank 0's that of a single process: what draws from it in training (the MoE
    # router's samples) must not repeat the same numbers on every rank. Weights and data have seeds of their own.
    torch.manual_seed(cfg.seed + rank)
    if rank == 0:
        print(format_config(cfg), end="", file=sys.stderr)
    return resume_point(Path(cfg.out), resume)


def check_positive(cfg, *keys: str) -> None:
    for k in keys:
        if getattr(cfg, k) < 1:
            raise UserError(f"{k} must be >= 1 (got {getattr(cfg, k)})")


def check_choice(cfg, key: str, choices: tuple[str, ...], what: str | None = None) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        names = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise UserError(f"{what or key} must be {names} (got {value!r})")


# ----------------------------------------------------------------------------------------------------------------
# Device, model and data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but torch sees no GPU")
    return torch.device(name)


def load_model_and_tokenizer(path: str, device: torch.device):
    """A chat model to post-train: fp32 weights on `device` and a tokenizer with the Phi-3 chat tokens."""
    from phiforge import load

    if not path:
        raise UserError("no --model: give an HF model folder with tokenizer files (e.g. runs/pretrain/final)")
    model, tok = load(path, dtype=torch.float32, device=str(device))
    if tok is None:
        raise UserError(f"{path} has no tokenizer files; post-training needs the model's chat template")
    for t in ("<|user|>", "<|assistant|>", "<|end|>"):
        if tok.token_to_id(t) is None:
            raise UserError(f"the tokenizer of {path} has no {t} token; it cannot render the Phi-3 chat format")
    return model, tok


def fit_seq_len(cfg, model, stage: str):
    """cfg with a seq_len the model can take. The default (1024) is longer than a small model's context (the
    recipe's has 512 positions), so a default that does not fit becomes the model's whole context, with a notice;
    a seq_len the user chose that does not fit stays an error."""
    n = model.config.max_position_embeddings
    if cfg.seq_len <= n:
        return cfg
    if cfg.seq_len != type(cfg).seq_len:
        raise UserError(f"seq_len {cfg.seq_len} > the model's max_position_embeddings {n}")
    print(f"{stage}: seq_len {n}, the model's max_position_embeddings (the default {cfg.seq_len} does not fit)",
          file=sys.stderr)
    return dataclasses.replace(cfg, seq_len=n)


def add_adapters(model, cfg) -> list[str]:
    """LoRA (or QLoRA: int4 base first) on cfg.lora_targets; everything else frozen."""
    from phiforge.lora import apply_lora

    if cfg.qlora:
        from phiforge.lora import prepare_qlora_base
        prepare_qlora_base(model, cfg.qlora_group_size)
    return apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def read_data(files: list, max_records: int) -> list[dict]:
    from phiforge.train.chat_data import read_records

    if not files:
        raise UserError("no --data files given")
    files = [files] if isinstance(files, str) else files
    records = []
    for f in files:
        recs = read_records(f)
        records += recs[:max_records] if max_records > 0 else recs
    return records


def posttrain_setup(cfg, resume: str | None, stage: str):
    """The opening of `phiforge sft` / `phiforge dpo` after their own checks: the shared value checks, the preamble,
    the model and tokenizer, a seq_len that fits the model, and the data records.
    Returns (cfg, the checkpoint to resume from or None, device, model, tokenizer, records)."""
    check_positive(cfg, "seq_len", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every")
    if cfg.qlora:
        cfg.lora = True
    ckpt_path = start(cfg, resume)
    device = pick_device(cfg.device)
    model, tok = load_model_and_tokenizer(cfg.model, device)
    cfg = fit_seq_len(cfg, model, stage)
    return cfg, ckpt_path, device, model, tok, read_data(cfg.data, cfg.max_records)


def optimizer_step(model, optimizer, grad_clip: float) -> None:
    """Clip the trainable parameters' gradients (grad_clip > 0), step, zero the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and export


class MetricsLog:
    """OUT/metrics.jsonl, one JSON record per line. A fresh run starts it empty; a resumed one drops the records a
    killed run wrote after its checkpoint (step > the resumed step). Only rank 0 (`master`) writes."""

    def __init__(self, path: Path, step: int, resumed: bool, master: bool = True):
        self.path, self.master = path, master
        if not master:
            return
        if resumed and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        elif not resumed:
            atomic_write_text(path, "")

    def __call__(self, record: dict) -> None:
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def expert_load_record(model, max_cells: int = 1024) -> dict:
    """The expert-load fields of a training record; {} for a dense model. A mixture-of-experts model counts the
    tokens its router sends to each expert (the optional `pop_expert_load()` of the model contract); this reads and
    resets them: `moe/load` is each expert's share of the routed tokens since the last call, all layers together,
    and `moe/load_layers` the same per layer (when layers x experts <= max_cells). Under torch.distributed the counts
    are pooled over ranks, so every rank must call this at the same step (a collective)."""
    pop = getattr(model, "pop_expert_load", None)
    if pop is None:
        return {}
    from phiforge.train import all_reduce_mean

    counts = all_reduce_mean(pop().double())  # (L, E); the mean over ranks has the same shares as the sum
    if counts.sum() == 0:  # no training forward since the last call
        return {}
    shares = lambda c: [round(v, 6) for v in (c / c.sum().clamp(min=1)).tolist()]  # noqa: E731
    record = {"moe/load": shares(counts.sum(0))}
    if counts.numel() <= max_cells:
        record["moe/load_layers"] = [shares(row) for row in counts]
    return record


def export(model, tok, out: Path, base_path: str) -> None:
    """out/final: an HF folder (LoRA merged into a copy, QLoRA's int4 modules back to float); with LoRA also
    out/adapter in PEFT format."""
    import copy

    from phiforge.checkpoint import save_hf_folder
    from phiforge.lora import lora_modules, merge_lora, save_adapter

    if lora_modules(model):
        save_adapter(model, out / "adapter", base_model_name_or_path=str(Path(base_path).resolve()))
        model = merge_lora(copy.deepcopy(model))
    for name, m in list(model.named_modules()):  # QLoRA: the non-adapted int4 modules (lm_head) back to float
        if hasattr(m, "dequantize") and not isinstance(m, torch.nn.Linear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=getattr(m, "bias", None) is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize().float())
                if lin.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(model, name, lin.to(m.dequantize().device))
    model.__dict__.pop("quant_config", None)
    save_hf_folder(model.eval(), out / "final", tok)
