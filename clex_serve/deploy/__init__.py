"""clex-serve on Ray Serve: engine replicas behind an ingress, routed on the prefix each replica can reuse at
the CLEX scale a prompt will run at (``clex_serve.deploy.ray:build_app``, ``clex-serve --ray-replicas N``).

Everything here but ``prefix_tree`` and ``routing_hint`` imports Ray (``pip install 'clex-serve[ray]'``).
"""
