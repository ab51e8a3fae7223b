"""Perplexity, bits per byte and the strided sliding window, against direct computations; bad input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval.loading import EvalInputError, load_model
from eval.perplexity import evaluate_perplexity, load_texts, strided_windows, tokenize_documents
from eval.run import main
from modeling_moe import MoeForCausalLM
from modeling_moe.corpus import stdlib_paragraphs
from tests.conftest import tiny_config
from training.tokenizer import train_byte_level_bpe

TEXTS = ["Return the sum of a list.", "Open a file and return a stream; raise OSError upon failure. Thé end."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(stdlib_paragraphs(max_chars=30_000), vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoeForCausalLM(tiny_config(vocab_size=300)).eval()


def direct_losses(model, ids: list[int]) -> list[float]:
    """Per-token NLL of ids[1:] from one full forward pass."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0]
    return F.cross_entropy(logits[:-1].float(), x[0, 1:], reduction="none").tolist()


def test_perplexity_and_bits_per_byte_match_a_direct_computation(model, tokenizer):
    docs = tokenize_documents(TEXTS, tokenizer)
    assert all(d[0] == tokenizer.bos_token_id for d in docs)
    result = evaluate_perplexity(model, docs, TEXTS, max_length=64, batch_size=2, pad_id=0)  # padded batch
    losses = [direct_losses(model, d) for d in docs]
    total = sum(sum(x) for x in losses)
    n = sum(len(x) for x in losses)
    assert result.num_tokens == n == sum(len(d) - 1 for d in docs)
    assert result.num_bytes == sum(len(t.encode("utf-8")) for t in TEXTS)  # é is two bytes
    assert result.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / result.num_bytes, rel=1e-5)
    for kept, direct in zip(result.token_losses, losses):
        assert kept == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("length", [2, 5, 32, 33, 100])
@pytest.mark.parametrize(("max_length", "stride"), [(8, 3), (8, 8), (32, 16), (2, 1)])
def test_strided_windows_score_every_token_once(length, max_length, stride):
    windows = strided_windows(0, length, max_length, stride)
    scored = [p for w in windows for p in range(w.first_target, w.end)]
    assert scored == list(range(1, length))
    for w in windows:
        assert w.end - w.begin <= max_length and w.begin < w.first_target
        if w.begin > 0:  # later windows are full and keep at least max_length - stride tokens of context
            assert w.end - w.begin == max_length
            assert w.first_target - w.begin >= max_length - min(stride, max_length - 1)


def test_strided_window_equals_full_window_where_both_fit(model, tokenizer):
    docs = tokenize_documents(TEXTS, tokenizer)
    short = [d for d in docs if len(d) <= 32]
    assert short
    full = evaluate_perplexity(model, short, TEXTS[:1], max_length=128, batch_size=1)
    strided = evaluate_perplexity(model, short, TEXTS[:1], max_length=32, stride=4, batch_size=3)
    for a, b in zip(strided.token_losses, full.token_losses):
        assert a == pytest.approx(b, abs=1e-5)
    assert strided.nll == pytest.approx(full.nll, rel=1e-6)


def test_strided_window_on_a_long_text(model, tokenizer):
    text = " ".join(stdlib_paragraphs(max_chars=3000))[:150]
    (doc,) = tokenize_documents([text], tokenizer)
    assert 40 < len(doc) <= 128
    full = evaluate_perplexity(model, [doc], [text], max_length=128)
    strided = evaluate_perplexity(model, [doc], [text], max_length=24, stride=8, batch_size=4)
    assert strided.num_tokens == full.num_tokens and not any(math.isnan(x) for x in strided.token_losses[0])
    # the first window sees the same prefix as the full pass; later tokens see only the window's context
    assert strided.token_losses[0][:23] == pytest.approx(full.token_losses[0][:23], abs=1e-5)
    assert strided.token_losses[0][23:] != pytest.approx(full.token_losses[0][23:], abs=1e-5)
    # a token scored by a later window has exactly the loss of a direct pass over that window
    (w,) = [w for w in strided_windows(0, len(doc), 24, 8) if w.first_target <= 40 < w.end]
    direct = direct_losses(model, doc[w.begin : w.end])
    assert strided.token_losses[0][40 - 1] == pytest.approx(direct[40 - w.begin - 1], abs=1e-5)


def test_context_longer_than_the_model_allows(model, tokenizer):
    docs = tokenize_documents(TEXTS, tokenizer)
    with pytest.raises(EvalInputError, match=r"max_length=256 is longer than the model allows.*128"):
        evaluate_perplexity(model, docs, TEXTS, max_length=256)
    with pytest.raises(EvalInputError, match="stride must be in"):
        evaluate_perplexity(model, docs, TEXTS, max_length=16, stride=17)


def test_empty_dataset_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EvalInputError, match="empty file"):
        load_texts(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(EvalInputError, match="no non-empty text"):
        load_texts(str(blank))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(EvalInputError, match=r"text_column: 'text' is not a column.*body"):
        load_texts(str(rows))
    assert load_texts(str(rows), text_column="body") == ["some text"]
    with pytest.raises(EvalInputError, match="no file or folder"):
        load_texts(str(tmp_path / "missing.txt"))


def test_model_folder_without_weights(tmp_path, model):
    folder = tmp_path / "no-weights"
    model.config.save_pretrained(folder)
    with pytest.raises(EvalInputError, match=r"model: folder .*no-weights has no safetensors weights"):
        load_model(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(EvalInputError, match="pickle weights are not loaded"):
        load_model(str(folder))
    with pytest.raises(EvalInputError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_cli_reports_bad_input_clearly(tmp_path, model, capsys):
    folder = tmp_path / "no-weights"
    model.config.save_pretrained(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(folder), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "has no safetensors weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--dtype", "float8"])
    assert "dtype must be one of" in capsys.readouterr().err


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalInputError, match="model: could not load a model from 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")
