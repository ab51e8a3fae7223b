"""torch.compile of the decode step: one full graph with a static KV cache, same tokens as eager."""

from __future__ import annotations

import torch
from transformers import CompileConfig, StaticCache

from modeling_moe import MoeForCausalLM
from tests.conftest import tiny_config


def test_static_cache_decode_step_compiles_to_one_graph_and_matches_eager():
    """fullgraph=True: any graph break (a host read of the routing, a data-dependent shape) fails the test."""
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(3, 128, (1, 6))
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)

    def decode(forward, steps=4):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            tok, logits = out.logits[:, -1:].argmax(-1), []
            for i in range(steps):
                pos = torch.tensor([ids.shape[1] + i])
                out = forward(input_ids=tok, past_key_values=cache, position_ids=pos[None], cache_position=pos)
                logits.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    torch.testing.assert_close(decode(compiled), decode(model.forward), rtol=1e-4, atol=1e-5)


def test_generate_with_static_cache_and_compile_config_matches_dynamic_cache():
    """The user-facing path: `generate(cache_implementation="static", compile_config=...)` on the CPU."""
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(3, 128, (1, 6))
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        got = model.generate(
            ids, max_new_tokens=5, do_sample=False, cache_implementation="static", compile_config=config
        )
    assert hasattr(model, "_compiled_call"), "generate() did not take the compiled path"
    assert torch.equal(got, expected)
