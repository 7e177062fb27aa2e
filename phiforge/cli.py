"""phiforge command line: a thin dispatcher from subcommand to `module.main(argv)`.

    phiforge inspect phi-3-mini-4k
    phiforge generate runs/demo/final --prompt "Once upon a time"

Every module also runs alone (`python -m phiforge.inspect ...`).
"""
from __future__ import annotations

import importlib
import sys

from phiforge.utils import did_you_mean, run_main

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
COMMANDS = {
    "inspect": ("phiforge.inspect", "show a model's config, size, tokenizer and chat template"),
    "tokenizer": ("phiforge.tokenizer", "train a byte-level BPE tokenizer with the Phi-3 special tokens"),
    "generate": ("phiforge.generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("phiforge.chat", "interactive chat with a model's chat template"),
    "tokenize": ("phiforge.train.tokenize", "pack text/jsonl/parquet into token shards"),
    "pretrain": ("phiforge.train.pretrain", "pretrain (single process or torchrun DDP/FSDP2)"),
    "plot": ("phiforge.train.plot", "plot a run's loss curves to PNG"),
    "sft": ("phiforge.train.sft", "supervised fine-tuning with assistant-only loss"),
    "dpo": ("phiforge.train.dpo", "direct preference optimisation (DPO / IPO / cDPO)"),
    "data": ("phiforge.data.cli", "data recipe: filter, classify, dedup, decontaminate, synthesize"),
    "quantize": ("phiforge.quant.cli", "int8/int4 weight quantization (RTN or GPTQ)"),
    "perplexity": ("phiforge.perplexity", "perplexity and KL divergence against a reference"),
    "export": ("phiforge.export", "export to GGUF"),
    "serve": ("phiforge.serve", "OpenAI-compatible HTTP server"),
    "eval": ("phiforge.eval.harness", "benchmarks scored like lm-evaluation-harness"),
    "recipe": ("phiforge.recipe", "the whole Phi-3 recipe in one command"),
}


def usage() -> str:
    lines = ["usage: phiforge <command> [options]   (phiforge --version)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `phiforge <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from phiforge import __version__

        print(f"phiforge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"phiforge: error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; "
              "run `phiforge --help` for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
