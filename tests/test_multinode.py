"""A 2-node run rehearsed on one machine: two `torchrun --nnodes 2 --nproc-per-node 2` launchers, as two
nodes would start them (c10d rendezvous on 127.0.0.1, gloo), train tests.multinode_worker's tiny DiT on 4
ranks, checkpoint, are SIGKILLed (each launcher's process group and its ranks, as when both nodes die)
inside step 5, after step 4's checkpoint, and resumed by two new launchers. The resumed run ends bit for
bit where an uninterrupted one does (loss history, whole weights and EMA), under FSDP (a flat mesh of 4
ranks) and HSDP (2 nodes x 2 ranks: sharded within a node, replicated across the two).

Three launches of the two launchers in all (each costs about a start of 6 Python processes):
    1. straight:fsdp straight:hsdp hold:hsdp  -> killed while held
    2. resume:hsdp hold:fsdp                  -> killed while held
    3. resume:fsdp
Every subprocess is bounded by a timeout and killed, with its ranks, when the test ends, however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_trainer import assert_same_state

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "GLOO_SOCKET_IFNAME": "lo",
       "TUTORIAL_LIB_DIST_TIMEOUT_MINUTES": "2"}  # a rank that hangs fails the launch within minutes
LAUNCH_SECONDS = 240  # one launch of the two launchers, at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc): torchrun starts each rank in a session of its own."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # it ended meanwhile
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class Launch:
    """The two launchers of one launch; `kill()` SIGKILLs their process groups and every rank under them."""

    def __init__(self, root: Path, jobs: list[str], name: str):
        port, self.logs, self.procs = free_port(), [], []
        for node in (0, 1):
            log = root / f"{name}-node{node}.log"
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                       "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                       "--rdzv-id", name, "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
                       "--max-restarts", "0", "-m", "tests.multinode_worker", str(root), *jobs]
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            self.logs.append(log)

    def output(self) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in self.logs)

    def wait(self, until=None, seconds: float = LAUNCH_SECONDS):
        """Until both launchers exit (then both must succeed), or until `until()` holds while they run."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and until():
                return
            codes = [p.poll() for p in self.procs]
            if until is None and None not in codes:
                assert codes == [0, 0], f"the launchers exited with {codes}:\n{self.output()}"
                return
            if until is not None and any(c is not None for c in codes):
                pytest.fail(f"a launcher exited ({codes}) before it was killed:\n{self.output()}")
            time.sleep(0.2)
        pytest.fail(f"the launch did not finish in {seconds} s:\n{self.output()}")

    def kill(self):
        for proc in self.procs:
            ranks = descendants(proc.pid)  # before the launcher dies and its ranks are re-parented
            for pid in [proc.pid, *ranks]:
                try:
                    os.killpg(pid, signal.SIGKILL)  # a launcher's group, each rank's own session
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.procs:
            proc.wait(timeout=30)


def held(folder: Path) -> bool:
    """Every rank waits inside step 5, after step 4's checkpoint was published."""
    latest = folder / "checkpoints" / "latest"
    return (latest.is_file() and latest.read_text() == "step_00000004\n"
            and all((folder / f"held-rank{r}").is_file() for r in range(4)))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    launches = []
    try:
        for name, jobs, hold in (("first", ["straight:fsdp", "straight:hsdp", "hold:hsdp"], "hsdp"),
                                 ("second", ["resume:hsdp", "hold:fsdp"], "fsdp"),
                                 ("third", ["resume:fsdp"], None)):
            launch = Launch(root, jobs, name)
            launches.append(launch)
            if hold:
                launch.wait(until=lambda: held(root / f"resumed-{hold}"))
                launch.kill()
                assert all(p.returncode == -signal.SIGKILL for p in launch.procs)
            else:
                launch.wait()
    finally:
        for launch in launches:
            launch.kill()
    return root


@pytest.mark.parametrize("parallelism", ["fsdp", "hsdp"])
def test_killed_launchers_resume_bit_exactly(rehearsal, parallelism):
    straight, resumed = (rehearsal / f"{kind}-{parallelism}" for kind in ("straight", "resumed"))
    a, b = (json.loads((folder / "result.json").read_text()) for folder in (straight, resumed))
    assert (a["world_size"], a["local_world_size"]) == (4, 2)  # 2 nodes x 2 ranks
    assert b["resumed_from"] == "step_00000004" and a["resumed_from"] is None
    assert [r["step"] for r in b["history"]] == list(range(1, 7)) and b["history"] == a["history"]
    assert_same_state(load_file(resumed / "final.safetensors"), load_file(straight / "final.safetensors"))
    assert len({r["loss"] for r in a["history"]}) == 6  # it trains


def test_hsdp_trains_as_fsdp_does(rehearsal):
    """Same data, same RNG streams, the gradients reduced in another order (within each node, then across):
    measured, the 6 losses within 7.1e-8 (relative) and the weights within 1.2e-5 (AdamW scales up gradients
    near 0) of FSDP's."""
    histories = [json.loads((rehearsal / f"straight-{p}" / "result.json").read_text())["history"]
                 for p in ("fsdp", "hsdp")]
    assert [r["loss"] for r in histories[0]] == pytest.approx([r["loss"] for r in histories[1]], rel=1e-6)
    fsdp, hsdp = (load_file(rehearsal / f"straight-{p}" / "final.safetensors") for p in ("fsdp", "hsdp"))
    assert max((fsdp[k] - hsdp[k]).abs().max().item() for k in fsdp) < 1e-4
