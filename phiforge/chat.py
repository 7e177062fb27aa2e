"""Interactive chat with a model's chat template: `phiforge chat`.

    phiforge chat runs/sft/final
    phiforge chat microsoft/Phi-3-mini-4k-instruct --dtype bfloat16 --system "You are terse." --temperature 0.7
    printf 'Hi!\\n/exit\\n' | python -m phiforge.chat runs/sft/final     # piped input works too

Commands: /reset (forget the conversation, keep the system prompt), /system TEXT (set the system prompt and reset),
/exit or /quit (or end of input). A line ending in a backslash continues on the next; text between two lines of
triple double quotes is one message (as in Ollama). At a terminal, lines can be edited and the history (kept in the
phiforge cache) is recalled with the arrow keys. Ctrl-C during an answer stops that answer (the partial answer stays
in the history); Ctrl-C at the prompt only clears the line. Answers end at the tokenizer's stop set (`<|end|>`, eos).
The conversation is rendered with `tokenizer.apply_chat_template` every turn; when it no longer leaves room for the
answer (--max-new-tokens, at most half the context), the oldest turns are dropped. An answer gets --max-new-tokens
(default: whatever the context leaves), capped at the context with a notice on stderr, as llama.cpp's -c.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import replace

from phiforge.generate import (add_model_args, add_sampling_args, config_from_args, load_for_cli,
                               stream_generate)
from phiforge.utils import ArgumentParser, UserError

PROMPT = ">>> "
HELP = "commands: /reset, /system TEXT, /exit"


class ChatSession:
    """The conversation state and one-turn answer logic (the REPL below is a thin loop around it)."""

    def __init__(self, model, tokenizer, config, system: str | None = None, compile: bool = False,
                 max_new_tokens: int | None | str = "config"):
        """max_new_tokens: None = each answer gets what is left of the context; default: config.max_new_tokens
        (capped at the context with a notice, as llama.cpp's -c)."""
        self.model, self.tok, self.config, self.compile = model, tokenizer, config, compile
        self.want = config.max_new_tokens if max_new_tokens == "config" else max_new_tokens
        self.system = system
        self.history: list[dict] = []
        self.notice = sys.stderr

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def prompt_ids(self) -> list[int]:
        # old turns are dropped until the answer has room for what was asked, but never more than half the
        # context: a long request then gets a capped answer instead of a forgotten conversation
        reserve = min(self.want or self.context, self.context // 2)
        while True:
            ids = self.tok.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=True)
            if len(ids) <= self.context - reserve or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # drop the oldest user/assistant pair
        if len(ids) >= self.context:
            raise UserError(f"the message ({len(ids)} tokens) does not fit the context of {self.context} tokens")
        return ids

    def answer_tokens(self, prompt_len: int) -> int:
        """Tokens this answer may have: what was asked, capped (with a notice) at what is left of the context."""
        room = self.context - prompt_len
        if self.want is None:
            return room
        if self.want > room:
            print(f"[answer capped at {room} tokens: the conversation uses {prompt_len} of the context of "
                  f"{self.context}]", file=self.notice, flush=True)
            return room
        return self.want

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
            config = replace(self.config, max_new_tokens=self.answer_tokens(len(ids)))
            for ev in stream_generate(self.model, self.tok, ids, config, compile=self.compile):
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


def _history():
    """Line editing and a history kept across sessions (as Ollama's and llama.cpp's REPLs): readline's, in the
    phiforge cache. Returns a function that saves it, or None where readline is missing."""
    try:
        import readline
    except ImportError:
        return None
    from phiforge.utils import cache_dir

    path = cache_dir() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home: the session still worked

    return save


def read_message(read_line) -> str:
    """One message: a line; lines ending in a backslash continue on the next; a block between lines of \"\"\"
    (as in Ollama) is taken as it is. `read_line(continued)` returns a line without its newline."""
    line = read_line(False)
    if line.strip().startswith('"""'):
        first = line.strip()[3:]
        if first.endswith('"""'):
            return first[:-3]
        lines = [first] if first else []
        while True:
            nxt = read_line(True)
            if nxt.rstrip().endswith('"""'):
                lines.append(nxt.rstrip()[:-3])
                return "\n".join(lines).rstrip("\n")
            lines.append(nxt)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(True)
    return "\n".join(lines + [line])


def repl(session: ChatSession, stdin=None, out=sys.stdout) -> int:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    save_history = _history() if interactive else None

    def read_line(continued: bool) -> str:
        if interactive:
            return input("... " if continued else PROMPT)
        if not continued:
            out.write(PROMPT)
            out.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    try:
        return _loop(session, read_line, out)
    finally:
        if save_history is not None:
            save_history()


def _loop(session: ChatSession, read_line, out) -> int:
    while True:
        try:
            line = read_message(read_line)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            out.write("\n")
            continue
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
    ap = ArgumentParser(prog="phiforge chat", description="Interactive chat with a model's chat template. "
                                 + HELP + "; Ctrl-C stops the current answer.")
    add_model_args(ap)
    ap.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(ap, max_new_tokens=None)
    args = ap.parse_args(argv)
    config = config_from_args(args)
    model, tokenizer = load_for_cli(args)
    if sys.stdin.isatty():
        print(f"phiforge chat: {args.model} ({HELP}; Ctrl-C stops an answer)", file=sys.stderr)
    # Ctrl-C is this REPL's "stop the answer" key, so it must raise KeyboardInterrupt even when the process
    # inherited SIGINT as ignored (anything started in the background by a non-interactive shell, e.g. `make test
    # &`): Python keeps an inherited SIG_IGN and Ctrl-C would silently do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return repl(ChatSession(model, tokenizer, config, system=args.system, compile=args.compile,
                            max_new_tokens=args.max_new_tokens))


if __name__ == "__main__":
    from phiforge.utils import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
