"""Run benchmarks: ``python -m bench`` runs every ``bench/bench_*.py`` that defines
``main()``; ``python -m bench NAME [ARGS...]`` runs one (``NAME`` as in ``bench_NAME``)
and passes it the remaining arguments."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    names = []
    for path in sorted(here.glob("bench_*.py")):
        module = importlib.import_module(f"bench.{path.stem}")
        if callable(getattr(module, "main", None)):
            names.append(path.stem.removeprefix("bench_"))
    return names


def main(argv: list[str]) -> int:
    names = available()
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench [NAME [ARGS...]]   NAME: {', '.join(names)}")
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in names:
            print(f"bench: no benchmark {name!r} (have: {', '.join(names)})", file=sys.stderr)
            return 2
        return int(importlib.import_module(f"bench.bench_{name}").main(rest) or 0)
    status = 0
    for name in names:
        print(f"== {name}", flush=True)
        status = max(status, int(importlib.import_module(f"bench.bench_{name}").main([]) or 0))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
