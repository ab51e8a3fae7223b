"""`python -m eval`: the evaluation harness (see `eval.run`)."""

from .run import main

if __name__ == "__main__":
    main()
