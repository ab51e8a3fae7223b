"""The whole harness on tiny models: JSON result file, per-token losses, and an HTML report that renders in
headless Chromium with its plots visible (checked on a screenshot taken here)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from eval.report import render_html
from eval.run import main
from eval.screenshot import find_chromium, screenshot
from modeling_moe import MoeForCausalLM
from modeling_moe.corpus import stdlib_paragraphs
from modeling_moe.hub import save_hub_ready
from tests.conftest import tiny_config
from training.tokenizer import train_byte_level_bpe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One full run: a Switch-style model with capacity, compared with a second model of the same shape."""
    root = tmp_path_factory.mktemp("report")
    tokenizer = train_byte_level_bpe(stdlib_paragraphs(max_chars=30_000), vocab_size=300)
    config = dict(vocab_size=300, router_type="switch", num_experts_per_tok=1, capacity_factor_eval=1.0)
    torch.manual_seed(0)
    save_hub_ready(MoeForCausalLM(tiny_config(**config)), root / "model", tokenizer=tokenizer)
    torch.manual_seed(1)
    save_hub_ready(MoeForCausalLM(tiny_config(**config)), root / "base", tokenizer=tokenizer)
    texts = root / "texts.txt"
    texts.write_text("\n\n".join(stdlib_paragraphs(max_chars=4000)[:10]) + "\n")  # blank lines are skipped
    main(
        ["--model", str(root / "model"), "--compare_model", str(root / "base"), "--dataset", str(texts),
         "--output_dir", str(root / "out"), "--max_length", "48", "--stride", "16", "--routing_max_tokens", "1024",
         "--capacity_factors", "0.5", "1.0", "2.0", "--cost_rounds", "2", "--cost_seq_len", "16",
         "--cost_new_tokens", "4", "--lm_eval_tasks", ""]
    )  # fmt: skip
    return root / "out"


def test_json_results(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["meta"]["texts"] == 10
    quality = results["quality"]
    assert set(quality["models"]) == {"model", "compare_model"}
    assert quality["models"]["model"]["perplexity"] > 1 and quality["models"]["model"]["bits_per_byte"] > 0
    assert 0 <= quality["token_comparison"]["a_better_fraction"] <= 1
    assert sum(quality["token_comparison"]["histogram"]["counts"]) == quality["models"]["model"]["num_tokens"]
    routing = results["routing"]
    assert routing["router_type"] == "switch" and len(routing["layers"]) == 2
    for layer in routing["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0) and layer["dropped_fraction"] > 0  # capacity factor 1.0
    assert routing["capacity_sweep"]["factors"] == [0.5, 1.0, 2.0]
    drops = np.array(routing["capacity_sweep"]["dropped_fraction"])
    assert (np.diff(drops, axis=0) <= 0).all()  # more capacity never drops more
    assert len(routing["comparison"]["topk_agreement"]) == 2 and min(routing["comparison"]["routing_kl"]) > 0
    assert len(routing["top_tokens"]) == 2 and len(routing["top_tokens"][0]) == 4
    assert len(routing["passage"]["first_choice"][0]) == len(routing["passage"]["tokens"]) > 0
    cost = results["cost"]
    assert cost["parameters"]["active_params"] < cost["parameters"]["total_params"]
    assert "same d=32, f=48, E=4, k=1" in cost["throughput"]["reference"]  # Switch + capacity: not a Mixtral
    assert cost["throughput"]["forward"]["ours_tokens_per_s"] > 0
    lines = (run_dir / "token_losses.jsonl").read_text().splitlines()
    assert len(lines) == 10
    row = json.loads(lines[0])
    assert len(row["loss"]) == len(row["token_ids"]) - 1 == len(row["compare_loss"])


def test_html_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 9  # heatmap, balance, confidence, consecutive, sweep, comparison, losses, params, speed
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing to fetch
    assert "What experts learn" in html and 'title="expert' in html


def colourful_pixels(png: Path) -> int:
    """Pixels with clearly saturated colour (plots; text and tables are grey on white)."""
    rgb = mpimg.imread(png)[..., :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3).sum())


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium binary found (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_plots_visible(run_dir, tmp_path):
    html = (run_dir / "report.html").read_text()
    shot = screenshot(run_dir / "report.html", tmp_path / "report.png", width=1000, height=1600)
    assert shot.read_bytes().startswith(PNG_MAGIC)
    # the same page with its images hidden (same layout): whatever colour remains is not from the plots
    hidden = tmp_path / "hidden.html"
    hidden.write_text(html.replace("</style>", "img{visibility:hidden}</style>", 1))
    control = screenshot(hidden, tmp_path / "hidden.png", width=1000, height=1600)
    with_plots, without = colourful_pixels(shot), colourful_pixels(control)
    assert with_plots > without + 20_000, (with_plots, without)
    # a broken image (an undecodable PNG) does not count as a visible plot
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[^\"]+", "base64,AAAA", html))
    assert colourful_pixels(screenshot(broken, tmp_path / "broken.png", width=1000, height=1600)) < with_plots / 2


def test_render_from_json_alone(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert render_html(results).count("data:image/png;base64,") >= 9


def test_mixtral_model_against_a_dense_model(tmp_path):
    """A transformers Mixtral folder (converted, routing recorded) compared with a dense Llama (quality only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_moe.convert import to_mixtral

    tokenizer = train_byte_level_bpe(stdlib_paragraphs(max_chars=30_000), vocab_size=300)
    torch.manual_seed(0)
    to_mixtral(MoeForCausalLM(tiny_config(vocab_size=300)).eval()).save_pretrained(tmp_path / "mixtral")
    dense = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(dense).save_pretrained(tmp_path / "dense")
    for name in ("mixtral", "dense"):
        tokenizer.save_pretrained(tmp_path / name)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(stdlib_paragraphs(max_chars=3000)[:4]) + "\n")
    results = main(
        ["--model", str(tmp_path / "mixtral"), "--compare_model", str(tmp_path / "dense"), "--dataset", str(texts),
         "--output_dir", str(tmp_path / "out"), "--max_length", "32", "--no_cost", "--lm_eval_tasks", ""]
    )  # fmt: skip
    assert results["meta"]["model_kind"] == "mixtral" and len(results["routing"]["layers"]) == 2
    assert "capacity_sweep" not in results["routing"]  # dropless Mixtral routing: no sweep in auto mode
    assert set(results["quality"]["models"]) == {"model", "compare_model"}
    assert "token_comparison" in results["quality"] and "comparison" not in results["routing"]
    assert any("records no routing" in note for note in results["notes"])
    assert any("converted with modeling_moe.convert.from_mixtral" in note for note in results["notes"])
