"""Load a saved model the way a Hub user would, in an environment where this repository's package is absent.

Run as a script (`python -I training/fresh_load.py MODEL_DIR "prompt"`): it makes `import modeling_moe` fail,
loads the folder with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, generates greedily
and prints one JSON line: the class and module that were loaded, the generated text and the prompt's logits
checksum. It imports only torch and transformers. The load is strict, like every loader of this repository
(`modeling_moe.checkpoint`, which this script cannot import): safetensors only, and a checkpoint with missing,
unexpected or wrong-shape tensors is refused (exit status 1, the tensors named) instead of run.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str, prompt: str, max_new_tokens: int = 24) -> dict:
    sys.modules["modeling_moe"] = None  # type: ignore[assignment]  # any import of our package now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problems = {kind: sorted(map(str, info[kind])) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        sys.exit(f"fresh_load: {model_dir} does not match its config: { {k: v for k, v in problems.items() if v} }")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    generated = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "generated": tokenizer.decode(generated[0], skip_special_tokens=True),
        "generated_ids": generated[0].tolist(),
        "logits_sum": float(logits.double().sum()),
    }


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -I fresh_load.py MODEL_DIR PROMPT [MAX_NEW_TOKENS]")
    print(json.dumps(main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))))
