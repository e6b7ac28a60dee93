"""`distill train`, `distill eval` and `distill tiny-model`: the engine on this machine, without the service.

    distill train CONFIG.yaml [--output-dir runs/NAME] [--resume] [--device cpu]
        (a spec with resources.devices > 1 re-runs this command in that many ranks under torch.distributed.run)
    distill eval --model DIR --data data/dolly/test.jsonl [--max-records N] [--do-sample --seeds 1 2 3]

Heavy imports (torch, transformers) happen inside the handlers so that `distill --help` and the service's
subcommands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from core.distill.callbacks import TrainerCallbacks

if TYPE_CHECKING:
    from core.distill.spec import JobSpec
    from core.distill.trainer import TrainResult

EXIT_ERROR = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `eval` subcommands."""
    train = subparsers.add_parser("train", help="Distill locally from a YAML job spec.")
    train.add_argument("config", type=Path, help="YAML file holding a JobSpec.")
    train.add_argument("--output-dir", type=Path, default=None, help="Default: runs/<config name>.")
    train.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint.")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    train.set_defaults(handler=run_train)

    ev = subparsers.add_parser("eval", help="ROUGE-L of a model's responses on a JSONL data set.")
    ev.add_argument("--model", required=True, help="Model directory (or GGUF directory with --gguf-file).")
    ev.add_argument("--data", required=True, type=Path, help="JSONL records with reference responses.")
    ev.add_argument("--gguf-file", default=None)
    ev.add_argument("--format", default="instruction", choices=["instruction", "chat", "text"])
    ev.add_argument("--max-records", type=int, default=None, help="Evaluate the first N records.")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--max-prompt-length", type=int, default=256)
    ev.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seeds", type=int, nargs="+", default=[0], help="Sampling seeds; scores are averaged.")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default=None)
    ev.set_defaults(handler=run_eval)

    tiny = subparsers.add_parser(
        "tiny-model", help="Write a tiny random Llama model + tokenizer (for trying the service out)."
    )
    tiny.add_argument("out_dir", type=Path, help="Directory to create, e.g. models/tiny-teacher.")
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--hidden-size", type=int, default=48)
    tiny.add_argument("--seed", type=int, default=1)
    tiny.set_defaults(handler=run_tiny_model)


def run_tiny_model(args: argparse.Namespace) -> int:
    from core.distill.tiny import make_tiny_model

    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(f"{args.out_dir} exists and is not empty; choose another directory", file=sys.stderr)
        return EXIT_USAGE
    path = make_tiny_model(
        args.out_dir, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, seed=args.seed
    )
    print(f"wrote a random {args.layers}-layer Llama model (hidden {args.hidden_size}) to {path}")
    return 0


def _print_validation_error(source: Path, error: Any, out: TextIO) -> None:
    print(f"{source}: invalid job spec", file=out)
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        print(f"  {where}: {item['msg']}", file=out)


class LocalCallbacks(TrainerCallbacks):
    """A tqdm progress bar, messages on stderr, and `metrics.jsonl` (one JSON object per step or eval)."""

    def __init__(self, metrics_path: Path, *, append: bool):
        self._metrics = metrics_path.open("a" if append else "w", encoding="utf-8")
        self._bar: Any = None

    def _write(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def on_start(self, *, total_steps: int, start_step: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps, initial=start_step, desc="distill", unit="step", dynamic_ncols=True
        )

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "step", "step": step, **metrics})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self._write({"kind": "eval", "step": step, **metrics, "samples": samples})
        self._say(
            f"eval step {step}: rouge-l {metrics['eval_rouge_l']:.2f}, kd {metrics['eval_kd_loss']:.4f}, "
            f"ce {metrics['eval_ce_loss']:.4f}"
        )

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self._say(f"checkpoint: {path}")

    def on_event(self, kind: str, message: str) -> None:
        self._say(f"[{kind}] {message}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._metrics.close()


def _launch_ranks(args: argparse.Namespace, spec: JobSpec, output_dir: Path) -> int:
    """Run this same command in `spec.resources.devices` ranks under torch.distributed.run (one machine:
    standalone; several: the c10d rendezvous at `rdzv_endpoint`, this command run on each machine)."""
    resources = spec.resources
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={resources.devices}"]
    if resources.nnodes == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={resources.nnodes}", "--rdzv-backend=c10d"]
        command += [f"--rdzv-endpoint={resources.rdzv_endpoint}", f"--rdzv-id=distill-{args.config.stem}"]
    command += ["-m", "cli.main", "train", str(args.config), "--output-dir", str(output_dir)]
    command += ["--resume"] if args.resume else []
    command += ["--device", args.device] if args.device else []
    return subprocess.run(command, check=False).returncode


def run_train(args: argparse.Namespace) -> int:
    """Handler of `distill train`."""
    import yaml
    from pydantic import ValidationError

    from core.distill.spec import JobSpec

    try:
        spec = JobSpec.from_yaml(args.config)
    except ValidationError as exc:
        _print_validation_error(args.config, exc, sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from core.distill.data import DataError
    from core.distill.models import TokenizerMismatchError
    from core.distill.trainer import TrainingError, latest_checkpoint, train

    output_dir = args.output_dir or Path("runs") / args.config.stem
    # Set in the ranks torchrun started: the launching command has checked and said everything already.
    rank = os.environ.get("RANK")
    resume_from = latest_checkpoint(output_dir) if args.resume else None
    if args.resume and resume_from is None and rank is None:
        print(f"{output_dir}: no checkpoint to resume from; starting from scratch", file=sys.stderr)
    elif not args.resume and latest_checkpoint(output_dir) is not None:
        print(
            f"{output_dir} already holds checkpoints: pass --resume or another --output-dir", file=sys.stderr
        )
        return EXIT_USAGE
    if spec.resources.world_size > 1 and rank is None:
        return _launch_ranks(args, spec, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Only rank 0 writes metrics.jsonl (and the student, and the card); the other ranks just train.
    callbacks: Any = TrainerCallbacks()
    if rank in (None, "0"):
        callbacks = LocalCallbacks(output_dir / "metrics.jsonl", append=resume_from is not None)
    try:
        result = train(
            spec, output_dir=output_dir, callbacks=callbacks, resume_from=resume_from, device=args.device
        )
    except (TrainingError, TokenizerMismatchError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if isinstance(callbacks, LocalCallbacks):
            callbacks.close()
    if rank not in (None, "0"):
        return 0
    _write_card(spec, result)
    summary = {
        k: round(v, 4) for k, v in result.metrics.items() if k in ("loss", "eval_rouge_l", "eval_kd_loss")
    }
    print(f"done at step {result.step}: {summary}; student in {result.student_dir}")
    return 0


def _write_card(spec: JobSpec, result: TrainResult) -> None:
    """The student's model card and distillery.json (no job id; the data files hashed here)."""
    from core.distill.model_card import local_data_file, teacher_license, write_student_card

    if result.student_dir is None:  # stopped before max_steps: no student to describe
        return
    data_files = {
        field: local_data_file(path)
        for field in ("train", "eval")
        if (path := getattr(spec.data, field)) is not None
    }
    write_student_card(
        result.student_dir,
        spec,
        job_id=None,
        data_files=data_files,
        steps=result.step,
        metrics=result.metrics,
        teacher_license=teacher_license(spec.teacher.model),
    )


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `distill eval`."""
    import torch

    from core.distill.data import DataError, DistillDataset, load_records
    from core.distill.evaluation import GenerationSettings, rouge_l_of_model
    from core.distill.models import load_causal_lm, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        records = load_records(args.data, args.format).records
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.max_records is not None:
        records = records[: args.max_records]
    tokenizer = load_tokenizer(args.model, args.gguf_file)
    model = load_causal_lm(args.model, args.gguf_file, dtype=torch.float32, device=device).eval()
    # Only the prompt and the reference text matter here; the length limit just has to keep the prompt.
    examples = DistillDataset(
        records,
        tokenizer,
        args.format,
        max_length=args.max_prompt_length + args.max_new_tokens + 1,
        max_prompt_length=args.max_prompt_length,
    ).examples
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
    )
    seeds = args.seeds if args.do_sample else args.seeds[:1]
    score, _ = rouge_l_of_model(model, tokenizer, examples, settings, seeds=seeds)
    mode = (
        f"sampled (T={args.temperature}, top-p={args.top_p}, seeds {seeds})" if args.do_sample else "greedy"
    )
    print(f"ROUGE-L: {score:.2f}  ({len(examples)} records, {mode})")
    return 0
