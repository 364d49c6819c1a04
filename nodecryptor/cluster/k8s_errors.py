"""The errors of talking to the Kubernetes API, as the rest of the agent sees them: each names
the server and what was being done, and carries a short ``cause`` for the watch-restart
metrics. ``client.translate_error`` maps the client library's exceptions onto them."""

from __future__ import annotations

from nodecryptor.core.errors import NodecryptorError


class KubernetesError(NodecryptorError):
    """Talking to the Kubernetes API failed. ``cause`` is a short word for the
    watch_restarts metric."""

    cause = "error"


class KubeConfigError(KubernetesError):
    """No usable client configuration (kubeconfig or in-cluster service account)."""

    cause = "config"


class ApiUnavailable(KubernetesError):
    """The API server could not be reached, timed out, or answered with a server error.
    ``cause``: unreachable, stalled, dropped or server-error."""

    def __init__(self, message: str, cause: str = "server-error"):
        super().__init__(message)
        self.cause = cause


class ApiForbidden(KubernetesError):
    """The API server rejected our credentials (401) or our permissions (403)."""

    cause = "forbidden"


class ApiGone(KubernetesError):
    """410: the resourceVersion or continue token is older than the server's history (or,
    cause "too-large", newer than the server's: a restored or replaced server)."""

    def __init__(self, message: str, cause: str = "expired"):
        super().__init__(message)
        self.cause = cause
