"""``python -m clex_serve``: the ``clex-serve`` command, for environments without its script on PATH."""

from clex_serve.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
