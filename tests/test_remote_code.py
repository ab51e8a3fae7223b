"""Hub portability: a saved model loads with trust_remote_code where this package cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_moe import MoeForCausalLM
from tests.conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]

LOADER = textwrap.dedent(
    """
    import sys
    # This environment has torch and transformers but not our package (nor the optional triton): make any
    # import of them fail, and drop the repository from the path.
    sys.modules["modeling_moe"] = None
    sys.modules["triton"] = None
    import os
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != "{repo}"]
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert any(m.endswith(".triton_experts") for m in sys.modules), "triton_experts.py did not travel"
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save({{"logits": out.logits, "aux": out.aux_loss, "generated": generated}}, sys.argv[3])
    print(json.dumps({{"class": type(model).__name__, "router_layers": len(out.router_logits)}}))
    """
)


CASES = {
    "switch_capacity_qkv_bias": dict(
        router_type="switch", num_experts_per_tok=1, moe_layers=[1], qkv_bias=True, capacity_factor_eval=1.5
    ),
    "deepseek_style": dict(
        router_type="sigmoid_grouped",
        num_local_experts=8,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_expert_gate=True,
        router_bias_update_rate=0.01,
        moe_layers=[1],
        capacity_factor_eval=2.0,
        capacity_policy="next_choice",
    ),
    "soft_moe": dict(
        router_type="soft", router_aux_loss_coef=0.0, soft_slots_per_expert=2, soft_group_size=2, moe_layers=[1]
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trust_remote_code_round_trip_in_a_fresh_process(tmp_path, case):
    config = tiny_config(**CASES[case])
    model = MoeForCausalLM(config).eval()
    for router in (m for m in model.modules() if getattr(m, "e_score_correction_bias", None) is not None):
        router.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, router.num_experts))  # a trained bias
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_moe.MoeConfig",
        "AutoModel": "modeling_moe.MoeModel",
        "AutoModelForCausalLM": "modeling_moe.MoeForCausalLM",
        "AutoModelForSequenceClassification": "modeling_moe.MoeForSequenceClassification",
    }
    assert not list(checkpoint.glob("*.bin")), "weights must be safetensors"

    ids = torch.randint(3, 128, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER.format(repo=str(REPO_ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"class": "MoeForCausalLM", "router_layers": 1}

    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(ids)
    assert torch.equal(remote["logits"], local.logits)
    assert torch.equal(remote["aux"], local.aux_loss)
    expected = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)
