"""Flag translation: the seed's flags (also Go's single-dash spelling) and clear errors."""

import pytest

from nodecryptor.cli import build_parser, main, normalize_go_flags, _long_options
from nodecryptor.commands.common import settings_from_args


def settings_for(argv):
    parser = build_parser()
    argv = normalize_go_flags(argv, _long_options(parser))
    return settings_from_args(parser.parse_args(argv))


def test_seed_defaults():
    s = settings_for(["run", "--node-name", "w1"])
    assert str(s.exempt_ports[0]) == "2379-2380" and str(s.exempt_ports[1]) == "6443"
    assert (s.health_bind, s.metrics_bind, s.noop_route) == (":8083", ":8084", False)
    assert (s.datapath, s.wg_interface, s.fail_mode, s.bpffs) == (
        "auto",
        "cilium_wg0",
        "closed",
        "/sys/fs/bpf",
    )


def test_flag_defaults_are_the_settings_defaults(monkeypatch):
    """Every flag of ``run`` left out yields what Settings itself defaults to: the defaults are
    decided once, in Settings, not copied into argparse."""
    import dataclasses

    from nodecryptor.core.settings import Settings

    monkeypatch.delenv("NODE_NAME", raising=False)
    from_flags = settings_for(["run", "--node-name", "w1"])
    plain = Settings(node_name="w1")
    differing = {
        f.name: (getattr(from_flags, f.name), getattr(plain, f.name))
        for f in dataclasses.fields(Settings)
        if getattr(from_flags, f.name) != getattr(plain, f.name)
    }
    assert not differing, f"flag defaults that differ from Settings: {differing}"


def test_go_single_dash_spelling():
    s = settings_for(
        [
            "run",
            "-node-name=w2",
            "-control-plane-exempt-ports",
            "6443",
            "-health-probe-bind-address=:9000",
            "-metrics-server-bind-address",
            ":9001",
            "-kubeconfig",
            "/tmp/kc",
            "-noop-route",
        ]
    )
    assert s.node_name == "w2" and [str(p) for p in s.exempt_ports] == ["6443"]
    assert (s.health_bind, s.metrics_bind, s.kubeconfig, s.noop_route) == (
        ":9000",
        ":9001",
        "/tmp/kc",
        True,
    )
    assert settings_for(["run", "-noop-route=false"]).noop_route is False


def test_node_name_falls_back_to_env(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert settings_for(["run"]).node_name == "from-env"
    assert settings_for(["run", "--node-name", "flag"]).node_name == "flag"


@pytest.mark.parametrize(
    "argv,flag,value",
    [
        (["--control-plane-exempt-ports", "0"], "--control-plane-exempt-ports", "'0'"),
        (["--control-plane-exempt-ports", "70000"], "--control-plane-exempt-ports", "'70000'"),
        (
            ["--control-plane-exempt-ports", "6443-2379"],
            "--control-plane-exempt-ports",
            "6443-2379",
        ),
        (["--control-plane-exempt-ports", "abc"], "--control-plane-exempt-ports", "abc"),
        (["--control-plane-exempt-ports", "icmp/5"], "--control-plane-exempt-ports", "icmp"),
        (["--health-probe-bind-address", "8083"], "--health-probe-bind-address", "8083"),
        (["--metrics-server-bind-address", ":99999"], "--metrics-server-bind-address", "99999"),
        (["--devices", "eth0,this-name-is-too-long"], "--devices", "this-name-is-too-long"),
    ],
)
def test_bad_flags_exit_2_naming_flag_and_value(argv, flag, value, capsys, monkeypatch):
    monkeypatch.setenv("NODE_NAME", "w1")
    # plan validates flags before contacting the API server
    assert main(["plan", *argv] if flag.startswith("--control") else ["run", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


def test_missing_node_name_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert main(["plan", "--kubeconfig", "/nonexistent"]) == 2
    assert "--node-name" in capsys.readouterr().err


def test_argparse_choices_are_enforced(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--fail-mode", "sometimes"])
    assert exc.value.code == 2 and "--fail-mode" in capsys.readouterr().err


def test_help_ends_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_watch_stall_seconds_flag():
    assert settings_for(["run", "--node-name", "w1"]).watch_stall_seconds == 55.0
    assert (
        settings_for(
            ["run", "--node-name", "w1", "--watch-stall-seconds", "120.5"]
        ).watch_stall_seconds
        == 120.5
    )
