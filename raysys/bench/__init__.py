"""`raysys bench`: each stage against a bare PyTorch loop (or a serial run) on the same work,
one module per benchmark, shared timing and machine facts in `common`."""

BENCH_FILE = "bench.json"  # every benchmark writes its result here, in its --out directory
