"""The host configuration file: strict loading, defaults, atomic 0600 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from guardfab.errors import FormatError, UsageError
from guardfab.host.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_EVENT_LOG,
    DEFAULT_TCTI,
    HgsSite,
    HostConfig,
    HostMode,
    RenewalSettings,
    RetrySettings,
    config_path,
    load_config,
    save_config,
)
from guardfab.host.signer import Pkcs11Uri


def minimal() -> dict[str, Any]:
    return {
        "version": 1,
        "mode": "tpm",
        "attestation_url": "https://hgs.example:8443",
        "key_protection_url": "https://hgs.example:8443/",
        "ca_file": "/etc/guardfab/hgs-ca.pem",
    }


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = HostConfig.from_dict(minimal())
    assert config.mode is HostMode.TPM
    assert config.primary == HgsSite("https://hgs.example:8443", "https://hgs.example:8443")
    assert config.fallback is None
    assert config.tcti == DEFAULT_TCTI == "device:/dev/tpmrm0"
    assert config.event_log == DEFAULT_EVENT_LOG
    assert config.renewal == RenewalSettings(fraction=0.75, min_validity=30.0)
    assert config.retry == RetrySettings()
    assert config.allowed_uid == 0
    assert config.direct_boot_dir is None  # no direct kernel boot unless a directory is named
    assert config.sites == (config.primary,)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    full = minimal() | {
        "fallback_attestation_url": "https://hgs2.example",
        "fallback_key_protection_url": "https://hgs2.example/kps",
        "tcti": "swtpm:host=127.0.0.1,port=2321",
        "event_log": "/var/tmp/log.bin",
        "ci_policy": "/etc/ima/policy",
        "mode": "host-key",
        "signing_key": "/etc/guardfab/sign.pem",
        "allowed_uid": 107,
        "direct_boot_dir": "/var/lib/guardfab/boot",
        "renewal": {"fraction": 0.5, "min_validity": 10},
        "retry": {"initial_delay": 1, "max_delay": 60, "jitter": 0, "failback_after": 5,
                  "http_timeout": 3},
    }  # fmt: skip
    config = HostConfig.from_dict(full)
    path = tmp_path / "etc" / "host.json"
    save_config(path, config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_config(path) == config
    assert config.fallback == HgsSite("https://hgs2.example", "https://hgs2.example/kps")
    assert config.direct_boot_dir == Path("/var/lib/guardfab/boot")


_URI = "pkcs11:token=host;object=k;type=private?module-path=/m.so&pin-source=/etc/pin"


def test_signing_key_is_a_path_or_a_pkcs11_uri() -> None:
    as_file = HostConfig.from_dict(minimal() | {"mode": "host-key", "signing_key": "file:/k.pem"})
    assert as_file.signing_key == Path("/k.pem")
    on_token = HostConfig.from_dict(minimal() | {"mode": "host-key", "signing_key": _URI})
    assert isinstance(on_token.signing_key, Pkcs11Uri)
    assert on_token.signing_key.pin_source == Path("/etc/pin")
    assert HostConfig.from_dict(on_token.to_dict()) == on_token


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version 1"),
        ({"colour": "blue"}, r"unknown field\(s\) colour"),
        ({"fallback_atestation_url": "https://x"}, "unknown field"),
        ({"attestation_url": "http://hgs.example"}, "not an https URL"),
        ({"attestation_url": "https://user:pw@hgs.example"}, "no credentials"),
        ({"key_protection_url": None}, "attestation_url and key_protection_url"),
        ({"fallback_attestation_url": "https://hgs2"}, "give both"),
        ({"mode": "magic"}, "invalid value"),
        ({"mode": "host-key"}, "signing_key"),
        ({"ca_file": "relative/ca.pem"}, "absolute path"),
        ({"encryption_key": "pkcs11:token=host;object=enc"}, "PKCS#11 URIs are not supported"),
        ({"mode": "host-key", "signing_key": "pkcs11:token=host;object=k"}, "'module-path'"),
        ({"mode": "host-key", "signing_key": f"{_URI}&pin-value=1"}, "PIN in the URI is refused"),
        ({"mode": "host-key", "signing_key": _URI.replace("private", "cert")}, "'private'"),
        ({"mode": "host-key", "signing_key": "file:relative.pem"}, "absolute path"),
        ({"allowed_uid": "0"}, "must be an integer"),
        ({"allowed_uid": True}, "must be an integer"),
        ({"ak_handle": 0x01000000}, "not a persistent handle"),
        ({"ek_profile": "EK-DSA"}, "ek_profile"),
        ({"renewal": {"fraction": 1.0}}, "fraction"),
        ({"renewal": {"fraction": "0.5"}}, "must be a number"),
        ({"renewal": {"when": 1}}, "unknown field"),
        ({"retry": {"initial_delay": 10, "max_delay": 1}}, "initial_delay <= max_delay"),
        ({"retry": {"jitter": 2}}, "jitter"),
        ({"tcti": 5}, "tcti"),
        ({"direct_boot_dir": "boot"}, "direct_boot_dir: 'boot' must be an absolute path"),
    ],
)
def test_strict_loading_names_the_problem(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        HostConfig.from_dict(minimal() | change)


def test_missing_required_field() -> None:
    data = minimal()
    del data["ca_file"]
    with pytest.raises(FormatError, match="missing field 'ca_file'"):
        HostConfig.from_dict(data)


def test_unconfigured_host_is_told_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as error:
        load_config(tmp_path / "host.json")
    assert "host configure" in error.value.hint


def test_broken_file_is_a_format_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text("{not json")
    with pytest.raises(FormatError, match=str(path)):
        load_config(path)
    path.write_text(json.dumps(minimal() | {"extra": 1}))
    with pytest.raises(FormatError, match="unknown field"):
        load_config(path)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.json"))
    assert config_path() == tmp_path / "env.json"
    assert config_path(tmp_path / "explicit.json") == tmp_path / "explicit.json"


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    first = HostConfig.from_dict(minimal())
    save_config(path, first)
    second = HostConfig.from_dict(minimal() | {"tcti": "swtpm:host=127.0.0.1,port=1"})
    save_config(path, second)
    assert load_config(path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["host.json"]
