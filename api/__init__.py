"""Headwater: a replicated, partitioned, durable event log.

The public Python API: ``Producer``, ``Consumer`` and ``Admin`` talk to nodes over gRPC; every error
they raise is a ``HeadwaterError``. Importing ``headwater`` loads the client and the generated
contract only, never the node or its storage.
"""

from headwater.client import *  # noqa: F403 - the client's curated surface is the package's
from headwater.client import __all__ as _client_all

__version__ = "0.1.0"

__all__ = [*_client_all, "__version__"]
