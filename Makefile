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

bench: setup
	. ./env.sh && python bench/run_all.py

clean:
	rm -rf .ros build install log .pytest_cache
