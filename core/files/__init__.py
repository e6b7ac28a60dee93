"""Uploaded JSONL files: validated on upload, stored under the artifact root, referenced by jobs by id."""
