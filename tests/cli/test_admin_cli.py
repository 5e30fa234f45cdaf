"""The operator's commands about the node rather than its volumes, through the real CLI
against a real daemon: ``settings list/get/set``, ``version``, ``node show``,
``completion`` (with the variables shells set), and the environment variables named in the
help of every client command."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from appliance import __version__
from appliance.cli.main import COMMANDS, LazyGroup, cli
from appliance.cli.settings import FALSE, TRUE, parse_value
from appliance.control.objects import Settings, setting_definitions
from appliance.errors import InvalidArgument
from tests.harness import APPLIANCE, Node, free_port, run


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("admin")
    running = Node(root)
    running.start()
    (root / "disk2").mkdir()
    running.cli("disk", "add", root / "disk2", "--tag", "second")
    try:
        yield running
    finally:
        running.cleanup()


def settings_of(node: Node) -> dict[str, dict[str, object]]:
    rows = json.loads(node.cli("settings", "list", "-o", "json").stdout)
    return {row["name"]: row for row in rows}


# -- settings -------------------------------------------------------------------------------


def test_every_setting_is_described_once() -> None:
    names = [d["name"] for d in setting_definitions()]
    assert names == [f.name for f in dataclasses.fields(Settings) if f.name != "name"]
    for definition in setting_definitions():
        assert definition["type"] in ("bool", "int", "float", "str"), definition
        assert definition["description"] and "\n" not in str(definition["description"])


def test_values_are_parsed_by_the_type_of_the_setting() -> None:
    for word in TRUE:
        assert parse_value("s", word.upper(), "bool") is True
    for word in FALSE:
        assert parse_value("s", f" {word} ", "bool") is False
    assert parse_value("s", "200", "int") == 200
    assert parse_value("s", "12.5", "float") == 12.5
    assert parse_value("s", "zstd", "str") == "zstd"
    for text, kind in (("maybe", "bool"), ("1.5", "int"), ("nan", "float"), ("x", "float")):
        with pytest.raises(InvalidArgument, match=f"invalid value '{text}' for setting s"):
            parse_value("s", text, kind)


def test_settings_list_shows_values_defaults_and_descriptions(node: Node) -> None:
    listed = settings_of(node)
    assert sorted(listed) == sorted(d["name"] for d in setting_definitions())
    for definition in setting_definitions():
        row = listed[str(definition["name"])]
        assert row["value"] == row["default"] == definition["default"]
        assert row["description"] == definition["description"]
    text = node.cli("settings", "list").stdout.splitlines()
    assert text[0].split() == ["NAME", "VALUE", "DEFAULT", "DESCRIPTION"]
    salvage = next(line for line in text if line.startswith("auto_salvage "))
    assert salvage.split()[1:3] == ["true", "true"] and "faulted engine" in salvage
    assert "name" not in listed and "global" not in node.cli("settings", "list").stdout
    assert node.cli("settings", "list", "-o", "yaml").stdout.startswith("- default:")


def test_settings_set_parses_the_value_and_says_what_changed(node: Node) -> None:
    try:
        said = node.cli("settings", "set", "auto_salvage", "off").stdout
        assert said == "auto_salvage: true -> false\n"
        assert node.cli("settings", "get", "auto_salvage").stdout == "false\n"
        assert node.cli("settings", "set", "auto_salvage", "NO").stdout == \
            "auto_salvage: already false\n"
        assert node.cli("settings", "set", "auto_salvage", "1").stdout == \
            "auto_salvage: false -> true\n"
        assert node.cli("settings", "set", "over_provisioning_percentage", "250").stdout == \
            "over_provisioning_percentage: 100 -> 250\n"
        assert node.cli("settings", "set", "replica_replenishment_wait", "12.5").stdout == \
            "replica_replenishment_wait: 30 -> 12.5\n"
        assert node.cli("settings", "set", "backup_compression", "zstd").stdout == \
            "backup_compression: lz4 -> zstd\n"
        listed = settings_of(node)
        assert (listed["over_provisioning_percentage"]["value"],
                listed["replica_replenishment_wait"]["value"],
                listed["backup_compression"]["value"]) == (250, 12.5, "zstd")
        assert listed["over_provisioning_percentage"]["default"] == 100
    finally:
        for name, value in (("over_provisioning_percentage", "100"),
                            ("replica_replenishment_wait", "30"),
                            ("backup_compression", "lz4"), ("auto_salvage", "true")):
            node.cli("settings", "set", name, value)


@pytest.mark.parametrize(("args", "message"), [
    (("set", "over_provisioning", "200"),
     "error: unknown setting 'over_provisioning'; the settings are: auto_failover, "
     "auto_salvage, backup_block_size, backup_compression, minimal_available_percentage, "
     "over_provisioning_percentage, replica_node_soft_anti_affinity, "
     "replica_replenishment_wait, replica_soft_anti_affinity"),
    (("get", "name"), "error: unknown setting 'name'; the settings are: auto_failover, "),
    (("set", "auto_salvage", "maybe"), "error: invalid value 'maybe' for setting "
     "auto_salvage: must be true or false (or yes/no, on/off, 1/0)"),
    (("set", "backup_block_size", "2M"),
     "error: invalid value '2M' for setting backup_block_size: must be an integer"),
    # what only the daemon knows: its own clear error
    (("set", "backup_compression", "gzip"), "error: backup_compression must be lz4, zstd or none"),
    (("set", "over_provisioning_percentage", "0"),
     "error: over_provisioning_percentage must be 1 to 10000"),
    (("set", "backup_block_size", "1000000"), "error: backup_block_size must be a power of two"),
])
def test_bad_settings_are_refused_changing_nothing(node: Node, args: tuple[str, ...],
                                                   message: str) -> None:
    before = settings_of(node)
    refused = node.cli("settings", *args, check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(message), refused.stderr
    assert refused.stdout == ""
    assert settings_of(node) == before


# -- version --------------------------------------------------------------------------------


def test_version_of_client_and_daemon(node: Node) -> None:
    assert node.cli("version").stdout == \
        f"client: {__version__}\ndaemon: {__version__} ({node.url})\n"
    assert json.loads(node.cli("version", "-o", "json").stdout) == {
        "client": __version__, "daemon": __version__, "url": node.url, "error": None}


def test_version_without_a_daemon(node: Node) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run("version", "--url", url, "--token-file", node.token_file, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stdout == f"client: {__version__}\ndaemon: unknown ({url})\n"
    assert result.stderr.startswith(f"error: cannot reach the appliance API at {url}")
    as_json = run("version", "-o", "json", "--url", url, "--token-file", node.token_file,
                  check=False)
    assert as_json.returncode == 1
    answer = json.loads(as_json.stdout)
    assert (answer["client"], answer["daemon"]) == (__version__, None) and answer["error"]


# -- node show ------------------------------------------------------------------------------


def test_node_show_reports_configuration_disks_volumes_and_processes(node: Node) -> None:
    node.cli("volume", "create", "shown", "--size", "16M", "--replicas", "2")
    node.cli("volume", "create", "idle", "--size", "16M", "--replicas", "1")
    node.cli("volume", "attach", "shown")
    try:
        info = json.loads(node.cli("node", "show", "-o", "json").stdout)
        assert info["version"] == __version__ and info["name"]
        assert (info["data_dir"], info["api_listen"]) == (str(node.data),
                                                          f"127.0.0.1:{node.port}")
        assert info["replica_address"] == "127.0.0.1"
        ports = info["replica_ports"]
        assert (ports["first"], ports["assigned"]) == (10100, 3)
        assert ports["free"] + ports["assigned"] + ports["taken"] == ports["total"]
        assert [d["path"] for d in info["disks"]] == [
            str(node.data / "disks" / "default"), str(node.root / "disk2")]
        assert info["disks"][1]["tags"] == ["second"]
        assert all(d["capacity"] >= d["available"] > 0 for d in info["disks"])
        assert info["volumes"] == {"total": 2, "states": {"attached": 1, "detached": 1},
                                   "robustness": {"healthy": 1, "unknown": 1}}
        replicas = node.volume("shown")["replica_list"]
        engine_pid = int(Path(f"{node.data}/run/shown/nbd.sock.pid").read_text())
        assert info["processes"]["engines"] == [{"volume": "shown", "pid": engine_pid}]
        servers = info["processes"]["replica_servers"]
        assert [(s["replica"], s["volume"], s["port"]) for s in servers] == sorted(
            (r["name"], "shown", r["port"]) for r in replicas)
        for server, replica in zip(servers, sorted(replicas, key=lambda r: r["name"]),
                                   strict=True):
            assert server["pid"] == int((Path(replica["directory"]) / "server.pid").read_text())
        text = node.cli("node", "show").stdout
        assert "volumes          2: 1 attached, 1 detached (1 healthy, 1 unknown)" in text
        assert "engines          1 running" in text and "replica servers  2 running" in text
        engine_row = next(line for line in text.splitlines() if line.startswith("engine "))
        assert engine_row.split() == ["engine", "shown", "-", "-", str(engine_pid)]
        assert "DISK" in text and str(node.root / "disk2") in text
        assert node.cli("node", "show", "-o", "yaml").stdout.startswith("api_listen: ")
    finally:
        node.cli("volume", "detach", "shown")
    after = json.loads(node.cli("node", "show", "-o", "json").stdout)
    assert after["processes"] == {"engines": [], "replica_servers": []}
    assert after["volumes"]["states"] == {"detached": 2}


# -- completion -----------------------------------------------------------------------------


def complete(shell: str, words: str, cword: int | str) -> list[str]:
    """What the program answers a *shell* asking to complete *words*, as its script asks."""
    env = {**os.environ, "_APPLIANCE_COMPLETE": f"{shell}_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    result = subprocess.run([APPLIANCE], env=env, capture_output=True, text=True, timeout=60,
                            check=True)
    return result.stdout.splitlines()


def test_completion_scripts_are_clicks() -> None:
    for shell in ("bash", "zsh", "fish"):
        printed = run("completion", shell).stdout
        env = {**os.environ, "_APPLIANCE_COMPLETE": f"{shell}_source"}
        source = subprocess.run([APPLIANCE], env=env, capture_output=True, text=True,
                                timeout=60, check=True).stdout
        assert printed == source and "_APPLIANCE_COMPLETE" in printed
    refused = run("completion", "tcsh", check=False)
    assert refused.returncode == 2 and "'tcsh' is not one of" in refused.stderr


def test_completion_through_the_lazy_group() -> None:
    assert complete("bash", "appliance vol", 1) == ["plain,volume"]
    assert complete("bash", "appliance se", 1) == ["plain,serve", "plain,settings"]
    commands = complete("bash", "appliance volume ", 2)
    assert {"plain,attach", "plain,create", "plain,list", "plain,show"} <= set(commands)
    assert complete("bash", "appliance settings s", 2) == ["plain,set"]
    assert complete("bash", "appliance completion ", 2) == ["plain,bash", "plain,zsh",
                                                            "plain,fish"]
    assert "--token-file" in " ".join(complete("bash", "appliance node show --", 3))
    # zsh: type, value and description per candidate; fish: the line and the current word
    assert complete("zsh", "appliance vol", 1)[:2] == ["plain", "volume"]
    fish = [line.split("\t")[0] for line in complete("fish", "appliance settings ", "")]
    assert fish == ["plain,get", "plain,list", "plain,set"]


def test_bash_completes_with_the_printed_script() -> None:
    script = (f'source <("{APPLIANCE}" completion bash)\n'
              'COMP_WORDS=(appliance vol); COMP_CWORD=1\n'
              f'_appliance_completion "{APPLIANCE}"\n'
              'echo "${COMPREPLY[@]}"\n'
              'COMP_WORDS=(appliance snapshot ""); COMP_CWORD=2\n'
              f'_appliance_completion "{APPLIANCE}"\n'
              'echo "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    first, second = result.stdout.splitlines()
    assert first == "volume"
    assert set(second.split()) >= {"create", "list", "revert", "delete", "purge"}


# -- help -----------------------------------------------------------------------------------


def client_commands() -> Iterator[tuple[str, click.Command]]:
    """Every command that talks to a daemon (it has --url), with its full name."""
    context = click.Context(cli, info_name="appliance")
    assert isinstance(cli, LazyGroup)
    todo: list[tuple[str, click.Command]] = [
        (name, command) for name in COMMANDS
        if (command := cli.get_command(context, name)) is not None]
    while todo:
        name, command = todo.pop()
        if isinstance(command, click.Group):
            todo += [(f"{name} {sub}", command.commands[sub]) for sub in command.commands]
        elif any(param.name == "url" for param in command.params):
            yield name, command


def test_client_help_names_the_environment_variables() -> None:
    found = dict(client_commands())
    assert {"volume list", "settings set", "node show", "version", "backup create"} <= \
        set(found)
    for name, command in found.items():
        text = command.get_help(click.Context(command, info_name=name))
        flat = " ".join(text.split())
        assert "env var: APPLIANCE_URL" in flat and "env var: APPLIANCE_TOKEN_FILE" in flat, \
            name
    shown = " ".join(run("disk", "list", "--help").stdout.split())
    assert "[env var: APPLIANCE_URL; default: http://127.0.0.1:9500]" in shown
