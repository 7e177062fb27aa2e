"""User errors end the CLI with one clear line on stderr (no traceback) and a non-zero exit code."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from phiforge import load
from phiforge.checkpoint import save_hf_folder


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "phiforge.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture()
def model_dir(tmp_path, trained_tokenizer):
    model, _ = load("tiny", seed=0)
    return save_hf_folder(model, tmp_path / "m", trained_tokenizer)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_inspect_ok(model_dir):
    proc = run_cli("inspect", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout and "<|user|>" in proc.stdout and "<|assistant|>" in proc.stdout


def test_corrupt_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated header/data
    assert_one_line_error(run_cli("inspect", str(model_dir)), "model.safetensors", "not a readable safetensors")


def test_unknown_rope_type(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("inspect", str(model_dir)), "unknown rope_scaling type 'yarn'")


def test_shape_mismatch(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("inspect", str(model_dir)), "model.layers.0.mlp.gate_up_proj.weight",
                          "shape (256, 64)", "expects (192, 64)")


def test_missing_and_extra_tensor_named(model_dir):
    from phiforge.checkpoint import load_hf_folder
    from phiforge.utils import UserError

    state = load_file(str(model_dir / "model.safetensors"))
    state.pop("model.norm.weight")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(3)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing tensor model\.norm\.weight \(shape \(64,\)\)"):
        load_hf_folder(model_dir)


def test_pickle_checkpoint_refused(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_one_line_error(run_cli("inspect", str(model_dir)), "never unpickles", "pytorch_model.bin")


def test_missing_folder_and_unknown_command():
    assert_one_line_error(run_cli("inspect", "/nonexistent/model"), "does not exist")
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Phi-3.5-MoE folders: one line naming the config field or the expert tensor, from every command that reads them


@pytest.fixture()
def moe_dir(tmp_path):
    from phiforge.checkpoint import build_model
    from phiforge.models import config_from_name

    model = build_model(config_from_name("tiny-moe", num_local_experts=8))  # experts 0..7
    return save_hf_folder(model, tmp_path / "moe")


def _edit_state(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_moe_top_k_other_than_two_refused(moe_dir):
    cfg = json.loads((moe_dir / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1
    (moe_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("inspect", str(moe_dir)), "config.json", "num_experts_per_tok is 1",
                          "exactly 2 experts")


def test_moe_expert_with_wrong_shape_named(moe_dir):
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    _edit_state(moe_dir, lambda s: s.__setitem__(name, torch.zeros(95, 64)))
    for cmd in (("generate", str(moe_dir), "--prompt", "hi"), ("quantize", str(moe_dir), "--out", str(moe_dir / "q"))):
        assert_one_line_error(run_cli(*cmd), name, "shape (95, 64)", "expects (96, 64)")
    assert not (moe_dir / "q").exists()  # refused before writing anything


def test_moe_missing_expert_named(moe_dir):
    name = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    _edit_state(moe_dir, lambda s: s.pop(name))
    assert_one_line_error(run_cli("inspect", str(moe_dir)), f"missing tensor {name} (shape (64, 96))")
