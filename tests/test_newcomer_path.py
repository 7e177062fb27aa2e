"""Issue 34, the newcomer's path: unwritable outputs refused before any work, empty data inputs, defaults derived
from the model, recipe keys checked up front, `inspect` of a quantized folder."""
import json
import os
import subprocess
import sys

import pytest

from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.utils import UserError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "phiforge.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture()
def model_dir(tmp_path, trained_tokenizer):
    model, _ = load("tiny", seed=0)
    return save_hf_folder(model, tmp_path / "m", trained_tokenizer)


# ---------------------------------------------------------------- item 2: unwritable outputs, checked first


def _bad_out_commands(tmp_path, model_dir):
    """(name, argv of `phiforge.cli.main`, --out) for every command that writes an --out, with --out under a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed\n")
    docs = tmp_path / "in.jsonl"
    docs.write_text(json.dumps({"text": "one two three four five six seven eight nine ten"}) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 50)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    bad = str(blocker / "x")
    return [
        ("eval", ["eval", str(model_dir), "--tasks", "arc_easy", "--data-dir", str(tmp_path), "--out", bad]),
        ("quantize", ["quantize", str(model_dir), "--bits", "8", "--out", bad]),
        ("export", ["export", "gguf", str(model_dir), "--type", "f32", "--out", bad]),
        ("tokenizer", ["tokenizer", "--files", str(corpus), "--vocab-size", "300", "--out", bad]),
        ("tokenize", ["tokenize", str(corpus), "--tokenizer", str(model_dir), "--out", bad]),
        ("data filter", ["data", "filter", str(docs), "--out", bad]),
        ("data dedup", ["data", "dedup", str(docs), "--out", bad]),
        ("data report", ["data", "report", str(run), "--out", bad]),
        ("plot", ["plot", str(run), "--out", bad + ".png"]),
    ]


def test_output_under_a_file_is_refused_before_any_work(tmp_path, model_dir, monkeypatch):
    """Before the fix each command failed (or, for eval, finished its whole run and then failed) with
    NotADirectoryError / FileExistsError and a traceback."""
    from phiforge import cli

    import phiforge

    commands = _bad_out_commands(tmp_path, model_dir)
    # Import every command first: a module first imported under the patch (quant.cli does `from phiforge import
    # load`) would keep the fake load for the rest of the session.
    modules = {name: __import__(cli.COMMANDS[argv[0]][0], fromlist=["main"]) for name, argv in commands}
    loaded = []
    fake = lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError)  # noqa: E731
    for owner in (phiforge, *[m for m in modules.values() if getattr(m, "load", None) is phiforge.load]):
        monkeypatch.setattr(owner, "load", fake)
    for name, argv in commands:
        module = modules[name]
        with pytest.raises(UserError, match=r"blocker is a file, not a folder"):
            module.main(argv[1:])
        assert not loaded, f"{name} loaded the model before checking --out"


def test_output_errors_are_one_line(tmp_path, model_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    one_line_error(run_cli("eval", str(model_dir), "--tasks", "arc_easy", "--data-dir", str(tmp_path),
                           "--out", str(blocker / "r.json")), "--out", "is a file, not a folder")
    # an existing file where a folder is needed, and a folder where a file is needed
    one_line_error(run_cli("quantize", str(model_dir), "--bits", "8", "--out", str(blocker)),
                   "is an existing file; it must name a folder")
    one_line_error(run_cli("export", "gguf", str(model_dir), "--out", str(tmp_path)),
                   "is a folder; it must name a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so the check cannot fail")
def test_read_only_folder_is_refused(tmp_path, model_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(run_cli("quantize", str(model_dir), "--bits", "8", "--out", str(ro / "q")), "not writable")
    finally:
        ro.chmod(0o755)


def test_check_writable_accepts_new_and_existing_paths(tmp_path):
    from phiforge.utils import check_writable

    assert check_writable(tmp_path / "a" / "b" / "r.json") == tmp_path / "a" / "b" / "r.json"
    assert check_writable(tmp_path, "dir") == tmp_path
    (tmp_path / "f.json").write_text("{}")
    check_writable(tmp_path / "f.json")  # an existing file is replaced
    assert not (tmp_path / "a").exists()  # creates nothing


# ---------------------------------------------------------------- item 3: empty inputs


def _shard_docs(folder):
    from phiforge.data.io import read_jsonl

    return [d for p in sorted(folder.glob("*.jsonl.gz")) for d in read_jsonl(p)]


def test_dedup_of_an_empty_file_writes_an_empty_output(tmp_path, capsys, monkeypatch):
    """Exit 0 with one clear line: an empty unit is a normal state of a pipeline (a Slurm shard, a filter that kept
    nothing), and the stages after it and the report must still run. Before: IndexError in the clustering."""
    from phiforge.data.cli import main

    monkeypatch.setenv("PHIFORGE_NO_PROGRESS", "1")
    empty = tmp_path / "EMPTY.jsonl"
    empty.write_text("")
    assert main(["dedup", str(empty), "--out", str(tmp_path / "D")]) == 0
    assert "dedup: no documents in" in capsys.readouterr().err
    assert list((tmp_path / "D").glob("*.jsonl.gz")) and _shard_docs(tmp_path / "D") == []
    assert json.loads((tmp_path / "D" / "stats.json").read_text())["docs_out"] == 0


def test_data_run_on_a_corpus_filtered_to_nothing(tmp_path, capsys, monkeypatch):
    from phiforge.data.cli import main

    monkeypatch.setenv("PHIFORGE_NO_PROGRESS", "1")
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"word {i}"}) + "\n" for i in range(3)))  # too short: all filtered
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog and runs far from home"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nstages:\n  - {{stage: filter, inputs: [{short}]}}\n"
                      f"  - {{stage: dedup}}\n  - {{stage: decontam, args: {{eval-sets: [{ev}]}}}}\n")
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "dedup: no documents in" in err and "decontam: no documents in" in err
    assert _shard_docs(tmp_path / "run" / "2_decontam") == []
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["docs_out"] for s in report] == [0, 0, 0]


# ---------------------------------------------------------------- item 4: defaults derived from the model


def test_quantize_int4_default_group_size_fits_the_model(tmp_path, model_dir, capsys):
    """The tiny model's in_features are 64 and 128: the default group 128 does not divide 64, so 64 is used (and said);
    before, the default failed and its hint suggested 128 itself."""
    from phiforge import quant
    from phiforge.quant import cli as quant_cli

    assert quant.fitting_group_sizes(load(str(model_dir))[0]) == [32, 64]
    assert quant_cli.main([str(model_dir), "--bits", "4", "--out", str(tmp_path / "q4")]) == 0
    assert "group size 64" in capsys.readouterr().err
    assert json.loads((tmp_path / "q4" / "quant_config.json").read_text())["group_size"] == 64
    with pytest.raises(UserError, match=r"use --group-size 32 or 64, which divide") as e:
        quant_cli.main([str(model_dir), "--bits", "4", "--group-size", "128", "--out", str(tmp_path / "q")])
    assert "128," not in str(e.value).split("(")[1]


def _chats(path, n=24):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_default_seq_len_fits_a_short_context_model(tmp_path, model_dir, capsys):
    """The tiny model has 256 positions; the default seq_len 1024 used to be refused. A seq_len the user sets
    that does not fit is still an error."""
    from phiforge.train import sft

    argv = ["--model", str(model_dir), "--data", str(_chats(tmp_path / "c.jsonl")), "--max_steps", "1",
            "--batch_size", "2", "--end_eval", "0", "--export", "false", "--threads", "1", "--eval_every", "1000"]
    assert sft.main(argv + ["--out", str(tmp_path / "s")]) == 0
    assert "sft: seq_len 256, the model's max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(UserError, match="seq_len 512 > the model's max_position_embeddings 256"):
        sft.main(argv + ["--out", str(tmp_path / "s2"), "--seq_len", "512"])


def test_pretrain_short_run_gets_a_warmup_that_fits(tmp_path, trained_tokenizer, capsys):
    """`pretrain --max-steps 5` with the default warmup (20) used to be refused by the schedule check."""
    from phiforge.train import pretrain, tokenize

    trained_tokenizer.save(tmp_path / "tok")
    src = tmp_path / "a.txt"
    src.write_text("<|endoftext|>".join(f"Tom saw {i} red balls in the park today." for i in range(200)))
    tokenize.main([str(src), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "a"), "--workers", "1",
                   "--val-fraction", "0.1"])
    argv = ["--out", str(tmp_path / "p"), "--sources", json.dumps({"a": str(tmp_path / "a")}), "--seq_len", "32",
            "--batch_size", "2", "--max-steps", "5", "--eval_every", "100", "--ckpt_every", "100", "--export", "false",
            "--threads", "1"]
    assert pretrain.main(argv) == 0
    assert "pretrain: warmup_steps 0 (10% of max_steps 5" in capsys.readouterr().err
    with pytest.raises(UserError, match="warmup_steps 8 must be between 0 and max_steps 5"):
        pretrain.main(argv + ["--warmup_steps", "8"])


# ---------------------------------------------------------------- item 5: recipe keys up front, continuing a run


def test_recipe_stage_keys_are_checked_before_any_stage(tmp_path, capsys):
    """Before: `--set pretrain.max_step=3` passed --print-config and six stages, then failed in pretraining."""
    from phiforge import recipe

    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"unknown recipe key 'pretrain.max_step'; did you mean 'pretrain.max_steps'"):
        recipe.main(["--smoke", "--out", str(out), "--set", "pretrain.max_step=3", "--print-config"])
    with pytest.raises(UserError, match=r"'sft.warmup_step'; did you mean 'sft.warmup_steps'"):
        recipe.main(["--smoke", "--out", str(out), "--set", "sft.warmup_step=3"])
    with pytest.raises(UserError, match=r"'pretrain.model_args.hiden_size'; did you mean '.*model_args.hidden_size'"):
        recipe.main(["--smoke", "--out", str(out), "--set", "pretrain.model_args.hiden_size=32"])
    with pytest.raises(UserError, match=r"max_steps: expected an integer"):
        recipe.main(["--smoke", "--out", str(out), "--set", "dpo.max_steps=many"])
    assert not out.exists()  # nothing ran


def test_recipe_continues_with_keys_only_unfinished_stages_read(tmp_path, capsys):
    """A run that stopped before pretraining takes a corrected pretrain key (before: "started with a different
    recipe"); a key a finished stage read is refused with the key and the stage named."""
    from phiforge import recipe

    def cfg(*sets):
        return recipe.resolve(recipe.build_parser().parse_args(["--smoke", *[a for kv in sets for a in ("--set", kv)]]))

    out = tmp_path / "run"
    (out / ".recipe").mkdir(parents=True)
    for name in ("corpus", "decontam", "filter", "dedup", "tokenizer", "tokenize"):
        (out / ".recipe" / f"{name}.json").write_text(json.dumps({"output": name}))
    saved = cfg()
    recipe.check_continuation(out, saved, cfg("pretrain.max_steps=3", "sft.lr=0.01", "threads=1"))
    err = capsys.readouterr().err
    assert "threads, pretrain.max_steps, sft.lr changed" in err and "pretrain and later stages use the new" in err
    with pytest.raises(UserError, match=r"tokenizer.vocab_size \(read by tokenizer, done\)"):
        recipe.check_continuation(out, saved, cfg("tokenizer.vocab_size=300", "pretrain.max_steps=3"))
    with pytest.raises(UserError, match=r"eval.benchmarks \(read by decontam, done\)"):
        recipe.check_continuation(out, saved, cfg("eval.benchmarks=[mmlu]"))
    recipe.check_continuation(out, saved, cfg("eval.limit=2"))  # read only by the eval stage, not run yet


# ---------------------------------------------------------------- item 6: inspect a quantized folder


def test_inspect_reads_a_quantize_output_folder(tmp_path, model_dir, capsys):
    """Before: `missing tensor lm_head.weight ... and 16 more` (the float layout was expected)."""
    from safetensors.torch import load_file, save_file

    from phiforge import inspect
    from phiforge.quant import cli as quant_cli

    for name, extra in (("q4", ["--bits", "4"]), ("q8e", ["--bits", "8", "--embed-bits", "8"])):
        assert quant_cli.main([str(model_dir), *extra, "--out", str(tmp_path / name)]) == 0
        capsys.readouterr()
        assert inspect.main([str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert "parameters:" in out and "<|assistant|>" in out
        assert ("quantization: int4, group 64, asymmetric, rtn" if name == "q4" else
                "quantization: int8, symmetric per output channel, rtn, embeddings int8") in out
    state = load_file(str(tmp_path / "q4" / "model.safetensors"))
    state.pop("model.layers.1.mlp.down_proj.scales")
    save_file(state, str(tmp_path / "q4" / "model.safetensors"))
    one_line_error(run_cli("inspect", str(tmp_path / "q4")), "missing tensor model.layers.1.mlp.down_proj.scales")


# ---------------------------------------------------------------- model files readable by others (not mkstemp's 0600)


def test_model_files_get_normal_permissions(tmp_path, model_dir):
    """safetensors' save_file made model.safetensors 0600 in every model folder, unlike every other file there."""
    import stat

    from phiforge import utils
    from phiforge.quant import cli as quant_cli

    m, tok = load(str(model_dir))
    save_hf_folder(m, tmp_path / "m", tok)
    assert quant_cli.main([str(tmp_path / "m"), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    for f in [*(tmp_path / "m").iterdir(), *(tmp_path / "q").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~utils._UMASK, f


# ---------------------------------------------------------------- export gguf writes an Ollama Modelfile


def test_export_gguf_writes_an_ollama_modelfile(tmp_path, model_dir, capsys):
    from phiforge.export import main as export_main
    from phiforge.export.modelfile import PROBE, is_phi3_format

    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.7,
                                                                   "top_p": 0.9}))
    assert export_main(["gguf", str(model_dir), "--type", "f32", "--out", str(tmp_path / "g" / "m.gguf")]) == 0
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in text
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text and "<|{{ .Role }}|>\n{{ .Content }}<|end|>" in text
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 256" in text and "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.9" in text
    assert "ollama create NAME -f" in capsys.readouterr().out

    from phiforge import load as load_model
    _, tok = load_model(str(model_dir))
    assert is_phi3_format(tok)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert not is_phi3_format(tok)  # another format: no TEMPLATE rather than a wrong one
    assert PROBE[0]["role"] == "system"


# ---------------------------------------------------------------- progress bars where a command is silent for minutes


def test_progress_bars_on_gptq_and_model_loading(tmp_path, model_dir, capsys, monkeypatch):
    from phiforge import checkpoint
    from phiforge.quant import cli as quant_cli

    monkeypatch.delenv("PHIFORGE_NO_PROGRESS", raising=False)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Tom and Lily went to the park. " * 40)
    assert quant_cli.main([str(model_dir), "--bits", "4", "--method", "gptq", "--calib", str(calib), "--seq-len", "16",
                       "--calib-samples", "4", "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "GPTQ: 100%" in err and "3/3" in err  # two blocks and the LM head
    monkeypatch.setattr(checkpoint, "LOAD_BAR_BYTES", 0)  # the tiny model is far below the real threshold
    checkpoint.load_hf_folder(model_dir)
    assert "loading weights" in capsys.readouterr().err
    monkeypatch.setenv("PHIFORGE_NO_PROGRESS", "1")
    checkpoint.load_hf_folder(model_dir)
    assert "loading weights" not in capsys.readouterr().err


# ---------------------------------------------------------------- empty and binary inputs, every reader
# Found by a sweep of every input-reading command over missing, empty and binary files (2026-12-07): these crashed
# (ZeroDivisionError, AttributeError) or read the binary file as text.


def test_empty_and_binary_inputs_are_one_line_everywhere(tmp_path, model_dir):
    from phiforge import cli

    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"  # a .txt suffix does not make it text
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 8)
    m = str(model_dir)
    cases = [
        (["generate", m, "--prompt-file", str(empty)], "is empty"),
        (["eval", m, "--tasks", "perplexity", "--text-files", str(empty)], "is empty"),
        (["eval", m, "--tasks", "perplexity", "--text-files", str(binary)], "binary file"),
        (["tokenizer", "--files", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "t1")], "no training text"),
        (["tokenizer", "--files", str(binary), "--vocab-size", "300", "--out", str(tmp_path / "t2")], "binary file"),
        (["tokenize", str(binary), "--tokenizer", m, "--out", str(tmp_path / "t3")], "binary file"),
        (["data", "filter", str(binary), "--out", str(tmp_path / "t4")], "binary file"),
    ]
    for argv, needle in cases:
        module = __import__(cli.COMMANDS[argv[0]][0], fromlist=["main"])
        with pytest.raises(UserError, match=needle):
            module.main(argv[1:])
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


def test_empty_prompt_generates_from_bos_or_eos(model_dir, capsys):
    """--prompt "" with a tokenizer that adds no BOS used to end in AttributeError (nothing was generated)."""
    from phiforge.generate import main

    assert main([str(model_dir), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert "prompt 1 tokens" in capsys.readouterr().err
