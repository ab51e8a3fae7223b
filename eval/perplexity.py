"""Perplexity and bits per byte with a strided sliding window, keeping every token's loss.

Each document is tokenized on its own, with the tokenizer's BOS (else EOS) token in front, so that every token
of the text is predicted and bits per byte cover all of its UTF-8 bytes. A document longer than the context is
scored with the strided sliding window of transformers' perplexity guide: windows of `max_length` tokens that
advance by `stride` tokens; each window scores only the tokens the previous window did not, with the rest of the
window (at least `max_length - stride` tokens) as their context. Every token is scored exactly once.

    perplexity    = exp(sum of token NLLs / number of scored tokens)
    bits per byte = sum of token NLLs / (ln 2 * UTF-8 bytes of the texts)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .loading import EvalInputError

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
LOCAL_BUILDERS[".parquet"] = "parquet"


@dataclass(frozen=True)
class Window:
    """One forward pass of the sliding window over document `doc`.

    Token positions [begin, end) of the document are fed; positions [first_target, end) are scored (each predicted
    from the positions before it inside the window).
    """

    doc: int
    begin: int
    end: int
    first_target: int


@dataclass
class PerplexityResult:
    """Quality of one model on one token stream.

    nll: sum of token negative log-likelihoods (nats). num_tokens: scored tokens. num_bytes: UTF-8 bytes of the
    texts. token_ids[d]: the ids of document d (BOS first); token_losses[d][i]: NLL of token_ids[d][i + 1].
    """

    nll: float
    num_tokens: int
    num_bytes: int
    max_length: int
    stride: int
    token_ids: list[list[int]] = field(default_factory=list)
    token_losses: list[list[float]] = field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        """Mean NLL per scored token (nats)."""
        return self.nll / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll) if self.num_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        """Sum of NLLs in bits over UTF-8 bytes."""
        return self.nll / (math.log(2) * self.num_bytes) if self.num_bytes else float("nan")

    def summary(self) -> dict:
        """JSON-ready numbers (without the per-token arrays)."""
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "mean_nll": self.mean_nll,
            "num_tokens": self.num_tokens,
            "num_bytes": self.num_bytes,
            "num_documents": len(self.token_ids),
            "max_length": self.max_length,
            "stride": self.stride,
        }


# ----------------------------------------------------------------------------------------------------- data
def load_texts(
    source: str,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    max_samples: int | None = None,
    field_name: str = "dataset",
) -> list[str]:
    """Non-empty texts from a `datasets` source: a local file (.txt one text per line, .json/.jsonl, .csv,
    .parquet), a local dataset folder, or a Hub dataset name (needs the data in the local cache when offline).

    Args:
        source: path or dataset name. config_name: dataset configuration. split: split to read.
        text_column: column holding the text. max_samples: keep at most this many non-empty texts.
        field_name: argument name used in error messages.
    Returns:
        The texts, in dataset order.
    Raises:
        EvalInputError: missing file, unknown column, or no non-empty text.
    """
    path = Path(source).expanduser()
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise EvalInputError(
                f"{field_name}: {source!r} has suffix {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)}"
            )
        if path.stat().st_size == 0:
            raise EvalInputError(f"{field_name}: {source!r} is an empty file; it holds no text to evaluate on")
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    elif source.startswith((".", "/", "~")) and not path.exists():
        raise EvalInputError(f"{field_name}: no file or folder at {source!r}")
    else:
        ds = datasets.load_dataset(source, config_name, split=split)
    if text_column not in ds.column_names:
        raise EvalInputError(f"text_column: {text_column!r} is not a column of {source!r}; columns: {ds.column_names}")
    texts = [t for t in ds[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise EvalInputError(f"{field_name}: {source!r} (split {split!r}) has no non-empty text in {text_column!r}")
    return texts[:max_samples] if max_samples else texts


def tokenize_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's BOS (else EOS) id in front so that every text token is scored.

    Raises:
        EvalInputError: the tokenizer has neither a BOS nor an EOS token.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EvalInputError("tokenizer: it has neither a bos_token nor an eos_token to start each text with")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[start, *ids] for ids in encoded]


def check_window(max_length: int, stride: int, model_max: int | None) -> None:
    """Validate the window sizes against each other and against the model's context.

    Raises:
        EvalInputError: max_length < 2, stride outside [1, max_length], or max_length above the model's
            `max_position_embeddings`.
    """
    if max_length < 2:
        raise EvalInputError(f"max_length must be >= 2 tokens, got {max_length}")
    if model_max is not None and max_length > model_max:
        raise EvalInputError(
            f"max_length={max_length} is longer than the model allows (max_position_embeddings={model_max}); "
            f"use --max_length <= {model_max}"
        )
    if not 1 <= stride <= max_length:
        raise EvalInputError(f"stride must be in [1, max_length={max_length}], got {stride}")


def strided_windows(doc: int, length: int, max_length: int, stride: int) -> list[Window]:
    """Windows covering a document of `length` tokens: every token after the first is scored exactly once.

    The first window covers tokens [0, max_length). Each later window scores the next `stride` tokens (at most
    `max_length - 1`, since a scored token needs one token before it in its window) with the window's remaining
    positions as context, so a token scored after the first window sees at least `max_length - stride` tokens.

    Returns:
        Windows in order; empty for documents with fewer than 2 tokens.
    """
    step = min(stride, max_length - 1)
    windows: list[Window] = []
    end = min(max_length, length)
    if end >= 2:
        windows.append(Window(doc, 0, end, 1))
    while end < length:
        new_end = min(end + step, length)
        windows.append(Window(doc, max(0, new_end - max_length), new_end, end))
        end = new_end
    return windows


def batched(windows: Sequence[Window], docs: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator:
    """Right-padded batches: yields (windows, input_ids (B, S), attention_mask (B, S))."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(w.end - w.begin for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, : w.end - w.begin] = torch.tensor(docs[w.doc][w.begin : w.end])
            mask[row, : w.end - w.begin] = 1
        yield chunk, ids, mask


def model_max_length(model: PreTrainedModel) -> int | None:
    """The longest context the model's config allows (`max_position_embeddings`), if it declares one."""
    return getattr(model.config, "max_position_embeddings", None)


# ----------------------------------------------------------------------------------------------------- scoring
def token_losses(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """NLL (float32) of each next token: (B, S, V) logits and (B, S) ids -> (B, S - 1) losses of ids[:, 1:]."""
    return F.cross_entropy(
        logits_BSV[:, :-1].float().reshape(-1, logits_BSV.shape[-1]), input_ids_BS[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids_BS.shape[0], -1)


@torch.no_grad()
def evaluate_perplexity(
    model: PreTrainedModel,
    docs: Sequence[Sequence[int]],
    texts: Sequence[str],
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity and bits per byte of `model` on tokenized documents.

    Args:
        model: a causal LM (eval mode). docs: token ids per document (BOS first, see `tokenize_documents`).
        texts: the documents' texts (for the byte count). max_length: window length in tokens.
        stride: window step (default max_length). batch_size: windows per forward. pad_id: padding id.
    Returns:
        `PerplexityResult` with the per-token losses.
    Raises:
        EvalInputError: bad window sizes (see `check_window`) or no token to score.
    """
    stride = stride or max_length
    check_window(max_length, stride, model_max_length(model))
    windows = [w for d, ids in enumerate(docs) for w in strided_windows(d, len(ids), max_length, stride)]
    if not windows:
        raise EvalInputError("dataset: the texts tokenize to nothing that can be scored (every text is empty)")
    losses: list[list[float]] = [[math.nan] * (len(ids) - 1) for ids in docs]
    device = next(model.parameters()).device
    total = 0.0
    progress = tqdm(total=len(windows), desc=desc, unit="window", leave=False)
    for chunk, ids, mask in batched(windows, docs, batch_size, pad_id):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        nll = token_losses(logits, ids.to(device)).cpu()
        for row, w in enumerate(chunk):
            # loss column j predicts window position j + 1, i.e. document position w.begin + j + 1
            cols = slice(w.first_target - w.begin - 1, w.end - w.begin - 1)
            values = nll[row, cols]
            losses[w.doc][w.first_target - 1 : w.end - 1] = values.tolist()
            total += float(values.double().sum())
        progress.update(len(chunk))
    progress.close()
    return PerplexityResult(
        nll=total,
        num_tokens=sum(len(ids) - 1 for ids in docs),
        num_bytes=sum(len(t.encode("utf-8")) for t in texts),
        max_length=max_length,
        stride=stride,
        token_ids=[list(ids) for ids in docs],
        token_losses=losses,
    )


def compare_token_losses(a: PerplexityResult, b: PerplexityResult, top_n: int = 20) -> dict:
    """Token-by-token comparison of two models scored on the same token ids.

    Returns:
        {"mean_delta": mean of loss_a - loss_b, "a_better_fraction": share of tokens where a's loss is lower,
        "deltas": every delta (for a histogram), "largest": the `top_n` tokens with the largest |delta| as
        (doc, position, token id, loss_a, loss_b)}.
    Raises:
        EvalInputError: the two results cover different token ids (different tokenizers).
    """
    if a.token_ids != b.token_ids:
        raise EvalInputError("compare_model: the two models' token streams differ (different tokenizers)")
    la = torch.tensor([x for doc in a.token_losses for x in doc], dtype=torch.float64)
    lb = torch.tensor([x for doc in b.token_losses for x in doc], dtype=torch.float64)
    delta = la - lb
    where = [(d, i + 1) for d, doc in enumerate(a.token_losses) for i in range(len(doc))]
    order = delta.abs().argsort(descending=True)[:top_n].tolist()
    largest = [
        {"doc": where[j][0], "position": where[j][1], "token_id": a.token_ids[where[j][0]][where[j][1]],
         "loss_a": float(la[j]), "loss_b": float(lb[j])}
        for j in order
    ]  # fmt: skip
    return {
        "mean_delta": float(delta.mean()),
        "a_better_fraction": float((delta < 0).double().mean()),
        "deltas": delta.tolist(),
        "largest": largest,
    }


__all__ = [
    "PerplexityResult",
    "Window",
    "batched",
    "check_window",
    "compare_token_losses",
    "evaluate_perplexity",
    "load_texts",
    "model_max_length",
    "strided_windows",
    "token_losses",
    "tokenize_documents",
]
