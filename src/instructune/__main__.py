"""`python -m instructune` runs the command line."""

from instructune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
