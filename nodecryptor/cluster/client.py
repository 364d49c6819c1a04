"""The Kubernetes client's configuration and errors: loading and checking ``--kubeconfig`` or
the in-cluster service account, naming the API server a client talks to (looked up here and
nowhere else), and translating the client's and the transport's exceptions into
nodecryptor's ``KubernetesError`` classes."""

from __future__ import annotations

import json
import os

import kubernetes.client
import kubernetes.config
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from nodecryptor.cluster.k8s_errors import (
    ApiForbidden,
    ApiGone,
    ApiUnavailable,
    KubeConfigError,
    KubernetesError,
)
from nodecryptor.core.settings import Settings

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the kubelet mounts the service-account token and CA (in-cluster configuration)."""

MAX_KUBECONFIG_BYTES = 16 << 20
"""A kubeconfig larger than this is refused rather than parsed (it is not one)."""

# What loading a broken kubeconfig raises, besides ConfigException: file errors, YAML errors
# (binary content is a UnicodeDecodeError, a ValueError), and TypeError, AttributeError or
# KeyError when the YAML is valid but not a kubeconfig-shaped mapping.
_CONFIG_ERRORS = (
    kubernetes.config.ConfigException,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    yaml.YAMLError,
)

# Errors a request can end with besides ApiException: connection refused or reset, timeouts,
# TLS failures, a stream cut short, an unparsable body.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, ValueError)


def _check_kubeconfig_file(path: str) -> None:
    """Clear messages for the file-level faults the client reports obscurely (a missing
    file is "No configuration found", a directory an IsADirectoryError)."""
    if not os.path.exists(path):
        raise KubeConfigError("the file does not exist")
    if os.path.isdir(path):
        raise KubeConfigError("it is a directory, not a kubeconfig file")
    if not os.path.isfile(path):
        raise KubeConfigError("it is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as e:
        raise KubeConfigError(f"cannot read it: {e.strerror or e}") from None
    if len(head) > MAX_KUBECONFIG_BYTES:
        raise KubeConfigError(f"larger than {MAX_KUBECONFIG_BYTES >> 20} MiB: not a kubeconfig")
    if b"\0" in head:
        raise KubeConfigError("binary content, not a YAML kubeconfig")
    try:
        doc = yaml.safe_load(head.decode("utf-8"))
    except UnicodeDecodeError:
        raise KubeConfigError("not UTF-8 text, so not a YAML kubeconfig") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KubeConfigError(f"not YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if doc is None:
        raise KubeConfigError("the file is empty")
    if not isinstance(doc, dict):
        raise KubeConfigError(
            f"YAML, but a {type(doc).__name__}, not a kubeconfig (a mapping "
            f"with clusters, users, contexts and current-context)"
        )
    if not doc.get("current-context"):
        raise KubeConfigError("no current-context set")


def _load_config(settings: Settings, cfg: kubernetes.client.Configuration) -> None:
    """Fill ``cfg`` from ``settings.kubeconfig`` or the in-cluster service account. Raises
    KubeConfigError whose message says what is wrong (not where: callers add that)."""
    try:
        if settings.kubeconfig is not None:
            _check_kubeconfig_file(os.path.expanduser(settings.kubeconfig))
            kubernetes.config.load_kube_config(
                config_file=settings.kubeconfig, client_configuration=cfg
            )
        else:
            InClusterConfigLoader(
                token_filename=os.path.join(SERVICE_ACCOUNT_DIR, "token"),
                cert_filename=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"),
            ).load_and_set(cfg)
    except KubeConfigError:
        raise
    except _CONFIG_ERRORS as e:
        raise KubeConfigError(str(e).replace("\n", " ") or type(e).__name__) from e


def config_source(settings: Settings) -> str:
    return (
        f"--kubeconfig {settings.kubeconfig!r}"
        if settings.kubeconfig is not None
        else f"in-cluster configuration (service account in {SERVICE_ACCOUNT_DIR}, "
        f"KUBERNETES_SERVICE_HOST/PORT)"
    )


def check_config(settings: Settings) -> None:
    """Load the client configuration without contacting the API server, so a command can
    refuse an unusable kubeconfig or a missing service account before it changes anything.
    Raises KubeConfigError saying what is wrong."""
    _load_config(settings, kubernetes.client.Configuration())


def load_client(settings: Settings) -> kubernetes.client.ApiClient:
    """An ApiClient for ``settings.kubeconfig``, or the in-cluster service account when it is
    None. Retries inside urllib3 are off: the sync's own backoff decides when to retry, and a
    hidden retry would multiply every timeout. Raises KubeConfigError."""
    cfg = kubernetes.client.Configuration()
    try:
        _load_config(settings, cfg)
    except KubeConfigError as e:
        raise KubeConfigError(f"cannot load {config_source(settings)}: {e}") from e
    cfg.retries = False
    # TCP keepalive (client-go's timings) notices a peer that vanished without a FIN or RST
    # (a rebooted control-plane node) long before the watch's read timeout would.
    cfg.keep_alive = True
    return kubernetes.client.ApiClient(cfg)


def api_host(owner: object) -> str:
    """The API server that ``owner`` talks to, for error messages: ``owner`` is an ApiClient,
    an API object holding one (``.api_client``), or a bound method of such an object."""
    owner = getattr(owner, "__self__", owner)
    client = (
        owner
        if isinstance(owner, kubernetes.client.ApiClient)
        else getattr(owner, "api_client", None)
    )
    try:
        return client.configuration.host
    except AttributeError:
        return "the API server"


def translate_error(err: Exception, server: str, what: str) -> KubernetesError:
    """Map client and transport exceptions to nodecryptor's error classes."""
    if isinstance(err, ApiException):
        status = err.status or 0
        detail = status_message(err)
        if status in (401, 403):
            return ApiForbidden(
                f"{what}: the API server {server} refused access ({status} {err.reason}): {detail}"
            )
        if status == 410:
            return ApiGone(f"{what}: {detail}")
        if status == 504 and "ResourceVersionTooLarge" in str(err.body):
            # Our version is newer than the server's (it was restored or replaced): only a
            # new list helps, as for 410.
            return ApiGone(f"{what}: {detail}", cause="too-large")
        if status == 404 and status_details_name(err):
            return KubernetesError(f"{what}: not found on {server} (404): {detail}")
        if status == 404:
            return KubernetesError(
                f"{what}: {server} has no ciliumnodes.cilium.io/v2 resource "
                f"(is Cilium installed?): {detail}"
            )
        if status >= 500 or status in (0, 429):
            return ApiUnavailable(
                f"{what}: the API server {server} answered {status} {err.reason}: {detail}",
                cause="server-error",
            )
        return KubernetesError(
            f"{what}: the API server {server} answered {status} {err.reason}: {detail}"
        )
    if isinstance(err, urllib3.exceptions.ReadTimeoutError):
        return ApiUnavailable(
            f"{what}: {server} sent nothing within the read timeout ({err})", cause="stalled"
        )
    if isinstance(err, urllib3.exceptions.ProtocolError):
        return ApiUnavailable(f"{what}: the connection to {server} broke: {err}", cause="dropped")
    return ApiUnavailable(
        f"{what}: cannot reach the API server {server}: {err}", cause="unreachable"
    )


def status_details_name(err: ApiException) -> str | None:
    """The object name of a Status body: present when one object, not the resource, is
    missing."""
    try:
        return json.loads(err.body)["details"]["name"]
    except (TypeError, ValueError, KeyError):
        return None


def status_message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body).get("message") or err.body)
    except (TypeError, ValueError, AttributeError):
        return str(err.body or err.reason)
