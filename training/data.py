"""Causal-LM data through `datasets`: local text / JSON / JSON Lines / parquet / CSV files or a dataset name,
tokenised with `Dataset.map` and packed into fixed-length blocks (the `run_clm` recipe).

    raw = load_raw_datasets(DataArguments(train_file=["corpus.txt"], block_size=64))
    blocks = tokenize_and_pack(raw, tokenizer, block_size=64)   # DatasetDict: train / validation

Every block holds `input_ids`, `attention_mask` (all ones) and `labels` (= input_ids; the model shifts them), so
every micro-batch has the same number of label tokens. Documents are separated by the tokenizer's own BOS (if it
adds one) and an EOS appended to each document.

Bad inputs raise before any training: a missing file (`FileNotFoundError` naming the argument), an empty (0-byte)
or malformed file (`DataError` naming the files and what the parser said), an unknown file type, a dataset that
is empty or too short for one block, a block size above the model's maximum positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

# File suffix -> `datasets` builder.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
DEFAULT_BLOCK_SIZE = 64
DEFAULT_VALIDATION_PERCENT = 5.0


class DataError(ValueError):
    """A data argument or the data it points at cannot be used; the message names the argument."""


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into training blocks."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A `datasets` name (Hub id, needs network) or a local folder written by `save_to_disk`."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Local training files: .txt/.md (one document per line), .json/.jsonl, .parquet or .csv."},
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Local validation files (same types); default: a slice of the training data."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text (json/parquet/csv/name)."})
    block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={"help": "Tokens per packed training block; at most the model's max_position_embeddings."},
    )
    validation_split_percentage: float = field(
        default=DEFAULT_VALIDATION_PERCENT,
        metadata={"help": "Percent of the training documents held out when there is no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many train blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many eval blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for `map`."})
    cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})
    data_seed_for_split: int = field(default=0, metadata={"help": "Seed of the train/validation split."})


def builder_for_files(files: list[str], argument: str) -> str:
    """The `datasets` builder ("text", "json", "parquet", "csv") for local `files`, after checking they exist.

    Raises:
        FileNotFoundError: a file is missing (the message names `argument`).
        DataError: unknown or mixed file types.
    """
    if not files:
        raise DataError(f"{argument} is empty; give at least one file")
    builders = set()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: no such file {name!r}")
        if path.stat().st_size == 0:
            raise DataError(f"{argument}: {name!r} is empty (0 bytes)")
        suffix = path.suffix.lower()
        if suffix not in BUILDERS:
            raise DataError(f"{argument}: {name!r} has type {suffix or '(none)'!r}; allowed: {sorted(BUILDERS)}")
        builders.add(BUILDERS[suffix])
    if len(builders) > 1:
        raise DataError(f"{argument} mixes file types ({sorted(builders)}); give files of one type")
    return builders.pop()


def _load_local(args: DataArguments) -> DatasetDict:
    builder = builder_for_files(args.train_file, "--train_file")
    data_files = {"train": list(args.train_file)}
    if args.validation_file:
        if builder_for_files(args.validation_file, "--validation_file") != builder:
            raise DataError("--validation_file must have the same file type as --train_file")
        data_files["validation"] = list(args.validation_file)
    kwargs = {"keep_linebreaks": False} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=data_files, cache_dir=args.cache_dir, **kwargs)
    except Exception as err:  # datasets / pyarrow raise many types for a malformed file; the cause says what
        cause = err.__cause__ or err.__context__ or err
        files = ", ".join(repr(f) for f in [*args.train_file, *(args.validation_file or [])])
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DataError(f"--train_file / --validation_file {files}: not readable as {builder} data ({detail})") from err


def _load_named(args: DataArguments) -> DatasetDict:
    name = args.dataset_name
    local = Path(name)
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = load_from_disk(str(local))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    try:
        loaded = load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as err:  # datasets raises many types (offline, unknown name, bad config)
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: use --train_file with local files)" if offline else ""
        raise DataError(f"--dataset_name {name!r} could not be loaded{hint}: {err}") from err
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def load_raw_datasets(args: DataArguments) -> DatasetDict:
    """Load the raw text as a DatasetDict with "train" and "validation" splits.

    Exactly one of `--dataset_name` / `--train_file` must be given. Blank documents are dropped. Without a
    validation split, `validation_split_percentage` of the training documents (at least one) is held out.

    Raises:
        DataError / FileNotFoundError: see the module docstring.
    """
    if bool(args.dataset_name) == bool(args.train_file):
        raise DataError("give exactly one of --dataset_name or --train_file")
    if not 0 < args.validation_split_percentage < 100:
        raise DataError(f"--validation_split_percentage must be in (0, 100), got {args.validation_split_percentage}")
    raw = _load_local(args) if args.train_file else _load_named(args)
    if "train" not in raw:
        raise DataError(f"the dataset has no 'train' split, only {sorted(raw)}")
    column = args.text_column
    if column not in raw["train"].column_names:
        raise DataError(f"--text_column {column!r} is not a column of the data; columns: {raw['train'].column_names}")
    raw = DatasetDict(
        {name: split.filter(lambda t: bool(t and t.strip()), input_columns=column) for name, split in raw.items()}
    )
    if len(raw["train"]) == 0:
        raise DataError("the training data is empty (no non-blank documents)")
    if "validation" not in raw:
        if len(raw["train"]) < 2:
            raise DataError("the training data has one document: too few to hold out a validation slice")
        split = raw["train"].train_test_split(
            test_size=max(1, round(len(raw["train"]) * args.validation_split_percentage / 100)),
            seed=args.data_seed_for_split,
            shuffle=True,
        )
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    elif len(raw["validation"]) == 0:
        raise DataError("the validation data is empty")
    return DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def check_block_size(block_size: int, max_position_embeddings: int) -> None:
    """Raise `DataError` unless 2 <= block_size <= the model's `max_position_embeddings`."""
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"--block_size must be an integer >= 2, got {block_size!r}")
    if block_size > max_position_embeddings:
        raise DataError(
            f"--block_size {block_size} is above the model's max_position_embeddings ({max_position_embeddings}); "
            f"use --block_size <= {max_position_embeddings}"
        )


def pack_blocks(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate the token lists of a `map` batch and cut them into full blocks (the remainder is dropped)."""
    ids = list(chain.from_iterable(batch["input_ids"]))
    total = (len(ids) // block_size) * block_size
    blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
    return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [b[:] for b in blocks]}


def tokenize_and_pack(
    raw: DatasetDict,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DatasetDict:
    """Tokenise every split with `map` (EOS appended per document) and pack into `block_size`-token blocks.

    Returns:
        DatasetDict with the same splits; columns input_ids, attention_mask, labels.
    Raises:
        DataError: a split yields no full block.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[text_column], add_special_tokens=True)["input_ids"]
        return {"input_ids": [[*seq, eos] if eos is not None else seq for seq in ids]}

    packed = {}
    for name, split in raw.items():
        tokens = split.map(
            tokenize,
            batched=True,
            num_proc=num_proc,
            remove_columns=split.column_names,
            desc=f"tokenising {name}",
        )
        blocks = tokens.map(
            pack_blocks,
            batched=True,
            batch_size=1000,
            num_proc=num_proc,
            fn_kwargs={"block_size": block_size},
            desc=f"packing {name} into blocks of {block_size}",
        )
        if len(blocks) == 0:
            n_tokens = sum(len(x) for x in tokens["input_ids"])
            raise DataError(
                f"the {name} split has {n_tokens} tokens, fewer than one block of --block_size {block_size}"
            )
        limit = max_train_samples if name == "train" else max_eval_samples
        if limit is not None:
            blocks = blocks.select(range(min(limit, len(blocks))))
        packed[name] = blocks
    return DatasetDict(packed)


def load_lm_datasets(args: DataArguments, tokenizer, max_position_embeddings: int) -> DatasetDict:
    """`check_block_size`, `load_raw_datasets` and `tokenize_and_pack` in one call (block size checked first)."""
    check_block_size(args.block_size, max_position_embeddings)
    raw = load_raw_datasets(args)
    return tokenize_and_pack(
        raw,
        tokenizer,
        args.block_size,
        args.text_column,
        args.preprocessing_num_workers,
        args.max_train_samples,
        args.max_eval_samples,
    )


def text_iterator(split: Dataset, text_column: str = "text", max_chars: int | None = None):
    """Yield the documents of a raw split (for tokenizer training), stopping after `max_chars` characters."""
    total = 0
    for text in split[text_column]:
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


__all__ = [
    "BUILDERS",
    "DataArguments",
    "DataError",
    "builder_for_files",
    "check_block_size",
    "load_lm_datasets",
    "load_raw_datasets",
    "pack_blocks",
    "text_iterator",
    "tokenize_and_pack",
]
