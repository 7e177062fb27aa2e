"""Direct preference optimisation: DPO (sigmoid), IPO or conservative DPO on preference pairs.

    phiforge dpo --model runs/sft/final --data ../shared/data/preference/dpo_en_demo.json --out runs/dpo
    phiforge dpo --model runs/sft/final --data pairs.jsonl --set loss=ipo --set beta=0.5 --out runs/ipo
    phiforge dpo --model runs/sft/final --data pairs.jsonl --set loss=cdpo --set label_smoothing=0.1 --out runs/cdpo
    phiforge dpo --model runs/sft/final --data pairs.jsonl --set lora=true --out runs/dpo-lora   # ref = adapters off
    phiforge dpo --config runs/dpo/config.yaml --out runs/dpo --resume              # continue exactly

Data (chat_data.to_preference): {prompt, chosen, rejected} (strings or message lists), ShareGPT pairs
({conversations, chosen: {from, value}, rejected}), HH-RLHF transcripts ({chosen, rejected} "\\n\\nHuman: ..."),
AlpacaEval annotations. Each side is rendered with the model's chat template; the scored tokens are the final
assistant turn (answer, <|end|> and the closing eos), the same span the SFT mask trains. Bad pairs (a missing role,
an empty answer, longer than seq_len) are skipped and counted.

Reference log-probs: full fine-tuning computes them once with the initial model (or ref_model) before the first
step and caches them in OUT/ref_logps.safetensors (a resumed run reads the cache, never the moved policy). With LoRA
the reference is the same model with its adapters switched off (phiforge.lora.disable_adapters), no second copy.
Logged metrics (train and held-out): loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins
with r = beta * (log pi - log pi_ref) summed over the answer tokens (as TRL reports them).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from phiforge.lora import disable_adapters, lora_modules
from phiforge.train.chat_data import SkipReport, build_pairs, collate_pairs, split
from phiforge.train.common import (MetricsLog, PostTrainConfig, add_adapters, check_choice, expert_load_record, export,
                                   optimizer_step, parse_stage_args, posttrain_setup)
from phiforge.train.config import save_config
from phiforge.scoring import sequence_logps
from phiforge.train.pref_losses import cdpo_loss, dpo_loss, ipo_loss, preference_metrics
from phiforge.train.schedule import check_schedule, lr_at, make_optimizer, set_lr
from phiforge.train.state import load_checkpoint, save_checkpoint
from phiforge.utils import UserError, atomic_write_bytes, atomic_write_json

LOSSES = ("dpo", "ipo", "cdpo")


@dataclass
class DPOConfig(PostTrainConfig):
    """PostTrainConfig (train/common.py: data, optimizer, schedule, LoRA, evaluation, checkpoints) with DPO's defaults,
    plus the reference model and the loss."""
    out: str = "runs/dpo"
    val_frac: float = 0.1
    batch_size: int = 4  # pairs per micro-batch
    lr: float = 5e-7
    lora_dropout: float = 0.0
    ref_model: str = ""  # default: the initial `model` (full fine-tuning) / adapters off (LoRA)
    loss: str = "dpo"  # dpo | ipo | cdpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo's eps


def pair_logps(model, pairs, pad_id: int, device, dtype: str = "fp32"):
    """Summed answer log-probs and answer token counts: (chosen (B,), rejected (B,), n_chosen, n_rejected)."""
    batch = collate_pairs(pairs, pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):  # scores are fp32 either way
        logps, n = sequence_logps(model, batch["input_ids"].to(device), batch["mask"].to(device),
                                  positions=batch["positions"].to(device))
    B = len(pairs)
    return logps[:B], logps[B:], n[:B], n[B:]


def pair_loss(cfg, pi_w, pi_l, ref_w, ref_l, n_w, n_l) -> torch.Tensor:
    if cfg.loss == "dpo":
        return dpo_loss(pi_w, pi_l, ref_w, ref_l, cfg.beta)
    if cfg.loss == "cdpo":
        return cdpo_loss(pi_w, pi_l, ref_w, ref_l, cfg.beta, cfg.label_smoothing)
    n_w, n_l = n_w.clamp(min=1), n_l.clamp(min=1)  # IPO: per-token averages (see ipo_loss)
    return ipo_loss(pi_w / n_w, pi_l / n_l, ref_w / n_w, ref_l / n_l, cfg.beta)


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, batch_size, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    w, l_ = [], []
    for k in range(0, len(pairs), batch_size):
        a, b, _, _ = pair_logps(model, pairs[k:k + batch_size], pad_id, device, dtype)
        w.append(a.double().cpu())
        l_.append(b.double().cpu())
    model.train(was)
    return torch.cat(w), torch.cat(l_)


def fingerprint(pairs, model_path: str) -> str:
    h = hashlib.sha256(str(Path(model_path).resolve()).encode())
    for (cw, mw), (cl, ml) in pairs:
        h.update(repr((cw, mw, cl, ml)).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse_stage_args("phiforge dpo", __doc__, DPOConfig, argv, named=("model", "data"))
    return train(cfg, args.resume)


def train(cfg: DPOConfig, resume: str | None = None) -> int:
    """Train as `cfg` says; `resume`: None (fresh), "latest" or a checkpoint directory. `phiforge recipe` calls
    this with the config it built."""
    check_choice(cfg, "loss", LOSSES)
    if cfg.beta <= 0 or not 0 <= cfg.label_smoothing < 0.5:
        raise UserError("need beta > 0 and 0 <= label_smoothing < 0.5")
    cfg, ckpt_path, device, model, tok, records = posttrain_setup(cfg, resume, "dpo")
    out = Path(cfg.out)
    report = SkipReport()
    pairs, report = build_pairs(records, tok, cfg.seq_len, report)
    print(report.summary("preference data"), file=sys.stderr)
    if len(pairs) < 2:
        raise UserError("fewer than 2 usable preference pairs (see the skip counts above)")
    train, val = split(pairs, cfg.val_frac, cfg.val_max, cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size) // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    check_schedule(cfg.schedule, min(cfg.warmup_steps, max_steps), max_steps, cfg.decay_steps)
    out.mkdir(parents=True, exist_ok=True)

    # -- reference log-probs, computed once (full fine-tuning) and cached on disk for resumes
    use_adapters_off = cfg.lora and not cfg.ref_model
    ref = {}
    if not use_adapters_off:
        cache = out / "ref_logps.safetensors"
        fp = fingerprint(train + val, cfg.ref_model or cfg.model)
        if cache.exists():
            from safetensors import safe_open
            with safe_open(str(cache), framework="pt") as fh:
                ok = (fh.metadata() or {}).get("fingerprint") == fp
            if ok:
                ref = load_file(str(cache))
        if not ref:
            if ckpt_path is not None:
                raise UserError(f"{cache} is missing or stale; a resumed full fine-tuning run needs the reference "
                                "log-probs of the initial model")
            ref_model = model if not cfg.ref_model else load_model_and_tokenizer(cfg.ref_model, device)[0]
            t = time.time()
            for name, subset in (("train", train), ("val", val)):
                if subset:
                    ref[f"{name}_w"], ref[f"{name}_l"] = reference_logps(ref_model, subset, tok.pad_id, device,
                                                                         cfg.batch_size, cfg.dtype)
            atomic_write_bytes(cache, save(ref, metadata={"fingerprint": fp}))
            print(f"dpo: reference log-probs of {len(train) + len(val)} pairs cached in {cache} "
                  f"({time.time() - t:.1f}s)", file=sys.stderr)
            del ref_model

    if cfg.lora:
        names = add_adapters(model, cfg)
        print(f"dpo: LoRA r={cfg.lora_r} on {len(names)} modules; reference = "
              + ("adapters off" if use_adapters_off else "cached"), file=sys.stderr)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)

    step = 0
    if ckpt_path is not None:
        step = load_checkpoint(ckpt_path, model, optimizer)["step"]
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "data_report.json", {"preference": report.as_dict(), "train": len(train),
                                                 "val": len(val)})
    log = MetricsLog(out / "metrics.jsonl", step, ckpt_path is not None)
    print(f"dpo: {len(train)} train / {len(val)} val pairs, loss {cfg.loss} beta {cfg.beta}, {max_steps} steps, "
          f"device {device}" + (f", resumed from {ckpt_path} at step {step}" if ckpt_path else ""), file=sys.stderr)

    def ref_for(name: str, idx: list[int], subset) -> tuple[torch.Tensor, torch.Tensor]:
        if use_adapters_off:
            with torch.no_grad(), disable_adapters(model):
                was = model.training
                model.eval()
                w, l_, _, _ = pair_logps(model, [subset[i] for i in idx], tok.pad_id, device, cfg.dtype)
                model.train(was)
            return w.detach(), l_.detach()
        return ref[f"{name}_w"][idx].to(device).float(), ref[f"{name}_l"][idx].to(device).float()

    def order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        return torch.randperm(len(train), generator=g).tolist()

    @torch.no_grad()
    def evaluate(subset, name: str) -> dict:
        model.eval()
        parts = {"w": [], "l": [], "rw": [], "rl": [], "loss": []}
        for k in range(0, len(subset), cfg.batch_size):
            idx = list(range(k, min(k + cfg.batch_size, len(subset))))
            rw, rl = ref_for(name, idx, subset)
            pw, pl, nw, nl = pair_logps(model, [subset[i] for i in idx], tok.pad_id, device, cfg.dtype)
            parts["loss"].append(pair_loss(cfg, pw, pl, rw, rl, nw, nl))
            for key, v in zip(("w", "l", "rw", "rl"), (pw, pl, rw, rl)):
                parts[key].append(v.float())
        model.train()
        cat = {k: torch.cat(v) for k, v in parts.items()}
        m = preference_metrics(cat["w"], cat["l"], cat["rw"], cat["rl"], cfg.beta)
        return {"val_loss": cat["loss"].mean().item(), **{f"val_{k}": v for k, v in m.items()}}

    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, desc=f"dpo ({cfg.loss})", unit="step", file=sys.stderr,
               dynamic_ncols=True)
    t0 = time.time()
    per_step = cfg.batch_size * cfg.grad_accum
    if step == 0 and val:
        log({"step": 0, **evaluate(val, "val")})
    while step < max_steps:
        lr = lr_at(step, cfg.schedule, cfg.lr, cfg.min_lr, min(cfg.warmup_steps, max_steps), max_steps,
                   cfg.decay_steps)
        set_lr(optimizer, lr)
        # pair indices of this step: a pure function of (seed, step), so a resumed run draws the same ones
        first = step * per_step
        idx_all = [order((first + j) // len(train))[(first + j) % len(train)] for j in range(per_step)]
        sums = {"loss": 0.0}
        stats = []
        for m in range(cfg.grad_accum):
            idx = idx_all[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            rw, rl = ref_for("train", idx, train)
            pw, pl, nw, nl = pair_logps(model, [train[i] for i in idx], tok.pad_id, device, cfg.dtype)
            loss = pair_loss(cfg, pw, pl, rw, rl, nw, nl).mean()
            (loss / cfg.grad_accum).backward()
            sums["loss"] += loss.item() / cfg.grad_accum
            stats.append((pw.detach(), pl.detach(), rw, rl))
        optimizer_step(model, optimizer, cfg.grad_clip)
        step += 1
        if not math.isfinite(sums["loss"]):
            raise UserError(f"loss is {sums['loss']} at step {step}; lower lr")
        if step % cfg.log_every == 0 or step == max_steps:
            m = preference_metrics(*(torch.cat([s[i] for s in stats]) for i in range(4)), beta=cfg.beta)
            log({"step": step, "loss": sums["loss"], "lr": lr, **m, "elapsed_s": round(time.time() - t0, 2),
                 **expert_load_record(model)})
            bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}")
        bar.update(1)
        if (step % cfg.eval_every == 0 or step == max_steps) and val:
            v = evaluate(val, "val")
            log({"step": step, **v})
            bar.write(f"step {step}: val_loss {v['val_loss']:.4f} val reward acc "
                      f"{v['val_rewards/accuracies']:.3f} margin {v['val_rewards/margins']:.4f}", file=sys.stderr)
        if step % cfg.ckpt_every == 0 or step == max_steps:
            save_checkpoint(out, step, model, optimizer, {}, config=cfg, keep_last=cfg.keep_last)
    bar.close()
    if val:
        final = evaluate(val, "val")
        atomic_write_json(out / "eval.json", {"step": step, **final, "n_val": len(val),
                                              "elapsed_s": round(time.time() - t0, 1)})
        print(f"dpo: held-out reward accuracy {final['val_rewards/accuracies']:.3f} on {len(val)} pairs, "
              f"margin {final['val_rewards/margins']:.4f}", file=sys.stderr)
    if cfg.export:
        export(model, tok, out, cfg.model)
        print(f"dpo: exported {out / 'final'}" + (f" and {out / 'adapter'}" if lora_modules(model) else ""),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
