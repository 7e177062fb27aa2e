"""Packed token shards: a 64-byte self-describing header followed by the tokens as little-endian uint16/uint32,
read back with a memory map. Documents are concatenated, each followed by the EOS token.

Header (little-endian, struct "<8sIIQQQqI12x"):
  magic      8 bytes  b"PHITOKS\\0"
  version    u32      1
  itemsize   u32      2 (uint16, vocab <= 65536) or 4 (uint32)
  vocab_size u64      every token is < vocab_size
  num_tokens u64      the file is exactly 64 + num_tokens * itemsize bytes
  num_docs   u64
  eos_id     i64      the document separator
  crc32      u32      zlib.crc32 of the token bytes
(llm.c's versioned headers are the model; numpy.memmap as in nanoGPT's data loader.)

A token directory (what `phiforge tokenize` writes) holds train_00000.bin ..., val_00000.bin ..., meta.json and a
copy of the tokenizer in tokenizer/.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.utils import UserError, read_json

MAGIC = b"PHITOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQqI12x")
HEADER_BYTES = HEADER.size  # 64
assert HEADER_BYTES == 64
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPES[2] if vocab_size <= 1 << 16 else DTYPES[4]


@dataclass
class ShardHeader:
    itemsize: int
    vocab_size: int
    num_tokens: int
    num_docs: int
    eos_id: int
    crc32: int
    version: int = VERSION

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]


def write_shard(path: str | os.PathLike, tokens, vocab_size: int, eos_id: int, num_docs: int) -> ShardHeader:
    """Write tokens (any int sequence) as a shard, atomically (temp file + fsync + rename)."""
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}) while writing {path}")
    data = arr.astype(dtype).tobytes()
    header = ShardHeader(dtype.itemsize, vocab_size, int(arr.size), num_docs, eos_id, zlib.crc32(data))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, header.itemsize, vocab_size, header.num_tokens, num_docs, eos_id,
                            header.crc32))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check the header and the file size. Raises UserError on a foreign, corrupt or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise UserError(f"token shard {path} is truncated ({size} bytes, smaller than the {HEADER_BYTES}-byte "
                        "header); rerun `phiforge tokenize` to rebuild it")
    magic, version, itemsize, vocab, n, docs, eos, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path} is not a phiforge token shard (bad magic {magic!r}); make shards with "
                        "`phiforge tokenize`")
    if version != VERSION:
        raise UserError(f"token shard {path} has format version {version}; this phiforge reads version {VERSION}")
    if itemsize not in DTYPES:
        raise UserError(f"token shard {path} is corrupt: token size {itemsize} bytes (expected 2 or 4)")
    if vocab < 1 or not 0 <= eos < vocab:
        raise UserError(f"token shard {path} is corrupt: vocab_size {vocab}, eos id {eos}")
    expected = HEADER_BYTES + n * itemsize
    if size < expected:
        raise UserError(f"token shard {path} is truncated: {size} bytes, the header promises {expected} "
                        f"({n} tokens); rerun `phiforge tokenize` to rebuild it")
    if size > expected:
        raise UserError(f"token shard {path} is corrupt: {size - expected} bytes after the {n} tokens the header "
                        "declares")
    return ShardHeader(itemsize, vocab, n, docs, eos, crc, version)


def open_shard(path: str | os.PathLike, verify: bool = True) -> tuple[ShardHeader, np.ndarray]:
    """(header, read-only memory-mapped tokens). `verify` also checks the CRC and that every id < vocab_size."""
    header = read_header(path)
    if header.num_tokens == 0:
        return header, np.zeros(0, dtype=header.dtype)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))
    if verify:
        if zlib.crc32(tokens) != header.crc32:
            raise UserError(f"token shard {path} is corrupt (checksum mismatch); rerun `phiforge tokenize` to "
                            "rebuild it")
        top = int(tokens.max())
        if top >= header.vocab_size:
            raise UserError(f"token shard {path} is corrupt: token id {top} >= vocab_size {header.vocab_size}")
    return header, tokens


def shard_paths(token_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split ("train" or "val") in a token directory, in order."""
    return sorted(Path(token_dir).glob(f"{split}_*.bin"))


def read_meta(token_dir: str | os.PathLike) -> dict:
    """meta.json of a token directory; refuses a directory whose tokenize run did not finish."""
    d = Path(token_dir)
    if not d.is_dir():
        raise UserError(f"token directory {d} does not exist; create it with `phiforge tokenize --out {d} ...`")
    p = d / "meta.json"
    if not p.exists():
        if (d / "tokenize.json").exists():
            raise UserError(f"{d}: `phiforge tokenize` did not finish; rerun the same command to complete it")
        raise UserError(f"{d} has no meta.json: it is not a `phiforge tokenize` output directory")
    meta = read_json(p)
    if not meta.get("complete"):
        raise UserError(f"{d}: `phiforge tokenize` did not finish; rerun the same command to complete it")
    return meta
