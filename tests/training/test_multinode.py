"""Multi-node torchrun on one machine: two "nodes" (two torchrun agents, ``--nnodes 2 --nproc-per-node 1``, a c10d
rendezvous on loopback) train one run on CPU/gloo, the way two GPU machines would with NCCL.

One module-scoped tiny dataset (40 US studies, 24 train / 8 val) and MLflow store; three torchrun jobs:

- two nodes x one process (`medxfer train` through the module entry point): the reference;
- one node x two processes: the same world size, ranks and data order, so the same weights;
- two nodes, one worker SIGKILLed mid-epoch, ``--max-restarts 1``: torchrun restarts the group, which continues
  the same MLflow run from the last checkpoint and ends on the reference's weights.

Each node is pinned to its own core (`sched_setaffinity`), as a real machine has its own: unpinned, the two
"nodes" each ran two threads on the 2 shared cores and an epoch took 4.9 s instead of 0.1 s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import make_dicom2d_dataset
from medxfer.core.workspace import Workspace
from medxfer.training import checkpoint as C

REPO = Path(__file__).resolve().parents[2]
KILL = Path(__file__).with_name("kill_train.py")
# 24 train studies over 2 ranks at batch 8: 2 steps per rank and epoch, so "after step 1" is mid-epoch.
# Random init at 32 px as in test_stage (ImageNet weights pool to all-zero features there).
RECIPE = [
    "epochs=2",
    "stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: all}]",
    "data.size=[32, 32]",
    "data.batch_size=8",
    "weights=none",
    "data.cache=memory",
]
# An all-reduce over two ranks adds two numbers per element (commutative in IEEE arithmetic) and every process runs
# one intra-op thread in both layouts, so the weights come out bit-identical (measured: max |diff| 0.0). The
# tolerance only leaves room for a BLAS that splits a GEMM differently; a different thread count (2 per process
# against 1) already moved the weights by 1.3e-3, which this would catch.
ATOL = 1e-6
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins each node to a core: Linux only")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    mp = pytest.MonkeyPatch()
    mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("multinode") / "d2")
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    yield ds
    mp.undo()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(
    ds, args: list[str], nnodes: int, nproc: int, max_restarts: int = 0, env: dict[str, str] | None = None
) -> tuple[dict, str]:
    """Run one torchrun job of `nnodes` agents x `nproc` workers; (rank 0's JSON summary, all agents' stderr)."""
    port, job = _free_port(), uuid.uuid4().hex[:8]  # own rdzv id: the job id keys the run a restart continues
    cpus = sorted(os.sched_getaffinity(0))
    # a fresh rendezvous store per attempt: with torch's shared one a restarted worker can read the dead attempt's
    # addresses (medxfer.training.distributed.stale_store_on_restart)
    full = {**os.environ, "MEDXFER_SYSTEM_METRICS": "0", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    full.pop("MEDXFER_PSEUDONYM_KEY", None)
    logs = Path(ds.workspace).parent / f"torchrun-{job}"
    logs.mkdir()
    procs = []
    for node in range(nnodes):
        # one core per node process; the one-node job gets two, so every worker runs one thread either way
        pin = {cpus[node % len(cpus)]} if nnodes > 1 else set(cpus[:2])
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            f"--node-rank={node}",  # ignored by c10d (it orders the nodes itself), given as a real launch would
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={job}",
            f"--max-restarts={max_restarts}",
            *args,
        ]
        out, err = (logs / f"node{node}.out").open("w"), (logs / f"node{node}.err").open("w")
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=full, stdout=out, stderr=err, preexec_fn=lambda p=pin: os.sched_setaffinity(0, p)
            )
        )
    codes = [p.wait(timeout=300) for p in procs]
    stderr = "\n".join((logs / f"node{n}.err").read_text() for n in range(nnodes))
    assert codes == [0] * nnodes, "\n".join((logs / f"node{n}.err").read_text()[-3000:] for n in range(nnodes))
    lines = [ln for n in range(nnodes) for ln in (logs / f"node{n}.out").read_text().splitlines() if ln.strip()]
    summaries = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert len(summaries) == 1, lines  # rank 0 alone reports
    return summaries[0], stderr


def _train(ds, nnodes: int, nproc: int) -> tuple[dict, str]:
    cli = ["-m", "medxfer", "train", str(ds.spec_path), "--workspace", str(ds.workspace), "--json"]
    return _torchrun(ds, [*cli, *[a for r in RECIPE for a in ("--set", r)]], nnodes, nproc)


def _client(ds):
    from mlflow.tracking import MlflowClient

    return MlflowClient(Workspace.for_spec(ds.workspace, ds.spec.name).tracking_uri)


def _run_ids(ds) -> set[str]:
    client = _client(ds)
    exp = client.get_experiment_by_name(ds.spec.name)
    return {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()


def _check_one_run(ds, summary: dict, before: set[str]) -> None:
    """The job made exactly one MLflow run, FINISHED, every metric step logged once."""
    assert _run_ids(ds) - before == {summary["run_id"]}
    client = _client(ds)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["run.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)


def _last(ds, summary: dict) -> dict:
    return C.load(Workspace.for_spec(ds.workspace, ds.spec.name).run_dir(summary["run_id"]) / C.LAST)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def two_nodes(prepared):
    before = _run_ids(prepared)
    summary, _ = _train(prepared, nnodes=2, nproc=1)
    _check_one_run(prepared, summary, before)
    return summary


def test_two_nodes_train_one_run_equal_to_two_processes_on_one_node(prepared, two_nodes) -> None:
    ds = prepared
    before = _run_ids(ds)
    one_node, _ = _train(ds, nnodes=1, nproc=2)
    _check_one_run(ds, one_node, before)
    assert one_node["world_size"] == two_nodes["world_size"] == 2
    a, b = _last(ds, two_nodes), _last(ds, one_node)
    assert _max_diff(a["model"], b["model"]) <= ATOL
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k in ("train_loss", "val_loss", "val_auroc", "val_balanced_accuracy"):
            assert ha[k] == pytest.approx(hb[k], abs=ATOL), k


def test_elastic_restart_after_a_worker_dies_mid_epoch_resumes_the_same_run(prepared, two_nodes, tmp_path) -> None:
    ds = prepared
    before = _run_ids(ds)
    once = tmp_path / "killed"
    # rank 1 (the second node's only worker, which does not track) dies after step 1 of epoch 2: mid-epoch, one
    # checkpoint (epoch 1) on disk; torchrun restarts both nodes' workers once
    env = {"KILL_TRAIN_RANK": "1", "KILL_TRAIN_STEP": "1", "KILL_TRAIN_ONCE": str(once)}
    args = [str(KILL), "2", str(ds.spec_path), str(ds.workspace), *RECIPE]
    summary, stderr = _torchrun(ds, args, nnodes=2, nproc=1, max_restarts=1, env=env)
    assert once.exists(), "no worker was killed"
    assert "torchrun restart 1: continuing run" in stderr, stderr[-3000:]
    assert summary["main"]["resumed_from_epoch"] == 2
    _check_one_run(ds, summary, before)
    a, b = _last(ds, two_nodes), _last(ds, summary)
    assert _max_diff(a["model"], b["model"]) <= ATOL
    assert a["best"]["val"] == pytest.approx(b["best"]["val"], abs=ATOL)
