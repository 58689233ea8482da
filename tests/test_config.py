"""Configuration has one source: each field of ServeSettings is a flag and a MLYNAR_* variable of
the same name, with the field's own type and help."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlynar_events import cli, config
from mlynar_events.config import ServeSettings


def parse(*argv: str) -> ServeSettings:
    return config.serve_settings(cli.build_parser().parse_args(["serve", *argv]))


def test_every_field_is_a_flag_with_its_variable_and_help() -> None:
    text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert config.env_name(flag) in text, flag
        assert field.description, f"{name} has no help"


def test_variables_are_read_with_the_fields_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLYNAR_PORT", "4001")
    monkeypatch.setenv("MLYNAR_EXECUTOR_ACK_WAIT", "2.5")
    monkeypatch.setenv("MLYNAR_REGISTRY", "a.yaml,b")
    monkeypatch.setenv("MLYNAR_ROLES", "api,solver")
    monkeypatch.setenv("MLYNAR_LOCAL_MACHINE", "false")
    monkeypatch.setenv("MLYNAR_BLOB_DIR", "/srv/blobs")
    s = parse()
    assert (s.port, s.executor_ack_wait, s.registry, s.roles, s.local_machine, s.blob_dir) == (
        4001, 2.5, [Path("a.yaml"), Path("b")], ["api", "solver"], False, Path("/srv/blobs"))


def test_a_flag_wins_over_its_variable_and_defaults_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLYNAR_PORT", "4001")
    monkeypatch.setenv("MLYNAR_REGISTRY", "from-env")
    s = parse("--port", "4002", "--registry", "x", "--registry", "y", "--no-local-machine")
    assert (s.port, s.registry, s.local_machine) == (4002, [Path("x"), Path("y")], False)
    assert parse().model_dump(exclude={"port", "registry"}) == ServeSettings().model_dump(exclude={"port", "registry"})


def test_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse("--roles", "api,nonsense")
    with pytest.raises(SystemExit):
        parse("--port", "many")


def test_the_kubernetes_group_is_every_kube_field_and_only_those() -> None:
    kube_fields = {n.removeprefix("kube_") for n in ServeSettings.model_fields if n.startswith("kube_")}
    assert set(config.KubeSettings.model_fields) == kube_fields
    s = parse("--kube-namespace", "jobs", "--kube-pvc-size", "5Gi", "--kube-keep-failed-jobs")
    assert (s.kube.namespace, s.kube.pvc_size, s.kube.keep_failed_jobs) == ("jobs", "5Gi", True)


def test_agent_flags_are_its_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from executors.agent import cli as agent_cli
    from executors.agent.settings import AgentSettings

    text = agent_cli.build_parser().format_help()
    for name in AgentSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert (flag in text) == (name not in agent_cli.NOT_FLAGS), flag
    monkeypatch.setenv("MLYNAR_ALLOW", "python3 *,sh x")
    monkeypatch.setenv("MLYNAR_MAX_PARALLEL", "3")
    s = agent_cli.settings_from_args(agent_cli.build_parser().parse_args(["--token", "t0k", "--port", "0"]))
    assert (s.allow, s.max_parallel, s.port, s.resolve_token()) == (["python3 *", "sh x"], 3, 0, "t0k")


def test_every_serve_setting_belongs_to_exactly_one_concern() -> None:
    """A new flag must be given to the role that uses it (a group) or be process wiring."""
    owners: dict[str, list[str]] = {}
    for group in config.GROUPS:
        for name in group.serve_fields():
            owners.setdefault(name, []).append(group.__name__)
    for name in config.PROCESS_FIELDS:
        owners.setdefault(name, []).append("process")
    assert set(owners) == set(ServeSettings.model_fields)
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}


def test_a_group_is_a_view_of_the_flags() -> None:
    s = parse("--kube-namespace", "jobs", "--executor-ack-wait", "7", "--max-json-bytes", "99")
    assert s.kube.namespace == "jobs" and s.executor.ack_wait == 7.0 and s.api.max_json_bytes == 99


def test_local_machine_flags_reach_the_built_in_agent_and_choices_are_checked() -> None:
    s = parse("--local-isolation", "bwrap", "--local-allow", "python3 /srv/ops/*", "--local-read", "/srv/data",
              "--no-local-network", "--local-limit-processes", "64")
    values = s.local.agent_values()
    assert values["isolation"] == "bwrap" and values["allow"] == ["python3 /srv/ops/*"]
    assert values["read"] == [Path("/srv/data")] and values["network"] is False and values["limit_processes"] == 64
    assert "limit_cpu_seconds" not in values  # unset: the agent's own default
    from executors.agent.settings import AgentSettings

    AgentSettings(token="t" * 20, **values)  # every name is the agent's
    with pytest.raises(SystemExit):
        parse("--local-isolation", "chroot")
