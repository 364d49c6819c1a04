"""Fixtures of the Kubernetes tests; helpers live in k8s_support (importable by test modules)."""

from k8s_support import fake, kubeconfig, run_sync, settings  # noqa: F401 - pytest fixtures
