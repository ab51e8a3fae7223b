"""Outputs are safe: atomic folders get plain-mkdir permissions, an overwrite killed half-way is recovered by the
next run, an output that overlaps its input is refused, and a kill while Trainer writes a checkpoint leaves no
`checkpoint-N/` under its final name (resuming `latest` takes the last complete one)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from transformers import default_data_collator

from modeling_moe import MoeForCausalLM
from modeling_moe.hub import UnsafeOutputError, atomic_directory, atomic_write_text, recover_interrupted
from modeling_moe.upcycling import upcycle_to_folder
from tests.conftest import tiny_config
from training.checkpoints import last_complete_checkpoint
from training.train import MoeTrainer, MoeTrainingArguments, resolve_resume

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-way")


def test_atomic_outputs_get_the_permissions_of_a_plain_mkdir(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("w")
        atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644


def _killed_child(work) -> None:
    """Fork; the child runs `work()` and dies with os._exit (no cleanup, like SIGKILL); the parent waits."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(9)
    os.waitpid(pid, 0)


@posix_only
def test_an_overwrite_killed_between_the_renames_is_restored_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")

    def overwrite_and_die_after_moving_the_old_folder_away():
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            os._exit(9)  # killed right after the first rename (old folder -> hidden backup)

        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
            monkeypatch.setattr(os, "replace", replace)

    _killed_child(overwrite_and_die_after_moving_the_old_folder_away)
    assert not out.exists() and len(list(tmp_path.glob(".model.old-*"))) == 1
    recover_interrupted(out)
    assert (out / "weights").read_text() == "old", "the previous folder is restored"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "the killed run's hidden folders are removed"


@posix_only
def test_a_write_killed_half_way_leaves_nothing_after_the_next_run(tmp_path):
    out = tmp_path / "model"

    def write_and_die():
        with atomic_directory(out) as tmp:
            (tmp / "part").write_text("half")
            os._exit(9)

    _killed_child(write_and_die)
    assert not out.exists() and len(list(tmp_path.glob(".model.tmp-*"))) == 1
    with atomic_directory(out) as tmp:  # the next run cleans up first
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_upcycling_refuses_an_output_that_is_or_is_inside_its_input(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text("{}")
    for out in (dense, dense / "moe", tmp_path):
        with pytest.raises(UnsafeOutputError, match="the input"):
            upcycle_to_folder(dense, out, overwrite=True)
    assert sorted(p.name for p in dense.iterdir()) == ["config.json"]


def _trainer(out, max_steps: int, resume: str | None = None) -> MoeTrainer:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (8, 16), generator=generator)
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    args = MoeTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        save_steps=1,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        resume_from_checkpoint=resume,
    )
    model = MoeForCausalLM(tiny_config())
    return MoeTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)


def test_a_kill_while_a_checkpoint_is_written_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = _trainer(out, max_steps=2)
    real = type(trainer)._save_optimizer_and_scheduler

    def die_at_step_2(self, output_dir):
        if self.state.global_step == 2:  # the model and modeling_moe.py are written; the optimizer is not yet
            raise KeyboardInterrupt("killed while writing checkpoint-2")
        return real(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_optimizer_and_scheduler", die_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" not in names, names
    staged = out / ".partial-checkpoint-2" / "checkpoint-2"
    assert (staged / "modeling_moe.py").is_file(), "the partial write went to the hidden staging folder"
    complete = {p.name for p in (out / "checkpoint-1").iterdir()}
    assert {"trainer_state.json", "model.safetensors", "optimizer.pt"} <= complete

    legacy = out / "checkpoint-3"  # what an older version (or plain Trainer) leaves: only the modeling file
    legacy.mkdir()
    (legacy / "modeling_moe.py").write_text("# partial")
    assert last_complete_checkpoint(out) == out / "checkpoint-1"
    latest = resolve_resume("latest", str(out))
    assert latest == str(out / "checkpoint-1")
    monkeypatch.undo()
    resumed = _trainer(out, max_steps=2)
    resumed.train(resume_from_checkpoint=latest)
    assert resumed.state.global_step == 2 and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / ".partial-checkpoint-2").exists(), "the next save removes the killed run's staging folder"
