"""Pure parts of two issue-12 fixes: which host keys a ``--kit`` accepts beyond the
target's pins (restore/backup refuse such a kit), and the size record an imported AES key
gets beside it on the token (SoftHSM 2.6.1 keeps no CKA_VALUE_LEN for unwrapped keys)."""

from __future__ import annotations

from hsmctl.keys.backup import foreign_kit_keys
from hsmctl.keys.remote import parse_size_record, size_record

K1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne"
K2 = "ecdsa-sha2-nistp256 AAAAE2VjZHNhTwo"
K3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIThree"


def test_a_kit_pinned_to_the_targets_keys_only_is_accepted() -> None:
    known = f"198.19.0.92 {K1}\n198.19.0.92 {K2}\n"
    assert foreign_kit_keys(known, [f"{K1} comment", K2]) == []


def test_another_appliances_kit_or_a_group_kit_is_refused() -> None:
    assert foreign_kit_keys(f"198.19.0.93 {K3}\n", [K1, K2]) == [K3]
    group = f"hsm-group-g {K1}\nhsm-group-g {K3}\n"
    assert foreign_kit_keys(group, [K1, K2]) == [K3]


def test_an_empty_known_hosts_is_refused_not_accepted() -> None:
    assert foreign_kit_keys("", [K1]) == ["(none)"]
    assert foreign_kit_keys("# only a comment\n\n", [K1]) == ["(none)"]


def test_size_record_round_trip_and_junk() -> None:
    key_id = bytes.fromhex("0011223344556677")
    for bits in (128, 192, 256):
        assert parse_size_record(size_record(key_id, bits)) == (key_id.hex(), bits)
    for junk in (b"", b"00 512", b"zz 256", b"0011 256 extra", b"\xff\xfe 128", b"0011 25"):
        assert parse_size_record(junk) is None
