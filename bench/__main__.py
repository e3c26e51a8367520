"""Command line: ``python -m bench [--section NAME]... [--list] [--quick]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import framework


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--section", action="append", metavar="NAME",
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list sections and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (CI / smoke runs)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"results dir (default ${framework.RESULTS_ENV} or bench/results)")
    args = parser.parse_args(argv)

    available = framework.section_names()
    if args.list:
        for name in available:
            summary = (framework.describe(name).splitlines() or [""])[0]
            print(f"{name:20} {summary}")
        return 0
    names = list(dict.fromkeys(args.section or available))
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"bench: unknown section(s): {', '.join(unknown)} "
              f"(available: {', '.join(available) or 'none'})", file=sys.stderr)
        return 2
    return framework.run_sections(names, quick=args.quick, results=args.results)


if __name__ == "__main__":
    sys.exit(main())
