"""Issue 26's battery: every bad command line of tests/bad_inputs.py run as a user runs it (a
process of its own, a fresh MLflow store and outputs folder each), its outcome counted by kind.

    python benchmarks/battery.py            # one line per case, then the counts
    python benchmarks/battery.py --json out.json
    python benchmarks/battery.py --checkout /tmp/main   # another checkout's train.py, same cases

Kinds, in the order they are decided: ``traceback`` (one on stderr), ``started anyway`` (exit
status 0), ``hydra`` (Hydra's own message: exit status 1, its HYDRA_FULL_ERROR hint), ``clear``
(exit status 2, one line on stderr holding the case's needles: the key, the value, what is
allowed), ``unclear`` (any other refusal). Left behind, per case: MLflow runs in its store, and
output folders (outputs/runs/<time>/, outputs/multirun/<time>/).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import CASES, Case  # noqa: E402

KINDS = ("clear", "hydra", "unclear", "traceback", "started anyway")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill(text: str, tmp: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(port))


def kind(case: Case, status: int, err: str, needles: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err:
        return "traceback"
    if status == 0:
        return "started anyway"
    if status == 1 and "HYDRA_FULL_ERROR" in err:
        return "hydra"
    if status == 2 and len(lines) == 1 and all(n in lines[0] for n in needles):
        return "clear"
    return "unclear"


def left_behind(tmp: Path) -> dict[str, int]:
    import sqlite3

    runs = 0
    db = tmp / "mlruns" / "mlflow.db"
    if db.is_file() and db.stat().st_size:
        with sqlite3.connect(db) as con:
            try:
                runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
            except sqlite3.OperationalError:
                runs = 0
    folders = [
        path
        for sub in ("runs", "multirun")
        for path in (tmp / "outputs" / sub).glob("*")
        if path.is_dir()
    ]
    return {"runs": runs, "folders": len(folders)}


def run_case(case: Case, cache: Path, checkout: Path) -> dict:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "mlruns").mkdir()
        port = closed_port()
        argv = [fill(arg, tmp, port) for arg in case.command()]
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlruns/mlflow.db",
            "PYTHONPATH": str(checkout / "src"),  # its package before the installed one
        }
        env.pop("HYDRA_FULL_ERROR", None)
        command = [
            sys.executable,
            str(checkout / "train.py"),
            *argv,
            f"paths.outputs={tmp}/outputs",
            f"paths.data_cache={cache}",
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600
            )
            status, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired as expired:
            status, err = -1, f"timeout: {expired.stderr}"
        seconds = time.perf_counter() - start
        needles = [fill(n, tmp, port) for n in case.needles]
        found = kind(case, status, err, needles)
        lines = [line for line in err.splitlines() if line.strip()]
        return {
            "case": ("sweep " if case.sweep else "run ") + case.id,
            "kind": found,
            "status": status,
            "seconds": round(seconds, 2),
            "last_line": lines[-1][:300] if lines else "",
            "stderr_lines": len(lines),
            **left_behind(tmp),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every case's outcome here")
    parser.add_argument("-k", default="", help="only the cases whose id holds this")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        help="the checkout whose train.py runs the cases (e.g. `git archive main` unpacked)",
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as cache:
        for case in CASES:
            if args.k not in case.id:
                continue
            result = run_case(case, Path(cache), args.checkout.resolve())
            results.append(result)
            print(
                f"{result['kind']:15} {result['status']:4} {result['seconds']:6.1f}s "
                f"runs={result['runs']} folders={result['folders']}  {result['case']}: "
                f"{result['last_line'][:160]}",
                flush=True,
            )
    counts = collections.Counter(result["kind"] for result in results)
    print(" / ".join(f"{kind} {counts[kind]}" for kind in KINDS), f"(of {len(results)})")
    print(
        f"left behind: {sum(r['runs'] for r in results)} MLflow runs, "
        f"{sum(r['folders'] for r in results)} output folders"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
