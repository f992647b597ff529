"""How every service process starts: parse its settings, run its main, and turn an error that
stops it from starting (a model directory that is not one, a tokenizer that does not load, an
address that cannot be bound) into one line on stderr and exit status 2 instead of a traceback.
With PRFAAS_LOG_LEVEL=DEBUG the traceback is printed too."""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from prfaas.engine.tokenizer import TokenizerError
from prfaas.errors import PrfaasError

S = TypeVar("S")

# what a bad setting surfaces as before the service serves
STARTUP_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TokenizerError, PrfaasError)


def setup_tls(name: str, settings: object) -> None:
    """The process's TLS configuration from its settings (prfaas/security/tls.py): a worker node is
    the `worker` named by its node id, the router, cache pool and front door the kinds of their names."""
    from prfaas.security import tls
    from prfaas.settings import TlsFlags

    if not isinstance(settings, TlsFlags):
        return
    node_id = getattr(settings, "node_id", None)
    who, kind = (node_id, "worker") if node_id else (name, name)
    cfg = tls.resolve(tls_dir=settings.tls_dir, ca=settings.ca, cert=settings.cert, key=settings.key,
                      insecure=settings.insecure, name=who, kind=kind)
    for listen in (getattr(settings, "listen", ""), getattr(settings, "token_listen", "")):
        if listen:
            tls.check_listen(listen, cfg, settings.allow_insecure_remote)
    tls.install(cfg)


def run_service(name: str, main: Callable[[S], Coroutine[Any, Any, None]], settings: S) -> None:
    try:
        setup_tls(name, settings)
        asyncio.run(main(settings))
    except KeyboardInterrupt:
        pass
    except STARTUP_ERRORS as e:
        if os.environ.get("PRFAAS_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        print(f"{name}: error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
