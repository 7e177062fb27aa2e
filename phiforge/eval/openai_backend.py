"""A model behind an OpenAI-compatible HTTP API (phiforge serve, vLLM, llama.cpp server, OpenAI): the same interface
as LocalLM, so every task runs against a URL. Also the MT-bench judge client.

* generate       -> POST /completions, temperature 0, `stop` = the task's stop strings
* chat           -> POST /chat/completions, temperature 0
* loglikelihood  -> POST /completions with echo=true, max_tokens=1, logprobs=1: the continuation is the echoed
                    tokens whose text_offset lies in the continuation, as lm-eval's `local-completions` reads them
                    (lm_eval/models/openai_completions.py); the server must support echo + logprobs.
"""
from __future__ import annotations

import os

import httpx
from tqdm import tqdm

from phiforge.client import Client
from phiforge.utils import UserError


class OpenAILM:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, batch_size: int = 16,
                 timeout: float = 600.0, retries: int = 3, flag: str = "--model"):
        self.base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        # `retries` tries in all, waiting 1, 2, 4 ... (at most 10) seconds between them
        self.client = Client(base_url, api_key=api_key, timeout=timeout, max_retries=max(0, retries - 1),
                             backoff=1.0, max_backoff=10.0, flag=flag)
        self.model = model or self.served_model()

    def served_model(self) -> str:
        """No --model-name: the first model the server lists (GET /models)."""
        try:
            return self.client.get("/models")["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise UserError(f"{self.base_url}/models did not list a model ({e}); pass --model-name") from None

    def post(self, path: str, payload: dict) -> dict:
        return self.client.post(path, payload)

    def generate(self, prompt: str, until: list[str] = (), max_new_tokens: int = 256) -> str:
        out = self.post("/completions", {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens,
                                         "temperature": 0.0, "stop": list(until)[:4] or None})
        text = out["choices"][0]["text"]
        hits = [text.find(s) for s in until if s and s in text]
        return text[:min(hits)] if hits else text

    def generate_many(self, prompts: list[str], until: list[str] = (), max_new_tokens: int = 256,
                      progress: bool = True) -> list[str]:
        return [self.generate(p, until, max_new_tokens) for p in tqdm(prompts, desc="generate", disable=not progress,
                                                                      leave=False)]

    def chat(self, messages: list[dict], max_new_tokens: int = 1024, temperature: float = 0.0) -> str:
        out = self.post("/chat/completions", {"model": self.model, "messages": messages,
                                              "max_tokens": max_new_tokens, "temperature": temperature})
        return out["choices"][0]["message"]["content"]

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = True) -> list[tuple[float, bool]]:
        results = []
        for b in tqdm(range(0, len(pairs), self.batch_size), desc="loglikelihood", disable=not progress, leave=False):
            batch = pairs[b:b + self.batch_size]
            out = self.post("/completions", {"model": self.model, "prompt": [c + x for c, x in batch], "echo": True,
                                             "max_tokens": 1, "logprobs": 1, "temperature": 0.0})
            for choice in sorted(out["choices"], key=lambda c: c["index"]):
                ctx, cont = batch[choice["index"]]
                lo, hi = len(ctx), len(ctx) + len(cont)  # the one generated token lies beyond hi
                lp = choice["logprobs"]
                total, greedy = 0.0, True
                for tok, tok_lp, off, top in zip(lp["tokens"], lp["token_logprobs"], lp["text_offset"],
                                                 lp.get("top_logprobs") or [None] * len(lp["tokens"])):
                    if lo <= off < hi and tok_lp is not None:
                        total += tok_lp
                        if top:
                            greedy &= max(top, key=top.get) == tok
                results.append((total, greedy))
        return results

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # no tokenizer over HTTP: ~4 characters a token


def judge_client(url: str, model: str, key_env: str = "OPENAI_API_KEY") -> OpenAILM:
    return OpenAILM(url, model, api_key=os.environ.get(key_env), flag="--judge-url")
