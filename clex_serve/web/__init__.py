"""The Gradio chat demo (``pip install 'clex-serve[web]'``): mounted on the API server by ``clex-serve --ui``,
or standalone against any OpenAI-compatible server (``clex-serve web --url``)."""

INSTALL_HINT = "the web UI needs Gradio: pip install 'clex-serve[web]'"
