"""`python -m autoregembed_fast.demo ...`: the whole pipeline on SmolLM2-135M, offline
(`autoregembed_fast.method.demo`)."""

from autoregembed_fast.method.demo import main

if __name__ == "__main__":
    main()
