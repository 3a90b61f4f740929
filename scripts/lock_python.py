#!/usr/bin/env python3
"""Writes scripts/locks/<env>.txt: every package the Python environments
handoff creates will install, each pinned to one version with the SHA-256 of
every wheel PyPI has for it on the platforms below, so `pip install
--require-hashes -r` installs exactly these files or nothing.

Run it after changing a top-level pin (the Rust constants next to each
environment; a test checks that the lock holds them):
    python3 scripts/lock_python.py            # all environments
    python3 scripts/lock_python.py quant      # one

pip resolves each platform without installing (`--dry-run --report`,
`--platform`, `--python-version`); a platform pip cannot resolve is left out
of the lock and named on stderr, and handoff then refuses to build that
environment there, saying so.
"""
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

ENVS = {
    "python-ort": [
        "onnxruntime==1.31.1",
        "numpy==2.4.6",
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "tokenizers==0.23.3",
    ],
    "python-torch": [
        "torch==2.15.0",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "tokenizers==0.23.3",
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
    ],
    "quant": ["onnxruntime==1.31.1", "onnx==1.20.1"],
}
PYTHONS = ["3.11", "3.12", "3.13"]
ARCHS = ["x86_64", "aarch64"]
# Every glibc-based tag a current Linux accepts: wheels name their minimum.
TAGS = ["manylinux2014"] + [f"manylinux_2_{v}" for v in range(5, 40)]


def norm(name):
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(packages, python, arch):
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
               "--ignore-installed", "--only-binary=:all:",
               "--python-version", python, "--target", os.path.join(tmp, "t"),
               "--report", report]
        for t in TAGS:
            cmd += ["--platform", f"{t}_{arch}"]
        out = subprocess.run(cmd + packages, capture_output=True, text=True)
        if out.returncode != 0:
            tail = " | ".join(out.stderr.strip().splitlines()[-2:])
            print(f"  cp{python.replace('.', '')}-{arch}: not resolved: {tail}", file=sys.stderr)
            return None
        return json.load(open(report))["install"]


def main():
    names = sys.argv[1:] or list(ENVS)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locks")
    os.makedirs(here, exist_ok=True)
    for env in names:
        packages = ENVS[env]
        print(f"{env}: {' '.join(packages)}", file=sys.stderr)
        pins = {}  # (name, version) -> {"hashes": set, "where": set}
        covered = []
        for python in PYTHONS:
            for arch in ARCHS:
                installs = resolve(packages, python, arch)
                if installs is None:
                    continue
                platform = (python, arch)
                covered.append(platform)
                for i in installs:
                    key = (norm(i["metadata"]["name"]), i["metadata"]["version"])
                    entry = pins.setdefault(key, {"hashes": set(), "where": set()})
                    entry["hashes"].add(i["download_info"]["archive_info"]["hashes"]["sha256"])
                    entry["where"].add(platform)
        if not covered:
            sys.exit(f"{env}: no platform resolved")
        lines = [
            f"# The `{env}` environment: every package, every wheel's SHA-256.",
            "# Written by scripts/lock_python.py; installed with pip --require-hashes.",
            f"# top-level: {' '.join(packages)}",
            "# platforms: " + " ".join(f"cp{p.replace('.', '')}-{a}" for p, a in covered),
        ]
        for (name, version), e in sorted(pins.items()):
            line = f"{name}=={version}"
            if e["where"] != set(covered):
                clauses = [f'(python_version == "{p}" and platform_machine == "{a}")'
                           for p, a in covered if (p, a) in e["where"]]
                line += " ; " + " or ".join(clauses)
            hashes = sorted(e["hashes"])
            lines.append(line + " \\")
            for k, h in enumerate(hashes):
                end = "" if k == len(hashes) - 1 else " \\"
                lines.append(f"    --hash=sha256:{h}{end}")
        path = os.path.join(here, f"{env}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"  wrote {path}: {len(pins)} packages, {len(covered)} platforms", file=sys.stderr)


if __name__ == "__main__":
    main()
