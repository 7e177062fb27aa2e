"""Heuristic filters, the shard loop (sharding, resume, malformed input) and the recipe runner.

Rules follow Gopher (Rae et al. 2021, A.1.1) and C4 (Raffel et al. 2020, 2.2); see phiforge/data/filters.py.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from phiforge.data import filters
from phiforge.data.filters import FilterConfig, c4_lines, filter_doc, gopher_quality, gopher_repetition
from phiforge.data.io import read_jsonl
from phiforge.utils import UserError

os.environ["PHIFORGE_NO_PROGRESS"] = "1"

GOOD = ("The water cycle describes how water moves between the land, the sea and the sky. When the sun warms "
        "the ocean, some of the water turns into vapour and rises into the air. As the vapour cools it forms "
        "clouds, and when the droplets in the clouds grow heavy enough they fall back to the ground as rain or "
        "snow. Rivers carry that water back to the sea, and the cycle starts again. Plants also take part in the "
        "cycle, because they pull water from the soil and release it through their leaves. Scientists study the "
        "cycle to understand droughts and floods, and to predict how a warmer climate will change the weather "
        "that farmers and cities depend on.")


GOOD2 = ("Fractions describe parts of a whole. If you cut a pizza into eight equal slices and eat three of them, you "
         "have eaten three eighths of the pizza. The number on the bottom, the denominator, tells how many equal "
         "parts the whole was cut into, and the number on the top, the numerator, tells how many of those parts "
         "we are talking about. To add two fractions with the same denominator, add the numerators and keep the "
         "denominator. When the denominators differ, first rewrite both fractions so that they share a common "
         "denominator, which is why practising multiplication tables makes working with fractions much easier.")
GOOD3 = ("Bees are insects that live together in large colonies with a single queen. Worker bees collect nectar and "
         "pollen from flowers, and while they move from flower to flower they carry pollen with them, which helps "
         "plants make seeds and fruit. Back in the hive the nectar is turned into honey that feeds the colony "
         "through the winter. Many of the fruits and vegetables that people eat depend on this pollination, so "
         "farmers often keep hives near their fields, and scientists worry when the number of bees goes down "
         "because of disease, pesticides or the loss of wild flowers. Planting flowers helps the bees.")


def test_good_document_passes_every_rule():
    reason, text = filter_doc(GOOD, FilterConfig())
    assert reason is None and text == GOOD


@pytest.mark.parametrize("text,reason", [
    ("The cat sat on the mat.", "gopher_too_few_words"),
    (" ".join(["# topic"] * 60) + " the and of the", "gopher_symbol_ratio"),
    (" ".join(f"Word{i} thing{i}" for i in range(40)), "gopher_stop_words"),
    (" ".join(["supercalifragilisticexpialidocious"] * 10 + ["antidisestablishmentarianism"] * 50) + " the of",
     "gopher_long_avg_word"),
    ("\n".join(f"Item {i} of the list with some more words about the thing here..." for i in range(30)),
     "gopher_ellipsis_lines"),
    ("\n".join(f"- item {i} of the list with some more words about the thing here." for i in range(30)),
     "gopher_bullet_lines"),
])
def test_gopher_quality_rules(text, reason):
    assert gopher_quality(text, text.split(), FilterConfig()) == reason


def test_gopher_repetition_rules():
    cfg = FilterConfig()
    assert gopher_repetition(GOOD, cfg) is None
    assert gopher_repetition("\n".join(["Buy cheap shoes online today."] * 10 + [GOOD]), cfg).startswith("gopher_dup")
    spam = GOOD + " " + " ".join(["click here to win a prize now"] * 30)
    assert gopher_repetition(spam, cfg) is not None


def test_c4_line_rules():
    cfg = FilterConfig()
    text = GOOD + "\nShare on Facebook\nPlease enable JavaScript to view the comments below, thanks.\n" \
        "Read our privacy policy for more details today.\n" + GOOD
    reason, new = c4_lines(text, cfg)
    assert reason is None
    assert "Facebook" not in new and "JavaScript" not in new and "privacy" not in new and new.count("water") >= 2
    assert c4_lines(GOOD + " Lorem ipsum dolor sit amet.", cfg)[0] == "c4_lorem_ipsum"
    assert c4_lines(GOOD + " if (x) { y(); }", cfg)[0] == "c4_curly_bracket"
    assert c4_lines("One sentence here. Two sentences.", cfg)[0] == "c4_too_few_sentences"


def write_inputs(tmp: Path) -> Path:
    d = tmp / "in"
    d.mkdir()
    lines = [json.dumps({"text": GOOD.replace("water", f"water{i}"), "id": f"g{i}"}) for i in range(12)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"body": "no text field"}))
    lines.insert(9, json.dumps(["a", "list"]))
    lines.append(json.dumps({"text": "too short.", "id": "short"}))
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (d / "b.txt").write_text("<|endoftext|>".join([GOOD.replace("sun", f"sun{i}") for i in range(5)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [GOOD.replace("rain", f"rain{i}") for i in range(4)]}), d / "c.parquet")
    return d


def kept_ids(out: Path) -> list[str]:
    return [r["id"] for f in sorted(out.glob("*.jsonl.gz")) for r in read_jsonl(f)]


def test_filter_stage_malformed_formats_and_report(tmp_path):
    d = write_inputs(tmp_path)
    out = tmp_path / "out"
    assert filters.main([str(d / "a.jsonl.gz"), str(d / "b.txt"), "--out", str(out), "--shard-size", "4"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["malformed"] == 3  # invalid JSON, missing field, not an object: counted, not fatal
    reasons = {s["reason"].split(" (")[0] for s in stats["malformed_samples"]}
    assert reasons == {"invalid JSON", "field 'text' missing or not a string", "not a JSON object"}
    assert stats["removed"] == {"gopher_too_few_words": 1}
    assert stats["docs_in"] == 18 and stats["docs_out"] == 17 == len(kept_ids(out))
    # parquet with another text column
    out2 = tmp_path / "out2"
    filters.main([str(d / "c.parquet"), "--out", str(out2), "--text-key", "content"])
    assert len(kept_ids(out2)) == 4
    from phiforge.data import report

    report.main([str(out), "--out", str(tmp_path / "rep")])
    assert list((tmp_path / "rep").glob("*.png")) and (tmp_path / "rep" / "report.md").exists()
    assert "invalid JSON" in (tmp_path / "rep" / "report.md").read_text()


def test_truncated_gzip_is_counted_not_fatal(tmp_path):
    good = [json.dumps({"text": GOOD.replace("water", f"water{i}")}) + "\n" for i in range(200)]
    data = gzip.compress("".join(good).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(data[:len(data) * 2 // 3])
    filters.main([str(tmp_path / "t.jsonl.gz"), "--out", str(tmp_path / "o")])
    st = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert st["malformed"] >= 1 and "unreadable" in json.dumps(st["malformed_samples"])
    assert 0 < st["docs_in"] < 200


def test_sharding_and_resume_lose_and_duplicate_nothing(tmp_path):
    d = write_inputs(tmp_path)
    args = [str(d / "a.jsonl.gz"), str(d / "b.txt"), "--shard-size", "3"]
    filters.main(args + ["--out", str(tmp_path / "single")])
    want = kept_ids(tmp_path / "single")
    split = tmp_path / "split"
    filters.main(args + ["--out", str(split), "--rank", "1", "--world", "2"])
    assert not (split / "stats.json").exists()  # rank 0's units are still missing
    filters.main(args + ["--out", str(split), "--rank", "0", "--world", "2"])
    assert kept_ids(split) == want and (split / "stats.json").exists()
    # a killed run: unit 2's marker never written, its shard half-written; the rerun redoes exactly that unit
    (split / ".done" / "00002.json").unlink()
    (split / "00002.jsonl.gz").write_bytes(b"torn")
    before = (split / "00000.jsonl.gz").stat().st_mtime_ns
    filters.main(args + ["--out", str(split)])
    assert kept_ids(split) == want
    assert (split / "00000.jsonl.gz").stat().st_mtime_ns == before  # finished units were skipped
    assert json.loads((split / "stats.json").read_text())["docs_out"] == len(want)


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        filters.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        filters.main([str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--rank"):
        filters.main([str(write_inputs(tmp_path)), "--out", str(tmp_path / "o"), "--rank", "2", "--world", "2"])


def test_recipe_chains_stages(tmp_path):
    from phiforge.data.cli import main

    docs = [GOOD, GOOD2, GOOD.upper(), GOOD3, GOOD2.replace("pizza", "cake"), "short."]  # 1 exact, 1 near dup
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nstages:\n"
                      f"  - {{stage: filter, inputs: [{inp}], args: {{shard-size: 4}}}}\n"
                      f"  - {{stage: dedup}}\n")
    assert main(["run", str(recipe)]) == 0
    assert kept_ids(tmp_path / "run" / "1_dedup") == ["in.jsonl:1", "in.jsonl:2", "in.jsonl:4"]
    assert json.loads((tmp_path / "run" / "report.json").read_text())[0]["stage"] in ("filter", "dedup")
    with pytest.raises(UserError, match="unknown stage"):
        recipe.write_text(f"out: {tmp_path}\nstages:\n  - {{stage: nope}}\n")
        main(["run", str(recipe)])
