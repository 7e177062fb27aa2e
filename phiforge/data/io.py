"""Reading documents, writing shards, and the resumable (rank, world) shard loop every data stage runs in.

Documents are read in input order (files sorted) and grouped into *units* of --shard-size documents; unit k is
processed by rank k % world and written to `<out>/<k:05d>.jsonl.gz` with a done marker `<out>/.done/<k:05d>.json`
holding that unit's stats. Both writes are atomic (temp + rename) and the marker is written after the shard, so a
rerun skips finished units and a killed run redoes only the unit it was in: nothing lost, nothing duplicated.
Ranks parse only their own units (raw lines of other units are skipped unparsed), so a Slurm array
(`--rank $SLURM_ARRAY_TASK_ID --world $SLURM_ARRAY_TASK_COUNT`) or Ray tasks can share the work.

Inputs: jsonl / jsonl.gz (one JSON object per line, text under --text-key), parquet (a text column), and text
files whose documents are separated per --text-sep (eot: "<|endoftext|>", line, blank, nul, file).

This module is also the one place every other part of phiforge reads and writes data files through: `open_text`
(utf-8, .gz by suffix), `read_jsonl` / `write_jsonl` (atomic, .gz by suffix, reproducible bytes), `read_documents`
(the strict reader the tokenizer uses), `read_text` (a file or folder as one text: perplexity, GPTQ calibration)
and `expand_files` (a file or a folder of files with given suffixes).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from phiforge.utils import UserError, atomic_write_bytes, atomic_write_json, check_writable

TEXT_EXT = (".txt", ".txt.gz", ".text", ".md")
JSONL_EXT = (".jsonl", ".jsonl.gz", ".ndjson", ".json.gz")
PARQUET_EXT = (".parquet",)
SEPARATORS = {"eot": "<|endoftext|>", "line": "\n", "blank": "\n\n", "nul": "\x00"}
MAX_MALFORMED_SAMPLES = 5


def expand_files(paths, suffixes: tuple[str, ...], *, what: str = "", recursive: bool = True,
                 check_suffix: bool = True) -> list[Path]:
    """Files given directly, or every file with one of `suffixes` inside given folders (sorted; hidden files and
    folders skipped). A missing path, a folder holding none, or (with check_suffix) a file of another type is a
    UserError naming `what` (the flag, e.g. "--eval-sets") and the path."""
    files: list[Path] = []
    say = f"{what} " if what else ""
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and f.name.endswith(suffixes)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{say}{p}: no {', '.join(suffixes)} files inside; pass files or a folder holding "
                                "them")
            files += found
        elif p.is_file():
            if check_suffix and not p.name.endswith(suffixes):
                raise UserError(f"{say}{p}: unsupported file type; use one of {', '.join(suffixes)}")
            files.append(p)
        else:
            raise UserError(f"{say}{p}: no such file or folder")
    return files


def input_files(paths: list[str]) -> list[Path]:
    """The documents a data stage or the tokenizer reads: text, jsonl(.gz) and parquet files, or folders of them."""
    return expand_files(paths, TEXT_EXT + JSONL_EXT + PARQUET_EXT)


def open_text(path: str | os.PathLike, *, newline: str | None = "") -> io.TextIOBase:
    """A utf-8 text reader, gunzipping a .gz. errors="replace": a stray invalid byte must not kill a run, but a file
    with NUL bytes in its first 8 KiB is refused as binary (one line, before any work).
    newline="" keeps "\\r\\n" as written; None translates it to "\\n"."""
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    try:
        _check_not_binary(Path(path), raw.read(8192))
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=newline)


def split_documents(text: str, text_sep: str) -> list[str]:
    """A text file's documents per --text-sep (unstripped, empty parts kept so their numbering is stable)."""
    if text_sep == "file":
        return [text]
    if text_sep not in SEPARATORS:
        raise UserError(f"--text-sep {text_sep!r}: use one of {', '.join(list(SEPARATORS) + ['file'])}")
    return text.replace("\r\n", "\n").split(SEPARATORS[text_sep])


def iter_raw(path: Path, text_sep: str = "eot") -> Iterator[tuple[str, object]]:
    """Yield (where, raw) per document without parsing it: a jsonl line, a text chunk, or a parquet row dict."""
    name = path.name
    if name.endswith(JSONL_EXT):
        i = 0
        try:
            with open_text(path) as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{name}:{i}", line
        except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt .gz: keep what was read, count it
            yield f"{name}:{i + 1}", BrokenFile(f"unreadable from here on ({type(e).__name__}: {e})")
    elif name.endswith(PARQUET_EXT):
        import pyarrow.parquet as pq

        for b, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=1024)):
            for i, row in enumerate(batch.to_pylist()):
                yield f"{name}:row{b * 1024 + i}", row
    else:
        with open_text(path) as f:
            parts = split_documents(f.read(), text_sep)
        for i, part in enumerate(parts):
            if part.strip():
                yield f"{name}:doc{i}", {"text": part.strip("\n")}


class Malformed(ValueError):
    pass


class BrokenFile(str):
    """Stands in for the rest of a file that could not be read (a truncated gzip); parsed as malformed."""


def parse_record(where: str, raw: object, text_key: str = "text") -> dict:
    """One raw record -> {"id", "text", ...other fields}. Raises Malformed with a short reason."""
    if isinstance(raw, BrokenFile):
        raise Malformed(str(raw))
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise Malformed(f"invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise Malformed(f"not a JSON object ({type(raw).__name__})")
    text = raw.get(text_key)
    if not isinstance(text, str):
        raise Malformed(f"field {text_key!r} missing or not a string")
    doc = dict(raw)
    if text_key != "text":
        doc["text"] = doc.pop(text_key)
    doc["id"] = str(doc.get("id", where))
    return doc


def write_jsonl(path: str | os.PathLike, records) -> None:
    """One JSON object a line, written atomically (temp + rename); gzipped when the name ends in .gz, with
    mtime=0 so a rerun writes identical bytes."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(data)
        data = buf.getvalue()
    atomic_write_bytes(path, data)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a jsonl(.gz) file, blank lines skipped; a line that is not JSON is a UserError naming it."""
    with open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"malformed record in {path} line {i}: not JSON ({e})") from None


def read_documents(path: Path, text_key: str = "text", text_sep: str = "eot") -> Iterator[str]:
    """The non-empty, stripped documents of one input file, strictly: a bad record or an unreadable file is a
    UserError (the data stages' lenient reader is iter_raw + parse_record)."""
    name = path.name
    try:
        if name.endswith(PARQUET_EXT):
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(path)
            if text_key not in pf.schema_arrow.names:
                raise UserError(f"{path} has no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                "pass --text-key")
            for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text and text.strip():
                        yield text.strip()
        elif name.endswith(JSONL_EXT):
            with open_text(path, newline=None) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from None
                    text = record.get(text_key) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise UserError(f"{path}:{lineno} has no string field {text_key!r}; pass --text-key")
                    if text.strip():
                        yield text.strip()
        else:
            with open_text(path, newline=None) as f:
                parts = split_documents(f.read(), text_sep)
            yield from (p.strip() for p in parts if p.strip())
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"could not read {path}: {e}") from None


# what read_text takes: evaluation and calibration text (perplexity, GPTQ)
TEXT_SUFFIXES = (".txt", ".gz", ".jsonl", ".json", ".parquet", ".md", ".raw", ".tokens")


def _check_not_binary(p: Path, head: bytes) -> None:
    """A NUL byte in the first block: an image, a checkpoint, a shard... Decoding megabytes of it with errors=replace
    and tokenizing the result takes minutes and measures nothing."""
    if b"\0" in head:
        raise UserError(f"{p} looks like a binary file, not text (it holds NUL bytes); pass a text file")


def _read_one(p: Path, max_chars: int | None = None) -> str:
    """The text of one file; with max_chars, stop reading after about that many characters."""
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises its own types for a file that is not parquet
            raise UserError(f"{p} is not a readable parquet file ({str(e).splitlines()[0]})") from None
        if "text" not in pf.schema_arrow.names:
            raise UserError(f"{p} has no 'text' column (columns: {pf.schema_arrow.names})")
        texts, n = [], 0
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if t:
                    texts.append(t)
                    n += len(t) + 1
            if max_chars is not None and n >= max_chars:
                break
        return "\n".join(texts)
    try:  # both readers below go through open_text, which refuses a binary file
        if ".jsonl" in p.suffixes:
            return _read_jsonl_text(p, max_chars)
        with open_text(p, newline=None) as f:
            return f.read(-1 if max_chars is None else max_chars)
    except (OSError, EOFError) as e:  # unreadable, or a .gz that is not gzip
        raise UserError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None


def _read_jsonl_text(p: Path, max_chars: int | None) -> str:
    """The 'text' fields of a JSON-lines file, read as `phiforge tokenize` reads them (one error per bad line)."""
    texts, n = [], 0
    for text in read_documents(p, "text", "file"):
        texts.append(text)
        n += len(text) + 1
        if max_chars is not None and n >= max_chars:
            break
    return "\n".join(texts)


def read_text(path: str, max_chars: int | None = None) -> str:
    """A text file (.txt/.gz/.jsonl with 'text'/.parquet with 'text'), or a folder of them (prefers files whose
    name contains 'test', as in wikitext's test split). max_chars: stop after about that many characters."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist")
    if not p.is_dir():
        return _read_one(p, max_chars)
    files = sorted(f for f in p.rglob("*") if f.is_file() and any(s in TEXT_SUFFIXES for s in f.suffixes))
    test = [f for f in files if "test" in f.name]
    files = test or files
    if not files:
        raise UserError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    texts, n = [], 0
    for f in files:
        texts.append(_read_one(f, None if max_chars is None else max_chars - n))
        n += len(texts[-1]) + 1
        if max_chars is not None and n >= max_chars:
            break
    return "\n".join(texts)


@dataclass
class Stats:
    """What one unit of a stage saw; units merge by adding."""
    docs_in: int = 0
    docs_out: int = 0
    removed: dict = field(default_factory=dict)  # reason -> count
    malformed: int = 0
    malformed_samples: list = field(default_factory=list)  # [{"where", "reason", "line"}]
    hist: dict = field(default_factory=dict)  # name -> {"edges": [...], "counts": [...]}
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # stage-specific counters

    def remove(self, reason: str, n: int = 1) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + n

    def bad(self, where: str, reason: str, raw: object) -> None:
        self.malformed += 1
        if len(self.malformed_samples) < MAX_MALFORMED_SAMPLES:
            self.malformed_samples.append({"where": where, "reason": reason, "line": str(raw)[:200]})

    def add_hist(self, name: str, values, edges) -> None:
        import numpy as np

        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        old = self.hist.get(name)
        if old is not None:
            counts = counts + np.asarray(old["counts"])
        self.hist[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}

    def merge(self, other: "Stats") -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        for k, v in other.removed.items():
            self.remove(k, v)
        self.malformed += other.malformed
        self.malformed_samples = (self.malformed_samples + other.malformed_samples)[:MAX_MALFORMED_SAMPLES]
        for k, h in other.hist.items():
            if k in self.hist:
                self.hist[k]["counts"] = [a + b for a, b in zip(self.hist[k]["counts"], h["counts"])]
            else:
                self.hist[k] = {"edges": list(h["edges"]), "counts": list(h["counts"])}
        self.seconds += other.seconds
        for k, v in other.extra.items():
            if isinstance(v, (int, float)):
                self.extra[k] = self.extra.get(k, 0) + v
            elif isinstance(v, list):
                self.extra[k] = (self.extra.get(k, []) + v)[:50]  # samples, capped
            else:
                self.extra[k] = v

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> "Stats":
        return cls(**d)


def iter_units(files: list[Path], shard_size: int, text_sep: str) -> Iterator[tuple[int, list]]:
    """Group raw records of all files, in order, into units of shard_size: yields (unit index, [(where, raw)]).
    An input without documents is one empty unit, so the stage still writes an (empty) shard and stats.json and
    the next stage of a chain reads an empty folder of shards instead of failing on a folder of none."""
    unit, buf = 0, []
    for path in files:
        for item in iter_raw(path, text_sep):
            buf.append(item)
            if len(buf) == shard_size:
                yield unit, buf
                unit, buf = unit + 1, []
    if buf or unit == 0:
        yield unit, buf


def done_path(out: Path, unit: int) -> Path:
    return out / ".done" / f"{unit:05d}.json"


def shard_path(out: Path, unit: int) -> Path:
    return out / f"{unit:05d}.jsonl.gz"


def run_units(stage: str, inputs: list[str], out: str | Path, process: Callable[[int, list[dict], Stats], list[dict]],
              *, rank: int = 0, world: int = 1, shard_size: int = 10000, text_key: str = "text",
              text_sep: str = "eot", config: dict | None = None, write: bool = True) -> Stats | None:
    """The shard loop: parse this rank's units, run `process(unit, docs, stats) -> kept docs`, write shard + marker.

    Returns the merged stats of all units (and writes <out>/stats.json) once every unit is done, else None.
    """
    if not 0 <= rank < world:
        raise UserError(f"--rank {rank} must be in [0, --world {world})")
    if shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    files = input_files(inputs)
    out = check_writable(out, "dir")
    (out / ".done").mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    n_units = 0
    bar = tqdm(desc=f"{stage} (rank {rank}/{world})", unit="doc", file=sys.stderr, dynamic_ncols=True,
               disable=os.environ.get("PHIFORGE_NO_PROGRESS") == "1")
    for unit, raws in iter_units(files, shard_size, text_sep):
        n_units = unit + 1
        if unit % world != rank or done_path(out, unit).exists():
            continue
        t0 = time.perf_counter()
        stats = Stats()
        docs = []
        for where, raw in raws:
            try:
                docs.append(parse_record(where, raw, text_key))
            except Malformed as e:
                stats.bad(where, str(e), raw)
        stats.docs_in = len(docs)
        kept = process(unit, docs, stats)
        stats.docs_out = len(kept)
        if write:
            write_jsonl(shard_path(out, unit), kept)
        stats.seconds = time.perf_counter() - t0
        atomic_write_json(done_path(out, unit), stats.to_json())
        bar.update(len(raws))
    bar.close()
    total = finalize(stage, out, n_units, config or {})
    if write and total is not None and total.docs_in == 0:
        print(f"{stage}: no documents in {', '.join(map(str, inputs))}"
              + (f" ({total.malformed} malformed records)" if total.malformed else "")
              + f"; wrote an empty output to {out}", file=sys.stderr)
    return total


def finalize(stage: str, out: Path, n_units: int, config: dict) -> Stats | None:
    """Merge unit stats into <out>/stats.json when all units are done (any rank may do it; same result)."""
    total = Stats()
    for unit in range(n_units):
        p = done_path(out, unit)
        if not p.exists():
            return None
        total.merge(Stats.from_json(json.loads(p.read_text())))
    atomic_write_json(out / "stats.json", {"stage": stage, "units": n_units, "config": config, **total.to_json()})
    return total


def add_io_args(ap) -> None:
    """The arguments every sharded stage shares."""
    ap.add_argument("inputs", nargs="+", help="jsonl(.gz), parquet or text files, or folders of them")
    ap.add_argument("--out", required=True, help="output folder of <unit>.jsonl.gz shards")
    ap.add_argument("--text-key", default="text", help="JSON/parquet field holding the text (default: text)")
    ap.add_argument("--text-sep", default="eot", help="text files: eot | line | blank | nul | file")
    ap.add_argument("--shard-size", type=int, default=10000, help="documents per unit/shard (default 10000)")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    ap.add_argument("--world", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
