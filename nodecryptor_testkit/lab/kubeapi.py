"""A deliberately tiny kube-apiserver client for the lab's Cilium stand-in and scenarios.

The stand-in plays Cilium, a separate program, so it does not borrow nodecryptor's own
Kubernetes client (``nodecryptor.cluster``): the lab must keep working when that client has a bug,
which is exactly what the lab is there to find. A few requests are all it needs.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

CILIUMNODES = "/apis/cilium.io/v2/ciliumnodes"
EXEMPTIONS = "/apis/nodecryptor.io/v1alpha1/encryptionexemptions"
NODES = "/api/v1/nodes"


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int | None, why: str):
        self.status = status
        super().__init__(f"{method} {path}: {status or 'no response'} {why}")


class KubeApi:
    def __init__(self, server: str, token: str, timeout: float = 3.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        # The lab's API uses a throw-away self-signed certificate when --tls is on.
        handlers: list = [urllib.request.ProxyHandler({})]  # the lab is never behind a proxy
        if server.startswith("https"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def _request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        content_type: str = "application/json",
    ) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": content_type,
            },
        )
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ApiError(method, path, e.code, e.read()[:200].decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(method, path, None, str(getattr(e, "reason", e))) from None
        return json.loads(raw) if raw else {}

    def list_ciliumnodes(self) -> list[dict]:
        return self._request("GET", CILIUMNODES).get("items", [])

    def annotate(self, name: str, key: str, value: str | None) -> dict:
        patch = {"metadata": {"annotations": {key: value}}}
        return self._request(
            "PATCH", f"{CILIUMNODES}/{name}", patch, content_type="application/merge-patch+json"
        )

    def create(self, obj: dict) -> dict:
        return self._request("POST", CILIUMNODES, obj)

    def delete(self, name: str) -> dict:
        return self._request("DELETE", f"{CILIUMNODES}/{name}")

    def create_exemption(self, obj: dict) -> dict:
        return self._request("POST", EXEMPTIONS, obj)

    def delete_exemption(self, name: str) -> dict:
        return self._request("DELETE", f"{EXEMPTIONS}/{name}")

    def get_node(self, name: str) -> dict:
        return self._request("GET", f"{NODES}/{name}")

    def fake_control(self, action: str, body: dict | None = None) -> dict:
        """A fault-injection or bookkeeping action of the fake API server (``/_fake/``)."""
        return self._request("POST", f"/_fake/{action}", body or {})

    def put_node(self, obj: dict) -> dict:
        """Replace a v1 Node (the lab's fake API takes Node writes through its control
        endpoint; a kubelet or an administrator's kubectl would PATCH the Node)."""
        return self._request("POST", "/_fake/apply", {"object": obj})
