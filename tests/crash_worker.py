"""A training process that kills itself (SIGKILL) at a chosen moment of a checkpoint write.

    python -m tests.crash_worker OUT_DIR STAGE STEP

trains tests.test_trainer's tiny DiT with a checkpoint after every step and, while writing the
checkpoint of step STEP, dies at STAGE:
    model_half    model.safetensors half written (a torn file in the temporary directory)
    before_rename every file written and flushed, the directory not yet renamed into place
    before_latest the checkpoint renamed into place, `latest` still naming the previous one
    latest_half   the new `latest` half written into its temporary file
test_fault_tolerance.py resumes what is left and compares it with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from tests.test_trainer import TINY_DIT, config, diffusion_loss, latent_data
from tutorial_lib.models.dit import DiT
from tutorial_lib.train import checkpoint as checkpoint_module
from tutorial_lib.train.trainer import Trainer

STAGES = ("model_half", "before_rename", "before_latest", "latest_half")
RUN = dict(steps=8, batch_size=8, ema_decay=0.9, log_every=3, checkpoint_every=1, keep_checkpoints=3)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def build(out_dir: Path) -> Trainer:
    torch.manual_seed(0)
    return Trainer(DiT(TINY_DIT), diffusion_loss, latent_data(), config(out_dir, **RUN))


def install(trainer: Trainer, stage: str, step: int):
    """Patch the checkpoint module's file operations so that the process dies at `stage` of step `step`."""
    module = checkpoint_module
    save_file, publish, atomic_write = module.save_file, module.publish, module.atomic_write
    now = lambda: trainer.step == step  # noqa: E731

    def torn_save(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if now() and stage == "model_half" and Path(filename).name == "model.safetensors":
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            die()

    def dying_publish(tmp, path, *args, **kwargs):
        if now() and stage == "before_rename":
            die()
        return publish(tmp, path, *args, **kwargs)

    def dying_atomic_write(path, write):
        if now() and Path(path).name == "latest":
            if stage == "before_latest":
                die()
            if stage == "latest_half":
                def half(tmp):
                    write(tmp)
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                    die()
                return atomic_write(path, half)
        return atomic_write(path, write)

    module.save_file, module.publish, module.atomic_write = torn_save, dying_publish, dying_atomic_write


def main(out_dir: str, stage: str, step: str):
    torch.set_num_threads(1)  # the same float reductions as the test process
    trainer = build(Path(out_dir))
    install(trainer, stage, int(step))
    trainer.fit()


if __name__ == "__main__":
    main(*sys.argv[1:])
