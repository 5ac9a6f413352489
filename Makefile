# Shortcuts for the two README commands and friends.
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

test-fast:
	bash scripts/test.sh -m "not e2e"
