"""`error_code`: a full disk or quota is `storage_full` however it surfaces; other OS errors are not."""

from __future__ import annotations

import errno

import pytest

from core.distill.checkpoint import StorageFullError
from worker.trainer_process import error_code


def _chained() -> BaseException:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from exc
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        StorageFullError("the checkpoint of step 6"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })'),
        _chained(),
    ],
    ids=["named", "enospc", "edquot", "safetensors-wording", "chained"],
)
def test_a_full_disk_is_storage_full(exc: BaseException) -> None:
    assert error_code(exc, started=True) == "storage_full"
    assert error_code(exc, started=False) == "storage_full"


def test_the_named_error_says_what_was_being_written_and_what_to_do() -> None:
    exc = StorageFullError("the checkpoint of step 6")
    assert str(exc) == (
        "the artifact storage is full while writing the checkpoint of step 6: free space or raise the quota"
    )
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def test_other_os_errors_are_not_storage_full() -> None:
    assert error_code(OSError(errno.EACCES, "Permission denied"), started=True) == "training_error"
