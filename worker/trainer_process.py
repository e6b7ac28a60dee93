"""`python -m worker.trainer_process JOB_ID --spec PATH --worker-id ID`: one training attempt of a job.

Started by `worker.supervisor` in its own process; reports progress to the database through
`worker.progress.DatabaseCallbacks` (and to MLflow through `worker.tracking` when the job asks for it),
resumes from the job's last checkpoint, and leaves `result.json`
(exit 0) or `error.json` with a code and a message (exit 3) in the job directory (`worker.job_files`); when
the disk or the quota is full, so that neither can be written, it exits 4 (the supervisor's storage_full).

A job on several devices runs this module in every rank under torch.distributed.run: rank 0 does all of
the above; the other ranks only train their share (`_run_other_rank`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path

from sqlalchemy import select

from core.config import Settings
from core.db import get_sessionmaker
from core.distill.data_formats import DataError
from core.distill.model_checks import ModelReferenceError, TokenizerMismatchError
from core.distill.spec import JobSpec
from core.jobs.models import Job
from core.storage import Storage, open_storage
from worker import process as process_control
from worker.job_files import EXIT_STORAGE_FULL, EXIT_TRAINING_FAILED, JobFiles, is_disk_full
from worker.progress import DatabaseCallbacks
from worker.student_card import write_job_student_card
from worker.tracking import EVENT_KIND, Fanout, open_tracker

# Another rank died: no error.json, so the supervisor sees a crashed attempt (retried from its checkpoint).
EXIT_RANK_LOST = 1


# ---------------------------------------------------------------------------------------- error codes
def error_code(exc: BaseException, *, started: bool) -> str:
    """The stable code a failed job reports for `exc` (see the API's error documentation)."""
    from core.distill.checkpoint import is_storage_full
    from core.distill.trainer import TrainingError

    if is_storage_full(exc):
        # `StorageFullError` names what was being written; a bare ENOSPC from elsewhere is still this.
        return "storage_full"
    if isinstance(exc, DataError):
        return "invalid_data"
    if isinstance(exc, TokenizerMismatchError):
        return "tokenizer_mismatch"
    if isinstance(exc, ModelReferenceError):
        return "model_load_failed"
    if isinstance(exc, TrainingError):
        return "non_finite_loss" if "non-finite" in str(exc) else "training_error"
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out_of_memory"
    if not started and _raised_in(exc, ("core/distill/models.py", "/transformers/", "/safetensors/")):
        return "model_load_failed"
    return "training_error"


def _lost_a_rank(exc: BaseException) -> bool:
    """A collective failed because another rank of the job died (killed, out of memory): the attempt
    crashed (the supervisor retries it from its checkpoint); the job's training did not fail."""
    if "RANK" not in os.environ:
        return False
    import torch.distributed

    peer_gone = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    return isinstance(exc, torch.distributed.DistError) or any(text in str(exc) for text in peer_gone)


def _raised_in(exc: BaseException, markers: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if any(marker in filename for marker in markers):
            return True
        tb = tb.tb_next
    return False


def public_message(message: str, *, spec: JobSpec, file_ids: dict[str, str], storage: Storage) -> str:
    """`message` with the worker's file paths replaced by what the user knows: the uploaded file ids."""
    for field, file_id in file_ids.items():
        path = getattr(spec.data, field, None)
        if path and path != file_id:
            message = message.replace(path, f"file {file_id}")
    return message.replace(f"{storage.root}{os.sep}", "")


def _file_ids(database_url: str, job_id: str) -> dict[str, str]:
    """The job's data fields as the user gave them (file ids), from the stored spec."""
    with get_sessionmaker(database_url)() as session:
        stored = session.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    data = stored.get("data") or {}
    return {field: data[field] for field in ("train", "eval") if isinstance(data.get(field), str)}


# ------------------------------------------------------------------------------------------------ main
def _run_other_rank(
    args: argparse.Namespace, settings: Settings, storage: Storage, spec: JobSpec, files: JobFiles
) -> int:
    """A rank other than 0: trains its share of every step. Rank 0 chooses the checkpoint to resume from,
    reports, saves and pushes; an error is written to error.json by whichever rank meets it first."""
    from core.distill.trainer import train

    if settings.trainer_threads:
        import torch

        torch.set_num_threads(settings.trainer_threads)
    try:
        train(spec, output_dir=files.root, device=args.device)
    except Exception as exc:
        traceback.print_exc()
        if _lost_a_rank(exc):
            return EXIT_RANK_LOST
        try:
            file_ids = _file_ids(settings.database_url, args.job_id)
        except Exception:
            file_ids = {}
        message = str(exc).strip() or type(exc).__name__
        message = public_message(message, spec=spec, file_ids=file_ids, storage=storage)
        # Started or not is unknown here (only rank 0 hears on_start): no guess of a model load failure.
        files.write_error(code=error_code(exc, started=True), message=message)
        return EXIT_TRAINING_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.trainer_process")
    parser.add_argument("job_id")
    parser.add_argument("--spec", required=True, type=Path, help="The spec with file ids resolved to paths.")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    args = parser.parse_args(argv)

    settings = Settings()
    storage = open_storage(settings)  # object storage: output_dir is this machine's scratch copy
    output_dir = storage.job_dir(args.job_id)
    files = JobFiles(output_dir)
    spec = files.read_spec(args.spec)
    if "RANK" in os.environ:  # a rank of torch.distributed.run, in a session of its own
        launcher = os.getppid()
        process_control.set_parent_death_signal()  # never outlive the launcher (killed with the job)
        if os.getppid() != launcher:
            return EXIT_TRAINING_FAILED
        if os.environ["RANK"] != "0":
            return _run_other_rank(args, settings, storage, spec, files)
    callbacks = DatabaseCallbacks(
        database_url=settings.database_url,
        storage=storage,
        job_id=args.job_id,
        worker_id=args.worker_id,
        checkpoint_every=spec.training.checkpoint_every,
    )
    tracker = open_tracker(
        settings=settings,
        spec=spec,
        job_id=args.job_id,
        job_dir=output_dir,
        report=lambda message, data: callbacks.flush(event=(EVENT_KIND, message, data)),
    )
    trainer_callbacks = callbacks if tracker is None else Fanout(callbacks, tracker)
    try:
        from core.distill.layout import checkpoint_step, checkpoints_dir
        from core.distill.trainer import latest_checkpoint, train

        if settings.trainer_threads:
            import torch

            # Fewer threads than cores when the API shares the machine: OpenMP threads that lose their
            # core to another process stall each other at every barrier.
            torch.set_num_threads(settings.trainer_threads)
        # Object storage: the checkpoints earlier attempts (maybe on other machines) pushed.
        storage.pull(storage.relative(checkpoints_dir(output_dir)))
        resume_from = latest_checkpoint(output_dir)
        if resume_from is not None:
            callbacks.on_resume(checkpoint_step(resume_from), resume_from)
        result = train(
            spec,
            output_dir=output_dir,
            callbacks=trainer_callbacks,
            resume_from=resume_from,
            device=args.device,
        )
        if result.student_dir is not None:
            write_job_student_card(
                settings=settings,
                job_id=args.job_id,
                trained_spec=spec,
                student_dir=result.student_dir,
                steps=result.step,
                metrics=result.metrics,
            )
            storage.push(storage.relative(result.student_dir))  # before the job can succeed
        if tracker is not None:
            tracker.finish(student_dir=result.student_dir)  # MLflow errors become an event, never raise
        callbacks.flush()
    except Exception as exc:
        with contextlib.suppress(OSError):  # the log lies on the job's disk, maybe the full one
            traceback.print_exc()
        if _lost_a_rank(exc):
            with contextlib.suppress(Exception):
                callbacks.flush()  # the steps before the loss are complete
            return EXIT_RANK_LOST
        code = error_code(exc, started=callbacks.started)
        message = str(exc).strip() or type(exc).__name__
        try:
            file_ids = _file_ids(settings.database_url, args.job_id)
        except Exception:
            file_ids = {}
        message = public_message(message, spec=spec, file_ids=file_ids, storage=storage)
        status = EXIT_TRAINING_FAILED
        try:
            files.write_error(code=code, message=message)
        except OSError as write_failed:
            if not is_disk_full(write_failed):
                raise
            status = EXIT_STORAGE_FULL  # the supervisor reports storage_full without error.json
        try:
            if tracker is not None:
                tracker.fail()
            callbacks.flush()
        except Exception:
            traceback.print_exc()
        return status
    try:
        files.write_result(step=result.step, stopped=result.stopped)
    except OSError as write_failed:
        if not is_disk_full(write_failed):
            raise
        return EXIT_STORAGE_FULL
    return 0


if __name__ == "__main__":
    sys.exit(main())
