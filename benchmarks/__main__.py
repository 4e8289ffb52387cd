"""``python -m benchmarks``: the benchmark suite (same options as ``fastvl bench``)."""

from .suite import main

if __name__ == "__main__":
    raise SystemExit(main())
