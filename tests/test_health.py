import json
import urllib.error
import urllib.request

from nodecryptor.observe.health import HealthServer


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_endpoints_report_checks():
    state = {"alive": (True, "fresh"), "ready": (False, "waiting for the first list")}
    seen = []
    server = HealthServer(
        "127.0.0.1:0", lambda: state["alive"], lambda: state["ready"], on_ready=seen.append
    ).start()
    try:
        assert get(server.port, "/healthz") == (200, {"ok": True, "reason": "fresh"})
        assert get(server.port, "/readyz") == (
            503,
            {"ok": False, "reason": "waiting for the first list"},
        )
        state["ready"] = (True, "synced")
        assert get(server.port, "/readyz")[0] == 200
        assert seen == [False, True]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=5)
            raise AssertionError("unknown path answered")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        server.stop()
