"""`finetune-operator`: run the FineTuneJob operator."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kopf

from finetune_operator import handlers
from finetune_operator.settings import parse_settings


def main(argv: Sequence[str] | None = None) -> None:
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
