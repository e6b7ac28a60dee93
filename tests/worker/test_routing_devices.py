"""How many devices a worker counts (worker/routing.py) and which Range headers the download serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.routers.outputs import byte_range
from core.config import Settings
from worker.routing import worker_devices


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, None),
        ("0", 1),
        ("0,1", 2),
        (" 2, 3 ,", 2),
        ("", 0),
        ("-1", 0),
        ("0,-1,2", 1),
        ("GPU-a1b2,GPU-c3", 2),
    ],
)
def test_devices_follow_cuda_visible_devices(
    tmp_path: Path, visible: str | None, expected: int | None
) -> None:
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert worker_devices(Settings(home=tmp_path), environ) == expected


def test_an_explicit_device_count_wins(tmp_path: Path) -> None:
    assert worker_devices(Settings(home=tmp_path, worker_devices=4), {"CUDA_VISIBLE_DEVICES": "0"}) == 4


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-1000", (0, 99)),
        ("bytes=90-1000", (90, 99)),
        ("BYTES = 5 - 6", (5, 6)),
        ("bytes=100-", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=9-3", None),  # malformed: ignored, the whole file
        ("bytes=0-1,5-6", None),  # several spans: the whole file
        ("items=0-1", None),
        ("bytes=-", None),
        ("bytes=١-٢", None),  # non-ASCII digits
        ("bytes=" + "9" * 30 + "-", None),
    ],
)
def test_byte_ranges(header: str, expected: object) -> None:
    assert byte_range(header, 100) == expected
