"""Run untrusted generated Python (HumanEval / MBPP completions) in a throwaway subprocess.

Layers, outermost first (each one alone stops the listed attack):
1. Parent: a fresh temp directory as cwd, a minimal environment, the base interpreter (not the venv) with
   `-I` (isolated: no PYTHONPATH, no user site, no cwd on sys.path), a new session, and a wall-clock timeout
   that SIGKILLs the whole process group (infinite loops, stuck children).
2. Child launcher, before the program runs: unshare(CLONE_NEWNET|CLONE_NEWNS) where the kernel allows it
   (root, or an unprivileged user namespace) so there is no network, and tmpfs over the repository and
   ../shared so nothing of them is reachable; then rlimits (RLIMIT_AS memory, RLIMIT_CPU time, RLIMIT_NPROC
   fork bombs, RLIMIT_FSIZE file size, no core dumps); then, when root, drop to uid/gid 65534 (root ignores
   RLIMIT_NPROC).
3. A PEP 578 audit hook that refuses sockets and any path inside the hidden directories, in case the
   kernel did not allow namespaces.

The design follows human-eval's execution.py (reliability_guard + timeout) with OS-level isolation on top:
https://github.com/openai/human-eval/blob/master/human_eval/execution.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs inside the child as `python -I -S -c LAUNCHER program.py limits.json`; stdlib only.
LAUNCHER = r'''
import ctypes, json, os, resource, sys
prog, cfg = sys.argv[1], json.load(open(sys.argv[2]))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
flags = CLONE_NEWNS | CLONE_NEWNET | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
if libc.unshare(flags) == 0:  # own network (no interfaces up) and mount namespace
    MS_REC, MS_PRIVATE = 16384, 1 << 18
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    for d in cfg["hidden"]:
        if os.path.isdir(d):
            libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=64k,mode=000")
    for d in ("/tmp", "/var/tmp", "/dev/shm"):  # private scratch; our cwd stays reachable as "."
        if os.path.isdir(d):
            libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=64m,mode=1777")
mb = 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize_mb"] * mb, cfg["fsize_mb"] * mb))
resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.geteuid() == 0 and cfg["drop_root"]:  # root ignores RLIMIT_NPROC and every file mode
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
hidden = tuple(os.path.realpath(d) for d in cfg["hidden"])
blocked = ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec", "subprocess.Popen",
           "os.kill", "os.killpg", "ctypes.dlopen")
def _hook(event, args, _hidden=hidden, _blocked=blocked):
    if event.startswith("socket.") and (event != "socket.__new__" or len(args) > 1 and args[1] in (2, 10)):
        raise PermissionError("sandbox: network is disabled")
    if event in _blocked:
        raise PermissionError(f"sandbox: {event} is disabled")
    if event in ("open", "os.listdir", "os.scandir", "os.chdir", "os.mkdir", "os.remove", "os.rename") and args:
        p = args[0]
        if isinstance(p, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(p))
            if any(full == h or full.startswith(h + os.sep) for h in _hidden):
                raise PermissionError(f"sandbox: {os.fsdecode(p)} is not reachable")
sys.addaudithook(_hook)
src = open(prog).read()
del prog, cfg, libc, flags, hidden, blocked, _hook, mb
sys.argv = ["program.py"]
exec(compile(src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class Result:
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_readable(path: str) -> bool:
    """Can uid 65534 reach `path`? (every ancestor o+x)."""
    p = Path(path)
    return all(os.stat(a).st_mode & stat.S_IXOTH for a in [*reversed(p.parents), p] if a.is_dir())


def base_python() -> tuple[str, bool]:
    """(interpreter, can drop to nobody). The venv's base interpreter, never anything inside the repository;
    when its stdlib is not readable by others (e.g. pyenv under /root) a system python3 is preferred."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if _world_readable(sys.base_prefix):
        return exe, True
    for cand in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if os.path.exists(cand) and _world_readable(str(Path(os.path.realpath(cand)).parent.parent)):
            return os.path.realpath(cand), True
    return exe, False


def run_python(program: str, timeout: float = 5.0, memory_mb: int = 1024, nproc: int = 64,
               fsize_mb: int = 16, hidden: list[str] | None = None) -> Result:
    """Run `program` (Python source) in the sandbox; status "passed" iff it exits 0 within `timeout` seconds."""
    from phiforge.utils import shared_dir

    hidden = hidden if hidden is not None else [str(REPO_ROOT)] + ([str(shared_dir())] if shared_dir() else [])
    work = tempfile.mkdtemp(prefix="phiforge-sandbox-")
    try:
        python, drop_root = base_python()
        cfg = {"memory_mb": memory_mb, "cpu_s": int(timeout) + 1, "fsize_mb": fsize_mb, "nproc": nproc,
               "hidden": hidden, "drop_root": drop_root}
        Path(work, "program.py").write_text(program)
        Path(work, "limits.json").write_text(json.dumps(cfg))
        if os.geteuid() == 0:  # the child drops to nobody: give it its own directory
            os.chown(work, 65534, 65534)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([python, "-I", "-S", "-c", LAUNCHER, "program.py", "limits.json"],
                                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            out, err, status = b"", b"", "timeout"
        finally:
            try:  # the whole group: a fork bomb's children die with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if status == "timeout":
                try:  # a grandchild that left the group may still hold the pipes
                    out, err = proc.communicate(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = b"", b""
        out_text, err_text = (b.decode(errors="replace")[-4000:] for b in (out, err))
        return Result(status, proc.returncode, out_text, err_text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(programs: list[str], timeout: float = 5.0, workers: int | None = None, **kw) -> list[Result]:
    """run_python over many programs with a thread pool (each one is its own subprocess), with a progress bar."""
    from tqdm import tqdm

    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    results: list[Result | None] = [None] * len(programs)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(programs), desc="sandbox", leave=False) as bar:
        futures = {pool.submit(run_python, p, timeout, **kw): i for i, p in enumerate(programs)}
        for fut in futures:
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results
