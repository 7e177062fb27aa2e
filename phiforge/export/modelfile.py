"""An Ollama Modelfile beside an exported GGUF, so `ollama create NAME -f Modelfile` gives a model that chats in its
own format, stops at its stop tokens and keeps within its context.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja chat template, and no general translation exists. So
the tokenizer's template is rendered on a probe conversation and compared with the Phi-3 turn format
(`<|role|>\\n{content}<|end|>\\n`, then `<|assistant|>\\n`); when it is that format, the Go template of the same format
(Ollama's own phi3 one, messages form) is written. Any other template is left out, with a notice.
Reference (read, not copied): Ollama docs/modelfile.md and template docs; ollama.com/library/phi3 template.
"""
from __future__ import annotations

import json
from pathlib import Path

# Ollama's phi3 template in its messages form: each turn `<|role|>\n{content}<|end|>\n`, then `<|assistant|>\n` after
# the last turn unless it is the assistant's (a response being continued).
PHI3_GO_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
         {"role": "user", "content": "V"}]

# generation_config.json key -> Ollama PARAMETER name
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def is_phi3_format(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders turns exactly as PHI3_GO_TEMPLATE does (a leading BOS aside:
    llama.cpp adds that itself)."""
    try:
        text = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True)
    except Exception:  # a template that fails on a plain conversation cannot be translated either
        return False
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text == "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in PROBE) + "<|assistant|>\n"


def sampling_parameters(model_dir: str | Path | None) -> dict:
    """Ollama PARAMETERs from the model folder's generation_config.json (only what it sets)."""
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if gen.get("do_sample") is False:  # greedy decoding, as transformers would do with this config
        return {"temperature": 0}
    return {name: gen[key] for key, name in SAMPLING.items() if isinstance(gen.get(key), (int, float))}


def modelfile_text(gguf_name: str, tokenizer, context: int, params: dict) -> tuple[str, bool]:
    """(Modelfile text, whether it has a TEMPLATE)."""
    lines = ["# Written by `phiforge export gguf`. Run: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", ""]
    templated = is_phi3_format(tokenizer)
    if templated:
        lines += [f'TEMPLATE """{PHI3_GO_TEMPLATE}"""', ""]
    stops = sorted({tokenizer.decode([i]) for i in tokenizer.stop_ids})
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops if s]
    lines.append(f"PARAMETER num_ctx {context}")  # Ollama's default context is longer than a small model's
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n", templated
