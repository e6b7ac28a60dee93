"""`/v1/files`: JSONL uploads that jobs refer to by id."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile, status

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import FileDeleted, FileId, FileOut, Page, cursor_query
from core.files import service
from core.jobs import service as jobs_service

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=status.HTTP_201_CREATED)
def upload_file(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: UploadFile,
    purpose: Annotated[Literal["train", "eval"], Form()] = "train",
) -> FileOut:
    """Upload a JSONL file; every line is parsed and validated, invalid lines are reported by number."""
    row = service.store_upload(
        session=session,
        settings=settings,
        tenant_id=tenant.id,
        source=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    return FileOut.of(row)


@router.get("")
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A file id from `next_cursor`.")] = None,
) -> Page[FileOut]:
    """List the tenant's files, newest first."""
    rows, has_more = service.list_files(session=session, tenant_id=tenant.id, limit=limit, after=after)
    return Page(
        data=[FileOut.of(r) for r in rows], has_more=has_more, next_cursor=rows[-1].id if has_more else None
    )


@router.get("/{file_id}")
def get_file(session: SessionDep, tenant: TenantDep, file_id: FileId) -> FileOut:
    """Get one file's metadata."""
    return FileOut.of(
        service.get_file(session=session, tenant_id=tenant.id, file_id=file_id, param="file_id")
    )


@router.delete("/{file_id}")
def delete_file(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, file_id: FileId
) -> FileDeleted:
    """Delete a file; refused while an active job uses it."""
    jobs_service.delete_unused_file(session=session, settings=settings, tenant_id=tenant.id, file_id=file_id)
    return FileDeleted(id=file_id)
