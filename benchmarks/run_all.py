"""Run every `benchmarks/bench_*.py` in turn; each prints its table and writes JSON under --out.

Each benchmark module exposes ``main(argv: list[str] | None = None) -> int`` and accepts
``--out DIR``. A failing benchmark is reported and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results")
    parser.add_argument("--only", nargs="*", default=None, help="names like bench_store")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )
    if args.only:
        names = [n for n in names if n in args.only]
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            rc = importlib.import_module(f"benchmarks.{name}").main(["--out", args.out])
        except Exception as err:  # keep going: one broken benchmark must not hide the others
            print(f"{name} failed: {err!r}", flush=True)
            rc = 1
        print(f"=== {name}: rc={rc} in {time.perf_counter() - start:.1f} s ===", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
