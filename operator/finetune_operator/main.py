"""`finetune-operator`: run the FineTuneJob operator."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Sequence

import kopf

from finetune_operator import handlers
from finetune_operator.settings import parse_settings

M_ARENA_MAX = -8  # mallopt(3)


def fewer_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads heaps of their own as they contend, up to 8 per core; with kopf's and
    the handlers' threads each holding freed memory apart, the operator's RSS grew with every
    burst of jobs. Two heaps are plenty for a process that mostly waits on the API server."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


def main(argv: Sequence[str] | None = None) -> None:
    fewer_malloc_arenas()  # before any thread starts
    settings = parse_settings(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handlers.configure(settings)
    kopf.run(
        standalone=settings.peering is None,
        peering_name=settings.peering,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness,
    )


if __name__ == "__main__":
    main()
