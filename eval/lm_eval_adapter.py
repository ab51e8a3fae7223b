"""Standard benchmarks through the real client: lm-evaluation-harness's HF model class (`HFLM`, model "hf"), on our
models (a model folder of this repository, a folder with remote code, or an in-memory model).

Remote code runs only with consent: `trust_remote_code` is off by default (as in lm-eval's and transformers' own
command lines). A folder of this repository's models needs no consent when the `modeling_moe` package is installed:
it is imported, so transformers uses the installed classes for `model_type` "moe_lm" and never the folder's copy.

The repository ships small task definitions in lm-eval's own YAML format, with local data, in `eval/tasks/`:
`moe_tiny_mc` (multiple choice, loglikelihood) and `moe_tiny_gen` (generate_until). Their `data_files` are
relative to the repository root; `task_specs` resolves them against it, so they run from any directory without a
download. Any other lm-eval task name also works when its data is reachable. The scores are folded into the
harness's JSON and HTML (`fold_results`).
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
import os
from pathlib import Path

import yaml

from .errors import EvalInputError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
REPO_ROOT = TASK_DIR.parent.parent
SHIPPED_TASKS = ("moe_tiny_mc", "moe_tiny_gen")


def shipped_task_configs() -> dict[str, Path]:
    """Task name -> YAML file, for every task defined in `eval/tasks/`."""
    out = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "task" in config:
            out[config["task"]] = path
    return out


def _resolve_data_files(data_files, root: Path):
    if isinstance(data_files, str):
        return data_files if os.path.isabs(data_files) else str(root / data_files)
    if isinstance(data_files, list):
        return [_resolve_data_files(f, root) for f in data_files]
    if isinstance(data_files, dict):
        return {split: _resolve_data_files(f, root) for split, f in data_files.items()}
    return data_files


def task_specs(tasks: list[str]) -> list[str | dict]:
    """What to hand to `lm_eval.simple_evaluate(tasks=...)`: the shipped tasks as config dicts with absolute
    `data_files`, any other name as is.

    Raises:
        EvalInputError: an empty task list, or a shipped task whose data file is missing.
    """
    if not tasks:
        raise EvalInputError("lm_eval_tasks: give at least one task name (shipped: " + ", ".join(SHIPPED_TASKS) + ")")
    shipped = shipped_task_configs()
    specs: list[str | dict] = []
    for name in tasks:
        if name not in shipped:
            specs.append(name)
            continue
        config = yaml.safe_load(shipped[name].read_text(encoding="utf-8"))
        kwargs = dict(config.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], REPO_ROOT)
            files = kwargs["data_files"].values() if isinstance(kwargs["data_files"], dict) else [kwargs["data_files"]]
            for f in files:
                if isinstance(f, str) and not Path(f).is_file():
                    raise EvalInputError(f"lm_eval_tasks: task {name!r} needs the data file {f}, which is missing")
        config["dataset_kwargs"] = kwargs
        specs.append(config)
    return specs


def _import_lm_eval():
    """The `lm_eval` package and its `TaskManager` class.

    Raises:
        EvalInputError: lm-evaluation-harness is not installed.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvalInputError(
            "lm_eval_tasks: lm-evaluation-harness is not installed; `pip install lm-eval==0.4.13`, or pass "
            "--lm_eval_tasks '' to skip benchmarks"
        ) from err
    return lm_eval, TaskManager


def check_tasks(tasks: list[str]) -> None:
    """Check a task list before any evaluation: lm-eval is installed, shipped tasks have their data, and every
    other name is a task lm-eval knows (indexing lm-eval's own tasks takes a few seconds, so only then).

    Raises:
        EvalInputError: naming the unknown tasks, with close matches.
    """
    _, TaskManager = _import_lm_eval()
    specs = task_specs(tasks)
    names = [s for s in specs if isinstance(s, str)]
    if not names:
        return
    known = set(TaskManager(include_path=str(TASK_DIR), include_defaults=True).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = {n: difflib.get_close_matches(n, known, n=3) for n in unknown}
        shown = "; ".join(f"{n!r}" + (f" (close: {', '.join(h)})" if h else "") for n, h in hints.items())
        raise EvalInputError(
            f"lm_eval_tasks: unknown task(s) {shown}; shipped offline: {', '.join(SHIPPED_TASKS)}; "
            "`lm-eval ls tasks` lists the others"
        )


def fold_results(raw: dict, limit: int | float | None) -> dict:
    """The JSON-ready part of lm-eval's result dict: per task, every numeric metric (with its stderr).

    Returns:
        {"version", "model_class", "limit", "results": {task: {metric: value}}, "n_samples": {task: {...}},
        "configs": {task: {"output_type", "num_fewshot"}}}, plus "samples": {task: [{"target", "response"}]}
        (the filtered model response per document) when lm-eval logged samples.
    """
    import lm_eval

    results = {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        for task, metrics in raw.get("results", {}).items()
    }
    configs = {
        task: {"output_type": cfg.get("output_type"), "num_fewshot": cfg.get("num_fewshot")}
        for task, cfg in raw.get("configs", {}).items()
    }
    folded = {
        "version": getattr(lm_eval, "__version__", "unknown"),
        "model_class": "lm_eval.models.huggingface.HFLM",
        "limit": limit,
        "results": results,
        "n_samples": raw.get("n-samples", {}),
        "configs": configs,
    }
    if raw.get("samples"):
        folded["samples"] = {
            task: [{"target": str(s.get("target")), "response": s.get("filtered_resps")} for s in samples]
            for task, samples in raw["samples"].items()
        }
    return folded


def run_lm_eval(
    model,
    tasks: list[str],
    tokenizer=None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Run lm-evaluation-harness on a model and fold the results.

    Args:
        model: a model folder or Hub id (loaded by lm-eval's `HFLM`), or an in-memory `PreTrainedModel`.
        tasks: lm-eval task names; the shipped ones (`SHIPPED_TASKS`) need no download.
        tokenizer: a folder / id, or a tokenizer object; default: the model folder's.
        limit: examples per task (None = all). batch_size, device, dtype: passed to `HFLM`.
        max_length: context length for lm-eval (default: the model config's). num_fewshot: few-shot examples.
        log_samples: keep each document's target and filtered response in the result.
        trust_remote_code: let a folder / id run the modeling code it ships (off: only installed classes load;
            this repository's models are installed classes when `modeling_moe` is importable).
    Returns:
        See `fold_results`.
    Raises:
        EvalInputError: lm-eval is not installed, or bad tasks (see `task_specs`).
    """
    lm_eval, TaskManager = _import_lm_eval()
    specs = task_specs(tasks)
    if isinstance(model, (str, os.PathLike)):
        with contextlib.suppress(ImportError):  # registers model_type "moe_lm": our folders need no remote code
            import modeling_moe  # noqa: F401
    needs_defaults = any(isinstance(s, str) for s in specs)
    task_manager = TaskManager(include_path=str(TASK_DIR), include_defaults=needs_defaults)
    model_args = {"pretrained": model, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if isinstance(model, (str, os.PathLike)):
        model_args["pretrained"] = str(model)
    if tokenizer is not None:
        model_args["tokenizer"] = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if max_length is not None:
        model_args["max_length"] = max_length
    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=specs,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return fold_results(raw, limit)


__all__ = [
    "REPO_ROOT",
    "SHIPPED_TASKS",
    "TASK_DIR",
    "check_tasks",
    "fold_results",
    "run_lm_eval",
    "shipped_task_configs",
    "task_specs",
]
