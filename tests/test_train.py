"""`python -m training.train` on tiny configs: the loss falls, resuming continues the same curve, the router
losses are averaged (not summed) over accumulation steps, two processes match gradient accumulation, bad
arguments fail before training, and the output folder is Hub-ready."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import Trainer, TrainingArguments, default_data_collator

from modeling_moe import MoeForCausalLM
from tests.conftest import tiny_config
from tests.training_helpers import REPO_ROOT, TINY_OVERRIDES, free_port, losses, make_corpus, offline_env, tiny_run_args
from training import train
from training.data import DataError
from training.train import MoeTrainer, TrainArgumentError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    """Run A: 8 steps from a YAML file plus command-line overrides, checkpoints at 4 and 8."""
    root = tmp_path_factory.mktemp("run_a")
    args = tiny_run_args(corpus, root / "out", root / "cache")
    values = {args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}
    values["max_steps"] = 3  # overridden on the command line below
    (root / "run.yaml").write_text(yaml.safe_dump(values))
    results = train.main([str(root / "run.yaml"), "--max_steps", "8"])
    return root, results


def test_loss_decreases_and_output_is_hub_ready(first_run):
    root, results = first_run
    curve = losses(results["log_history"])
    assert sorted(curve) == list(range(1, 9)), "the CLI --max_steps 8 overrides the file's 3"
    assert (curve[7] + curve[8]) / 2 < (curve[1] + curve[2]) / 2 - 0.05, curve
    final = root / "out" / "model"
    assert results["final_model_dir"] == str(final)
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_moe.py", "tokenizer.json", "README.md"} <= names
    assert not list(final.glob("*.bin")) and not list((root / "out" / "checkpoint-4").glob("pytorch_model*"))
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe.MoeForCausalLM"
    card = (final / "README.md").read_text()
    assert "training.train" in card and "per micro-batch and process" in card
    assert (root / "out" / "router_load_heatmap.png").stat().st_size > 1000
    reloaded = MoeForCausalLM.from_pretrained(final)
    assert reloaded.config.hidden_size == 32 and results["perplexity"] == pytest.approx(
        torch.exp(torch.tensor(results["eval_loss"])).item(), rel=1e-6
    )
    logged = results["log_history"][0]
    assert "router/layer_1/load_cv" in logged and "router/layer_0/aux_loss" in logged


def test_resume_continues_the_same_loss_curve_and_pushes_the_final_folder(first_run, corpus, monkeypatch):
    root, results = first_run
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr(train, "hf_api", lambda: FakeApi())
    out = root / "resumed"
    argv = tiny_run_args(corpus, out, root / "cache", resume_from_checkpoint=root / "out" / "checkpoint-4")
    resumed = train.main([*argv, "--push_to_hub", "true", "--hub_model_id", "me/tiny-moe"])
    before, after = losses(results["log_history"]), losses(resumed["log_history"])
    for step in range(5, 9):
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-6), (step, before, after)
    assert calls == [("create_repo", "me/tiny-moe"), ("upload_folder", "me/tiny-moe", str(out / "model"))]


def _packed_dataset(n: int, length: int = 16, vocab: int = 128):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


@pytest.mark.parametrize("trainer_class", [MoeTrainer, Trainer])
def test_router_losses_are_averaged_over_accumulation_steps(trainer_class, tmp_path):
    """With gradient accumulation 2, the logged loss must be the mean of the two micro-batch losses (CE + router
    losses), with our Trainer and with transformers' plain one: the model sets `accepts_loss_kwargs = False`, so
    Trainer does not normalise CE by the accumulated token count, which would sum the router losses instead."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    model = MoeForCausalLM(config)
    initial = copy.deepcopy(model)
    data = _packed_dataset(4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-3,
        train_sampling_strategy="sequential",
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    logged = losses(trainer.state.log_history)[1]
    with torch.no_grad():
        micro = [initial(**default_data_collator(data[i : i + 2])).loss.item() for i in (0, 2)]
    expected = sum(micro) / 2
    assert logged == pytest.approx(expected, rel=1e-5)


def test_two_processes_match_one_process_with_gradient_accumulation(corpus, tmp_path):
    """accelerate launch (torchrun launcher, gloo on CPU) with 2 processes x micro-batch 2 against one process
    with gradient accumulation 2 over the same micro-batches, dropless routing. The balancing loss is computed per
    micro-batch on each process in both runs, so the per-step losses, grad norms and router statistics agree to
    float32 reduction order (rel 1e-5). Aux-loss-free balancing is on too: its bias update sums the load over
    processes, so both runs take the same bias steps (this needs ddp_broadcast_buffers off)."""
    tokenizer_run = tmp_path / "tok"
    aux_free = json.dumps({**json.loads(TINY_OVERRIDES), "router_bias_update_rate": 0.01})
    common = dict(max_steps=4, save_steps=4, per_device_train_batch_size=2, config_overrides=aux_free)
    single = train.main(
        tiny_run_args(corpus, tokenizer_run, tmp_path / "cache", gradient_accumulation_steps=2, **common)
    )
    ddp_out = tmp_path / "ddp"
    argv = tiny_run_args(
        corpus, ddp_out, tmp_path / "cache", tokenizer_name_or_path=tokenizer_run / "tokenizer", **common
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "training.train",
        *argv,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=offline_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "processes 2" in result.stderr
    state = json.loads((ddp_out / "checkpoint-4" / "trainer_state.json").read_text())
    two = {e["step"]: e for e in state["log_history"] if "loss" in e}
    one = {e["step"]: e for e in single["log_history"] if "loss" in e}
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        for key in ("loss", "grad_norm", "router/layer_0/load_cv", "router/layer_1/aux_loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert (ddp_out / "model" / "model.safetensors").is_file()
    ddp_model = MoeForCausalLM.from_pretrained(ddp_out / "model")
    one_model = MoeForCausalLM.from_pretrained(tokenizer_run / "model")
    bias = ddp_model.model.layers[1].mlp.router.e_score_correction_bias
    assert bias.abs().sum() > 0, "RouterBiasUpdateCallback is attached when router_bias_update_rate > 0"
    for (name, a), (_, b) in zip(ddp_model.state_dict().items(), one_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"train_file": "/nonexistent/corpus.txt"}, FileNotFoundError, "--train_file"),
        ({"block_size": "128"}, DataError, "--block_size 128 is above the model's max_position_embeddings"),
        ({"config": "/nonexistent/config.json"}, TrainArgumentError, "exactly one of --preset, --config"),
        (
            {"config_overrides": '{"router_aux_loss_coef": 0, "router_z_loss_coef": 0}'},
            TrainArgumentError,
            "no load balancing",
        ),
        ({"config_overrides": "capacity=1"}, TrainArgumentError, "--config_overrides must be a JSON object"),
    ],
)
def test_bad_arguments_fail_before_training(corpus, tmp_path, change, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        train.main(tiny_run_args(corpus, out, tmp_path / "cache", **change))
    assert not list(out.glob("checkpoint-*")) and not (out / "model").exists()


def test_unknown_key_in_arguments_file(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"preset": "tiny-mixtral", "learning_rat": 0.1}))
    with pytest.raises(TrainArgumentError, match=r"unknown arguments \['learning_rat'\]"):
        train.main([str(tmp_path / "run.json")])


def test_data_from_jsonl_and_parquet_packs_fixed_blocks(tmp_path):
    import pandas as pd

    from training.data import DataArguments, load_lm_datasets
    from training.tokenizer import train_byte_level_bpe

    texts = [f"document number {i} says something about experts and routers." for i in range(60)]
    tokenizer = train_byte_level_bpe(texts, vocab_size=300)
    pd.DataFrame({"body": texts}).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        args = DataArguments(
            train_file=[str(tmp_path / name)], text_column="body", block_size=16, cache_dir=str(tmp_path)
        )
        blocks = load_lm_datasets(args, tokenizer, max_position_embeddings=64)
        first = blocks["train"][0]
        assert len(first["input_ids"]) == 16 and first["labels"] == first["input_ids"]
        assert set(blocks) == {"train", "validation"} and len(blocks["validation"]) >= 1
        n_tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)
        assert len(blocks["train"]) + len(blocks["validation"]) <= n_tokens // 16
    with pytest.raises(DataError, match="--text_column 'text' is not a column"):
        load_lm_datasets(DataArguments(train_file=[str(tmp_path / "d.jsonl")], cache_dir=str(tmp_path)), tokenizer, 64)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        load_lm_datasets(
            DataArguments(train_file=[str(tmp_path / "empty.txt")], cache_dir=str(tmp_path)), tokenizer, 64
        )
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(DataError, match="allowed"):
        load_lm_datasets(DataArguments(train_file=[str(tmp_path / "notes.docx")]), tokenizer, 64)


def test_a_dense_checkpoint_is_refused_with_a_pointer_to_upcycling(corpus, tmp_path):
    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TrainArgumentError, match=r"'llama' model.*training\.upcycle"):
        train.main(tiny_run_args(corpus, tmp_path / "out", tmp_path / "cache", preset="", model_name_or_path=dense))
