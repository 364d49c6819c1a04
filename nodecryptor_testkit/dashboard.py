"""The Grafana dashboard of nodecryptor, built with Grafana's foundation SDK and written to
k8s/optional/monitoring/ as dashboard.json and as a ConfigMap for the Grafana sidecar
(label grafana_dashboard: "1"). `python -m nodecryptor_testkit.dashboard` rewrites both; the
test suite fails when they differ from what this module builds.

Every panel is per node (the `node` label the ServiceMonitor sets), filtered by the `$node`
variable; queries name only metrics the agent exports (checked by the tests)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml
from grafana_foundation_sdk.builders import common as gc
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as gm

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING = os.path.join(SOURCE_ROOT, "k8s", "optional", "monitoring")
DASHBOARD_JSON = os.path.join(MONITORING, "dashboard.json")
CONFIGMAP_YAML = os.path.join(MONITORING, "dashboard-configmap.yaml")
UID = "nodecryptor-nodes"

DATASOURCE = gm.DataSourceRef(type_val="prometheus", uid="${datasource}")
NODE = 'node=~"$node"'


def _query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def _series(title: str, description: str, unit: str, *queries, stacked=False):
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .legend(
            gc.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            gc.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
    )
    for q in queries:
        panel = panel.with_target(q)
    if stacked:
        panel = panel.fill_opacity(40)
    return panel


def _states(title: str, description: str, expr: str, legend: str, ok: str, bad: str):
    """A state timeline of a 0/1 gauge per node: green ``ok`` at 1, red ``bad`` at 0."""
    mapping = gm.ValueMap(
        options={
            "1": gm.ValueMappingResult(text=ok, color="green", index=0),
            "0": gm.ValueMappingResult(text=bad, color="red", index=1),
        }
    )
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_query(expr, legend))
        .mappings([mapping])
        .show_value(cm.VisibilityMode.AUTO)
        .merge_values(True)
        .height(6)
        .span(12)
    )


def build() -> dict:
    """The dashboard as Grafana's JSON model (a dict)."""
    rate = "$__rate_interval"
    d = (
        gd.Dashboard("nodecryptor: node encryption")
        .uid(UID)
        .description(
            "Per node: enforcing or not, verdicts, clear text, WireGuard peers, "
            "reconcile latency and Kubernetes API watch health."
        )
        .tags(["nodecryptor", "cilium", "wireguard"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            gd.QueryVariable("node")
            .label("Node")
            .datasource(DATASOURCE)
            .query("label_values(nodecryptor_ready, node)")
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .refresh(gm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(gm.VariableSort.ALPHABETICAL_ASC)
        )
    )
    d = d.with_row(gd.Row("Enforcement"))
    d = d.with_panel(
        _states(
            "Enforcing",
            "nodecryptor_ready: 1 when /readyz is ready (datapath applied, WireGuard "
            "usable, state within capacity).",
            f"min by (node) (nodecryptor_ready{{{NODE}}})",
            "{{node}}",
            "enforcing",
            "NOT enforcing",
        )
    )
    d = d.with_panel(
        _states(
            "WireGuard device",
            "nodecryptor_wireguard_up: cilium_wg0 present and up.",
            f"min by (node) (nodecryptor_wireguard_up{{{NODE}}})",
            "{{node}}",
            "up",
            "down",
        )
    )
    d = d.with_panel(
        stat.Panel()
        .title("Datapath")
        .description("The active datapath of each node.")
        .datasource(DATASOURCE)
        .height(4)
        .span(24)
        .reduce_options(gc.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(cm.BigValueGraphMode.NONE)
        .text_mode(cm.BigValueTextMode.NAME)
        .with_target(
            _query(
                f"max by (node, datapath) (nodecryptor_datapath_info{{{NODE}}})",
                "{{node}}: {{datapath}}",
            )
        )
    )
    d = d.with_row(gd.Row("Traffic"))
    d = d.with_panel(
        _series(
            "Verdicts",
            "Packets per second the BPF program decided, by verdict.",
            "pps",
            _query(
                f"sum by (node, verdict) (rate(nodecryptor_datapath_packets_total{{{NODE}}}"
                f"[{rate}]))",
                "{{node}} {{verdict}}",
            ),
        )
    )
    d = d.with_panel(
        _series(
            "Clear text",
            "Cluster traffic seen in the clear: ingress audit is accepted clear "
            "text, ingress drop is refused clear text; egress/ingress exempt are bootstrap flows.",
            "pps",
            _query(
                f"sum by (node, direction, verdict) (rate(nodecryptor_cleartext_packets_total"
                f"{{{NODE}}}[{rate}]))",
                "{{node}} {{direction}}/{{verdict}}",
            ),
        )
    )
    d = d.with_row(gd.Row("WireGuard peers"))
    d = d.with_panel(
        _series(
            "Peers by state",
            "Remote nodes by WireGuard peer state, per node.",
            "short",
            _query(f"sum by (node, state) (nodecryptor_peers{{{NODE}}})", "{{node}} {{state}}"),
            stacked=True,
        )
    )
    d = d.with_panel(
        _series(
            "Oldest handshake",
            "Age of the oldest handshake among peers that carry traffic "
            "(WireGuard renews every 2 minutes; the alert is at 5).",
            "s",
            _query(
                f"max by (node) (nodecryptor_peer_oldest_handshake_age_seconds{{{NODE}}})",
                "{{node}}",
            ),
        )
    )
    d = d.with_row(gd.Row("Control loop and Kubernetes API"))
    d = d.with_panel(
        _series(
            "Reconcile latency",
            "Duration of reconcile passes (99th and 50th percentile).",
            "s",
            *[
                _query(
                    f"histogram_quantile({q}, sum by (node, le) (rate("
                    f"nodecryptor_reconcile_duration_seconds_bucket{{{NODE}}}[{rate}])))",
                    f"{{{{node}}}} p{int(q * 100)}",
                )
                for q in (0.99, 0.5)
            ],
        )
    )
    d = d.with_panel(
        _series(
            "Reconcile errors",
            "Reconcile passes that failed, per second.",
            "ops",
            _query(
                f'sum by (node) (rate(nodecryptor_reconciles_total{{{NODE}, result="error"}}'
                f"[{rate}]))",
                "{{node}}",
            ),
        )
    )
    d = d.with_panel(
        _series(
            "Since the last CiliumNode list",
            "Seconds since the last complete list (a resync "
            "happens every 300 s; the alert is at 900).",
            "s",
            _query(
                f"time() - max by (node) (nodecryptor_last_sync_timestamp_seconds{{{NODE}}})",
                "{{node}}",
            ),
        )
    )
    d = d.with_panel(
        _series(
            "API watch restarts",
            "CiliumNode watch restarts by cause and stalls (the server "
            "sent nothing within the stall threshold).",
            "short",
            _query(
                f"sum by (node, cause) (increase(nodecryptor_watch_restarts_total{{{NODE}}}"
                f"[{rate}]))",
                "{{node}} {{cause}}",
            ),
            _query(
                f"sum by (node) (increase(nodecryptor_k8s_watch_stalls_total{{{NODE}}}[{rate}]))",
                "{{node}} stalled",
            ),
        )
    )
    d = d.with_row(gd.Row("BPF program"))
    d = d.with_panel(
        _series(
            "Program compiles",
            "Successful compile-and-loads in the last hour (across agent "
            "restarts) and failed attempts of the running agents.",
            "short",
            _query(
                f"changes(nodecryptor_bpf_program_loaded_timestamp_seconds{{{NODE}}}[1h])",
                "{{node}} compiles/h",
            ),
            _query(
                f"sum by (node, result) (nodecryptor_bpf_program_loads_total{{{NODE}, "
                f'result!="ok"}})',
                "{{node}} {{result}}",
            ),
        )
    )
    model = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for number, panel in enumerate(model["panels"], start=1):  # the SDK leaves every id at 0
        panel["id"] = number
        if panel["type"] == "row":  # rows have no options or field config; the SDK says null
            panel.pop("options", None)
            panel.pop("fieldConfig", None)
    return model


def render_json(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def render_configmap(model: dict) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "nodecryptor-dashboard",
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/name": "nodecryptor", "grafana_dashboard": "1"},
        },
        "data": {"nodecryptor.json": json.dumps(model, sort_keys=True)},
    }
    header = (
        "# Generated by `python -m nodecryptor_testkit.dashboard`; do not edit. The "
        'Grafana sidecar\n# imports ConfigMaps labelled grafana_dashboard: "1".\n'
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=1 << 20)


def expressions(model: dict) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    out = [t["expr"] for p in model.get("panels", []) for t in p.get("targets", [])]
    for var in model.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            out.append(var["query"] if isinstance(var["query"], str) else var["query"]["query"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the files differ from what would be written",
    )
    args = ap.parse_args(argv)
    model = build()
    wanted = {DASHBOARD_JSON: render_json(model), CONFIGMAP_YAML: render_configmap(model)}
    stale = [p for p, text in wanted.items() if not os.path.exists(p) or open(p).read() != text]
    if args.check:
        for path in stale:
            print(
                f"{path} is out of date: run python -m nodecryptor_testkit.dashboard",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        with open(path, "w") as f:
            f.write(wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
