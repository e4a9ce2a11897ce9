"""Regenerate the README's "Performance" section from ``bench/results/*.csv``.

    python bench/update_readme.py                 # rewrite README.md between its markers
    python bench/update_readme.py --stdout [CSV]  # print the section only (for given CSVs)
"""
import argparse
import glob
import os
import sys

from bharnet.bench.readme import render, update_readme
from bharnet.bench.report import read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", help="CSV files (default: every CSV in --results-dir)")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--plots-dir", default=os.path.join(ROOT, "bench", "plots"),
                        help="PNGs to link, named <device>_*.png by bharnet bench")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--stdout", action="store_true", help="print the section instead of writing the README")
    args = parser.parse_args()
    paths = args.csv or sorted(glob.glob(os.path.join(args.results_dir, "*.csv")))
    if not paths:
        print(f"update_readme: no CSV files in {args.results_dir}; run `bharnet bench` first", file=sys.stderr)
        return 2
    if args.stdout:
        print(render((row for path in sorted(paths) for row in read_csv(path)), args.plots_dir,
                     os.path.dirname(os.path.abspath(args.readme))))
        return 0
    update_readme(args.readme, paths, args.plots_dir)
    print(f"updated {args.readme} from {len(paths)} CSV file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
