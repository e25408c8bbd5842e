"""Integration-tier fixtures; they live in integration.harness with the helpers tests import."""

from integration.harness import cluster, gpu_nodes, kubelet, namespace, operator  # noqa: F401
