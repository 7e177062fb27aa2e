"""Chat data for post-training: converters to `messages`, assistant-only label masks, packing, skip reports.

Every record becomes a list of `{"role", "content"}` messages; the model's chat template (phiforge.tokenizer, the one
place that knows the chat format) renders it. Which tokens are "assistant tokens" is read off the template itself:

  * assistant turn i starts after the rendering of messages[:i] with the generation prompt (`<|assistant|>\\n`),
  * and ends where the rendering of messages[:i+1] stops agreeing with the rendering of the whole conversation.

For the Phi-3 template that is `content<|end|>\\n` for every assistant turn, plus the closing eos after the last one,
exactly the span that TRL's `{% generation %}` training template (trl/chat_templates/phi3_training.jinja, TRL 1.16)
marks. The comparison is done on token ids, so a template whose prefixes do not tokenise as prefixes is reported.

Bad records (a missing/unknown role, an empty message, no assistant answer, a conversation longer than the context)
are skipped and counted, never truncated: `SkipReport` prints the counts.

Formats understood (auto-detected per record):
  * messages:  {"messages": [{"role", "content"}, ...]}
  * Alpaca:    {"instruction", "input", "output", optional "system", optional "history": [[user, assistant], ...]}
  * ShareGPT:  {"conversations": [{"from": human|gpt|system, "value"}, ...]}
  * prompt/response: {"prompt", "response"} (one user turn, one assistant turn)
Preference formats (`to_preference`):
  * {"prompt", "chosen", "rejected"} with strings, or with message lists (TRL's conversational form)
  * {"messages" | "conversations", "chosen": {...}, "rejected": {...}} (LLaMA-Factory / ShareGPT pairs)
  * {"chosen", "rejected"} full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic HH-RLHF)
  * {"instruction", "output_1", "output_2", "preference"} (AlpacaEval annotations; ties skipped)
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phiforge.data.io import open_text, read_jsonl
from phiforge.utils import UserError

IGNORE = -100
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bot": "assistant", "model": "assistant", "system": "system"}


class BadRecord(Exception):
    """A record that does not fit the chat format; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipReport:
    """Counts of kept and skipped records, by reason, with one example index per reason."""
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def skip(self, reason: str, index) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, index)

    @property
    def total(self) -> int:
        return self.kept + sum(self.skipped.values())

    def summary(self, name: str = "data") -> str:
        parts = [f"{name}: kept {self.kept} of {self.total} records"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} {r} (first: record {self.first[r]})"
                                                for r, n in sorted(self.skipped.items())))
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped)}


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def read_records(path: str | Path) -> list[dict]:
    """A .json array or .jsonl file (optionally .gz) -> list of dicts."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file {p} does not exist")
    name = p.name[:-3] if p.suffix == ".gz" else p.name
    try:
        if name.endswith(".jsonl"):
            records = list(read_jsonl(p))
        else:
            with open_text(p) as fh:
                records = json.load(fh)
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{p} is not valid JSON/JSONL: {e}") from None
    if isinstance(records, dict):  # {"data": [...]} style wrappers
        lists = [v for v in records.values() if isinstance(v, list)]
        records = lists[0] if len(lists) == 1 else [records]
    if not isinstance(records, list):
        raise UserError(f"{p} must hold a JSON array or one JSON object per line")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Converters -> messages


def _msg(role, content) -> dict:
    return {"role": role, "content": content}


def from_alpaca(rec: dict) -> list[dict]:
    msgs = [_msg("system", rec["system"])] if rec.get("system") else []
    for pair in rec.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRecord("bad_history", "history entries must be [user, assistant] pairs")
        msgs += [_msg("user", pair[0]), _msg("assistant", pair[1])]
    instruction, extra = rec.get("instruction"), rec.get("input")
    if instruction is None:
        raise BadRecord("missing_role", "no instruction (user turn)")
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return msgs + [_msg("user", user), _msg("assistant", rec.get("output"))]


def from_sharegpt(conversations: list) -> list[dict]:
    msgs = []
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn:
            raise BadRecord("missing_role", "a ShareGPT turn has no 'from'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise BadRecord("unknown_role", f"ShareGPT role {turn['from']!r}")
        msgs.append(_msg(role, turn.get("value")))
    return msgs


def to_messages(rec: dict) -> list[dict]:
    """Any supported SFT record -> messages (not yet validated; see `check_messages`)."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise BadRecord("bad_messages", "'messages' must be a list")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m:
                raise BadRecord("missing_role", "a message has no 'role'")
            out.append(_msg(m["role"], m.get("content")))
        return out
    if "conversations" in rec:
        return from_sharegpt(rec["conversations"])
    if "instruction" in rec or "output" in rec:
        return from_alpaca(rec)
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return [_msg("user", rec["prompt"]), _msg("assistant", rec.get("response", rec.get("completion")))]
    raise BadRecord("unknown_format", f"keys {sorted(rec)[:6]}")


def check_messages(msgs: list[dict], need_final_assistant: bool = True) -> list[dict]:
    """Validate a conversation: known roles, non-empty string contents, optional system first, then user/assistant
    alternating starting with user; at least one assistant answer (and it must end the conversation for SFT)."""
    if not msgs:
        raise BadRecord("empty_conversation")
    for m in msgs:
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role", repr(m["role"]))
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadRecord("empty_answer" if m["role"] == "assistant" else "empty_message", m["role"])
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body or body[0]["role"] != "user":
        raise BadRecord("missing_role", "no user turn before the first answer")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("missing_role", f"turn {i} should be {'user' if i % 2 == 0 else 'assistant'}, "
                                            f"got {m['role']}")
    if not any(m["role"] == "assistant" for m in body):
        raise BadRecord("no_assistant")
    if need_final_assistant and body[-1]["role"] != "assistant":
        raise BadRecord("missing_role", "conversation does not end with an assistant answer")
    return msgs


# ----------------------------------------------------------------------------------------------------------------
# Assistant-only masks from the template


def render(tok, msgs: list[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template (the one chat-format truth); a template failure is a bad record, not a crash."""
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    except UserError as e:
        raise BadRecord("template_error", str(e)) from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _offsets(tok, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character span of every token (tokenizer.json backends); None when the backend cannot tell (SentencePiece)."""
    if getattr(tok, "backend", None) is None:
        return None
    enc = tok.backend.encode(text, add_special_tokens=False)
    return list(enc.offsets) if list(enc.ids) == list(ids) else None


def assistant_spans(tok, msgs: list[dict], last_only: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole rendered conversation, and the [start, end) token span of every assistant turn.

    Spans are found in characters (so a token that merges the template's newline with the answer's first characters,
    e.g. "\\n   " before indented code, counts as the answer's, as in transformers' char_to_token masks) and mapped to
    tokens with the tokenizer's offsets; without offsets the same comparison is done on token ids."""
    text = render(tok, msgs)
    full = tok.encode(text)  # no added special tokens: the template writes them (as apply_chat_template(tokenize=True))
    offsets = _offsets(tok, text, full)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or (last_only and i != len(msgs) - 1):
            continue
        prompt = render(tok, msgs[:i], add_generation_prompt=True)
        upto = text if i == len(msgs) - 1 else render(tok, msgs[:i + 1])
        if not text.startswith(prompt):
            raise BadRecord("template_not_prefix", f"rendering of turns before assistant turn {i} is not a prefix")
        if offsets is None:  # token-level comparison
            p_ids, u_ids = tok.encode(prompt), tok.encode(upto)
            if full[:len(p_ids)] != p_ids:
                raise BadRecord("template_not_prefix", f"prompt of assistant turn {i} does not tokenize as a prefix")
            a, b = len(p_ids), _common_prefix(u_ids, full)
        else:
            c0, c1 = len(prompt), _common_prefix(upto, text)
            a = next(t for t, (s, e) in enumerate(offsets) if e > c0)  # token holding the answer's first char
            # end: the first token not wholly inside the shared rendering; one the two renderings share only a piece
            # of ("<|" of "<|endoftext|>" vs "<|user|>") belongs to the next turn
            b = next((t for t, (s, e) in enumerate(offsets) if e > c1), len(full))
        if b <= a:
            raise BadRecord("template_not_prefix", f"assistant turn {i} renders to no tokens")
        spans.append((a, b))
    return full, spans


def tokenize_sft(tok, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = input_ids on assistant tokens and IGNORE elsewhere (HF convention: labels
    are aligned with input_ids; the model shifts them)."""
    ids, spans = assistant_spans(tok, msgs)
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    return ids, labels


def build_sft(records: list[dict], tok, max_len: int, report: SkipReport | None = None):
    """Records -> list of (input_ids, labels); bad or too-long records skipped and counted in `report`."""
    report = report if report is not None else SkipReport()
    out = []
    for i, rec in enumerate(records):
        try:
            msgs = check_messages(to_messages(rec))
            ids, labels = tokenize_sft(tok, msgs)
        except BadRecord as e:
            report.skip(e.reason, i)
            continue
        if len(ids) > max_len:
            report.skip("too_long", i)
            continue
        out.append((ids, labels))
        report.kept += 1
    return out, report


# ----------------------------------------------------------------------------------------------------------------
# Batching: packing with isolated documents, or padding


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, seed: int = 0) -> list[list[int]]:
    """Greedy first-fit packing of example indices into rows of at most seq_len tokens (no example is split)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, room = [], []
    for i in sorted(order, key=lambda j: -len(examples[j][0])):
        n = len(examples[i][0])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    random.Random(seed + 1).shuffle(rows)
    return rows


def collate(examples: list[tuple[list[int], list[int]]], rows: list[list[int]], pad_id: int,
            seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of example indices -> a batch. Each row concatenates its examples; RoPE positions restart at 0 for each
    document and the attention mask is block-diagonal causal, so documents never see each other (one example per row
    is plain padding). Padding tokens have position -1, label IGNORE, and attend only to themselves.

    Returns input_ids (B,T), labels (B,T) aligned with input_ids, positions (B,T), attn_mask (B,1,T,T) bool,
    doc (B,T)."""
    lengths = [sum(len(examples[i][0]) for i in row) for row in rows]
    T = seq_len or max(lengths)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            x, y = examples[i]
            n = len(x)
            if t + n > T:
                raise ValueError(f"row {b} holds {lengths[b]} tokens, more than seq_len {T}")
            ids[b, t:t + n] = torch.tensor(x)
            labels[b, t:t + n] = torch.tensor(y)
            labels[b, t] = IGNORE  # a document's first token is never predicted from the previous document
            positions[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = d
            t += n
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key k visible to query q iff k <= q
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)  # (B, T, T)
    mask = (same & causal) | torch.eye(T, dtype=torch.bool)  # pads attend to themselves: no all-masked rows
    return {"input_ids": ids, "labels": labels, "positions": positions, "attn_mask": mask[:, None], "doc": doc}


class batches:
    """One epoch of batches, shuffled with `seed`; collated lazily (len() and [i]), since block masks are (T, T)."""

    def __init__(self, examples, batch_size: int, seq_len: int, packing: bool, pad_id: int, seed: int = 0):
        if packing:
            rows = pack(examples, seq_len, seed)
        else:
            order = list(range(len(examples)))
            random.Random(seed).shuffle(order)
            rows = [[i] for i in order]
        self.groups = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
        self.examples, self.pad_id, self.seq_len = examples, pad_id, seq_len if packing else None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate(self.examples, self.groups[i], self.pad_id, self.seq_len)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled targets, and their count. logits (B,T,V), labels (B,T)."""
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


# ----------------------------------------------------------------------------------------------------------------
# Preference data


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> list[dict]:
    """Anthropic HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise BadRecord("bad_transcript", "text before the first 'Human:' turn")
    msgs = []
    for role, text in zip(parts[1::2], parts[2::2]):
        msgs.append(_msg("user" if role == "Human" else "assistant", text.strip()))
    return msgs


def _answer(x) -> str | None:
    """A chosen/rejected answer given as a string, a {from/role, value/content} dict, or a one-message list."""
    if isinstance(x, list):
        if len(x) != 1:
            raise BadRecord("bad_completion", "chosen/rejected must be a single assistant message")
        x = x[0]
    if isinstance(x, dict):
        role = x.get("role", SHAREGPT_ROLES.get(str(x.get("from", "assistant")).lower()))
        if role != "assistant":
            raise BadRecord("missing_role", "chosen/rejected is not an assistant message")
        return x.get("content", x.get("value"))
    return x


def to_preference(rec: dict) -> tuple[list[dict], str, str]:
    """Any supported preference record -> (prompt messages ending with a user turn, chosen answer, rejected answer)."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    if "preference" in rec and "output_1" in rec:  # AlpacaEval annotations
        pref = str(rec["preference"]).strip()
        if pref not in ("1", "2", "1.0", "2.0"):
            raise BadRecord("tie", f"preference {rec['preference']!r}")
        a, b = rec["output_1"], rec["output_2"]
        chosen, rejected = (a, b) if pref.startswith("1") else (b, a)
        return [_msg("user", rec.get("instruction"))], chosen, rejected
    if "chosen" not in rec or "rejected" not in rec:
        raise BadRecord("unknown_format", f"keys {sorted(rec)[:6]}")
    if "prompt" in rec:
        prompt = rec["prompt"]
        prompt = [_msg("user", prompt)] if isinstance(prompt, str) else to_messages({"messages": prompt})
        return prompt, _answer(rec["chosen"]), _answer(rec["rejected"])
    if "messages" in rec or "conversations" in rec:
        return to_messages(rec), _answer(rec["chosen"]), _answer(rec["rejected"])
    if isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):  # HH-RLHF full transcripts
        c, r = parse_hh(rec["chosen"]), parse_hh(rec["rejected"])
        if len(c) != len(r) or c[:-1] != r[:-1] or not c or c[-1]["role"] != "assistant":
            raise BadRecord("pair_mismatch", "chosen and rejected differ before the last assistant turn")
        return c[:-1], c[-1]["content"], r[-1]["content"]
    if isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):  # full conversations as messages
        c, r = to_messages({"messages": rec["chosen"]}), to_messages({"messages": rec["rejected"]})
        if len(c) != len(r) or c[:-1] != r[:-1] or not c or c[-1]["role"] != "assistant":
            raise BadRecord("pair_mismatch", "chosen and rejected differ before the last assistant turn")
        return c[:-1], c[-1]["content"], r[-1]["content"]
    raise BadRecord("unknown_format", "chosen/rejected without a prompt")


def tokenize_pair(tok, prompt: list[dict], chosen: str, rejected: str):
    """-> ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)); mask marks the final assistant turn's tokens
    (the same span the SFT mask uses for the last turn)."""
    out = []
    for answer in (chosen, rejected):
        msgs = check_messages(prompt + [_msg("assistant", answer)])
        ids, spans = assistant_spans(tok, msgs, last_only=True)
        a, b = spans[-1]
        mask = [0] * len(ids)
        mask[a:b] = [1] * (b - a)
        out.append((ids, mask))
    return tuple(out)


def build_pairs(records: list[dict], tok, max_len: int, report: SkipReport | None = None):
    """Records -> list of ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)); bad ones skipped and counted."""
    report = report if report is not None else SkipReport()
    out = []
    for i, rec in enumerate(records):
        try:
            prompt, chosen, rejected = to_preference(rec)
            if chosen == rejected:
                raise BadRecord("identical_pair")
            pair = tokenize_pair(tok, prompt, chosen, rejected)
        except BadRecord as e:
            report.skip(e.reason, i)
            continue
        if max(len(pair[0][0]), len(pair[1][0])) > max_len:
            report.skip("too_long", i)
            continue
        out.append(pair)
        report.kept += 1
    return out, report


def collate_pairs(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> one right-padded batch [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] (TRL's layout):
    input_ids (2B,T), mask (2B,T) completion tokens, positions (2B,T) with -1 on padding."""
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    positions = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (x, m) in enumerate(seqs):
        ids[b, :len(x)] = torch.tensor(x)
        mask[b, :len(x)] = torch.tensor(m)
        positions[b, :len(x)] = torch.arange(len(x))
    return {"input_ids": ids, "mask": mask, "positions": positions}


def split(items: list, val_frac: float, val_max: int | None = None, seed: int = 0) -> tuple[list, list]:
    """Deterministic shuffle, then a held-out tail of `val_frac` (at most `val_max`)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = int(round(len(items) * val_frac))
    if val_max is not None:
        n_val = min(n_val, val_max)
    if val_frac > 0 and len(items) > 1:
        n_val = max(n_val, 1)
    return items[n_val:], items[:n_val]
