"""Tokenizer and chat format: the one place that decides special tokens, the chat template and the stop set.

Loads `tokenizer.json` (HF fast tokenizer, via the `tokenizers` library) or a SentencePiece `tokenizer.model` plus
its added tokens, with `tokenizer_config.json` and `generation_config.json`. Trains new byte-level BPE tokenizers
that reserve the Phi-3 special tokens and load in transformers as `PreTrainedTokenizerFast`.

    phiforge tokenizer --files corpus.txt --vocab-size 8192 --out runs/tok
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text, check_writable

# Phi-3 chat tokens, in the order they are reserved (ids 0..) by train_bpe. Released checkpoints keep their own ids
# (PHI3_SPEC 9): <|endoftext|> 32000, <|assistant|> 32001, <|system|> 32006, <|end|> 32007, <|user|> 32010.
SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>",
                  "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
                  "<|placeholder5|>", "<|placeholder6|>"]

# Built-in template when a tokenizer ships none: the May-2024-onward Phi-3-mini template (system role supported;
# ../shared/reference/phi3/Phi-3-mini-4k-instruct/chat_template.may2024-onward.jinja).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _raise(message):
    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    # Compiling costs ~20-60 ms; SFT renders thousands of conversations with one template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         **variables) -> str:
    """Render a Jinja chat template the way transformers does (trim_blocks, lstrip_blocks), in a sandbox:
    templates ship inside downloaded checkpoints and must not reach Python internals."""
    try:
        return _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **variables)
    except TemplateError as e:
        raise UserError(f"chat template failed: {e}") from None


def _token_str(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")  # AddedToken dict form in tokenizer_config.json


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` (or SentencePiece) with the Phi-3 chat conventions."""

    def __init__(self, backend, config: dict | None = None, generation_config: dict | None = None,
                 sp_model=None, added: dict[str, int] | None = None):
        self.backend, self.sp = backend, sp_model
        self.config = dict(config or {})
        self.added = dict(added or {})  # SentencePiece path: added token -> id
        self.chat_template = self.config.get("chat_template") or PHI3_CHAT_TEMPLATE
        if isinstance(self.chat_template, list):  # named templates: take "default"
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"),
                                      self.chat_template[0]["template"])
        self.bos_token = _token_str(self.config.get("bos_token")) or ("<s>" if self._has("<s>") else None)
        self.eos_token = _token_str(self.config.get("eos_token")) or "<|endoftext|>"
        self.pad_token = _token_str(self.config.get("pad_token")) or self.eos_token
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token)
        self.pad_id = self.token_to_id(self.pad_token)
        self.end_id = self.token_to_id("<|end|>")
        # Stop set: generation_config's eos list, plus <|end|> (ends every assistant turn) and eos (PHI3_SPEC 10).
        stop = (generation_config or {}).get("eos_token_id", [])
        stop = set(stop if isinstance(stop, list) else [stop])
        self.stop_ids = {i for i in stop | {self.end_id, self.eos_id} if i is not None}
        specials = [t for t in SPECIAL_TOKENS if self._has(t)]
        specials += [t for t in self.added if t not in specials]
        self.special_ids = {self.token_to_id(t) for t in specials}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
                                      + ")") if self.added else None
        self._decide_special_tokens()

    def _decide_special_tokens(self, add_bos_token: bool | None = None) -> None:
        """Which special tokens encode(add_special_tokens=True) adds, decided as transformers 5 decides it for the same
        folder, so that our ids are `tokenizer(text)`'s: with a tokenizer.json, its post-processor alone decides
        (from_pretrained drops add_bos_token / add_eos_token of tokenizer_config.json; the released Phi-3
        tokenizer.json prepends <s>); with a SentencePiece model, add_bos_token / add_eos_token of the config.
        `add_bos_token` given is from_pretrained's argument of that name: the rule becomes [bos] text."""
        self._post_processor_decides = self.backend is not None and add_bos_token is None
        if self._post_processor_decides:
            ids = self.backend.encode("", add_special_tokens=True).ids  # what the post-processor adds
            bos, eos = ids[:1] == [self.bos_id], ids[-1:] == [self.eos_id]
        elif self.backend is not None:
            bos, eos = add_bos_token, False
        else:
            bos = self.config.get("add_bos_token", False) if add_bos_token is None else add_bos_token
            eos = self.config.get("add_eos_token", False)
        self.add_bos_token = bool(bos) and self.bos_id is not None
        self.add_eos_token = bool(eos) and self.eos_id is not None

    def with_add_bos_token(self, add_bos_token: bool) -> "Tokenizer":
        """A copy that adds BOS iff `add_bos_token`, as transformers' `from_pretrained(..., add_bos_token=...)`
        rebuilds the post-processor (lm-eval's add_bos_token model argument does that)."""
        tok = copy.copy(self)
        tok._decide_special_tokens(add_bos_token)
        return tok

    # -- loading and saving ----------------------------------------------------------------------------------------
    @classmethod
    def from_folder_or_none(cls, folder: str | Path) -> "Tokenizer | None":
        """The folder's tokenizer, or None where it has no tokenizer.json / tokenizer.model (a model folder may
        hold weights only: load, load_quantized and `phiforge quantize` all accept that)."""
        folder = Path(folder)
        has = folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        return cls.from_folder(folder) if has else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") or {}
        special_map = _read_json(folder / "special_tokens_map.json") or {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            config.setdefault(key, special_map.get(key))
        if (folder / "chat_template.jinja").exists() and not config.get("chat_template"):
            config["chat_template"] = (folder / "chat_template.jinja").read_text()
        gen = _read_json(folder / "generation_config.json")
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{folder / 'tokenizer.json'} could not be read: {e}") from None
            return cls(backend, config, gen)
        if (folder / "tokenizer.model").exists():
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor()
            try:
                sp.Load(str(folder / "tokenizer.model"))
            except Exception as e:
                raise UserError(f"{folder / 'tokenizer.model'} is not a SentencePiece model: {e}") from None
            added = _read_json(folder / "added_tokens.json") or {}
            for sid, tok in (config.get("added_tokens_decoder") or {}).items():
                added[tok["content"]] = int(sid)
            added = {t: i for t, i in added.items() if i >= sp.GetPieceSize()}  # pieces already in the model stay
            config.setdefault("add_bos_token", True)  # Llama tokenizers prepend <s> unless told otherwise
            return cls(None, config, gen, sp_model=sp, added=added)
        raise UserError(f"{folder} has no tokenizer.json or tokenizer.model")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.backend is None:
            raise UserError("saving is supported for tokenizer.json tokenizers only")
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        cfg = {k: v for k, v in self.config.items() if k != "added_tokens_decoder"}
        cfg.update({"tokenizer_class": cfg.get("tokenizer_class", "PreTrainedTokenizerFast"),
                    "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "add_bos_token": self.add_bos_token, "chat_template": self.chat_template})
        cfg.setdefault("clean_up_tokenization_spaces", False)
        atomic_write_json(folder / "tokenizer_config.json", cfg)
        atomic_write_json(folder / "special_tokens_map.json",
                          {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token})

    # -- ids ---------------------------------------------------------------------------------------------------
    def _has(self, token: str) -> bool:
        if self.backend is not None:
            return self.backend.token_to_id(token) is not None
        return token in self.added or self.sp.PieceToId(token) != self.sp.unk_id() or token == self.sp.IdToPiece(0)

    def token_to_id(self, token: str) -> int | None:
        if self.backend is not None:
            return self.backend.token_to_id(token)
        if token in self.added:
            return self.added[token]
        i = self.sp.PieceToId(token)
        return None if (i == self.sp.unk_id() and token != self.sp.IdToPiece(i)) else i

    @property
    def vocab_size(self) -> int:
        if self.backend is not None:
            return self.backend.get_vocab_size(with_added_tokens=True)
        return max([self.sp.GetPieceSize() - 1, *self.added.values()]) + 1

    # -- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token strings in `text` become their single ids (never split). `add_special_tokens` adds what
        the tokenizer adds around a text (transformers' `tokenizer(text)`; see _decide_special_tokens): the one
        rule for every text that is scored or generated from outside a chat template."""
        if self.backend is not None:
            if add_special_tokens and self._post_processor_decides:
                return self.backend.encode(text, add_special_tokens=True).ids
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = []
            parts = self._special_re.split(text) if self._special_re else [text]
            for part in parts:
                if part in self.added:
                    ids.append(self.added[part])
                elif part:
                    ids.extend(self.sp.EncodeAsIds(part))
        if add_special_tokens:
            ids = [self.bos_id] * self.add_bos_token + ids + [self.eos_id] * self.add_eos_token
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids and i != self.bos_id]
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        inv = {i: t for t, i in self.added.items()}
        out, run = [], []
        for i in ids:
            if i in inv:
                out.append(self.sp.DecodeIds(run))
                out.append(inv[i])
                run = []
            elif i < self.sp.GetPieceSize():
                run.append(i)
        out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"message {i} must be an object with 'role' and 'content'")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        kind = "tokenizers" if self.backend is not None else "sentencepiece"
        return f"Tokenizer({kind}, vocab={self.vocab_size}, eos={self.eos_token!r}, stop_ids={sorted(self.stop_ids)})"


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


# ------------------------------------------------------------------------------------------------------------------
# Training a byte-level BPE tokenizer


def _iter_lines(files: Iterable[str | Path]) -> Iterator[str]:
    """Lines of text files; the `text` field of .jsonl/.parquet records (training on their JSON syntax would
    spend the vocabulary on `{"text": "` and escapes)."""
    from phiforge.data.io import JSONL_EXT, PARQUET_EXT, open_text, read_documents

    for f in files:
        p = Path(f)
        if not p.exists():
            raise UserError(f"tokenizer training file {p} does not exist")
        if p.name.endswith(JSONL_EXT + PARQUET_EXT):
            yield from read_documents(p, "text", "line")
            continue
        with open_text(p, newline=None) as fh:
            yield from fh


def train_bpe(texts: Iterable[str] | None = None, vocab_size: int = 8192, files: Iterable[str | Path] = (),
              model_max_length: int = 4096) -> Tokenizer:
    """Byte-level BPE (GPT-2 style byte alphabet: every UTF-8 string round-trips) with the Phi-3 special tokens
    reserved at ids 0..len(SPECIAL_TOKENS)-1. Loads in transformers as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < n_special + 256:
        raise UserError(f"vocab_size must be at least {n_special + 256} (specials + 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted(lines):  # an empty corpus would "train" a byte-only tokenizer: say so instead
        for line in lines:
            seen[0] += bool(line.strip())
            yield line

    tok.train_from_iterator(counted(texts if texts is not None else _iter_lines(files)), trainer=trainer)
    if not seen[0]:
        raise UserError(f"no training text in {', '.join(map(str, files)) or 'the texts given'}: every file is empty")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": model_max_length,
              "chat_template": PHI3_CHAT_TEMPLATE}
    end_id, eos_id = tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")
    return Tokenizer(tok, config, {"eos_token_id": [end_id, eos_id]})


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge tokenizer", description=train_bpe.__doc__)
    ap.add_argument("--files", nargs="+", required=True,
                    help="text files (.txt, .txt.gz; one document per line ok) or .jsonl/.parquet (their `text` field)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", required=True, help="folder to write tokenizer.json + tokenizer_config.json")
    args = ap.parse_args(argv)
    check_writable(args.out, "dir")
    tok = train_bpe(vocab_size=args.vocab_size, files=args.files)
    tok.save(args.out)
    atomic_write_json(Path(args.out) / "generation_config.json", {"eos_token_id": sorted(tok.stop_ids)})
    print(f"trained {tok!r} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
