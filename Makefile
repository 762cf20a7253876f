# The README's two commands. Both set everything up first and can be run again.
.PHONY: demo test setup setup-dev notebooks

# Train the notebook-01 text-to-image model briefly, write a sample grid and its metrics.
demo: setup
	.venv/bin/python -m tutorial_lib demo

# The whole test suite: pytest, and every notebook under nbval in the smoke budget.
test: setup-dev
	TUTORIAL_BUDGET=smoke .venv/bin/python -m pytest tests notebooks --nbval-lax -q --durations=15

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

# Re-run every notebook in the default budget and save the outputs (what is committed).
notebooks: setup-dev
	.venv/bin/python scripts/notebook_headers.py
	cd notebooks && for nb in [0-9][0-9]*_*.ipynb; do \
	  TUTORIAL_BUDGET=default ../.venv/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; done
	.venv/bin/python scripts/notebook_headers.py
