# The two commands of the README. Both set everything up first (idempotent, quick when done).
.PHONY: setup demo test lint bench clean

setup:
	./scripts/setup.sh

demo: setup
	./scripts/run_demo.sh

test: setup
	./scripts/run_tests.sh

lint: setup
	. ./env.sh && ruff check .

# CPU benchmarks of this machine (GPU ones: see docs/benchmarks.md); not part of the tests.
bench: setup
	. ./env.sh && python bench/bench_geometry.py && python bench/bench_decoder.py --device cpu

clean:
	rm -rf .ros build install log .pytest_cache
