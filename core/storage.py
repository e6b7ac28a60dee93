"""Artifact storage on a local (or mounted, shared) filesystem.

Layout under the root: `files/<tenant>/<file id>.jsonl` for uploads, `jobs/<job id>/` as the trainer's
output directory (`checkpoints/step-XXXXXXXX/`, `student/`). The database stores paths relative to the
root so that the root can move (a volume mounted elsewhere in another container).
"""

from __future__ import annotations

from pathlib import Path


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def file_path(self, tenant_id: str, file_id: str) -> Path:
        return self.root / "files" / tenant_id / f"{file_id}.jsonl"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored relative path; refuses anything that escapes the root."""
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"storage path escapes the storage root: {relative!r}")
        return path
