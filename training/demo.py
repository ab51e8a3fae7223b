"""End-to-end demo (the README's main job): build a tiny MoE model offline, save it Hub-ready, reload it with
trust_remote_code in a fresh process that cannot import this package, and generate from it.

    python -m training.demo [--out outputs/demo] [--preset tiny-mixtral]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_moe import MoeForCausalLM, count_parameters, load_preset
from modeling_moe.hub import model_card, save_hub_ready
from training.corpus import stdlib_paragraphs
from training.tokenizer import train_byte_level_bpe

PROMPT = "Return a new list containing"


def fresh_process_generate(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> dict:
    """Run `training/fresh_load.py` in an isolated interpreter and return its JSON result."""
    script = Path(__file__).with_name("fresh_load.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(model_dir), prompt, str(max_new_tokens)],
        cwd=model_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--preset", default="tiny-mixtral", help="config preset name or JSON path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()

    print("[1/4] tokenizer: byte-level BPE trained on Python's standard-library docstrings (no download)")
    config = load_preset(args.preset)
    tokenizer = train_byte_level_bpe(stdlib_paragraphs(max_chars=300_000), vocab_size=config.vocab_size)

    print(f"[2/4] model: preset {args.preset!r}")
    model = MoeForCausalLM(config).eval()
    counts = count_parameters(model)
    print(f"      {counts.total_params:,} parameters, {counts.active_params:,} active per token")

    model_dir = args.out / "model"
    print(f"[3/4] saving Hub-ready folder to {model_dir}")
    card = model_card(
        model, "moe-demo", description="A randomly initialised tiny MoE built by `python -m training.demo`."
    )
    save_hub_ready(model, model_dir, tokenizer=tokenizer, card=card, overwrite=True)
    print("      " + ", ".join(sorted(p.name for p in model_dir.iterdir())))

    print("[4/4] reloading with trust_remote_code in a fresh process without this package")
    remote = fresh_process_generate(model_dir.resolve(), PROMPT)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        local_sum = float(model(**ids).logits.double().sum())
    local = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    same_tokens = local[0].tolist() == remote["generated_ids"]
    same_logits = abs(local_sum - remote["logits_sum"]) <= 1e-6 * max(1.0, abs(local_sum))
    print(f"      loaded {remote['class']} from {remote['module']}")
    print(f"      generated: {remote['generated']!r}")
    print(f"      same logits as in-process: {same_logits}; same tokens: {same_tokens}")
    if not (same_tokens and same_logits):
        raise SystemExit("demo failed: the reloaded model differs from the saved one")
    print(f"done in {time.time() - start:.1f}s")
    return {"model_dir": str(model_dir), **remote}


if __name__ == "__main__":
    main()
