"""Supervised fine-tuning on chat data with the loss on assistant tokens only.

    phiforge sft --model runs/pretrain/final --data ../shared/data/sft/alpaca_en_demo.json --out runs/sft
    phiforge sft --config runs/sft/config.yaml --set max_steps=50 --out runs/sft2     # flags override YAML
    phiforge sft --config runs/sft/config.yaml --out runs/sft2 --resume               # continue exactly
    phiforge sft --model runs/pretrain/final --data chats.jsonl --set lora=true --set lora_r=16 --out runs/sft-lora

Data: `messages` jsonl, Alpaca (instruction/input/output[/history]) or ShareGPT (conversations) records, .json or
.jsonl (.gz); each is rendered with the model's own chat template (phiforge.tokenizer) and trained on the assistant
tokens, including the `<|end|>` closing each assistant turn (chat_data.py). Records that do not fit (a missing role,
an empty answer, longer than seq_len) are skipped and counted, never truncated; the counts are printed and saved in
data_report.json. Packing (default) puts several conversations in one row with positions restarting at 0 and a
block-diagonal causal mask, so they never see each other; `--set packing=false` pads instead.

Config precedence: SFTConfig defaults < --config YAML < flags (--set key=value; train/config.py); the resolved
config is printed and saved beside every checkpoint. Run directory: config.yaml, data_report.json, metrics.jsonl,
ckpt/step_XXXXXXXX/ (exact resume: model, optimizer, RNG, data cursor), final/ (HF folder; LoRA is merged into it)
and, with LoRA, adapter/ (PEFT format).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from phiforge.train.chat_data import SkipReport, batches, build_sft, split
from phiforge.train.common import (MetricsLog, PostTrainConfig, add_adapters, check_choice, expert_load_record, export,
                                   optimizer_step, parse_stage_args, posttrain_setup)
from phiforge.train.config import save_config
from phiforge.train.schedule import check_schedule, lr_at, make_optimizer, set_lr
from phiforge.train.state import load_checkpoint, save_checkpoint
from phiforge.utils import UserError, atomic_write_json


@dataclass
class SFTConfig(PostTrainConfig):
    """PostTrainConfig (train/common.py: data, optimizer, schedule, LoRA, evaluation, checkpoints) plus packing and the
    held-out <|end|> check."""
    out: str = "runs/sft"
    packing: bool = True
    end_eval: int = 100  # held-out prompts answered greedily at the end: how many end with <|end|> (0 = skip)
    end_max_new_tokens: int = 256


# ----------------------------------------------------------------------------------------------------------------
# The held-out <|end|> check


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
    cfg, args = parse_stage_args("phiforge sft", __doc__, SFTConfig, argv, named=("model", "data"))
    return train(cfg, args.resume)


def train(cfg: SFTConfig, resume: str | None = None) -> int:
    """Fine-tune as `cfg` says; `resume`: None (fresh), "latest" or a checkpoint directory. `phiforge recipe`
    calls this with the config it built."""
    check_choice(cfg, "dtype", ("fp32", "bf16"))
    cfg, ckpt_path, device, model, tok, records = posttrain_setup(cfg, resume, "sft")
    out = Path(cfg.out)
    report = SkipReport()
    examples, report = build_sft(records, tok, cfg.seq_len, report)
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
    log = MetricsLog(out / "metrics.jsonl", step, ckpt_path is not None)
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
        optimizer_step(model, optimizer, cfg.grad_clip)
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at step {step}; lower lr or use dtype fp32")
        if step % cfg.log_every == 0 or step == max_steps:
            log({"step": step, "loss": loss_value, "lr": lr, "epoch": epoch, "elapsed_s": round(time.time() - t0, 2),
                 **expert_load_record(model)})
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
        export(model, tok, out, cfg.model)
        print(f"sft: exported {out / 'final'}" + (f" and {out / 'adapter'}" if cfg.lora else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
