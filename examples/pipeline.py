"""A pipeline step on the Python SDK alone: upload data, create a job with metadata (and an MLflow target when
asked), watch it, download and verify the student, load it with transformers, and say where it was registered.

    make serve                                           # in another terminal
    .venv/bin/distill tiny-model models/tiny-teacher     # a tiny random teacher under the model roots
    .venv/bin/python examples/pipeline.py --teacher tiny-teacher

The API's address and key: --api-url / --api-key, else DISTILL_API_URL / DISTILL_API_KEY, else the
development key `make serve` keeps in .distill/dev-api-key. Exits 0 when every step worked, 1 when the job
failed or the student did not verify, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from distillery import Distillery, DistilleryError, Event, Job

REPO = Path(__file__).resolve().parents[1]
# The prompt format the student learns from instruction records (Alpaca's, as in the AMiD paper).
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", default=os.environ.get("DISTILL_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("DISTILL_API_KEY"))
    parser.add_argument("--teacher", required=True, help="A model under the server's DISTILL_MODEL_ROOTS.")
    parser.add_argument("--student-layers", type=int, nargs="+", default=[0, 2], help="Teacher layers kept.")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "dolly" / "train.jsonl")
    parser.add_argument("--records", type=int, default=64, help="Train on the first N records of --data.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs") / "pipeline", help="Where students go.")
    parser.add_argument("--prompt", default="Give three tips for staying healthy.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds to wait for the job.")
    parser.add_argument(
        "--mlflow-register-as",
        default=None,
        help="Register the student in the service's MLflow as this model.",
    )
    parser.add_argument("--mlflow-experiment", default=None, help="Default: the service's (distillery).")
    return parser.parse_args(argv)


def api_key(given: str | None) -> str | None:
    if given:
        return given
    dev_key = Path(os.environ.get("DISTILL_HOME", ".distill")) / "dev-api-key"
    return dev_key.read_text(encoding="utf-8").strip() if dev_key.is_file() else None


def first_records(source: Path, count: int, folder: Path) -> Path:
    """The first `count` lines of `source` in a file of their own."""
    target = folder / f"{source.stem}-first-{count}.jsonl"
    with source.open(encoding="utf-8") as lines, target.open("w", encoding="utf-8") as out:
        for number, line in enumerate(lines):
            if number == count:
                break
            out.write(line)
    return target


def job_spec(args: argparse.Namespace, train_file: str) -> dict:
    spec: dict = {
        "teacher": {"model": args.teacher},
        "student": {"from_teacher_layers": args.student_layers},
        "data": {"train": train_file, "max_length": 128, "max_prompt_length": 64},
        "loss": {"name": "amid", "alpha": 0.5, "lam": 0.1},
        "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 5e-4, "eval_every": 0},
    }
    if args.mlflow_register_as:
        # The MLflow server is the service's (DISTILL_MLFLOW_TRACKING_URI); a job names only these.
        mlflow = {"register_as": args.mlflow_register_as}
        if args.mlflow_experiment:
            mlflow["experiment"] = args.mlflow_experiment
        spec["tracking"] = {"mlflow": mlflow}
    return spec


def show(event: Event) -> None:
    print(f"  [{event.kind}] {event.message}", flush=True)


def verify(student: Path, job: Job, train_sha256: str) -> str | None:
    """What is wrong with the downloaded student's own record of its job, or None."""
    record_path = student / "distillery.json"
    if not record_path.is_file():
        return "the student carries no distillery.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("job_id") != job.id:
        return f"distillery.json names job {record.get('job_id')!r}, not {job.id}"
    trained_on = (record.get("data_files") or {}).get("train", {}).get("sha256")
    if trained_on != train_sha256:
        return f"distillery.json's training data has SHA-256 {trained_on}, the upload {train_sha256}"
    if not (student / "README.md").is_file():
        return "the student carries no model card (README.md)"
    return None


def generate(student: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    inputs = tokenizer(PROMPT.format(instruction=prompt), return_tensors="pt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def registration(client: Distillery, job: Job) -> str:
    """Where the student was registered, from the job's `tracking` events (MLflow)."""
    tracking = [event for event in client.jobs.events(job.id) if event.kind == "tracking"]
    for event in tracking:
        data = event.data or {}
        if "registered_model" in data:
            name, version, run = data["registered_model"], data.get("version"), data.get("mlflow_run_id")
            return f"in the service's MLflow registry as {name!r} version {version} (run {run})"
    if tracking:
        return f"not registered; MLflow's last word: {tracking[-1].message}"
    return "not registered (the job had no MLflow target)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = api_key(args.api_key)
    if not key:
        print("no API key: pass --api-key, set DISTILL_API_KEY, or run `make serve` here", file=sys.stderr)
        return 2
    with Distillery(args.api_url, key) as client, tempfile.TemporaryDirectory() as scratch:
        try:
            upload = client.files.upload(first_records(args.data, args.records, Path(scratch)))
            print(
                f"uploaded {upload.filename}: {upload.id}, {upload.records} records, sha256 {upload.sha256}"
            )
            job = client.jobs.create(job_spec(args, upload.id), metadata={"pipeline": "example"})
            print(f"created {job.id} (metadata {job.metadata}); watching its events:")
            job = client.jobs.wait(job.id, on_event=show, timeout=args.timeout)
            if job.status != "succeeded":
                error = f": {job.error.code}: {job.error.message}" if job.error else ""
                print(f"job {job.id} {job.status}{error}", file=sys.stderr)
                return 1
            loss = job.latest_metrics.get("loss")
            print(f"job {job.id} succeeded at step {job.progress.step}; final loss {loss:.4f}")

            student = client.jobs.download_student(job.id, args.out / job.id)  # verifies its SHA-256
            problem = verify(student, job, upload.sha256)
            if problem is not None:
                print(f"the downloaded student does not verify: {problem}", file=sys.stderr)
                return 1
            print(f"downloaded the student to {student}: SHA-256 verified, distillery.json names {job.id} "
                  "and the uploaded data")  # fmt: skip

            print(f"generated for {args.prompt!r}: {generate(student, args.prompt)!r}")
            print(f"registered: {registration(client, job)}")
        except DistilleryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
