"""lm-evaluation-harness through its HF model class with trust_remote_code, on a tiny model with a locally trained
tokenizer: the shipped loglikelihood and generation tasks complete, and results fold into our JSON and HTML."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval.lm_eval_adapter import SHIPPED_TASKS, task_specs
from eval.loading import EvalInputError
from modeling_moe import MoeForCausalLM
from modeling_moe.corpus import stdlib_paragraphs
from modeling_moe.hub import save_hub_ready
from tests.conftest import tiny_config
from training.tokenizer import train_byte_level_bpe

REPO_ROOT = Path(__file__).resolve().parents[1]
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tokenizer = train_byte_level_bpe(stdlib_paragraphs(max_chars=30_000), vocab_size=300)
    model = MoeForCausalLM(tiny_config(vocab_size=300)).eval()
    return save_hub_ready(model, tmp_path_factory.mktemp("lm") / "tiny-moe", tokenizer=tokenizer)


def test_shipped_tasks_resolve_to_local_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data paths must not depend on the working directory
    specs = task_specs(list(SHIPPED_TASKS))
    assert [s["task"] for s in specs] == list(SHIPPED_TASKS)
    assert {s["output_type"] for s in specs} == {"multiple_choice", "generate_until"}
    for spec in specs:
        assert spec["dataset_path"] == "json"
        path = Path(spec["dataset_kwargs"]["data_files"]["test"])
        assert path.is_absolute() and path.is_file()
    assert task_specs(["hellaswag"]) == ["hellaswag"]  # any other lm-eval task passes through by name
    with pytest.raises(EvalInputError, match="at least one task"):
        task_specs([])


# Runs the adapter where this repository's model package cannot be imported, so lm-eval's HFLM must load the
# model from the folder's own code, which it may run only with consent (trust_remote_code=True).
ADAPTER_RUN = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_moe"] = None
    from eval.lm_eval_adapter import SHIPPED_TASKS, run_lm_eval
    result = run_lm_eval(sys.argv[1], list(SHIPPED_TASKS), limit=3, log_samples=True, trust_remote_code=True)
    loaded = [n for n, m in sys.modules.items() if n.startswith("transformers_modules") and n.endswith("modeling_moe")]
    print(json.dumps({"result": result, "remote_modules": loaded}))
    """
)


def test_loglikelihood_and_generation_tasks_complete(model_dir, hf_modules_cache):
    env = {**os.environ, "HF_MODULES_CACHE": str(hf_modules_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", ADAPTER_RUN, str(model_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = out["result"]
    assert out["remote_modules"], "the model was not loaded from the folder's own code"
    assert set(result["results"]) == set(SHIPPED_TASKS)
    mc, gen = result["results"]["moe_tiny_mc"], result["results"]["moe_tiny_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert 0.0 <= gen["exact_match,strip"] <= 1.0
    assert result["n_samples"]["moe_tiny_mc"]["effective"] == 3
    assert result["n_samples"]["moe_tiny_gen"]["effective"] == 3
    assert result["configs"]["moe_tiny_mc"]["output_type"] == "multiple_choice"
    assert result["configs"]["moe_tiny_gen"]["output_type"] == "generate_until"
    # multiple choice: one finite log-likelihood per choice (4 choices); generation: a string per document
    for sample in result["samples"]["moe_tiny_mc"]:
        assert len(sample["response"]) == 4 and all(math.isfinite(ll) for ll, _ in sample["response"])
    assert all(isinstance(s["response"][0], str) for s in result["samples"]["moe_tiny_gen"])


def test_results_fold_into_json_and_html(model_dir, tmp_path, hf_modules_cache):
    from eval.run import main

    out = tmp_path / "out"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(stdlib_paragraphs(max_chars=3000)[:4]) + "\n")
    main(
        ["--model", str(model_dir), "--output_dir", str(out), "--dataset", str(texts), "--max_length", "32",
         "--no_cost", "--capacity_sweep", "off", "--lm_eval_limit", "2", "--lm_eval_tasks", ",".join(SHIPPED_TASKS)]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["lm_eval"]["results"]) == set(SHIPPED_TASKS)
    html = (out / "report.html").read_text()
    assert "Benchmarks (lm-evaluation-harness)" in html and "moe_tiny_gen" in html and "acc_norm,none" in html
