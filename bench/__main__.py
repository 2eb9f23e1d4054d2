"""`python -m bench`: the op benchmark (see bench/op.py for the options)."""

from bench import op

op.main()
