"""Which audit keys sign the log: checkpoints and key rotations, checked against them.

The pinned audit keys are trusted. A valid ``key-rotation`` record (old key trusted, both
signatures good) trusts the new key and retires the old one, so a leaked old key cannot
sign later checkpoints. A collector that resumes from its archive passes the resulting
``report.trusted_keys`` and ``report.retired_keys`` back in next time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hsmctl.auditlog.chain import Head
from hsmctl.auditlog.report import Stop, ViolationKind
from hsmctl.auditlog.signing import (
    ALG,
    checkpoint_payload,
    key_id_for_pem,
    key_rotation_payload,
    verify_raw_signature,
)
from hsmctl.errors import ConfigError

_CHECKPOINT_KEYS = frozenset({"head", "device", "key_id", "alg", "sig"})
_ROTATION_KEYS = frozenset(
    {"head", "device", "alg", "old_key_id", "new_key_id", "new_public_key", "sig_old", "sig_new"}
)


def _check_detail(seq: int, detail: Mapping[str, Any], keys: frozenset[str], what: str) -> None:
    if detail.keys() != keys:
        missing = ", ".join(sorted(keys - detail.keys())) or "-"
        extra = ", ".join(sorted(detail.keys() - keys)) or "-"
        raise Stop(
            ViolationKind.MALFORMED, seq, f"malformed {what}: missing {missing}, unexpected {extra}"
        )
    for name in keys - {"head"}:
        if type(detail[name]) is not str:
            raise Stop(ViolationKind.MALFORMED, seq, f"malformed {what}: {name} is not a string")


class Trust:
    """The keys trusted and retired so far, and the device the log is for.

    Lifecycle: create with the pinned keys (checked: a key id must be its key's); the
    verifier calls ``checkpoint`` or ``rotation`` for each signed record, in order, after
    the record's form and link are checked. Each raises ``Stop`` or records what the
    record proved.
    """

    def __init__(
        self,
        trusted_keys: Mapping[str, str],
        *,
        device: str | None,
        retired_keys: Iterable[str],
    ) -> None:
        self.trusted: dict[str, str] = {}
        for key_id, pem in trusted_keys.items():
            try:
                actual = key_id_for_pem(pem)
            except ValueError as exc:
                raise ConfigError(f"pinned audit key {key_id}: {exc}") from exc
            if actual != key_id:
                raise ConfigError(f"pinned audit key {key_id} is really {actual}")
            self.trusted[key_id] = pem
        self.retired: dict[str, int | None] = dict.fromkeys(retired_keys)
        for key_id in self.retired:
            self.trusted.pop(key_id, None)
        self.device = device
        self.keys_seen: dict[str, None] = {}

    def _signed_head(self, seq: int, record: Mapping[str, Any], what: str) -> Head:
        head = record["detail"]["head"]
        if not (
            type(head) is dict
            and head.keys() == {"seq", "hash"}
            and type(head["seq"]) is int
            and type(head["hash"]) is str
        ):
            raise Stop(ViolationKind.MALFORMED, seq, f"malformed {what}: bad head")
        signed = Head(head["seq"], head["hash"])
        if signed != Head(seq - 1, record["prev"]):
            raise Stop(
                ViolationKind.HEAD_MISMATCH,
                seq,
                f"{what} signs head {signed.seq}/{signed.hash[:12]} but the previous record"
                f" is {seq - 1}/{record['prev'][:12]}",
            )
        return signed

    def _check_device(self, seq: int, device: str, what: str) -> None:
        if self.device is not None and device != self.device:
            raise Stop(
                ViolationKind.WRONG_DEVICE,
                seq,
                f"{what} is for device {device!r}, expected {self.device!r}",
            )

    def checkpoint(self, seq: int, record: Mapping[str, Any]) -> None:
        detail = record["detail"]
        if not detail.get("sig"):
            raise Stop(ViolationKind.MISSING_SIGNATURE, seq, "checkpoint has no signature")
        _check_detail(seq, detail, _CHECKPOINT_KEYS, "checkpoint")
        head = self._signed_head(seq, record, "checkpoint")
        device, key_id = detail["device"], detail["key_id"]
        self._check_device(seq, device, "checkpoint")
        if detail["alg"] != ALG:
            raise Stop(
                ViolationKind.BAD_SIGNATURE, seq, f"checkpoint alg {detail['alg']!r} unsupported"
            )
        pem = self.trusted.get(key_id)
        if pem is None:
            if key_id in self.retired:
                at = self.retired[key_id]
                when = f" at record {at}" if at is not None else ""
                raise Stop(
                    ViolationKind.RETIRED_KEY,
                    seq,
                    f"checkpoint signed by key {key_id[:16]}, retired{when}",
                )
            raise Stop(
                ViolationKind.UNKNOWN_KEY, seq, f"checkpoint signed by unknown key {key_id[:16]}"
            )
        if not verify_raw_signature(pem, detail["sig"], checkpoint_payload(device, head, key_id)):
            raise Stop(
                ViolationKind.BAD_SIGNATURE,
                seq,
                f"checkpoint signature does not verify with key {key_id[:16]}",
            )
        self.device = device
        self.keys_seen[key_id] = None

    def rotation(self, seq: int, record: Mapping[str, Any]) -> None:
        detail = record["detail"]
        for name in ("sig_old", "sig_new"):
            if not detail.get(name):
                raise Stop(ViolationKind.MISSING_SIGNATURE, seq, f"key rotation has no {name}")
        _check_detail(seq, detail, _ROTATION_KEYS, "key rotation")
        head = self._signed_head(seq, record, "key rotation")
        device = detail["device"]
        old, new, new_pem = detail["old_key_id"], detail["new_key_id"], detail["new_public_key"]
        self._check_device(seq, device, "key rotation")

        def broken(why: str) -> Stop:
            return Stop(ViolationKind.BAD_ROTATION, seq, f"key rotation: {why}")

        if detail["alg"] != ALG:
            raise broken(f"alg {detail['alg']!r} unsupported")
        old_pem = self.trusted.get(old)
        if old_pem is None:
            state = "retired" if old in self.retired else "not trusted"
            raise broken(f"old key {old[:16]} is {state}")
        try:
            actual_new = key_id_for_pem(new_pem)
        except ValueError:
            raise broken("new_public_key is not a P-256 public key") from None
        if actual_new != new:
            raise broken(f"new_key_id {new[:16]} is not the id of new_public_key")
        if new == old or new in self.retired:
            raise broken(f"new key {new[:16]} is not new")
        payload = key_rotation_payload(device, head, old, new, new_pem)
        if not verify_raw_signature(old_pem, detail["sig_old"], payload):
            raise broken("sig_old does not verify with the old key")
        if not verify_raw_signature(new_pem, detail["sig_new"], payload):
            raise broken("sig_new does not verify with the new key")
        del self.trusted[old]
        self.retired[old] = seq
        self.trusted[new] = new_pem
        self.device = device
        self.keys_seen[old] = None
        self.keys_seen[new] = None
        self._last_checkpoint = seq
