"""The routing `evaluate` modules: they load offline from their folders, match hand counts, and work from
Trainer's `compute_metrics` on a model whose routing is set by hand."""

from __future__ import annotations

import math
import os

import evaluate
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from eval.metrics import METRIC_NAMES, RoutingComputeMetrics, metric_path, routing_indices_for_metrics
from tests.test_eval_routing import DOCS, hand_counts, hand_routed_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_modules_load_offline_from_their_folder(name):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    module = evaluate.load(metric_path(name))
    assert isinstance(module, evaluate.Metric)
    assert module.name == name
    with pytest.raises(ValueError, match="num_experts must be an integer"):
        if name == "moe_routing_agreement":
            module.compute(predictions=[[0]], references=[[0]], num_experts=0)
        else:
            module.compute(expert_indices=[[0]], num_experts=0)


def test_load_cv_module_by_hand():
    metric = evaluate.load(metric_path("moe_load_cv"))
    # 4 experts: e0 gets 3, e1 1, e2 1, e3 0 (token 3 is Trainer padding, -100)
    out = metric.compute(expert_indices=[[0, 1], [0, 4], [2, 0], [-100, -100]], num_experts=4)
    assert out["load"] == pytest.approx([0.6, 0.2, 0.2, 0.0])
    assert out["load_cv"] == pytest.approx(math.sqrt(((3 - 1.25) ** 2 + 2 * 0.25**2 + 1.25**2) / 4) / 1.25)
    assert out["load_entropy"] == pytest.approx(-(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)))
    assert out["dead_experts"] == 1
    per_layer = metric.compute(expert_indices=[[0, 1], [2, 3], [0, 1], [0, 1]], layer=[0, 0, 1, 1], num_experts=4)
    assert per_layer["load_cv_per_layer"] == pytest.approx([0.0, 1.0])  # layer 1: [2, 2, 0, 0]: std 1, mean 1
    assert per_layer["dead_experts"] == 2
    with pytest.raises(ValueError, match=r"expert_indices must be in \[0, num_experts=4\]"):
        metric.compute(expert_indices=[[5, 0]], num_experts=4)


def test_drop_rate_module_by_hand():
    metric = evaluate.load(metric_path("moe_drop_rate"))
    assert metric.compute(expert_indices=[[0], [4], [1], [4], [-100]], num_experts=4)["drop_rate"] == 0.5
    out = metric.compute(expert_indices=[[0, 4], [4, 4], [1, 2], [3, 0]], layer=[0, 0, 1, 1], num_experts=4)
    assert out["drop_rate_per_layer"] == [0.75, 0.0]  # layer 0: 3 of 4 assignments dropped
    assert out["drop_rate"] == 3 / 8


def test_agreement_module_by_hand():
    metric = evaluate.load(metric_path("moe_routing_agreement"))
    # token 0: {0,1} vs {0,1} -> 1; token 1: {2,3} vs {0,2} -> 1/2; token 2: {1} (2nd dropped) vs {1,2} -> 1
    out = metric.compute(predictions=[[0, 1], [2, 3], [1, 4]], references=[[1, 0], [2, 0], [1, 2]], num_experts=4)
    assert out["topk_agreement"] == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match=r"number of predictions \(1\) and references \(2\)"):
        metric.compute(predictions=[[0, 1]], references=[[0, 1], [1, 2]], num_experts=4)


def test_modules_from_trainer_compute_metrics(tmp_path):
    model = hand_routed_model()
    model.config.output_router_logits = True
    width = max(len(d) for d in DOCS)
    rows = []
    for doc in DOCS:
        pad = width - len(doc)
        rows.append(
            {"input_ids": doc + [0] * pad, "attention_mask": [1] * len(doc) + [0] * pad, "labels": doc + [-100] * pad}
        )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=1, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=Dataset.from_list(rows),
        preprocess_logits_for_metrics=routing_indices_for_metrics,
        compute_metrics=RoutingComputeMetrics(num_experts=4),
    )
    metrics = trainer.evaluate()
    # hand counts (see test_eval_routing): layer 0 [7, 7, 2, 2], layer 1 [5, 7, 6, 0]
    cvs = []
    for layer in range(2):
        counts = hand_counts(layer)
        mean = sum(counts) / 4
        cvs.append(math.sqrt(sum((c - mean) ** 2 for c in counts) / 4) / mean)
    assert metrics["eval_load_cv"] == pytest.approx(sum(cvs) / 2)
    assert metrics["eval_dead_experts"] == 1.0
    assert metrics["eval_drop_rate"] == 0.0
    assert metrics["eval_consecutive_layer_agreement"] == pytest.approx(6 / 9)


def test_preprocess_needs_router_indices():
    with pytest.raises(ValueError, match="output_router_logits = True"):
        routing_indices_for_metrics((torch.zeros(1, 2, 3),), torch.zeros(1, 2, dtype=torch.long))
