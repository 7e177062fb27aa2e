"""The recipe's embedded data: a phi-1-style "code textbook" corpus from the Python standard library on this machine,
or a story corpus from TinyStories text; plus SFT and DPO sets built honestly from the same text.

Why the standard library: every Python installation has it, it needs no network, it is real, well-documented code
under the PSF licence, and its docstrings give a grounded supervised signal (a function and what it does). Numbers
depend on the Python version (3.11's stdlib differs from 3.12's): the report records which one was used.

Everything here is deterministic: files are visited in an order fixed by a hash of their relative path, the held-out
split is a hash of the path, and the DPO negatives are drawn from a seeded RNG.

Pretraining documents (documents.jsonl.gz: {"id", "text", "set", "doc_ratio"} records, `set` naming the source):
  * source:   stdlib .py files (the phase-1 "web" analogue), up to `budget_bytes`, cut into ~chunk_bytes pieces;
              `doc_ratio` is the file's share of documented functions/classes: the recipe's filter stage keeps the
              mostly documented ones as the "heavily filtered" phase-2 subset.
  * textbook: one "textbook chapter" per module: each documented public function/class as prose (its docstring)
              followed by its code without the docstring (the "synthetic textbook" analogue, no LLM involved).
SFT ({"messages"}): "What does `mod.f` do?" -> the docstring's first paragraph; "Write the signature of `mod.f`."
-> `def f(args):`. DPO ({"prompt", "chosen", "rejected"}): the "What does" prompts with chosen = the right summary and
rejected = the same words in a shuffled order (a fluency preference a 5M-parameter model can learn; with rejected = another
function's summary, which takes knowledge of that function the tiny model lacks, held-out reward accuracy stayed at
chance: 0.43 on 100 pairs).
Stories: stories are documents; `phiforge data filter` + `dedup` make the phase-2 subset; SFT = "Continue this
story: <first two sentences>" -> the next three; DPO rejected = three sentences of another story.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import re
import sysconfig
from pathlib import Path

from phiforge.data.io import expand_files, open_text, write_jsonl
from phiforge.utils import UserError, atomic_write_text

# Generated tables, bundled wheels and test suites: not "code a person wrote to be read".
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data", "ensurepip",
              "__pycache__", "__phello__"}
SKIP_PREFIXES = ("config-", "_sysconfigdata", "lib-dynload")
HELDOUT_FACTS = 200  # held-out questions to collect (the report shows a few)


def _h(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=salt.encode()[:64]).digest(), "little")


def is_heldout(key: str, fraction: float, salt: str = "heldout") -> bool:
    return fraction > 0 and _h(key, salt) / 2.0 ** 64 < fraction


# ----------------------------------------------------------------------------------------------------------------
# The standard library as code-textbook data


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "textwrap.py").is_file():
        raise UserError(f"the Python standard library sources are not at {root} (textwrap.py missing); install your "
                        "distribution's full python3 package, or pass --data PATH with text files")
    return root


def stdlib_files(root: Path) -> list[Path]:
    """Every readable stdlib .py file, in an order fixed by a hash of its relative path (not alphabetical, so a
    byte budget takes a spread of packages rather than the first letters)."""
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in SKIP_PARTS or part.startswith(SKIP_PREFIXES) for part in rel.parts):
            continue
        files.append(p)
    return sorted(files, key=lambda p: (_h(p.relative_to(root).as_posix()), p.as_posix()))


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def chunk(text: str, chunk_bytes: int) -> list[str]:
    """Cut text at blank-line-pair boundaries into pieces of about chunk_bytes (a piece is never split inside)."""
    pieces, out, cur = re.split(r"\n\n\n+", text), [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece) > chunk_bytes:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n\n{piece}" if cur else piece
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def first_paragraph(doc: str) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return re.sub(r"\s+", " ", para).strip()


def _defs(tree: ast.Module):
    """(qualified name, node) of top-level functions/classes and the methods of top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield f"{node.name}.{sub.name}", sub


def _public(qual: str) -> bool:
    return not any(part.startswith("_") for part in qual.split("."))


def _without_docstring(node) -> str:
    """The source of a def/class with its own docstring removed (the code half of a textbook section)."""
    import copy
    node = copy.deepcopy(node)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    return ast.unparse(node)


def analyse(text: str, module: str) -> dict | None:
    """Docstring statistics, SFT facts and a textbook chapter for one source file (None if it does not parse)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    defs = list(_defs(tree))
    documented = [(q, n) for q, n in defs if ast.get_docstring(n)]
    facts, sections = [], []
    for qual, node in documented:
        if not _public(qual):
            continue
        summary = first_paragraph(ast.get_docstring(node))
        if not 3 <= len(summary.split()) <= 60:
            continue
        name = f"{module}.{qual}" if module else qual
        sig = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sig = f"def {node.name}({ast.unparse(node.args)}):"
        facts.append({"name": name, "summary": summary, "signature": sig})
        code = _without_docstring(node)
        if len(code) <= 3000 and "." not in qual:  # a chapter section per top-level def; methods live in classes
            sections.append(f"## {name}\n\n{inspect.cleandoc(ast.get_docstring(node))}\n\n```python\n{code}\n```\n")
    mod_doc = ast.get_docstring(tree)
    chapter = None
    if sections:
        intro = first_paragraph(mod_doc) if mod_doc else ""
        chapter = f"# The `{module}` module\n\n" + (intro + "\n\n" if intro else "") + "\n\n".join(sections)
    return {"defs": len(defs), "documented": len(documented), "facts": facts, "chapter": chapter,
            "module_doc": bool(mod_doc)}


def doc_ratio(info: dict) -> float:
    """Share of a file's functions/classes (and its module) that carry a docstring."""
    return (info["documented"] + info["module_doc"]) / (info["defs"] + 1)


def build_stdlib(out: Path, budget_bytes: int, heldout_fraction: float, heldout_max: int, heldout_max_bytes: int,
                 sft_max: int, seed: int, chunk_bytes: int = 8000) -> dict:
    """Write out/documents.jsonl.gz, out/heldout.txt (+ heldout_index.json), out/{sft,dpo,heldout_sft}.jsonl and
    out/tokenizer_corpus.txt. Returns counts (the caller writes them to out/corpus.json).

    A file is held out iff a hash of its path says so; held-out files are never trained on (by the tokenizer,
    pretraining, SFT or DPO), and the first `heldout_max` of at most `heldout_max_bytes` are the evaluation text.
    Files are cut into documents of about `chunk_bytes` at top-level boundaries (two blank lines, PEP 8), so that
    the validation split and near-duplicate detection work at a finer grain than whole modules."""
    root = stdlib_root()
    source, textbook, heldout, facts, heldout_facts = [], [], [], [], []
    used = 0
    for p in stdlib_files(root):
        rid = p.relative_to(root).as_posix()
        held = is_heldout(rid, heldout_fraction)
        heldout_full = len(heldout) >= heldout_max and len(heldout_facts) >= HELDOUT_FACTS
        if used >= budget_bytes and heldout_full:
            break
        if (held and heldout_full) or (not held and used >= budget_bytes):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > 400_000:
            continue
        info = analyse(text, module_name(p.relative_to(root)))
        if info is None:
            continue
        if held:  # never trained on: evaluation text and held-out questions
            if len(heldout) < heldout_max and len(text.encode()) <= heldout_max_bytes:
                heldout.append({"id": rid, "text": text})
            heldout_facts += info["facts"]
            continue
        used += len(text.encode())
        ratio = round(doc_ratio(info), 4)
        source += [{"id": f"{rid}#{k}", "text": c, "set": "source", "doc_ratio": ratio}
                   for k, c in enumerate(chunk(text, chunk_bytes))]
        if info["chapter"]:
            textbook += [{"id": f"{rid}#textbook{k}", "text": c, "set": "textbook"}
                         for k, c in enumerate(chunk(info["chapter"], chunk_bytes))]
        facts += info["facts"]
    if len(source) < 5 or not heldout:
        raise UserError(f"only {len(source)} usable standard-library files under {root}; the recipe needs more "
                        "(or pass --data PATH)")
    sft, dpo = stdlib_sft_dpo(facts, sft_max, seed)
    heldout_qa = [r for r in stdlib_sft_dpo(heldout_facts, 0, seed)[0]
                  if r["messages"][0]["content"].startswith("What does")]
    _write_corpus(out, source + textbook, heldout, sft, dpo, heldout_qa)
    return {"corpus": "python-stdlib", "stdlib": str(root), "python": sysconfig.get_python_version(),
            "source_docs": len(source), "source_bytes": used,
            "textbook_docs": len(textbook), "heldout_docs": len(heldout), "sft_records": len(sft),
            "dpo_records": len(dpo), "facts": len(facts)}


def stdlib_sft_dpo(facts: list[dict], sft_max: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    facts = sorted({f["name"]: f for f in facts}.values(), key=lambda f: _h(f["name"], "sft"))
    sft, dpo = [], []
    for f in facts:
        q = f"What does `{f['name']}` do?"
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f["summary"]}]})
        if f["signature"]:
            sft.append({"messages": [{"role": "user", "content": f"Write the signature of `{f['name']}`."},
                                     {"role": "assistant", "content": f["signature"]}]})
        words = f["summary"].split()
        rng.shuffle(words)
        scrambled = " ".join(words)
        if scrambled != " ".join(f["summary"].split()):  # one- and two-word summaries may come back unchanged
            dpo.append({"prompt": q, "chosen": f["summary"], "rejected": scrambled})
    return sft[:sft_max] if sft_max else sft, dpo[:sft_max // 2] if sft_max else dpo


# ----------------------------------------------------------------------------------------------------------------
# Stories (TinyStories text)


def read_stories(paths: list[str]) -> list[str]:
    """Stories from .txt/.txt.gz files or folders of them: split on `<|endoftext|>` when a file has it, else on
    blank lines."""
    files = expand_files(paths, (".txt", ".txt.gz"), what="--data", check_suffix=False)
    if not files:
        raise UserError(f"--data {' '.join(paths)}: no .txt or .txt.gz files")
    stories = []
    for f in files:
        with open_text(f, newline=None) as fh:
            text = fh.read()
        parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else re.split(r"\n\s*\n", text)
        stories += [s.strip() for s in parts if len(s.split()) >= 20]
    return stories


def build_stories(paths: list[str], out: Path, budget_bytes: int, heldout_fraction: float, heldout_max: int,
                  sft_max: int, seed: int) -> dict:
    """The stories of `paths` as documents (held out by a hash of the text), SFT and DPO sets; see build_stdlib."""
    source, heldout = [], []
    used = 0
    for i, s in enumerate(read_stories(paths)):
        rid = f"story{i:06d}"
        if is_heldout(s, heldout_fraction):
            if len(heldout) < heldout_max:
                heldout.append({"id": rid, "text": s})
            continue
        if used < budget_bytes:
            source.append({"id": rid, "text": s, "set": "source"})
            used += len(s.encode())
    if len(source) < 5 or not heldout:
        raise UserError(f"--data gave {len(source)} training and {len(heldout)} held-out stories; need more text")
    sft, dpo = story_sft_dpo(source, sft_max, seed)
    heldout_qa = story_sft_dpo(heldout, 0, seed)[0]
    _write_corpus(out, source, heldout, sft, dpo, heldout_qa)
    return {"corpus": "stories", "inputs": [str(Path(p).resolve()) for p in paths], "source_docs": len(source),
            "source_bytes": used, "heldout_docs": len(heldout), "sft_records": len(sft), "dpo_records": len(dpo)}


def story_sft_dpo(source: list[dict], sft_max: int, seed: int) -> tuple[list[dict], list[dict]]:
    """SFT: the first two sentences of a story -> its next three. DPO: the same prompt, chosen = the story's own next
    three sentences, rejected = three sentences from another story."""
    rng = random.Random(seed)
    sft, dpo = [], []

    def parts(text: str) -> tuple[str, str]:
        sentences = re.split(r"(?<=[.!?])\s+", text)
        return " ".join(sentences[:2]), " ".join(sentences[2:5])

    for d in sorted(source, key=lambda d: _h(d["id"], "sft")):
        opening, rest = parts(d["text"])
        if not rest:
            continue
        q = f"Continue this story: {opening}"
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": rest}]})
        other = parts(source[rng.randrange(len(source))]["text"])[1]
        if other and other != rest:
            dpo.append({"prompt": q, "chosen": rest, "rejected": other})
        if sft_max and len(sft) >= sft_max:
            break
    return sft, dpo[:max(len(sft) // 2, 2)]


def _write_corpus(out: Path, documents, heldout, sft, dpo, heldout_qa) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "documents.jsonl.gz", documents)
    atomic_write_text(out / "heldout.txt", "\n\n".join(d["text"] for d in heldout) + "\n")
    atomic_write_text(out / "heldout_index.json", json.dumps([d["id"] for d in heldout], indent=1) + "\n")
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "dpo.jsonl", dpo)
    write_jsonl(out / "heldout_sft.jsonl", heldout_qa)
    # the tokenizer learns from everything it will see in training (the held-out files excluded)
    atomic_write_text(out / "tokenizer_corpus.txt", "\n".join(d["text"] for d in documents) + "\n")
