"""`python -m autoregembed_fast.evaluate ...`: embedding evaluation (`autoregembed_fast.method.evaluate`)."""

from autoregembed_fast.method.evaluate import main

if __name__ == "__main__":
    main()
