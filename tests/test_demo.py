"""Smoke test of the end-to-end demo at its smallest setting (`python -m training.demo --smoke`): every stage runs,
the upcycled MoE starts with the dense model's function, routers stay frozen in LoRA, and the final folder
reloads in a fresh process with the same logits and tokens."""

from __future__ import annotations

import json

import pytest

from training import demo


def test_demo_smoke(tmp_path, hf_modules_cache):
    summary = demo.main(["--smoke", "--out", str(tmp_path / "demo")])
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["data", "tokenizer", "dense", "upcycle", "MoE train", "LoRA", "final eval", "reload"]
    assert stages["upcycle"]["perplexity"] == pytest.approx(stages["dense"]["perplexity"], rel=1e-4)
    assert stages["MoE train"]["steps"] == 4 and stages["LoRA"]["steps"] == 4
    assert "routers unchanged: True" in stages["LoRA"]["routing"]
    assert summary["same_logits"] and summary["same_tokens"]
    model_dir = tmp_path / "demo" / "model"
    assert {"README.md", "config.json", "model.safetensors", "modeling_moe.py", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["generated"].startswith(demo.PROMPT)
    assert (tmp_path / "demo" / "moe_train" / "router_load_heatmap.png").is_file()


def test_demo_rejects_a_block_size_above_the_preset_positions(tmp_path):
    with pytest.raises(ValueError, match="--block_size 128 is above"):
        demo.main(["--smoke", "--block_size", "128", "--out", str(tmp_path / "demo")])
