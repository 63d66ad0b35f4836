"""The routers of this process by deployment name, for the ingress to list the replicas (its /metrics).

A module of its own, imported when used: Ray ships a router's module by value, with copies of its globals,
so state shared with the ingress cannot live there.
"""

ROUTERS: dict = {}
