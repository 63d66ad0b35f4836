"""Ray Serve's default policy (power of two choices), unchanged, plus what the ingress needs of any router:
the replicas it routes to are listed for ``/metrics``, and a request pinned to one replica goes there.

For comparison (``router=ray``); Ray has no public path for its default router class, hence the private
import.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from clex_serve.deploy.router import forwarded_request, pinned_replicas


class RayDefaultRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        from clex_serve.deploy import live_routers  # at run time: see live_routers

        live_routers.ROUTERS[self._deployment_id.name] = self

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pinned = pinned_replicas(candidate_replicas, forwarded_request(pending_request))
        if pinned:
            return [pinned]
        return await super().choose_replicas(candidate_replicas, pending_request)
