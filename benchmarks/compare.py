"""Regression check: flag the rows of a new ``results.json`` that are slower than in an earlier run by more
than the noise of the two runs (see ``vit_fast.bench.compare_results``).

    python benchmarks/compare.py NEW/results.json [OLD/results.json]

OLD defaults to the newest run committed under ``benchmarks/results/`` on the same device. Exit status 1 when
a row is flagged, 0 otherwise (also when there is nothing to compare with), 2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from readme_table import newest_results

from vit_fast.bench import compare_results, format_comparison
from vit_fast.bench.analysis import read_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", help="results.json of the new run")
    parser.add_argument("old", nargs="?", default=None, help="results.json of the earlier run")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--min-rel", type=float, default=0.02, help="smallest slowdown flagged (default 0.02)")
    args = parser.parse_args(argv)
    try:
        return _compare(args)
    except (OSError, ValueError) as e:  # a results file that is missing, torn or of another shape: one line
        print(f"compare: error: {e}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace) -> int:
    new = read_results(args.new)
    if args.old is None:
        dev = new["environment"]["device"]
        found = newest_results(args.results_dir, device_type=dev["type"], device_name=dev["name"], exclude=args.new)
        if found is None:
            print(f"regression check: no earlier committed run on {dev['name']} under {args.results_dir}")
            return 0
        old_path, old = found
    else:
        old_path = args.old
        old = read_results(old_path)
    print(f"comparing {args.new} with {old_path}")
    cmp = compare_results(old, new, min_rel=args.min_rel)
    print(format_comparison(cmp))
    return 1 if cmp["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
