"""transformers' own sharding engines on our model, 2 processes on gloo (CPU), each against the same model in one
process: `from_pretrained(..., distributed_config=DistributedConfig(...))` with tensor parallelism (TP), expert
parallelism + FSDP2 (EP + FSDP), TP + EP and FSDP2 alone.

One launch (`_worker`, started once for the module) runs every case and writes what it measured; the tests read
it. Per case: eval logits and routing (drops included) against the single process, the training loss and every
parameter's full gradient (FSDP: the mean of the single process's gradients on the two ranks' batches, which is
what FSDP's reduce-scatter computes), and that the experts are really split (each rank holds its slice of the
single-process tensor and no more). The models have random biases everywhere (`mlp_bias`, `attention_bias`) so
that a bias added once per rank instead of once would show.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from modeling_moe import MoeConfig, MoeForCausalLM
from modeling_moe.parallel import check_distributed_config
from tests.training_helpers import free_port

TOL = 1e-5
CONFIGS = {
    # Mixtral-like: every layer MoE, dropless, no biases; aux-loss-free router bias updates
    "plain": dict(router_bias_update_rate=0.01),
    # dense layer 0, shared expert with gate, expert and attention biases, capacity factor 0.5 (drops) in both modes
    "full": dict(
        moe_layers=[1],
        mlp_bias=True,
        attention_bias=True,
        num_shared_experts=1,
        shared_expert_gate=True,
        capacity_factor_train=0.5,
        capacity_factor_eval=0.5,
    ),
    # Soft MoE (Mixture of Tokens): slots mixed over groups of 2 batch rows, one experts call on every slot
    "soft": dict(
        router_type="soft", soft_group_size=2, soft_eval_group_size=2, mlp_bias=True, router_aux_loss_coef=0.0
    ),
}
ENGINES = {
    "fsdp": dict(fsdp_size=2),
    "tp": dict(tp_size=2),
    "ep_fsdp": dict(ep_size=2, fsdp_size=2),
    "tp_ep": dict(tp_size=2, ep_size=2),
}
CASES = [(c, e) for c in CONFIGS for e in ENGINES]
SAVED_CASES = [("plain", "fsdp"), ("full", "ep_fsdp"), ("full", "tp_ep")]  # trained one step sharded, then saved


def tiny_config(**overrides) -> MoeConfig:
    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MoeConfig(**{**values, **overrides})


def _save_model(name: str, folder: str) -> None:
    torch.manual_seed(0)
    model = MoeForCausalLM(tiny_config(**CONFIGS[name]))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.5)  # zeros at init: a bias counted twice would not show
    model.save_pretrained(folder)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _expert_slice_ok(engine: str, rank: int, local: torch.Tensor, full: torch.Tensor) -> bool:
    """The rank's local gate_up_proj is exactly its slice of the single-process (E, 2I, D) tensor."""
    E, two_i, _ = full.shape
    if engine != "tp":  # whole experts, E / 2 per rank: EP, or FSDP2's dim-0 shards
        expected = full[rank * E // 2 : (rank + 1) * E // 2]
    else:  # half of every expert's gate rows and half of its up rows
        i, h = two_i // 2, two_i // 4
        expected = torch.cat([full[:, rank * h : (rank + 1) * h], full[:, i + rank * h : i + (rank + 1) * h]], 1)
    return local.shape == expected.shape and torch.equal(local, expected)


def _run_case(rank, folder, config_name, engine, save_dir):
    from transformers.distributed import DistributedConfig

    ref = MoeForCausalLM.from_pretrained(folder)
    model = MoeForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(**ENGINES[engine]))
    torch.manual_seed(1)
    ids_all = torch.randint(0, 96, (2, 12))
    distinct = "fsdp" in engine  # FSDP ranks see distinct batches; TP ranks share one
    ids = ids_all[rank : rank + 1] if distinct else ids_all
    out = {}
    ref.eval(), model.eval()
    with torch.no_grad():
        a = ref(ids, output_router_logits=True)
        b = model(ids, output_router_logits=True)
    out["logits"] = (a.logits - b.logits).abs().max().item()
    out["drops"] = [a.dropped_tokens.tolist(), b.dropped_tokens.tolist()]
    out["routing_equal"] = all(torch.equal(x, y) for x, y in zip(a.router_indices, b.router_indices))
    ref.train(), model.train()
    if distinct:  # FSDP averages the ranks' gradients: the reference is the mean over both batches
        losses = [ref(ids_all[r : r + 1], labels=ids_all[r : r + 1]).loss for r in range(2)]
        ref_loss = losses[rank]
        (sum(losses) / 2).backward()
    else:
        ref_loss = ref(ids, labels=ids).loss
        ref_loss.backward()
    loss = model(ids, labels=ids, output_router_logits=True)
    out["train_drops"] = loss.dropped_tokens.tolist()
    loss = loss.loss
    loss.backward()
    out["loss"] = abs(loss.item() - ref_loss.item())
    grads, missing = 0.0, []
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if q.grad is None:
            missing.append(name)
            continue
        grads = max(grads, (_full(q.grad) - p.grad).abs().max().item())
    out["grads"], out["missing_grads"] = grads, missing
    if ref.config.router_bias_update_rate:  # both sum the load over the ranks: the same step everywhere
        ref.update_router_biases()
        model.update_router_biases()
        bias, ref_bias = (m.model.layers[1].mlp.router.e_score_correction_bias for m in (model, ref))
        out["router_bias"], out["router_bias_ref"] = bias.tolist(), ref_bias.tolist()
    experts = model.model.layers[1].mlp.experts
    full = ref.model.layers[1].mlp.experts.gate_up_proj.detach()
    out["experts_split"] = _expert_slice_ok(engine, rank, _local(experts.gate_up_proj).detach(), full)
    if save_dir is not None:  # one SGD step sharded, then the Hub-ready save (every rank)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        model.eval()
        with torch.no_grad():
            out["trained_logits"] = model(ids_all).logits.tolist()
        model.save_pretrained(save_dir)
    return out


def _worker(rank: int, world: int, port: int, folders: dict, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from transformers.distributed import DistributedConfig

    results = {}
    for config_name, engine in CASES:
        key = f"{config_name}-{engine}"
        save_dir = os.path.join(out_dir, f"saved-{key}") if (config_name, engine) in SAVED_CASES else None
        try:
            results[key] = _run_case(rank, folders[config_name], config_name, engine, save_dir)
        except Exception as err:  # reported by the test of this case
            results[key] = {"error": f"{type(err).__name__}: {err}"}
        torch.distributed.barrier()
    try:
        MoeForCausalLM.from_pretrained(
            folders["expert_choice"], distributed_config=DistributedConfig(ep_size=2, fsdp_size=2)
        )
        results["expert_choice_ep"] = "loaded"
    except ValueError as err:
        results["expert_choice_ep"] = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    folders = {}
    for name in CONFIGS:
        folders[name] = str(root / name)
        _save_model(name, folders[name])
    folders["expert_choice"] = str(root / "expert_choice")
    MoeForCausalLM(tiny_config(router_type="expert_choice")).save_pretrained(folders["expert_choice"])
    mp.spawn(_worker, args=(2, free_port(), folders, str(root)), nprocs=2, join=True)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return root, ranks


@pytest.mark.parametrize(("config_name", "engine"), CASES)
def test_sharded_model_matches_one_process(launch, config_name, engine):
    _, ranks = launch
    for rank, results in enumerate(ranks):
        r = results[f"{config_name}-{engine}"]
        assert "error" not in r, r.get("error")
        assert r["logits"] < TOL, (rank, r["logits"])
        assert r["routing_equal"] and r["drops"][0] == r["drops"][1], (rank, r["drops"])
        assert r["loss"] < TOL and r["grads"] < TOL, (rank, r["loss"], r["grads"])
        assert not r["missing_grads"], r["missing_grads"]
        assert r["experts_split"], f"rank {rank} does not hold exactly its slice of the experts"
        if "router_bias" in r:
            assert r["router_bias"] == r["router_bias_ref"] == ranks[0][f"{config_name}-{engine}"]["router_bias"]
            assert any(r["router_bias"]), "the bias must have moved"
        if CONFIGS[config_name].get("capacity_factor_eval"):
            assert r["drops"][0][0] > 0 and r["train_drops"][0] > 0, "the capacity factor must drop something"


@pytest.mark.parametrize("case", SAVED_CASES)
def test_folder_saved_after_sharded_training_loads_on_one_process(launch, case):
    from transformers import AutoModelForCausalLM

    root, ranks = launch
    key = "-".join(case)
    folder = root / f"saved-{key}"
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.startswith("_fsdp")], files
    assert {"modeling_moe.py", "configuration_moe.py", "parallel.py", "model.safetensors"} <= set(files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe.MoeForCausalLM"
    assert config["architectures"] == ["MoeForCausalLM"] and "distributed_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    expected = torch.tensor(ranks[0][key]["trained_logits"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=TOL)


def test_expert_choice_is_refused_under_expert_parallelism(launch):
    _, ranks = launch
    for results in ranks:
        assert "router_type='expert_choice' cannot run under expert parallelism" in results["expert_choice_ep"]


@pytest.mark.parametrize(
    ("overrides", "sizes", "match"),
    [
        (dict(num_key_value_heads=1), dict(tp_size=2), r"num_key_value_heads \(1\)"),
        (dict(num_local_experts=3, num_experts_per_tok=1), dict(ep_size=2, fsdp_size=2), r"num_local_experts \(3\)"),
        (dict(moe_intermediate_size=33), dict(tp_size=2), r"moe_intermediate_size \(33\)"),
        (dict(expert_quantization={"bits": 8}), dict(fsdp_size=2), r"expert_quantization=.* cannot be sharded"),
    ],
)
def test_sizes_that_do_not_divide_are_refused(overrides, sizes, match):
    from transformers.distributed import DistributedConfig

    with pytest.raises(ValueError, match=match):
        check_distributed_config(tiny_config(**overrides), DistributedConfig(**sizes))


def test_plans_keep_only_rules_that_name_something():
    plain = MoeForCausalLM(tiny_config())
    full = MoeForCausalLM(tiny_config(**CONFIGS["full"]))
    assert plain.tp_plan["model.layers.*.mlp.experts"] == "moe_tp_experts"
    assert "model.layers.*.mlp.gate_proj" not in plain.tp_plan  # no dense layer
    assert "model.layers.*.mlp.experts.gate_up_proj_bias" not in plain.ep_plan
    assert full.tp_plan["model.layers.*.mlp.experts"] == "moe_lm_tp_experts"  # adds the down bias once
    assert full.tp_plan["model.layers.*.mlp.shared_expert.down_proj"] == "rowwise"
    assert full.ep_plan["model.layers.*.mlp.experts.down_proj_bias"] == "grouped_gemm"
    assert full.fsdp_plan["lm_head"] == "keep_full_weight"
