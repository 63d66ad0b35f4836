"""The web demo, standalone: ``python web/app.py --url http://127.0.0.1:8000/v1``.

The code lives in ``clex_serve.web`` so that ``clex-serve --ui`` and ``clex-serve web`` work after a plain
``pip install 'clex-serve[web]'``; this file is the source checkout's entry point.
"""

import sys

from clex_serve.web.main import main

if __name__ == "__main__":
    sys.exit(main(prog="web/app.py"))
