"""Supervised fine-tuning on chat data with the loss on assistant tokens only.

    phiforge sft --model runs/pretrain/final --data ../shared/data/sft/alpaca_en_demo.json --out runs/sft
    phiforge sft --config runs/sft/config.yaml --max_steps 50 --out runs/sft2         # flags override YAML
    phiforge sft --config runs/sft/config.yaml --out runs/sft2 --resume               # continue exactly
    phiforge sft --model runs/pretrain/final --data chats.jsonl --lora true --lora_r 16 --out runs/sft-lora

Data: `messages` jsonl, Alpaca (instruction/input/output[/history]) or ShareGPT (conversations) records, .json or
.jsonl (.gz); each is rendered with the model's own chat template (phiforge.tokenizer) and trained on the assistant
tokens, including the `<|end|>` closing each assistant turn (chat_data.py). Records that do not fit (a missing role,
an empty answer, longer than seq_len) are skipped and counted, never truncated; the counts are printed and saved in
data_report.json. Packing (default) puts several conversations in one row with positions restarting at 0 and a
block-diagonal causal mask, so they never see each other; `--packing false` pads instead.

Config precedence: SFTConfig defaults < YAML < --key value flags; the resolved config is printed and saved beside
every checkpoint. Run directory: config.yaml, data_report.json, metrics.jsonl, ckpt/step_XXXXXXXX/ (exact resume:
model, optimizer, RNG, data cursor), final/ (HF folder; LoRA is merged into it) and, with LoRA, adapter/ (PEFT format).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phiforge.train.chat_data import SkipReport, batches, build_sft, read_records, split
from phiforge.train.config import format_config, parse_overrides, resolve_config, save_config
from phiforge.train.schedule import check_schedule, lr_at, make_optimizer, set_lr
from phiforge.train.state import load_checkpoint, resume_point, save_checkpoint
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text


@dataclass
class SFTConfig:
    out: str = "runs/sft"
    seed: int = 0
    model: str = ""  # HF folder with tokenizer files (e.g. a pretrain run's final/)
    data: list = field(default_factory=list)  # files; formats auto-detected per record
    max_records: int = 0  # 0 = all (per file, first N)
    val_frac: float = 0.05
    val_max: int = 200
    seq_len: int = 1024  # the context: longer conversations are skipped, never truncated
    packing: bool = True
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
    lora_targets: list = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    eval_every: int = 50
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    export: bool = True
    end_eval: int = 100  # held-out prompts answered greedily at the end: how many end with <|end|> (0 = skip)
    end_max_new_tokens: int = 256


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared with dpo.py


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but torch sees no GPU")
    return torch.device(name)


def load_model_and_tokenizer(path: str, device: torch.device):
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


def export(model, tok, out: Path, cfg, base_path: str) -> None:
    """out/final: an HF folder (LoRA merged into a copy); with LoRA also out/adapter in PEFT format."""
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
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin.to(m.dequantize().device))
    model.__dict__.pop("quant_config", None)
    save_hf_folder(model.eval(), out / "final", tok)


def read_data(files: list, max_records: int) -> list[dict]:
    if not files:
        raise UserError("no --data files given")
    files = [files] if isinstance(files, str) else files
    records = []
    for f in files:
        recs = read_records(f)
        records += recs[:max_records] if max_records > 0 else recs
    return records


def make_logger(path: Path):
    def log(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def reset_metrics(path: Path, step: int, resumed: bool) -> None:
    """Fresh run: empty metrics.jsonl. Resumed: drop the records a killed run wrote after its checkpoint."""
    if resumed and path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
    else:
        atomic_write_text(path, "")


def last_prompt(example: tuple[list[int], list[int]]) -> list[int]:
    """The prompt of an example's last assistant turn: its tokens before the final run of trained labels."""
    ids, labels = example
    t = len(labels)
    while t > 0 and labels[t - 1] == -100:
        t -= 1
    while t > 0 and labels[t - 1] != -100:
        t -= 1
    return ids[:t]


def end_rate(model, tok, prompt_ids: list[list[int]], max_new_tokens: int = 128) -> dict:
    """Greedy answers to held-out prompts: the fraction that end with <|end|> (the turn-closing token the SFT loss
    trains) within max_new_tokens."""
    from phiforge.generate import generate

    ids = prompt_ids
    model.eval()
    results = []
    with torch.no_grad():
        for k in range(0, len(ids), 16):
            results += generate(model, tok, ids[k:k + 16], max_new_tokens=max_new_tokens, temperature=0.0)
    ended = sum(1 for r in results if r.token_ids and r.token_ids[-1] == tok.end_id)
    return {"end_rate": ended / max(len(results), 1), "n": len(results),
            "mean_len": sum(len(r.token_ids) for r in results) / max(len(results), 1)}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = ArgumentParser(prog="phiforge sft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any SFTConfig field can be set with --key value or --key=value.")
    ap.add_argument("--config", help="YAML settings (between the defaults and the flags)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the latest checkpoint in --out (or the given checkpoint directory)")
    ap.add_argument("--data", nargs="+", help="data files (.json / .jsonl, optionally .gz)")
    args, rest = ap.parse_known_args(argv)
    flags = parse_overrides(rest)
    if args.data:
        flags["data"] = args.data
    cfg = resolve_config(SFTConfig, args.config, flags)
    for k in ("seq_len", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every"):
        if getattr(cfg, k) < 1:
            raise UserError(f"{k} must be >= 1 (got {getattr(cfg, k)})")
    if cfg.dtype not in ("fp32", "bf16"):
        raise UserError(f"dtype must be fp32 or bf16 (got {cfg.dtype!r})")
    if cfg.qlora:
        cfg.lora = True
    out = Path(cfg.out)
    print(format_config(cfg), end="", file=sys.stderr)
    ckpt_path = resume_point(out, args.resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)

    # -- model and data
    model, tok = load_model_and_tokenizer(cfg.model, device)
    cfg = fit_seq_len(cfg, model, "sft")
    report = SkipReport()
    examples, report = build_sft(read_data(cfg.data, cfg.max_records), tok, cfg.seq_len, report)
    print(report.summary("sft data"), file=sys.stderr)
    if not examples:
        raise UserError("no usable SFT records (see the skip counts above)")
    train, val = split(examples, cfg.val_frac, cfg.val_max, cfg.seed)
    n_rows = len(batches(train, cfg.batch_size, cfg.seq_len, cfg.packing, tok.pad_id, cfg.seed))
    steps_per_epoch = max(1, n_rows // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    check_schedule(cfg.schedule, min(cfg.warmup_steps, max_steps), max_steps, cfg.decay_steps)

    if cfg.lora:
        names = add_adapters(model, cfg)
        print(f"sft: LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {len(names)} modules"
              + (" over an int4 base (QLoRA)" if cfg.qlora else ""), file=sys.stderr)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    step, epoch, cursor = 0, 0, 0
    if ckpt_path is not None:
        meta = load_checkpoint(ckpt_path, model, optimizer)
        step, epoch, cursor = meta["step"], meta["epoch"], meta["cursor"]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "data_report.json", {"sft": report.as_dict(), "train": len(train), "val": len(val)})
    metrics_path = out / "metrics.jsonl"
    reset_metrics(metrics_path, step, ckpt_path is not None)
    log = make_logger(metrics_path)
    print(f"sft: {len(train)} train / {len(val)} val conversations, {steps_per_epoch} steps per epoch, "
          f"{max_steps} steps, {n_train:,} trainable parameters, device {device}"
          + (f", resumed from {ckpt_path} at step {step}" if ckpt_path else ""), file=sys.stderr)

    def loss_on(batch) -> torch.Tensor:
        labels = batch["labels"].to(device)
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # (B, T): next token
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            return model(batch["input_ids"].to(device), positions=batch["positions"].to(device),
                         attn_mask=batch["attn_mask"].to(device), targets=targets)

    @torch.no_grad()
    def evaluate() -> dict:
        """Mean assistant-token loss over the held-out conversations."""
        if not val:
            return {}
        model.eval()
        total, count = 0.0, 0
        for batch in batches(val, cfg.batch_size, cfg.seq_len, cfg.packing, tok.pad_id, seed=0):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(loss_on(batch)) * n
            count += n
        model.train()
        return {"val_loss": total / max(count, 1)}

    # -- the loop: epoch batches are a pure function of (seed, epoch), so (epoch, cursor) resumes exactly
    from tqdm import tqdm

    epoch_batches = batches(train, cfg.batch_size, cfg.seq_len, cfg.packing, tok.pad_id, cfg.seed + epoch)
    bar = tqdm(total=max_steps, initial=step, desc="sft", unit="step", file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    while step < max_steps:
        lr = lr_at(step, cfg.schedule, cfg.lr, cfg.min_lr, min(cfg.warmup_steps, max_steps), max_steps,
                   cfg.decay_steps)
        set_lr(optimizer, lr)
        micro = []
        for _ in range(cfg.grad_accum):
            if cursor >= len(epoch_batches):
                epoch, cursor = epoch + 1, 0
                epoch_batches = batches(train, cfg.batch_size, cfg.seq_len, cfg.packing, tok.pad_id, cfg.seed + epoch)
            micro.append(epoch_batches[cursor])
            cursor += 1
        loss_sum = 0.0
        for batch in micro:
            loss = loss_on(batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at step {step}; lower lr or use dtype fp32")
        if step % cfg.log_every == 0 or step == max_steps:
            log({"step": step, "loss": loss_value, "lr": lr, "epoch": epoch, "elapsed_s": round(time.time() - t0, 2)})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % cfg.eval_every == 0 or step == max_steps:
            val_metrics = evaluate()
            if val_metrics:
                log({"step": step, **val_metrics})
                bar.write(f"step {step}: val_loss {val_metrics['val_loss']:.4f}", file=sys.stderr)
        if step % cfg.ckpt_every == 0 or step == max_steps:
            save_checkpoint(out, step, model, optimizer, {"epoch": epoch, "cursor": cursor}, config=cfg,
                            keep_last=cfg.keep_last)
    bar.close()
    final = {"step": step, **(evaluate() if val else {})}
    if cfg.end_eval > 0 and val:
        final.update(end_rate(model, tok, [last_prompt(e) for e in val[:cfg.end_eval]], cfg.end_max_new_tokens))
        print(f"sft: {final['n']} held-out prompts, {100 * final['end_rate']:.1f}% of greedy answers end with "
              f"<|end|> (mean {final['mean_len']:.1f} tokens)", file=sys.stderr)
    atomic_write_json(out / "eval.json", {**final, "elapsed_s": round(time.time() - t0, 1)})
    if cfg.export:
        export(model, tok, out, cfg, cfg.model)
        print(f"sft: exported {out / 'final'}" + (f" and {out / 'adapter'}" if cfg.lora else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))
