"""`training.train` under torchrun with transformers' engines (`--ep_size 2 --fsdp_size 2`) and DeepSpeed ZeRO-3,
against one process with gradient accumulation 2 over the same micro-batches; and the scale-out arguments'
refusals (no launch needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from modeling_moe import MoeForCausalLM
from tests.training_helpers import REPO_ROOT, TINY_OVERRIDES, free_port, make_corpus, offline_env, tiny_run_args
from training import train
from training.distributed import DistributedArgumentError, DistributedArguments, distributed_config

# capacity factor 1.0 (some assignments drop) and aux-loss-free balancing: drops and bias steps must agree too
OVERRIDES = json.dumps({**json.loads(TINY_OVERRIDES), "router_bias_update_rate": 0.01, "capacity_factor_train": 1.0})
COMMON = dict(max_steps=3, save_steps=3, per_device_train_batch_size=2, max_eval_samples=8, config_overrides=OVERRIDES)
COMPARED = ("loss", "grad_norm", "router/layer_0/load_cv", "router/layer_1/dropped_fraction")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, gradient accumulation 2: the reference run (its tokenizer is reused by the launches)."""
    root = tmp_path_factory.mktemp("single")
    corpus = make_corpus(root)
    results = train.main(tiny_run_args(corpus, root / "one", root / "cache", gradient_accumulation_steps=2, **COMMON))
    return root, corpus, results


def _launch(root, corpus, out, *extra: str) -> subprocess.CompletedProcess:
    argv = tiny_run_args(corpus, out, root / "cache", tokenizer_name_or_path=root / "one" / "tokenizer", **COMMON)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "training.train",
        *argv,
        *extra,
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(), capture_output=True, text=True, timeout=300, check=False
    )


def _check_against_single(single_results, out) -> None:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    two = {e["step"]: e for e in state["log_history"] if "loss" in e}
    one = {e["step"]: e for e in single_results["log_history"] if "loss" in e}
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:
        for key in COMPARED:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert one[1]["router/layer_1/dropped_fraction"] > 0, "capacity factor 1.0 drops something"


def test_expert_parallel_fsdp_training_matches_one_process(single):
    """EP + FSDP2 through transformers (`--ep_size 2 --fsdp_size 2`): the same losses, grad norms, router
    statistics and drops as one process, and the final folder (saved by both ranks together) is the single
    process's Hub-ready folder: our modeling files, our auto_map, the same weights and router biases."""
    root, corpus, results = single
    out = root / "ep_fsdp"
    result = _launch(root, corpus, out, "--ep_size", "2", "--fsdp_size", "2", "--save_only_model", "true")
    assert result.returncode == 0, result.stderr[-4000:]
    _check_against_single(results, out)
    for folder in (out / "model", out / "checkpoint-3"):
        files = {p.name for p in folder.iterdir()}
        assert "modeling_moe.py" in files and not [f for f in files if f.startswith("_fsdp")], files
    one_dir = root / "one" / "model"
    assert json.loads((out / "model" / "config.json").read_text()) == json.loads((one_dir / "config.json").read_text())
    sharded = MoeForCausalLM.from_pretrained(out / "model")
    reference = MoeForCausalLM.from_pretrained(one_dir)
    assert sharded.model.layers[1].mlp.router.e_score_correction_bias.abs().sum() > 0
    # 3 AdamW steps from gradients equal to float32 reduction order: weights and logits agree to ~1e-6
    for (name, a), (_, b) in zip(sharded.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sharded.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_training_matches_one_process(single):
    """`--deepspeed` ZeRO-3 (MoE blocks as ZeRO-3 leaves): the same losses as one process."""
    root, corpus, results = single
    ds_config = root / "zero3.json"
    ds_config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    out = root / "zero3"
    result = _launch(root, corpus, out, "--deepspeed", str(ds_config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DeepSpeed ZeRO-3: ['MoeSparseBlock'] are leaf modules" in result.stderr
    _check_against_single(results, out)


@pytest.mark.parametrize(
    ("sizes", "world", "extra", "match"),
    [
        (dict(tp_size=2), "1", {}, r"--tp_size 2 x --fsdp_size 1 must equal the number of processes"),
        (dict(ep_size=3, fsdp_size=2), "2", {}, r"--ep_size 3 must be a multiple of --tp_size 1 and divide"),
        (dict(tp_size=0), "2", {}, r"--tp_size must be an integer >= 1"),
        (dict(fsdp_size=2), "2", dict(deepspeed="ds.json"), r"cannot be combined with --deepspeed"),
        (dict(fsdp_size=2), "2", dict(save_only_model=False), r"--save_only_model true"),
    ],
)
def test_bad_scale_out_arguments_are_refused(monkeypatch, sizes, world, extra, match):
    class Args:  # the TrainingArguments fields the check reads
        deepspeed = None
        fsdp = None
        save_strategy = "steps"
        save_only_model = True
        resume_from_checkpoint = None

    for key, value in extra.items():
        setattr(Args, key, value)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(DistributedArgumentError, match=match):
        distributed_config(DistributedArguments(**sizes), Args())
