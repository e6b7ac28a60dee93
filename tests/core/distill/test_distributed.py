"""Several ranks on CPU (gloo), launched by torch.distributed.run as `distill train` and the worker do.

The same global batch on 2 ranks gives the one-rank losses, gradient norms and evaluations (to 1e-5) under
DDP and FSDP; a stop on 2 ranks checkpoints, and the resume reproduces the uninterrupted run; a rank that
dies makes the launcher exit non-zero. Run as a script, this file is one rank (see `_rank_main`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
# Per step: losses and gradient norm. The weights after 4 AdamW steps differ by at most `WEIGHT_ATOL`: the
# ranks' partial sums round differently (~1e-7), and Adam's m/√v turns that into ~1e-6 of the update.
COMPARED = ("loss", "kd_loss", "ce_loss", "grad_norm", "lr", "response_tokens")
WEIGHT_ATOL = 1e-5


# ------------------------------------------------------------------------------------ one rank's main
def _rank_main(argv: list[str]) -> int:
    """One rank: train the spec, rank 0 writes what its callbacks saw to `--out`/record.json."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    torch.set_num_threads(1)
    from core.distill import trainer
    from core.distill.spec import JobSpec
    from tests.core.distill._trainer_utils import Recorder

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at", type=int, default=None, help="rank 1 kills itself in this step")
    args = parser.parse_args(argv)
    if args.die_at is not None and os.environ["RANK"] == "1":
        step = trainer._train_step

        def dying_step(run: Any, number: int) -> dict[str, float]:
            if number == args.die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(run, number)

        trainer._train_step = dying_step
    spec = JobSpec.model_validate_json(args.spec.read_text(encoding="utf-8"))
    recorder = Recorder(stop_after=args.stop_after)
    resume_from = trainer.latest_checkpoint(args.out) if args.resume else None
    result = trainer.train(
        spec, output_dir=args.out, callbacks=recorder, resume_from=resume_from, device="cpu"
    )
    if os.environ["RANK"] == "0":
        record = {
            "steps": recorder.steps,
            "evals": [[step, metrics] for step, metrics, _ in recorder.evals],
            "checkpoints": [step for step, _ in recorder.checkpoints],
            "started": recorder.started,
            "result": {"step": result.step, "stopped": result.stopped},
        }
        (args.out / "record.json").write_text(json.dumps(record), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))


# ------------------------------------------------------------------------------------------ harness
from core.distill.spec import JobSpec  # noqa: E402
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset  # noqa: E402


def launch(spec: JobSpec, out: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """Run `ranks` ranks of this file under torch.distributed.run, as `distill train` launches them."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [__file__, "--spec", str(spec_path), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def record_of(process: subprocess.CompletedProcess[str], out: Path) -> dict[str, Any]:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    record = json.loads((out / "record.json").read_text(encoding="utf-8"))
    record["steps"] = {int(step): metrics for step, metrics in record["steps"].items()}
    return record


def assert_same_steps(steps: dict[int, dict[str, float]], reference: dict[int, dict[str, float]]) -> None:
    for step, metrics in steps.items():
        for key in COMPARED:
            assert metrics[key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)


def load_weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.fixture(scope="module")
def spec(tmp_path_factory, dolly_train_path, dolly_test_path, tiny_teacher_dir, tiny_student_dir) -> JobSpec:
    """4 steps of 2 micro-batches of 4 (10 examples: the data order crosses an epoch), an evaluation and a
    checkpoint at steps 2 and 4."""
    root = tmp_path_factory.mktemp("distributed-data")
    train_path = write_subset(dolly_train_path, root / "train.jsonl", 10)
    eval_path = write_subset(dolly_test_path, root / "eval.jsonl", 3)
    return tiny_spec(
        tiny_teacher_dir,
        tiny_student_dir,
        train_path,
        eval_path,
        training={"max_steps": 4, "batch_size": 4, "grad_accum": 2, "eval_every": 2, "checkpoint_every": 2},
    )


@pytest.fixture(scope="module")
def one_rank(spec, tmp_path_factory) -> tuple[Recorder, Path]:
    """The reference: the same spec on one rank, in this process."""
    from core.distill.trainer import train

    out = tmp_path_factory.mktemp("one-rank")
    recorder = Recorder()
    train(spec, output_dir=out, callbacks=recorder, device="cpu")
    return recorder, out


def with_resources(spec: JobSpec, **resources: Any) -> JobSpec:
    return JobSpec.model_validate(spec.model_dump() | {"resources": resources})


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_rank_run(spec, one_rank, tmp_path, strategy):
    reference, reference_dir = one_rank
    out = tmp_path / strategy
    record = record_of(launch(with_resources(spec, devices=2, strategy=strategy), out), out)

    assert sorted(record["steps"]) == [1, 2, 3, 4]
    assert_same_steps(record["steps"], reference.steps)
    assert [step for step, _ in record["evals"]] == [step for step, _, _ in reference.evals] == [0, 2, 4]
    for (_, metrics), (_, expected, _) in zip(record["evals"], reference.evals, strict=True):
        for key in ("eval_kd_loss", "eval_ce_loss", "eval_rouge_l"):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert record["checkpoints"] == [2, 4]
    final, expected = load_weights(out / "student"), load_weights(reference_dir / "student")
    assert final.keys() == expected.keys()
    for name, tensor in final.items():
        assert (tensor - expected[name]).abs().max() <= WEIGHT_ATOL, name

    from core.distill.checkpoint import SHARDED_DIR, verify_checkpoint

    checkpoint = out / "checkpoints" / "step-00000004"
    assert verify_checkpoint(checkpoint) is None
    shards = sorted(p.name for p in (checkpoint / SHARDED_DIR).glob("*")) if strategy == "fsdp" else []
    assert shards == ([".metadata", "__0_0.distcp", "__1_0.distcp"] if strategy == "fsdp" else [])


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_stop_on_two_ranks_resumes_into_the_uninterrupted_run(spec, one_rank, tmp_path, strategy):
    """Rank 0 asks to stop after step 1: every rank stops, a checkpoint of step 1 is written (under FSDP
    with every rank's optimizer shards), and 2 ranks resuming from it run steps 2..4 of the one-rank run."""
    reference, _ = one_rank
    two = with_resources(spec, devices=2, strategy=strategy)
    out = tmp_path / "run"
    stopped = record_of(launch(two, out, "--stop-after", "1"), out)
    assert stopped["result"] == {"step": 1, "stopped": True}
    assert stopped["checkpoints"] == [1]

    resumed = record_of(launch(two, out, "--resume"), out)
    assert resumed["started"] == [[4, 1]]
    assert sorted(resumed["steps"]) == [2, 3, 4]
    assert_same_steps(resumed["steps"], reference.steps)
    assert [step for step, _ in resumed["evals"]] == [2, 4]
    assert resumed["result"] == {"step": 4, "stopped": False}


def test_a_rank_that_dies_fails_the_launch(spec, tmp_path):
    """Rank 1 is killed in step 2 while rank 0 waits for it: the launcher ends rank 0 and exits non-zero
    (what the worker's supervisor sees as a crashed attempt), instead of hanging."""
    out = tmp_path / "run"
    process = launch(with_resources(spec, devices=2), out, "--die-at", "2")
    assert process.returncode != 0
    assert "SIGKILL" in process.stderr or "Signal 9" in process.stderr, process.stderr[-3000:]
    assert not (out / "record.json").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_metadata_is_read_without_running_code(tmp_path):
    """The DCP metadata pickle is read with DCP's classes only; a pickle that names any other callable
    (here os.system) is refused before it runs."""
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from core.distill.distributed import SafeFileSystemReader

    state = {"state": {"w": {"exp_avg": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3.0)}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "shards"), no_dist=True)
    loaded = {"state": {"w": {"exp_avg": torch.zeros(2, 3), "step": torch.tensor(0.0)}}}
    dcp.load(loaded, storage_reader=SafeFileSystemReader(tmp_path / "shards"), no_dist=True)
    assert torch.equal(loaded["state"]["w"]["exp_avg"], state["state"]["w"]["exp_avg"])
    assert float(loaded["state"]["w"]["step"]) == 3.0

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "shards" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not allowed"):
        SafeFileSystemReader(tmp_path / "shards").read_metadata()
    assert not (tmp_path / "pwned").exists()


def test_distill_train_launches_the_ranks_and_writes_the_one_rank_metrics(spec, one_rank, tmp_path):
    """`distill train` with resources.devices: 2 runs itself in 2 ranks under torch.distributed.run; its
    metrics.jsonl (rank 0's alone) holds the one-rank run's steps and evaluations."""
    reference, _ = one_rank
    config = tmp_path / "two.yaml"
    config.write_text(with_resources(spec, devices=2).model_dump_json(), encoding="utf-8")  # JSON is YAML
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli.main", "train", str(config), "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [*command, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert process.returncode == 0, process.stderr[-6000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4]  # once each: no other rank wrote to the file
    assert_same_steps(steps, reference.steps)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert (out / "student" / "config.json").is_file()
    assert "done at step 4" in process.stdout


# ------------------------------------------------------------------------------------------- worker
def _rank_pids(job_id: str) -> dict[str, int]:
    """RANK → pid of the trainer processes of `job_id` that torch.distributed.run started."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.trainer_process" in cmdline and job_id.encode() in cmdline:
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                found[env[b"RANK"].decode()] = int(proc.name)
    return found


@pytest.mark.slow
def test_the_worker_trains_a_two_device_job_and_resumes_it_after_a_rank_dies(tmp_path, tiny_teacher_dir):
    """The supervisor launches 2 ranks; rank 1 is killed after the checkpoint of step 3: the attempt ends
    as a crash and the job is re-queued; the next attempt resumes from step 3 on 2 ranks and succeeds,
    with each step's metrics recorded once."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.jobs.models import Job, Metric
    from tests.support.services import make_settings, seed_job, sqlite_database, wait_for
    from tests.support.services import tiny_spec as service_spec
    from worker import supervisor

    settings = make_settings(
        tmp_path, database_url=sqlite_database(tmp_path / "db"), model_roots=[tiny_teacher_dir.parent]
    )
    spec = service_spec(tiny_teacher_dir, "placeholder", max_steps=8, checkpoint_every=3)
    job_id = seed_job(settings, spec | {"resources": {"devices": 2, "strategy": "ddp"}})
    checkpoint = tmp_path / "artifacts" / "jobs"

    def kill_rank_one() -> None:
        wait_for(
            lambda: any(checkpoint.glob(f"**/{job_id}/checkpoints/step-00000003")), timeout=240, what="step 3"
        )
        os.kill(_rank_pids(job_id)["1"], signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    assert supervisor.run_job(job_id, settings, "w1") == "requeued"
    killer.join()
    assert supervisor.run_job(job_id, settings, "w2") == "succeeded"
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status.value == "succeeded" and job.current_step == 8
        counts = session.execute(
            select(Metric.step, func.count())
            .where(Metric.job_id == job_id, Metric.name == "loss")
            .group_by(Metric.step)
        ).all()
    assert sorted(counts) == [(step, 1) for step in range(1, 9)]
    assert _rank_pids(job_id) == {}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_on_policy_generation_runs_on_two_ranks(spec, tmp_path, strategy):
    """Each rank samples the responses of its slice of the prompts (under FSDP, transformers' generate keeps
    the ranks in step until every rank's sequences have ended), then evaluates."""
    on_policy = JobSpec.model_validate(
        spec.model_dump()
        | {
            "strategy": {"name": "on_policy", "max_new_tokens": 6},
            "training": spec.training.model_dump() | {"max_steps": 2, "checkpoint_every": 0},
            "resources": {"devices": 2, "strategy": strategy},
        }
    )
    out = tmp_path / "run"
    record = record_of(launch(on_policy, out), out)
    assert sorted(record["steps"]) == [1, 2]
    for metrics in record["steps"].values():
        assert metrics["on_policy"] == 1.0
        assert metrics["loss"] == pytest.approx(metrics["loss"])  # finite, not NaN
        assert metrics["response_tokens"] > 0
    assert [step for step, _ in record["evals"]] == [0, 2]
    assert (out / "student" / "config.json").is_file()


# ----------------------------------------------------------------------------------- spec, commands
def test_resources_are_strict_and_split_the_batch_evenly(spec):
    from pydantic import ValidationError

    assert spec.resources.devices == 1 and spec.resources.strategy == "ddp"
    for bad in ({"devices": True}, {"devices": "2"}, {"devices": 2.0}, {"devices": 0}, {"devices": 65}):
        with pytest.raises(ValidationError, match="resources.devices"):
            with_resources(spec, **bad)
    with pytest.raises(ValidationError, match="strategy"):
        with_resources(spec, devices=2, strategy="zero3")
    with pytest.raises(
        ValidationError, match=r"training\.batch_size \(4\) must be a multiple of the 3 ranks"
    ):
        with_resources(spec, devices=3)
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        with_resources(spec, devices=2, nnodes=2)
    assert with_resources(spec, devices=2, nnodes=2, rdzv_endpoint="node0:29500").resources.world_size == 4


def test_the_worker_launches_one_rank_per_device(spec):
    from worker.supervisor import JobSetupError, _trainer_command

    assert _trainer_command(spec) == [sys.executable, "-m", "worker.trainer_process"]
    assert _trainer_command(with_resources(spec, devices=4, strategy="fsdp")) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "worker.trainer_process",
    ]
    two_machines = with_resources(spec, devices=2, nnodes=2, rdzv_endpoint="node0:29500")
    with pytest.raises(JobSetupError, match="nnodes"):
        _trainer_command(two_machines)
