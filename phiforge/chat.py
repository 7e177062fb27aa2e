"""Interactive chat with a model's chat template: `phiforge chat`.

    phiforge chat runs/sft/final
    phiforge chat microsoft/Phi-3-mini-4k-instruct --dtype bfloat16 --system "You are terse." --temperature 0.7
    printf 'Hi!\\n/exit\\n' | python -m phiforge.chat runs/sft/final     # piped input works too

Commands: /reset (forget the conversation, keep the system prompt), /system TEXT (set the system prompt and reset),
/exit or /quit (or end of input). Ctrl-C during an answer stops that answer (the partial answer stays in the
history); Ctrl-C at the prompt only clears the line. Answers end at the tokenizer's stop set (`<|end|>`, eos).
The conversation is rendered with `tokenizer.apply_chat_template` every turn; when it no longer fits the model's
context, the oldest turns are dropped.
"""
from __future__ import annotations

import argparse
import signal
import sys

from phiforge.generate import (add_model_args, add_sampling_args, config_from_args, load_for_cli,
                               stream_generate)
from phiforge.utils import UserError

PROMPT = ">>> "
HELP = "commands: /reset, /system TEXT, /exit"


class ChatSession:
    """The conversation state and one-turn answer logic (the REPL below is a thin loop around it)."""

    def __init__(self, model, tokenizer, config, system: str | None = None, compile: bool = False):
        self.model, self.tok, self.config, self.compile = model, tokenizer, config, compile
        self.system = system
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def prompt_ids(self) -> list[int]:
        limit = self.model.config.max_position_embeddings - self.config.max_new_tokens
        while True:
            ids = self.tok.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=True)
            if len(ids) <= limit or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # drop the oldest user/assistant pair
        if len(ids) > limit:
            raise UserError(f"the message ({len(ids)} tokens) plus --max-new-tokens {self.config.max_new_tokens} "
                            f"does not fit the context of {self.model.config.max_position_embeddings} tokens")
        return ids

    def answer(self, user_text: str, out=sys.stdout) -> tuple[str, str]:
        """Stream the answer to `out`; returns (answer text, finish reason or "interrupted")."""
        self.history.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
        except UserError:
            self.history.pop()
            raise
        text, reason = [], "interrupted"
        try:
            for ev in stream_generate(self.model, self.tok, ids, self.config, compile=self.compile):
                if ev.text:
                    text.append(ev.text)
                    out.write(ev.text)
                    out.flush()
                if ev.finish_reason:
                    reason = ev.finish_reason
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        answer = "".join(text)
        self.history.append({"role": "assistant", "content": answer})
        return answer, reason


def repl(session: ChatSession, stdin=None, out=sys.stdout) -> int:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    while True:
        try:
            if interactive:
                line = input(PROMPT)
            else:
                out.write(PROMPT)
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            out.write("\n")
            continue
        line = line.rstrip("\r\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
        elif cmd == "/system" or cmd.startswith("/system "):
            session.system = cmd[len("/system"):].strip() or None
            session.reset()
            out.write(f"[system prompt {'set' if session.system else 'cleared'}; conversation reset]\n")
        elif cmd in ("/help", "/?"):
            out.write(HELP + "\n")
        elif cmd.startswith("/") and " " not in cmd:
            out.write(f"unknown command {cmd}; {HELP}\n")
        else:
            try:
                session.answer(line, out)
            except UserError as e:
                out.write(f"[{e}]\n")
            except KeyboardInterrupt:  # between tokens and output: still only this answer stops
                out.write(" [stopped]\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="phiforge chat", description="Interactive chat with a model's chat template. "
                                 + HELP + "; Ctrl-C stops the current answer.")
    add_model_args(ap)
    ap.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(ap, max_new_tokens=512)
    args = ap.parse_args(argv)
    config = config_from_args(args)
    model, tokenizer = load_for_cli(args)
    if sys.stdin.isatty():
        print(f"phiforge chat: {args.model} ({HELP}; Ctrl-C stops an answer)", file=sys.stderr)
    # Ctrl-C is this REPL's "stop the answer" key, so it must raise KeyboardInterrupt even when the process
    # inherited SIGINT as ignored (anything started in the background by a non-interactive shell, e.g. `make test
    # &`): Python keeps an inherited SIG_IGN and Ctrl-C would silently do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return repl(ChatSession(model, tokenizer, config, system=args.system, compile=args.compile))


if __name__ == "__main__":
    from phiforge.cli import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
