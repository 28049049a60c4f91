"""Summarise a folder of text files into a JSONL file, resumably, with a progress bar.

    python examples/batch_summarise.py FOLDER OUTPUT.jsonl [--model smollm2]

Run it again after a crash: documents already in OUTPUT.jsonl are skipped.
"""

import argparse
import json
import tempfile
from pathlib import Path

from unillm import Engine
from unillm.jobs import run_job

TEMPLATE = "Summarise this document in one sentence.\n\n$text\n"


def folder_to_jsonl(folder: Path, dest: Path) -> int:
    files = sorted(folder.glob("*.txt"))
    with open(dest, "w", encoding="utf-8") as f:
        for p in files:
            f.write(json.dumps({"id": p.name, "text": p.read_text(encoding="utf-8")}) + "\n")
    return len(files)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    if not args.folder.is_dir():
        ap.error(f"{args.folder} is not a folder")
    if not any(args.folder.glob("*.txt")):
        ap.error(f"{args.folder} has no .txt file to summarise")
    with tempfile.TemporaryDirectory() as tmp:
        records, template = Path(tmp) / "docs.jsonl", Path(tmp) / "template.txt"
        n = folder_to_jsonl(args.folder, records)
        template.write_text(TEMPLATE)
        with Engine() as engine:
            summary = run_job(engine, records, args.output, args.model, template=template, max_tokens=64, temperature=0.0)
    print(f"{n} files -> {args.output}: {summary}")
