"""`RouterMonitorCallback` against hand counts on a fixed routing, in a plain transformers `Trainer` with
gradient accumulation and gradient checkpointing (each forward counted once), with padding (excluded)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from modeling_moe import MoeForCausalLM
from modeling_moe.routing import MoeRouter, topk_softmax_routing
from tests.conftest import tiny_config
from training.monitor import HEATMAP_FILE, RouterMonitorCallback

SEQ, PAD = 12, 3  # 12 positions, the last 3 padding
E = 4


def fixed_logits(layer: int, position: int) -> list[float]:
    """Router logits of a token at `position`. Layer 0 prefers experts p % 4 then (p + 1) % 4; layer 1 uses
    experts 0-2 only (expert 3 is dead there)."""
    first, second = (position % 4, (position + 1) % 4) if layer == 0 else (position % 3, (position + 1) % 3)
    logits = [0.0, 0.0, 0.0, -1.0 if layer == 0 else -4.0]
    logits[first], logits[second] = 2.0, 1.0 + 0.1 * layer
    return logits


def install_fixed_routing(model: MoeForCausalLM, seq_len: int, k: int) -> list[int]:
    """Make every router return the fixed logits (and the routing they imply) whatever its input. Returns a
    one-element list counting router calls (recomputation under gradient checkpointing included)."""
    calls = [0]
    routers = [m for m in model.modules() if isinstance(m, MoeRouter)]
    for layer, router in enumerate(routers):
        table = torch.tensor([fixed_logits(layer, p) for p in range(seq_len)])

        def hook(module, args, output, table=table):
            calls[0] += 1
            T = args[0].shape[0]
            logits_TE = table.repeat(T // seq_len, 1).to(args[0].dtype)
            logits_TE = logits_TE + 0 * output[0]  # keep the graph connected to the router weight
            weights_TK, indices_TK = topk_softmax_routing(logits_TE, k, renormalize=True)
            scores_TE = F.softmax(logits_TE.float(), dim=-1)
            return logits_TE, weights_TK, indices_TK, scores_TE, scores_TE

        router.register_forward_hook(hook)
    return calls


def hand_window(num_sequences: int) -> list[dict]:
    """Per layer: load fractions, CV, router entropy, aux and z losses, dead experts, by plain Python."""
    out = []
    real = SEQ - PAD
    for layer in range(2):
        counts = [0] * E
        entropy = prob_sum = 0.0
        probs_sum = [0.0] * E
        z = 0.0
        for p in range(real):
            logits = fixed_logits(layer, p)
            top2 = sorted(range(E), key=lambda e: -logits[e])[:2]
            for e in top2:
                counts[e] += num_sequences
            norm = sum(math.exp(v) for v in logits)
            probs = [math.exp(v) / norm for v in logits]
            entropy += -sum(q * math.log(q) for q in probs)
            for e in range(E):
                probs_sum[e] += probs[e]
            z += math.log(norm) ** 2
            prob_sum += 1
        total = sum(counts)
        load = [c / total for c in counts]
        mean = total / E
        cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / E) / mean
        f = [c / (num_sequences * real) for c in counts]
        P = [s / real for s in probs_sum]
        out.append(
            {
                "load": load,
                "load_cv": cv,
                "router_entropy": entropy / real,
                "aux_loss": E * sum(fi * pi for fi, pi in zip(f, P)),
                "z_loss": z / real,
                "dead": [e for e in range(E) if counts[e] == 0],
            }
        )
    return out


def padded_dataset(n: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 128, (SEQ,), generator=generator)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[-PAD:] = 0
        ids[-PAD:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


class Reporter(TrainerCallback):
    """Stands in for a report_to integration: sits before user callbacks and records what on_log shows it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_monitor_matches_hand_count_with_accumulation_and_checkpointing(tmp_path):
    model = MoeForCausalLM(tiny_config(router_z_loss_coef=0.001))
    router_calls = install_fixed_routing(model, SEQ, k=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=padded_dataset(16), data_collator=default_data_collator)
    reporter = Reporter()
    trainer.callback_handler.callbacks.insert(0, reporter)
    monitor = RouterMonitorCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is monitor
    trainer.train()

    # 2 logging windows x 2 steps x 2 micro-batches x 2 sequences = 8 sequences per window
    assert router_calls[0] == 2 * 8 * 2, "8 micro-batch forwards x 2 routers, each run again in backward"
    assert [entry["step"] for entry in monitor.history] == [2, 4]
    expected = hand_window(num_sequences=8)
    for entry in monitor.history:
        for layer, (got, want) in enumerate(zip(entry["layers"], expected)):
            assert got["tokens"] == 8 * (SEQ - PAD), "each micro-batch counted once, padding excluded"
            assert got["load"] == pytest.approx(want["load"], rel=1e-9)
            assert got["load_cv"] == pytest.approx(want["load_cv"], rel=1e-9)
            assert got["router_entropy"] == pytest.approx(want["router_entropy"], rel=1e-6)
            assert got["aux_loss"] == pytest.approx(want["aux_loss"], rel=1e-5)
            assert got["z_loss"] == pytest.approx(want["z_loss"], rel=1e-5)
            assert got["dead_experts"] == want["dead"]
            assert got["dropped_fraction"] == 0.0
            assert got["layer"] == layer
    assert expected[1]["dead"] == [3]

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert train_logs[0]["router/layer_1/dead_experts"] == 1 and train_logs[0]["router/dead_experts"] == 1
    assert train_logs[0]["router/layer_0/load_expert_2"] == pytest.approx(expected[0]["load"][2])
    reporter_logs = [log for log in reporter.seen if "loss" in log]
    assert reporter_logs and all("router/layer_0/load_cv" in log for log in reporter_logs)
    assert (tmp_path / HEATMAP_FILE).stat().st_size > 1000


def test_monitor_counts_drops_and_ignores_eval_and_no_grad_forwards():
    """Switch top-1 with capacity factor 1 and every token sent to expert 0: each forward keeps
    ceil(real / E) tokens and drops the rest."""
    config = tiny_config(
        num_experts_per_tok=1, router_type="switch", capacity_factor_train=1.0, capacity_factor_eval=1.0
    )
    model = MoeForCausalLM(config)

    def all_to_expert_0(module, args, output):
        logits_TE = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).expand(args[0].shape[0], E) + 0 * output[0]
        weights_TK, indices_TK = topk_softmax_routing(logits_TE, 1, renormalize=False)
        scores_TE = F.softmax(logits_TE.float(), dim=-1)
        return logits_TE, weights_TK, indices_TK, scores_TE, scores_TE

    for router in (m for m in model.modules() if isinstance(m, MoeRouter)):
        router.register_forward_hook(all_to_expert_0)
    monitor = RouterMonitorCallback()
    monitor.install(model)
    batch = default_data_collator(padded_dataset(2))
    model.train()
    model(**batch).loss.backward()
    with torch.no_grad():
        model(**batch)  # no grad: not a training forward
    model.eval()
    model(**batch)  # eval: ignored
    summary = monitor.flush()
    real = 2 * (SEQ - PAD)
    kept = math.ceil(real * 1 * 1.0 / E)
    for layer in summary:
        assert layer["tokens"] == real
        assert layer["load"] == [1.0, 0.0, 0.0, 0.0]
        assert layer["dead_experts"] == [1, 2, 3]
        assert layer["dropped_fraction"] == pytest.approx((real - kept) / real)
    assert monitor.flush() is None, "the window restarts after a flush"
    monitor.remove()
