"""Regenerate the README's benchmark results section from the newest GPU run committed under
``benchmarks/results/`` (the table is never typed by hand).

    python benchmarks/readme_table.py           # rewrite README.md between the bench:results markers
    python benchmarks/readme_table.py --check   # exit 1 when README.md is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vit_fast.bench import atomic_write, readme_table, update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        old = f.read()
    new = update_readme(old, readme_table(args.results_dir, os.path.dirname(os.path.abspath(args.readme))))
    if args.check:
        if new != old:
            print(f"{args.readme}: the results section is out of date; run python benchmarks/readme_table.py")
            return 1
        print(f"{args.readme}: the results section is up to date")
        return 0
    if new != old:
        atomic_write(args.readme, new)
    print(f"{args.readme}: results section {'rewritten' if new != old else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
