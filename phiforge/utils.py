"""Small shared helpers: the user-facing error type, atomic writes, and where shared data lives."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, bad data). The CLI prints it as one line, exit code 2."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _says_nothing(default) -> bool:
    """Defaults not worth printing: "default: None", "default: False", "default: []"."""
    return default is None or default is False or default is argparse.SUPPRESS or default == []


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (they hold examples), and every option's default in --help."""

    def _get_help_string(self, action):
        if _says_nothing(action.default) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help, and one-line errors that suggest the nearest option for a typo
    (`--max-new-token` -> did you mean --max-new-tokens?)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        if formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            formatter_class = HelpFormatter
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints no help line, so no default, for an option without help text: give it one
        if kwargs.get("help") is None and not _says_nothing(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            options = [o for a in self._actions for o in a.option_strings]
            typo = next((w for w in message.split(": ", 1)[1].split() if w.startswith("--")), None)
            if typo:
                message += did_you_mean(typo.split("=")[0], options)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr, so stdout stays the command's output; PHIFORGE_NO_PROGRESS=1 turns it off."""
    from tqdm import tqdm

    kwargs["disable"] = kwargs.get("disable", False) or os.environ.get("PHIFORGE_NO_PROGRESS") == "1"
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def normal_mode(path: str | os.PathLike) -> None:
    """Give a file the mode open() would have (0644 under umask 022). mkstemp and safetensors' save_file create
    files 0600, which another user (a server account, a teammate) cannot read."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        normal_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in `path`; a UserError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def shared_dir() -> Path | None:
    """`../shared` beside the checkout (or $PHIFORGE_SHARED), if present."""
    env = os.environ.get("PHIFORGE_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def cache_dir() -> Path:
    """$PHIFORGE_CACHE, default ~/.cache/phiforge: built kernels and the llama.cpp reference build."""
    return Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge"))


def llama_cpp_bin(*tools: str, explicit: str | None = None) -> Path | None:
    """The folder holding all of `tools` (llama.cpp binaries): `explicit`, $LLAMA_CPP_BIN, the folder of the first
    tool on PATH, or where scripts/build_llama_cpp.sh puts them; None when none has them all."""
    on_path = shutil.which(tools[0])
    for d in (explicit, os.environ.get("LLAMA_CPP_BIN"), Path(on_path).parent if on_path else None,
              cache_dir() / "llama.cpp" / "bin"):
        if d and all((Path(d) / t).exists() for t in tools):
            return Path(d)
    return None


def check_writable(path: str | os.PathLike, kind: str = "file", flag: str = "--out") -> Path:
    """Fail now, with one line, when `path` cannot be written as a file (kind="file") or a folder (kind="dir"),
    so that a long run (an eval, GPTQ, a data stage) does not lose its results to a bad path found at the end.
    Creates nothing: the stage makes its folders when it writes."""
    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is an existing file; it must name a folder")
    if kind == "file" and p.is_dir():
        raise UserError(f"{flag} {p} is a folder; it must name a file")
    # The nearest existing ancestor is where the first new file or folder will be made; it must be a writable folder.
    anc = p if kind == "dir" else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{flag} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: folder {anc} is not writable")
    return p


def set_module(model, name: str, new) -> None:
    """Put `new` in place of the submodule called `name` (dotted, as named_modules() names it)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def run_main(main, argv: list[str]) -> int:
    """Call a stage's main(); turn UserError into one clear line and exit code 2 (no traceback)."""
    try:
        rc = main(argv)
    except UserError as e:
        print(f"phiforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phiforge: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
