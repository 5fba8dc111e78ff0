"""Reaching the Hugging Face hub: where it cannot be reached, work from the local cache at once, instead of after
huggingface_hub's retries (half a minute to a minute per model or data set id, then the same error)."""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger("fabric_align")

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens (its name resolves, its port answers within ``timeout``).
    True when it cannot be told: offline mode already set, or a proxy (through which names resolve elsewhere)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_unless_reachable() -> None:
    """Before reading a model or data set by hub id: switch huggingface_hub, transformers and datasets to offline mode
    (the local cache only) when the hub cannot be reached, so a missing id fails at once and a cached one loads."""
    if hub_reachable():
        return
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        log.info(
            "the Hugging Face hub (%s) cannot be reached: reading hub ids from the local cache", constants.ENDPOINT
        )
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub (and through it transformers) at each call
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes a launcher starts
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True  # datasets keeps its own copy, read at each load
