"""The daemon's configuration: flags over a TOML file over defaults; bad files refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidArgument, NotFound
from appliance.node.config import DEFAULT_DATA_DIR, load_config


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'listen = "127.0.0.1:7000"\ndata_dir = "{tmp_path / "from-file"}"\n'
                      'node_name = "n1"\nport_range = [20000, 20100]\n')
    loaded = load_config(None, None, config)
    assert (loaded.listen, loaded.data_dir, loaded.node_name, loaded.port_range) == \
        (("127.0.0.1", 7000), tmp_path / "from-file", "n1", (20000, 20100))
    flagged = load_config(tmp_path / "flag", "127.0.0.1:7001", config)
    assert (flagged.listen, flagged.data_dir, flagged.node_name) == \
        (("127.0.0.1", 7001), tmp_path / "flag", "n1")
    assert load_config(None, "127.0.0.1:7002", None).data_dir == DEFAULT_DATA_DIR


@pytest.mark.parametrize(("text", "message"), [
    ('listen = "127.0.0.1:7000"\ncolour = 1\n', "unknown key 'colour'"),
    ('listen = "127.0.0.1:7000"\nport_range = [10, 5]\n', "port_range"),
    ('listen = "nowhere"\n', "nowhere"),
    ("listen = \n", "config file"),
    ('node_name = "x"\n', "--listen"),
    ('listen = "127.0.0.1:7000"\nshare_port_range = [20490]\n', "share_port_range"),
    ('listen = "127.0.0.1:7000"\nshare_port_range = [80, 90]\n', "share_port_range"),
    ('listen = "127.0.0.1:7000"\niscsi_portal = "3260"\n', "3260"),
])
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        load_config(None, None, config)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_config(None, None, tmp_path / "absent.toml")


def test_port_range_is_inclusive(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("port_range = [10100, 10102]\n")
    ports = load_config(tmp_path / "data", "127.0.0.1:7003", config).replica_ports
    assert list(ports) == [10100, 10101, 10102]  # the last port is used too


@pytest.mark.parametrize(("given", "urls"), [
    ("etcds://a:2379,b:2379,c:2379", ("https://a:2379", "https://b:2379", "https://c:2379")),
    ("a:2379,etcds://b:2379,c:2379", ("http://a:2379", "https://b:2379", "https://c:2379")),
    ("etcd://a:2379, b:2379", ("http://a:2379", "http://b:2379")),
    (["etcds://a:2379", "b:2379"], ("https://a:2379", "https://b:2379")),
])
def test_an_etcd_scheme_holds_for_the_members_after_it(given: object,
                                                       urls: tuple[str, ...]) -> None:
    assert load_config(None, "127.0.0.1:7000", None, cluster=given).cluster == urls  # type: ignore[arg-type]


def test_a_cluster_that_is_not_addresses_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="invalid cluster"):
        load_config(None, "127.0.0.1:7000", None, cluster=5)  # type: ignore[arg-type]


def test_the_iscsi_portal_takes_the_advertised_address_unless_given(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('iscsi_portal = ":3261"\nshare_port_range = [30000, 30009]\n')
    loaded = load_config(tmp_path / "data", "127.0.0.1:7003", config, advertise="10.1.2.3")
    assert loaded.portal == ("10.1.2.3", 3261)
    assert loaded.share_port_range == (30000, 30009)
    config.write_text('iscsi_portal = "192.0.2.7:3262"\n')
    assert load_config(tmp_path / "data", "127.0.0.1:7003", config).portal == \
        ("192.0.2.7", 3262)
    default = load_config(tmp_path / "data", "127.0.0.1:7003", None)
    assert default.portal == ("127.0.0.1", 3260)
