"""service: the BentoML HTTP service for snodevit models.

Serve::

    python -m service.demo                      # a model in the store (trains one if there is none)
    bentoml serve service.service:SNodeViTService --host 127.0.0.1 --port 3000

Modules: ``service.service`` (the BentoML service; reads ``SNODEVIT_*`` when it starts), ``engine`` (what the
endpoints do, without BentoML), ``batching`` (requests share forward passes), ``guard`` and ``errors`` (request
checks before BentoML parses a body, one error shape), ``schemas`` (pydantic answers), ``settings``,
``heatmap``, ``metrics``, ``demo`` and ``testing`` (a tiny model in a throwaway store for the three test tiers).
"""

from .batching import MicroBatcher
from .engine import Engine, Params
from .errors import ServiceError
from .settings import ServiceSettings

__all__ = ["Engine", "MicroBatcher", "Params", "ServiceError", "ServiceSettings"]
