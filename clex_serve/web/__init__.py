"""The Gradio chat demo (``pip install 'clex-serve[web]'``): mounted on the API server by ``clex-serve --ui``,
or standalone against any OpenAI-compatible server (``clex-serve web --url``)."""

import os

INSTALL_HINT = "the web UI needs Gradio: pip install 'clex-serve[web]'"

# Offline by default: no usage reports from Gradio (set before anything imports it).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
