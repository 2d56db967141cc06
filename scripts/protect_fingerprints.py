"""Fingerprint what `mmguard protect` writes, to check that a code change kept every
method's output byte-identical.

    python scripts/protect_fingerprints.py OUT_DIR [--only NAME,NAME]
    python scripts/protect_fingerprints.py OUT_DIR --compare BEFORE_DIR/fingerprints.json

Runs each command below (every method and MMGuard's variants, on a few digits images
with tiny models; about 2.5 minutes on 2 cores) and writes OUT_DIR/fingerprints.json:
per command, the SHA-256 of every output file and the run record's per-item entries.
Run it on the old code and the new, then compare (exit code 1 if anything differs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

PAIRS = ["--dataset", "digits", "--kind", "pairs", "--limit", "24", "--quiet", "--seed", "3"]
TRIPLES = ["--dataset", "digits", "--kind", "triples", "--limit", "6", "--quiet", "--seed", "3",
           "--surrogate", "lvlm-test", "--rounds", "1", "--pgd-steps", "2", "--top-k", "3",
           "--batch-size", "3", "--method", "mmguard"]
CLIP = ["--surrogate", "rn-test", "--batch-size", "8"]
COMMANDS = {
    "random": [*PAIRS, "--method", "random"],
    "em": [*PAIRS, "--method", "em", *CLIP, "--rounds", "2", "--pgd-steps", "2",
           "--train-steps", "2"],
    "uap": [*PAIRS, "--method", "uap", *CLIP, "--clean-epochs", "1", "--pgd-steps", "2"],
    "mem3": [*PAIRS, "--method", "mem", *CLIP, "--rounds", "2", "--pgd-steps", "2",
             "--top-k", "4", "--trigger-len", "3"],
    "mem-nat": [*PAIRS, "--method", "mem", *CLIP, "--rounds", "1", "--pgd-steps", "1",
                "--top-k", "4", "--natural-triggers", "--surrogate-bn", "batch"],
    "mmg-bph": TRIPLES,
    "mmg-crs": [*TRIPLES, "--binding", "crs"],
    "mmg-none-img": [*TRIPLES, "--binding", "none", "--components", "image"],
    "mmg-text": [*TRIPLES, "--components", "text", "--trigger-position", "start"],
    "mmg-groups-bilevel": [*TRIPLES, "--noise-groups", "response", "--trigger-groups",
                           "response", "--bilevel"],
}
ITEM_FIELDS = ("key", "file", "trigger", "linf_levels", "psnr_db")


def fingerprint(out: Path) -> dict:
    files = {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(out.rglob("*"))
             if path.is_file() and ".mmguard" not in path.parts and path.name != "mmguard-run.json"}
    record = json.loads((out / "mmguard-run.json").read_text())
    return {"files": files,
            "items": [{k: item.get(k) for k in ITEM_FIELDS} for item in record["items"]]}


def run(out_dir: Path, names: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        out = out_dir / name
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "mmguard", "protect", *COMMANDS[name],
                               "--out", str(out)], capture_output=True, text=True)
        results[name] = ({"error": done.stderr[-2000:]} if done.returncode
                         else fingerprint(out))
        print(name, "failed" if done.returncode else "ok", flush=True)
    (out_dir / "fingerprints.json").write_text(json.dumps(results, indent=1))
    return results


def compare(before: dict, after: dict) -> bool:
    same = True
    for name, new in after.items():
        old = before.get(name)
        if old is None or "error" in old or "error" in new:
            print(f"{name:20s} not comparable")
            same = False
            continue
        files, items = old["files"] == new["files"], old["items"] == new["items"]
        print(f"{name:20s} files identical: {files}, items identical: {items}")
        same = same and files and items
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", default=",".join(COMMANDS))
    parser.add_argument("--compare", type=Path, default=None,
                        help="fingerprints.json of an earlier run to compare with")
    args = parser.parse_args()
    after = run(args.out_dir, args.only.split(","))
    if args.compare:
        sys.exit(0 if compare(json.loads(args.compare.read_text()), after) else 1)


if __name__ == "__main__":
    main()
