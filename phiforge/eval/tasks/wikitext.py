"""WikiText-2 raw test (the whole file as one document, CRLF normalised to LF): perplexity and bits-per-byte as in
perplexity.py. lm-eval's `wikitext` splits the same text into its 62 articles; one document here means fewer window
boundaries, so numbers are close to, not identical with, lm-eval's."""
from phiforge.eval.data import find
from phiforge.eval.tasks.perplexity import DEFAULT_FEWSHOT, METRICS, OUTPUT, aggregate, run  # noqa: F401

FILE = "wikitext/wikitext-2-raw-test.txt"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    p = find(data_dir, FILE)
    return [{"id": FILE, "text": p.read_text(encoding="utf-8").replace("\r\n", "\n")}]
