"""Issue 34: every command the documentation shows runs. The `phiforge ...` lines of README.md and docs/*.md code
blocks, every example in a subcommand's `--help` and module docstring, each run as a subprocess against the smoke
recipe's model, so the documentation cannot drift from the code again.

Commands run in document order in one workspace, as a reader following the pages would: a later command reads what
an earlier one wrote (`quantize --out runs/demo/int4`, then `perplexity runs/demo/int4`). The workspace has
`../shared` (a link to the real one, when present) and `recipes/` beside it, so relative paths in the docs and in
the YAML files they name resolve as in a checkout. Model placeholders (`MODEL`, `path/to/model`, `runs/*/final`)
are the smoke model; input placeholders (`corpus.txt`, `chats.jsonl`, ...) are small files written here. Only the
commands in SKIPS are skipped, each with its reason; CAPS bounds the few whose documented size takes minutes.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import importlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from phiforge.utils import shared_dir

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120

# --------------------------------------------------------------------------------------------------------------
# collecting


@dataclass(frozen=True)
class DocCommand:
    source: str  # where it is written: "docs/quant.md:4" or "help: quantize"
    text: str  # the logical line as written (continuations joined, comment dropped)
    argv: tuple  # the phiforge argv (after `phiforge` / `python -m phiforge.X`), before substitution
    module: str | None = None  # `python -m phiforge.X` form: X's module
    stdin: str | None = None  # `printf '...' | phiforge ...`: what is piped in


def logical_lines(lines: list[str]):
    """(index of the first line, text) with backslash continuations joined."""
    buf, start = "", 0
    for i, line in enumerate(lines):
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""
    if buf:
        yield start, buf


def parse_command(source: str, line: str, variables: dict) -> DocCommand | None:
    """A DocCommand for a shell line that runs phiforge, else None (make, python scripts, prose)."""
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line.strip())
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    stdin = None
    if "|" in tokens and tokens[0] == "printf":  # `printf 'Hi!\n/exit\n' | phiforge chat M`
        cut = tokens.index("|")
        stdin = tokens[1].encode().decode("unicode_escape")
        tokens = tokens[cut + 1:]
    tokens = tokens[:-1] if tokens[-1:] == ["&"] else tokens  # `phiforge serve ... &`: serve is run as a server
    if not tokens:
        return None
    text = shlex.join(tokens)
    if tokens[0] == "phiforge":
        return DocCommand(source, text, tuple(tokens[1:]), stdin=stdin)
    if tokens[0] in ("python", "python3") and tokens[1:2] == ["-m"] and len(tokens) > 2:
        if tokens[2].startswith("phiforge"):
            return DocCommand(source, text, tuple(tokens[3:]), module=tokens[2], stdin=stdin)
        if tokens[2] == "torch.distributed.run":
            return DocCommand(source, text, tuple(tokens[3:]), module=tokens[2], stdin=stdin)
    return None


def commands_in_lines(source_of, lines: list[str]) -> list[DocCommand]:
    variables: dict[str, str] = {}
    out = []
    for i, line in logical_lines(lines):
        if m := re.match(r"\s*(?:export\s+)?([A-Za-z_]\w*)=(\S+)\s*(?:#.*)?$", line):
            variables[m.group(1)] = m.group(2)
            continue
        if cmd := parse_command(source_of(i), line, variables):
            out.append(cmd)
    return out


def doc_commands(path: Path) -> list[DocCommand]:
    """Commands in the fenced blocks of a Markdown file (```bash and unlabelled shell blocks; not ```python)."""
    text = path.read_text()
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("", "bash", "sh", "shell", "console"):
            continue
        first = text[:m.start(2)].count("\n") + 1
        rel = path.relative_to(ROOT)
        out += commands_in_lines(lambda i, first=first, rel=rel: f"{rel}:{first + i}", m.group(2).splitlines())
    return out


def example_lines(text: str) -> list[str]:
    """The indented example lines of a help text or docstring (with their continuation lines)."""
    lines, keep = text.splitlines(), []
    for i, line in enumerate(lines):
        starts = re.match(r"\s+(printf .*\| )?(phiforge |python -m (phiforge|torch\.distributed\.run)\b)", line)
        if starts or (keep and keep[-1].rstrip().endswith("\\")):
            keep.append(line)
    return keep


def help_text(argv: list[str]) -> str:
    from phiforge import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.suppress(SystemExit):
        cli.main(argv)
    return buf.getvalue()


def help_commands() -> list[DocCommand]:
    """Examples of `phiforge <cmd> --help` (and `phiforge data <stage> --help`) and of the modules' docstrings,
    which carry examples that argparse shows only in part."""
    from phiforge import cli
    from phiforge.data import cli as data_cli

    texts = {"phiforge": cli.__doc__}
    for name, (module, _) in cli.COMMANDS.items():
        texts[f"help: {name}"] = help_text([name, "--help"])
        texts[f"docstring: {module}"] = importlib.import_module(module).__doc__ or ""
    for stage, (module, _, _) in data_cli.STAGES.items():
        texts[f"help: data {stage}"] = help_text(["data", stage, "--help"])
        texts[f"docstring: {module}"] = importlib.import_module(module).__doc__ or ""
    out = []
    for source, text in texts.items():
        out += commands_in_lines(lambda i, source=source: source, example_lines(text))
    return out


def collect() -> list[DocCommand]:
    """Every documented command once (the first place it is written wins)."""
    seen, out = set(), []
    for cmd in [c for path in DOC_FILES for c in doc_commands(path)] + help_commands():
        key = (cmd.module, cmd.argv, cmd.stdin)
        if key not in seen:
            seen.add(key)
            out.append(cmd)
    return out


COMMANDS = collect()

# --------------------------------------------------------------------------------------------------------------
# what is not run, and what is bounded (each entry: a regex on the command's text, and why)

SKIPS = [
    (r"microsoft/Phi-3", "needs the Hugging Face Hub (network) for a released checkpoint"),
    (r"--judge-url https://", "needs a judge model behind a remote API (network)"),
    (r"data (annotate|synth) ", "needs a teacher LLM behind an OpenAI-compatible API"),
    (r"--device cuda", "needs a CUDA GPU"),
    (r"torch\.distributed\.run", "two training processes; torchrun DDP/FSDP2 parity is test_train_distributed.py's"),
    (r"pretrain --config recipes/tinystories\.yaml",
     "needs the TinyStories shards scripts/tinystories.sh builds (runs/tinystories/ts_*) and a 20-minute budget; "
     "`phiforge pretrain` itself runs in the smoke recipe"),
]

# Extra flags appended (argparse and --set: the last value wins) where the documented command takes minutes on 2 cores.
CAPS = [
    (r"^phiforge recipe ", ["--print-config"]),  # the recipe runs end to end once, as the smoke fixture
    # training: 2 steps, and not 200 held-out examples scored nor 100 answers generated at the end
    (r"^phiforge sft ", ["--set", "max_steps=2", "--set", "val_max=8", "--set", "end_eval=4"]),
    (r"^phiforge dpo ", ["--set", "max_steps=2", "--set", "val_max=8"]),
    (r"^phiforge eval .*--tasks (mmlu|gsm8k)", ["--limit", "2", "--max-gen-toks", "16"]),  # benchmarks: minutes each
    (r"^phiforge perplexity .*\.\./shared", ["--max-tokens", "2048"]),  # all of wikitext: a minute
    (r"--method gptq", ["--calib-samples", "4"]),
    (r"--dtype bfloat16", ["--max-new-tokens", "16"]),  # bf16 matmuls without bf16 dot products: ~1 min by default
]

# --------------------------------------------------------------------------------------------------------------
# the workspace


@pytest.fixture(scope="module")
def workspace(smoke_run, tmp_path_factory):
    """A folder to run the documented commands in, with their inputs; `../shared` and `recipes/` beside it."""
    base = tmp_path_factory.mktemp("docs")
    ws = base / "work"
    ws.mkdir()
    if shared_dir() is not None:
        (base / "shared").symlink_to(shared_dir())
    (ws / "recipes").symlink_to(ROOT / "recipes")
    write_inputs(ws, smoke_run[0])
    return ws


def write_inputs(ws: Path, smoke: Path) -> None:
    """The files the documented commands name as examples of the user's own data."""
    text = (ROOT / "README.md").read_text()
    for name in ("corpus.txt", "text.txt", "test.txt", "notes.txt", "a.txt", "b.txt"):
        (ws / name).write_text(text)
    (ws / "corpus.txt.gz").write_bytes(gzip.compress(text.encode()))
    docs = [json.dumps({"text": p}) for p in text.split("\n\n") if len(p.split()) > 30]
    (ws / "web").mkdir()
    (ws / "web" / "part0.jsonl.gz").write_bytes(gzip.compress(("\n".join(docs) + "\n").encode()))
    (ws / "in.jsonl.gz").write_bytes(gzip.compress(("\n".join(docs) + "\n").encode()))
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."}]} for i in range(16)]
    (ws / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{i}."} for i in range(16)]
    (ws / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # `data train-classifier runs/data/labels` reads `data annotate`'s labels, which need a teacher LLM: the
    # hand-labelled set in ../shared stands in for them
    if shared_dir() is not None:
        shutil.copytree(shared_dir() / "data" / "quality_labels", ws / "runs" / "data" / "labels")
    # ... and `data synth`'s stories (a teacher again): the web documents stand in
    (ws / "runs" / "data" / "stories").mkdir(parents=True, exist_ok=True)
    shutil.copy(ws / "in.jsonl.gz", ws / "runs" / "data" / "stories" / "stories_00000.jsonl.gz")
    # `phiforge plot RUN` reads a pretrain run's metrics: the smoke recipe's pretraining
    for run in ("runs/tinystories", "runs/tinystories/train", "runs/a", "runs/b"):
        (ws / run).mkdir(parents=True, exist_ok=True)
        shutil.copy(smoke / "pretrain" / "metrics.jsonl", ws / run / "metrics.jsonl")
    data_recipe = re.search(r"\n\n(    out: .*?)\n\"\"\"", (ROOT / "phiforge/data/cli.py").read_text(), re.S)
    (ws / "my_data_recipe.yaml").write_text(re.sub(r"^    ", "", data_recipe.group(1), flags=re.M) + "\n")


MODEL_PLACEHOLDERS = re.compile(r"^(MODEL|path/to/model|tiny-folder|runs/teacher|runs/[\w./-]*/final)$")
WORD_PLACEHOLDERS = {"IN": "in.jsonl.gz", "OUT": "runs/out", "EVAL...": "../shared/data/gsm8k", "$R": "0", "$W": "1"}


def substitute(argv: tuple, model: Path, cwd: Path) -> list[str]:
    """The documented argv with its placeholders filled in and its globs expanded (as the shell would)."""
    out = []
    skip_optional = False
    for tok in argv:
        if tok.startswith("["):  # `[--key value ...] [--resume]`: optional parts of a synopsis, left out
            skip_optional = not tok.endswith("]")
            continue
        if skip_optional:
            skip_optional = not tok.endswith("]")
            continue
        tok = WORD_PLACEHOLDERS.get(tok, tok)
        if MODEL_PLACEHOLDERS.match(tok):
            tok = str(model)
        out += (sorted(glob.glob(tok, root_dir=cwd)) or [tok]) if "*" in tok else [tok]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# running


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PHIFORGE_NO_PROGRESS": "1",
            "PYTHONPATH": str(ROOT)}


def full_argv(cmd: DocCommand, args: list[str]) -> list[str]:
    module = cmd.module or "phiforge.cli"
    return [sys.executable, "-m", module, *args]


def run_serve(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Start the server on a free port, list the models once, stop it with SIGINT as Ctrl-C would."""
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(free_port())
    else:
        argv += ["--port", str(free_port())]
    port = argv[argv.index("--port") + 1]
    proc = subprocess.Popen(argv, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the server did not answer in time"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["data"], r.text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def shown(cmd: DocCommand) -> str:
    return ("phiforge " if cmd.module is None else f"python -m {cmd.module} ") + shlex.join(cmd.argv)


def skip_reason(cmd: DocCommand, args: list[str], cwd: Path) -> str | None:
    for pattern, reason in SKIPS:
        if re.search(pattern, shown(cmd)):
            return reason
    if shared_dir() is None and needs_shared(cmd, args, cwd):
        return "needs ../shared/data"
    return None


def needs_shared(cmd: DocCommand, args: list[str], cwd: Path) -> bool:
    """The command names ../shared, after its placeholders are filled in or inside a file it reads, or it is an
    `eval` that reads its benchmark data from ../shared/data by default."""
    if "../shared" in shown(cmd) or any("../shared" in a for a in args):
        return True
    if args[:1] == ["eval"] and "--data-dir" not in args:
        return True
    files = [cwd / a for a in args if a.endswith((".yaml", ".yml")) and (cwd / a).is_file()]
    return any("../shared" in f.read_text() for f in files)


def command_args(cmd: DocCommand, model: Path, cwd: Path) -> list[str]:
    args = substitute(cmd.argv, model, cwd)
    for pattern, extra in CAPS:
        if re.search(pattern, shown(cmd)):
            args += extra
    return args


def run_one(cmd: DocCommand, args: list[str], cwd: Path) -> tuple[int, str]:
    argv = full_argv(cmd, args)
    if args[:1] == ["serve"] or cmd.module == "phiforge.serve":
        return run_serve(argv, cwd)
    is_chat = args[:1] == ["chat"] or cmd.module == "phiforge.chat"
    stdin = cmd.stdin if cmd.stdin is not None else ("Hi!\n/exit\n" if is_chat else "")  # one answer, then out
    proc = subprocess.run(argv, cwd=cwd, env=env(), input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stderr


def touches(args: list[str], path: str) -> bool:
    """Whether `args` name `path`, something inside it, or a folder holding it."""
    return any(a == path or a.startswith(path + "/") or path.startswith(a + "/") for a in args)


def out_of(args: list[str]) -> str | None:
    return args[args.index("--out") + 1] if "--out" in args[:-1] else None


LANES = 2  # the suite's machine has 2 cores; each command is one thread, most of it importing torch


@pytest.fixture(scope="module")
def outcomes(workspace, smoke_run):
    """Every documented command started at once on LANES workers: {index: ("skip", reason) | (args, future)}. A
    command waits for the earlier ones that write what it names (`--out runs/tok`, then `--tokenizer runs/tok`), so
    the pages' order holds where it matters; the pool takes commands in order, so a wait is never on one not begun."""
    from concurrent.futures import ThreadPoolExecutor

    model = smoke_run[0] / "final"
    writers: list[tuple[str, object]] = []  # (--out, future) of the commands submitted so far
    missing: list[tuple[str, str]] = []  # (--out, why) of skipped commands whose output nothing stands in for
    result = {}
    pool = ThreadPoolExecutor(LANES)
    for i, cmd in enumerate(COMMANDS):
        args = command_args(cmd, model, workspace)
        reason = skip_reason(cmd, args, workspace) or next((f"reads {out}, which a skipped command writes ({why})"
                                           for out, why in missing if touches(args, out)), None)
        if reason:
            out = out_of(args)
            if out and not (workspace / out).exists():  # no stand-in (e.g. ../shared's labels for `annotate`)
                missing.append((out, reason))
            result[i] = ("skip", reason)
            continue
        deps = [f for out, f in writers if touches(args, out)]

        def job(cmd=cmd, args=args, deps=deps):
            for f in deps:
                with contextlib.suppress(Exception):  # a failed input fails its own test, and this one after it
                    f.result()
            return run_one(cmd, args, workspace)

        future = pool.submit(job)
        if out := out_of(args):
            writers.append((out, future))
        result[i] = (args, future)
    yield result
    pool.shutdown(cancel_futures=True)


def command_id(cmd: DocCommand) -> str:
    return f"{cmd.source} {' '.join(cmd.argv[:2])}"


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[command_id(c) for c in COMMANDS])
def test_documented_command_runs(index, outcomes):
    cmd, (args, outcome) = COMMANDS[index], outcomes[index]
    if args == "skip":
        pytest.skip(outcome)
    rc, err = outcome.result(timeout=4 * TIMEOUT_S)
    assert "Traceback" not in err, f"{shown(cmd)}\n{err[-3000:]}"
    assert rc == 0, f"{shown(cmd)}\n-> {shlex.join(args)}\n{err[-3000:]}"
