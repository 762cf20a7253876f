"""One rank of a 2-node run rehearsed on one machine, started by torchrun (tests/test_multinode.py):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT ... \
        -m tests.multinode_worker ROOT JOB [JOB ...]

runs each JOB in turn, JOB = MODE:PARALLELISM (fsdp or hsdp), training tests.test_trainer's tiny DiT for 6
steps on the 4 ranks (2 micro-batches a step, the gradient sync skipped on the first), with a checkpoint every
2 steps:
    straight  from step 0 to the end, in ROOT/straight-PARALLELISM
    hold      from step 0 in ROOT/resumed-PARALLELISM, then inside step 5 (after step 4's checkpoint) every
              rank writes ROOT/resumed-PARALLELISM/held-rankR and waits to be killed (at most HOLD_SECONDS)
    resume    continues ROOT/resumed-PARALLELISM from its newest checkpoint to the end
A finished run's rank 0 writes final.safetensors (the whole weights, "model.*", and EMA, "ema.*") and
result.json (the history, the checkpoint it resumed from) into its folder. The process group is destroyed
at the end, also on error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.test_trainer import TINY_DIT, config, diffusion_loss, latent_data
from tutorial_lib.models.dit import DiT
from tutorial_lib.train import distributed
from tutorial_lib.train.trainer import Trainer

HOLD_SECONDS = 120  # a held rank that nobody kills gives up: no orphan outlives the test for long
RUN = dict(steps=6, batch_size=8, grad_accum_steps=2, ema_decay=0.9, log_every=1, checkpoint_every=2,
           keep_checkpoints=None)  # 2 micro-batches of 1 per rank: the gradient sync skipped on the first


def run(root: Path, mode: str, parallelism: str):
    out = root / f"{'straight' if mode == 'straight' else 'resumed'}-{parallelism}"
    torch.manual_seed(0)
    model = DiT(TINY_DIT)
    trainer = None

    def loss_fn(net, batch, generator):
        if mode == "hold" and trainer.step == 4:  # inside step 5, after step 4's checkpoint
            (out / f"held-rank{trainer.dist.rank}").write_text("")
            time.sleep(HOLD_SECONDS)
            raise TimeoutError(f"rank {trainer.dist.rank} was held {HOLD_SECONDS} s and not killed")
        return diffusion_loss(net, batch, generator)

    trainer = Trainer(model, loss_fn, latent_data(), config(out, parallelism=parallelism, **RUN))
    resumed_from = trainer.load_checkpoint().name if mode == "resume" else None
    history = trainer.fit()
    weights = distributed.full_state_dict(trainer.model)  # collectives: every rank takes part
    ema = trainer.export_ema()
    if trainer.dist.is_main:
        save_file({**{f"model.{k}": v for k, v in weights.items()},
                   **{f"ema.{k}": v for k, v in ema.state_dict().items()}}, out / "final.safetensors")
        (out / "result.json").write_text(json.dumps({"history": history, "resumed_from": resumed_from,
                                                     "world_size": trainer.dist.world_size,
                                                     "local_world_size": trainer.dist.local_world_size}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    with distributed.process_group():  # the Trainers join it; every rank leaves it together at the end
        for job in sys.argv[2:]:
            run(Path(sys.argv[1]), *job.split(":"))
