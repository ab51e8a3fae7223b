"""Trainer checkpoints that appear whole or not at all, and finding the last complete one to resume from.

transformers' `Trainer._save_checkpoint` writes straight into `output_dir/checkpoint-N/`: `save_pretrained` first
copies the modeling files (`custom_object_save`), then the weights, optimizer, scheduler, RNG and
`trainer_state.json`. A kill on the way leaves `checkpoint-N/` under its final name with part of that (often only
`modeling_moe.py`), and `get_last_checkpoint` would pick it. `AtomicCheckpointMixin` makes Trainer write the
checkpoint into a hidden staging folder `output_dir/.partial-checkpoint-N/checkpoint-N/` and renames it into place
once everything is written (after a barrier, by the saving process), so a `checkpoint-N/` folder is always
complete; with `push_to_hub`, Trainer's checkpoint push runs from the final folder, after the rename. A staging
folder left by a killed run is deleted by the next save and at the start of training.

`last_complete_checkpoint(output_dir)` (used for `--resume_from_checkpoint latest`) returns the newest
`checkpoint-N/` that holds a readable `trainer_state.json` and weights, skipping incomplete ones (e.g. written by
an older version of this code) with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from (no / unreadable trainer_state.json, no safetensors weights), or None."""
    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {TRAINER_STATE} is unreadable (truncated?)"
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        return f"it has no safetensors weights ({', '.join(WEIGHT_FILES)})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N/` of `output_dir` with the largest N that is complete (see `incomplete_reason`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(found, reverse=True):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, reason)
    return None


def remove_staging(output_dir: str | os.PathLike) -> None:
    """Delete the hidden staging folders (`.partial-checkpoint-N/`) that killed runs left in `output_dir`."""
    folder = Path(output_dir)
    if folder.is_dir():
        for path in folder.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(path, ignore_errors=True)


class AtomicCheckpointMixin:
    """Mix into a `Trainer` subclass (before `Trainer`): checkpoints are staged and renamed into place whole."""

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_staging is not None:  # Trainer._save_checkpoint writes into <run dir>/checkpoint-N
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            remove_staging(run_dir)
        self.accelerator.wait_for_everyone()
        push, self.args.push_to_hub = self.args.push_to_hub, False  # pushed below, from the final folder
        self._checkpoint_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
            self.args.push_to_hub = push
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            self._publish_checkpoint(run_dir, staging, name)
        self.accelerator.wait_for_everyone()
        if push:
            self._push_from_checkpoint(str(run_dir / name))

    def _publish_checkpoint(self, run_dir: Path, staging: Path, name: str) -> None:
        """Point the best-checkpoint path at the final folder, rename the staged checkpoint into place, rotate."""
        state = self.state
        if state.best_global_step:
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
            if best.name == name or best.is_dir():
                state.best_model_checkpoint = str(best)
        staged = staging / name
        if (staged / TRAINER_STATE).is_file():  # re-save with the final path of the best checkpoint
            state.save_to_json(str(staged / TRAINER_STATE))
        final = run_dir / name
        if final.exists():  # an earlier run reached the same step; Trainer would have written over it
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )


__all__ = [
    "AtomicCheckpointMixin",
    "incomplete_reason",
    "last_complete_checkpoint",
    "remove_staging",
]
