"""Every command line answers a user error with exit status 2 and one `prog: error: ...` line naming the argument,
before any work (no traceback; `MOE_DEBUG=1` shows it). Most cases run in-process through the same `run_cli`
wrapper the `__main__` blocks use; one subprocess checks the real `python -m` wiring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from eval import run as eval_run
from eval import screenshot
from modeling_moe import MoeForCausalLM
from modeling_moe.cli import UsageError, run_cli
from modeling_moe.corpus import stdlib_paragraphs
from tests.conftest import tiny_config
from tests.training_helpers import REPO_ROOT, offline_env
from training import demo, finetune_lora, soft_moe_toy_experiment, train, upcycle, upcycle_toy_experiment
from training.tokenizer import train_byte_level_bpe


def user_error(capsys, module, argv: list[str]) -> str:
    """Run `module.main(argv)` as its `__main__` does; assert exit 2 and one `PROG: error:` line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, module.PROG, argv, user_errors=module.USER_ERRORS)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"{module.PROG}: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty.json").write_text("")
    (root / "bad.json").write_text("this is not json {\n")
    (root / "a_file").write_text("x")
    (root / "dense").mkdir()
    (root / "no_model").mkdir()
    (root / "run.json").write_text("{not json")
    return root


def test_training_train(capsys, files):
    base = ["--preset", "tiny-mixtral", "--output_dir", str(files / "out"), "--cache_dir", str(files / "cache")]
    cases = [
        ([], "give exactly one of --preset, --config, --model_name_or_path"),
        (["--lerning_rate", "1e-3"], "--lerning_rate (did you mean --learning_rate?)"),
        (["--max_steps", "x"], "argument --max_steps"),
        ([*base, "--max_steps", "0"], "--max_steps must be >= 1, or -1"),
        ([*base, "--max_steps", "-5"], "--max_steps must be >= 1, or -1"),
        ([*base, "--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
        ([*base, "--output_dir", str(files / "a_file" / "out")], "--output_dir"),
        ([*base, "--resume_from_checkpoint", "latest"], "holds no complete checkpoint"),
        ([*base, "--resume_from_checkpoint", str(files / "dense")], "not a complete Trainer checkpoint"),
        ([*base, "--train_file", str(files / "empty.json")], "'" + str(files / "empty.json") + "' is empty"),
        ([*base, "--train_file", str(files / "bad.json"), "--max_steps", "2"], "bad.json': not readable as json"),
        ([str(files / "run.json")], "run.json is not valid JSON"),
        ([*base, "--final_model_dir", str(files), "--overwrite_final_model", "true"], "contains --output_dir"),
        ([*base, "--final_model_dir", str(files / "out"), "--overwrite_final_model", "true"], "is --output_dir"),
    ]
    if not torch.accelerator.is_available():
        cases.append(([*base, "--fp16"], "--fp16 needs a GPU"))
    for argv, match in cases:
        line = user_error(capsys, train, argv)
        assert match in line, (argv, line)
    assert not (files / "out").exists()


def test_training_finetune_lora(capsys, files):
    base = ["--model_name_or_path", str(files / "no_model"), "--output_dir", str(files / "lora")]
    for argv, match in [
        ([], "the following arguments are required: --model_name_or_path"),
        (["--model_name_or_path", str(files / "nowhere")], "--model_name_or_path: no such model folder"),
        ([*base, "--lora_rr", "4"], "--lora_rr (did you mean --lora_r?)"),
        ([*base], "--model_name_or_path: no config.json"),
    ]:
        assert match in user_error(capsys, finetune_lora, argv), argv
    merged = files / "lora" / "merged"  # a merged model fine-tuned again into the same --output_dir
    tiny_config().save_pretrained(merged)
    before = sorted(p.name for p in merged.iterdir())
    argv = ["--model_name_or_path", str(merged), "--output_dir", str(files / "lora"), "--merge", "true"]
    line = user_error(capsys, finetune_lora, [*argv, "--overwrite_outputs", "true"])
    assert "is the input --model_name_or_path" in line
    assert sorted(p.name for p in merged.iterdir()) == before


def test_training_upcycle_refuses_to_overwrite_its_input(capsys, files):
    dense = files / "dense"
    (dense / "config.json").write_text("{}")
    for argv, match in [
        ([], "the following arguments are required: --dense, --out_dir"),
        (["--dense", str(dense), "--out_dir", str(dense), "--overwrite"], "is the input --dense"),
        (["--dense", str(dense), "--out_dir", str(dense / "moe"), "--overwrite"], "is inside the input --dense"),
        (["--dense", str(dense), "--out_dir", str(files), "--overwrite"], "contains the input --dense"),
        (["--dense", str(files / "nowhere"), "--out_dir", str(files / "moe")], "--dense: no such folder"),
        (["--dense", str(dense), "--out_dir", str(files / "m"), "--router_type", "top1"], "invalid choice: 'top1'"),
        (["--dense", str(dense), "--out_dir", str(files / "m"), "--moe_layers", "1,x"], "--moe_layers must be"),
    ]:
        assert match in user_error(capsys, upcycle, argv), argv
    assert sorted(p.name for p in dense.iterdir()) == ["config.json"]


def test_training_demo_and_toy_experiments_and_screenshot(capsys, files):
    assert "--dense_steps must be >= 1" in user_error(capsys, demo, ["--dense_steps", "0"])
    assert "--smokee (did you mean --smoke?)" in user_error(capsys, demo, ["--smokee"])
    assert "--out" in user_error(capsys, demo, ["--smoke", "--out", str(files / "a_file" / "demo")])
    assert "--num_layers must be >= 1" in user_error(capsys, upcycle_toy_experiment, ["--num_layers", "0"])
    assert "--num_experts_per_tok 5 is above" in user_error(
        capsys, upcycle_toy_experiment, ["--num_experts_per_tok", "5"]
    )
    assert "--soft_group_size must be >= 1" in user_error(capsys, soft_moe_toy_experiment, ["--soft_group_size", "0"])
    assert "equal active FLOPs" in user_error(capsys, soft_moe_toy_experiment, ["--top_k", "3"])
    assert "html: no such file" in user_error(capsys, screenshot, [str(files / "no.html"), str(files / "x.png")])
    assert "--width must be >= 1" in user_error(capsys, screenshot, ["a.html", "b.png", "--width", "0"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "model"
    MoeForCausalLM(tiny_config(vocab_size=300, capacity_factor_eval=1.0)).save_pretrained(folder)
    train_byte_level_bpe(stdlib_paragraphs(max_chars=20_000), vocab_size=300).save_pretrained(folder)
    return folder


def eval_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        eval_run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m eval: error: "), err
    return err[0]


def test_eval_checks_everything_before_the_perplexity_pass(capsys, files, model_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluation started before the arguments were checked")

    monkeypatch.setattr(eval_run, "evaluate_perplexity", must_not_run)

    class KnownTasks:  # lm-eval's full task index takes ~20 s to build; the check only needs its names
        def __init__(self, **kwargs):
            self.all_tasks = ["moe_tiny_mc", "moe_tiny_gen", "hellaswag", "arc_easy"]

    monkeypatch.setattr("lm_eval.tasks.TaskManager", KnownTasks)
    out = files / "eval-out"
    base = ["--model", str(model_dir), "--output_dir", str(out), "--dataset", str(files / "bad.json")]
    cases = [
        ([], "the following arguments are required: --model"),
        ([*base, "--max_length", "0"], "max_length must be >= 2"),
        ([*base, "--stride", "0"], "stride must be in [1, max_length]"),
        ([*base, "--capacity_factors", "1.0", "-1"], "capacity_factors must be one or more numbers > 0"),
        ([*base, "--capacity_factors", "x"], "argument --capacity_factors"),
        ([*base, "--lm_eval_tasks", "moe_tiny_mc,hellaswagg"], "unknown task(s) 'hellaswagg' (close: hellaswag"),
        ([*base, "--output_dir", str(files / "a_file" / "eval")], "output_dir"),
        ([*base, "--max_lenght", "8"], "did you mean --max_length?"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*base, "--device", "cuda"], "device: 'cuda' is not available on this machine"))
    for argv, match in cases:
        assert match in eval_error(capsys, argv), argv
    assert not out.exists()


def test_eval_writes_nothing_when_a_later_step_fails(capsys, files, model_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the perplexity pass")

    monkeypatch.setattr(eval_run.cost_lib, "parameter_report", fail)
    out = files / "eval-partial"
    with pytest.raises(RuntimeError, match="simulated failure"):
        small = ["--max_samples", "4", "--max_length", "32", "--routing_max_tokens", "64", "--capacity_sweep", "off"]
        eval_run.main(["--model", str(model_dir), "--output_dir", str(out), "--lm_eval_tasks", "", *small])
    assert not out.exists(), "a partial output folder was left"


def test_python_m_wiring_and_debug_traceback(files, monkeypatch):
    """The real entry point (a subprocess): one line and exit 2. With MOE_DEBUG=1 the error propagates."""
    code = "import sys, runpy; sys.argv = ['x', '--lerning_rate', '1']; runpy.run_module('training.train', "
    code += "run_name='__main__')"
    quiet = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=offline_env(), capture_output=True, text=True
    )
    assert quiet.returncode == 2, quiet.stderr[-2000:]
    assert quiet.stderr.strip().splitlines() == [
        "python -m training.train: error: unrecognized arguments: --lerning_rate (did you mean --learning_rate?), 1; "
        "see --help"
    ]
    monkeypatch.setenv("MOE_DEBUG", "1")
    with pytest.raises(UsageError, match="--lerning_rate"):
        run_cli(train.main, train.PROG, ["--lerning_rate", "1"], user_errors=train.USER_ERRORS)


def test_eval_trust_remote_code_is_consent(tmp_path, model_dir):
    """A folder shipping its own code loads only with --trust_remote_code; ours loads the installed class."""
    from eval.loading import EvalInputError, load_model

    ours = load_model(str(model_dir))
    assert type(ours.model) is MoeForCausalLM and json.loads((model_dir / "config.json").read_text())["auto_map"]
    custom = tmp_path / "custom"
    custom.mkdir()
    for path in model_dir.iterdir():
        (custom / path.name).write_bytes(path.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "someone_elses_moe"  # not an installed model type: only the folder's code can load it
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvalInputError, match=r"ships its own modeling code.*pass --trust_remote_code"):
        load_model(str(custom))
