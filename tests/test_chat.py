"""`phiforge chat`: the REPL driven through piped stdin in a subprocess (history, /reset, /system, /exit, SIGINT)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.generate import generate
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chat_model(trained_tokenizer, tmp_path_factory):
    tok = trained_tokenizer
    # Wide enough that a 3000-token answer takes seconds even on an idle machine: the Ctrl-C tests must interrupt
    # an answer still being written (with the 64-wide preset, 1000 tokens could finish before the signal landed).
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                                               hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                               max_position_embeddings=4096, original_max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Phi3(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        # stop ids get logit 0: some other token beats them at every step, so an answer runs until stopped
        model.lm_head.weight[sorted(tok.stop_ids)] = 0.0
    folder = tmp_path_factory.mktemp("chatmodel")
    save_hf_folder(model.eval(), folder, tok)
    model, tok = load(str(folder))
    return model, tok, folder


def run_chat(folder, stdin_text, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "phiforge.chat", str(folder), "--max-new-tokens", "8", *extra],
                          input=stdin_text, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def answer(model, tok, messages, n=8):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return generate(model, tok, ids, max_new_tokens=n).text


def test_chat_piped_history_reset_system_exit(chat_model):
    model, tok, folder = chat_model
    out = run_chat(folder, "Hello there\nTell me more\n/reset\nTell me more\n/system Be brief.\nTell me more\n"
                           "/exit\nnever read\n", "--system", "You are Pip.")
    pip = [{"role": "system", "content": "You are Pip."}]
    a1 = answer(model, tok, pip + [{"role": "user", "content": "Hello there"}])
    a2 = answer(model, tok, pip + [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": a1},
                                   {"role": "user", "content": "Tell me more"}])
    a3 = answer(model, tok, pip + [{"role": "user", "content": "Tell me more"}])
    a4 = answer(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me more"}])
    assert a2 != a3  # the history changes the answer, so the transcript below checks it is used
    want = (f">>> {a1}\n>>> {a2}\n>>> [conversation reset]\n>>> {a3}\n"
            f">>> [system prompt set; conversation reset]\n>>> {a4}\n>>> ")
    assert out == want


def test_ctrl_c_stops_the_answer_not_the_session(chat_model):
    model, tok, folder = chat_model
    n = 3000
    long = generate(model, tok, tok.apply_chat_template([{"role": "user", "content": "Go"}],
                                                        add_generation_prompt=True, tokenize=True),
                    max_new_tokens=n)
    assert long.finish_reason == "length"  # precondition: the first answer would run for n tokens
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "phiforge.chat", str(folder), "--max-new-tokens", str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        proc.stdin.write(b"Go\n")
        proc.stdin.flush()
        seen = b""
        while len(seen) < len(">>> ") + 5:  # wait until the answer is streaming
            seen += os.read(proc.stdout.fileno(), 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        assert proc.poll() is None, "SIGINT ended the session"
        rest, err = proc.communicate(b"/exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (seen + rest).decode()
    assert proc.returncode == 0, err.decode()
    assert " [stopped]\n>>> " in out
    partial = out[len(">>> "):out.index(" [stopped]")]
    assert long.text.startswith(partial) and len(partial) < len(long.text)


def test_chat_through_a_pseudo_terminal(chat_model):
    """Interactive path (stdin is a tty, input() with line editing): Ctrl-C typed on the terminal (^C -> SIGINT from
    the line discipline) stops the answer; the session goes on until end of input (Ctrl-D)."""
    import pty
    import select

    model, tok, folder = chat_model
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "phiforge.chat", str(folder), "--max-new-tokens", "3000"])
    buf = b""

    def read_until(marker: bytes, start: int = 0, timeout: float = 90.0) -> int:
        nonlocal buf
        end = time.time() + timeout
        while marker not in buf[start:]:
            assert time.time() < end, f"timed out waiting for {marker!r}; got {buf[-300:]!r}"
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf.index(marker, start) + len(marker)

    try:
        at = read_until(b">>> ")
        os.write(fd, b"Go\r")
        at = read_until(b"Go\r\n", at)  # the terminal's echo
        end = time.time() + 90
        while len(buf) < at + 8:  # wait until the answer is streaming
            assert time.time() < end, buf[-300:]
            if select.select([fd], [], [], 0.5)[0]:
                buf += os.read(fd, 4096)
        os.write(fd, b"\x03")  # Ctrl-C
        at = read_until(b"[stopped]", at)
        at = read_until(b">>> ", at)
        os.write(fd, b"\x04")  # Ctrl-D at the prompt: end of input ends the session
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, buf[-500:]
