"""The takeover's steps (SPEC §7 steps 2-8), each an action for :func:`hsmctl.steps.run`.

Each step decides from the journal what is left of it, and journals a decision *before*
the action it leads to, so that a step interrupted anywhere is finished by running it
again: secrets are escrowed before the device hears of them, the password change is
``pending`` before it is sent, staged host keys are journaled before they are activated,
the audit key rotated away from is noted before the rotation, a client's key pair is
written and journaled before it is registered.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from hsmctl import steps, utc
from hsmctl.clients.kit import key_path
from hsmctl.clients.request import ClientRequest
from hsmctl.clients.workflow import finish_kit, kit_dir, kit_public_key, new_key, start_kit
from hsmctl.customer.store import ApplianceDir
from hsmctl.device import (
    AUDIT_KEY,
    CLIENTS,
    HOST_KEYS,
    HSM_INFO,
    ROTATE_AUDIT_KEY,
    STAGE_HOST_KEYS,
    Clients,
    register_client,
)
from hsmctl.errors import ConflictError, HsmctlError, IntegrityError, UsageError
from hsmctl.handoff.identity import TenantIdentity
from hsmctl.secret import Secret, generate_password, generate_pin
from hsmctl.sshkeys import KeyFormatError, PublicKey
from hsmctl.takeover import faults
from hsmctl.takeover.options import Options, token_label
from hsmctl.takeover.proof import prove
from hsmctl.takeover.receipt import write_receipt
from hsmctl.takeover.records import ClientKit, PasswordState, TakeoverStep, same_keys
from hsmctl.takeover.session import AdminSession


class TakeoverSteps:
    """The steps of one run, over one :class:`AdminSession`."""

    def __init__(self, session: AdminSession, opts: Options, identity: TenantIdentity) -> None:
        self.session = session
        self.opts = opts
        self.identity = identity
        self.state = session.state
        self.journal = session.journal
        self.record = session.journal.record
        self.bundle = session.bundle

    def plan(self) -> Mapping[TakeoverStep, steps.Action]:
        return {
            TakeoverStep.ESCROW: self.escrow,
            TakeoverStep.PASSWORD: self.password,
            TakeoverStep.REVOKE: self.revoke,
            TakeoverStep.HOSTKEYS: self.hostkeys,
            TakeoverStep.HSM_INIT: self.hsm_init,
            TakeoverStep.CO_PIN: self.co_pin,
            TakeoverStep.DOMAIN: self.domain,
            TakeoverStep.AUDIT_KEY: self.audit_key,
            TakeoverStep.COLLECTOR: self.collector,
            TakeoverStep.CLIENTS: self.clients,
            TakeoverStep.PROVE: self.prove,
            TakeoverStep.RECEIPT: self.receipt,
        }

    def escrow(self) -> None:
        s = self.state
        given = {
            "admin-password": self.opts.new_password,
            "so-pin": self.opts.so_pin,
            "co-pin": self.opts.co_pin,
            "domain-secret": self.opts.domain_secret,
        }
        for name, value in given.items():
            existing = s.escrowed(name)
            if value is None and name == "domain-secret":
                continue  # no domain unless asked for: never generated
            if value is None:
                if existing is None:
                    s.escrow(
                        name, generate_password() if name == "admin-password" else generate_pin()
                    )
                continue
            if value == existing:
                continue
            if existing is not None and TakeoverStep.ESCROW in self.record.done:
                # Escrowed secrets are in use from here on: changing one now could lock
                # the customer out of a half-done device.
                raise ConflictError(
                    f"a different {name} is already escrowed for {self.bundle.appliance} "
                    "by this unfinished takeover; rerun without it"
                )
            # Nothing has used the escrow yet (this step is not done): the value given wins.
            s.escrow(name, value)
        if s.escrowed("audit-collector-key") is None:
            s.escrow("audit-collector-key", _new_ssh_key())

    def password(self) -> None:
        new = self.state.escrowed("admin-password")
        assert new is not None
        record, session = self.record, self.session
        if record.password is PasswordState.ONE_TIME:
            session.admin()  # log in with the one-time password before anything changes
            record.password = PasswordState.PENDING
            record.first_login_at = record.first_login_at or utc.stamp()
            self.journal.save()
            faults.reached("pending:password", session.conn)
        if record.password is PasswordState.PENDING:
            conn = session.admin()
            if record.password is PasswordState.PENDING:
                # Still on the one-time password: make the change.
                faults.reached("send:user-password", conn)
                conn.run("user password", [new])
                faults.reached("sent:user-password", conn)
            session.drop()
            session.conn = session.connect_with(new)  # prove it before committing
            record.password = PasswordState.COMMITTED
            self.journal.save()

    def revoke(self) -> None:
        self.session.run("sysconf provider-access revoke")
        if not self.opts.keep_monitor:
            self.session.run("user disable monitor")

    def hostkeys(self) -> None:
        keys, session = self.record.host_keys, self.session
        session.admin()  # observes a rotation that happened before an interruption
        if not keys.rotated:
            info = session.read(HOST_KEYS)
            journaled = keys.staged
            on_device = bool(journaled) and (
                same_keys(info.staged_keys, journaled) or same_keys(info.active_keys, journaled)
            )
            if not on_device:
                # Nothing staged yet, or the device does not hold what we journaled (its
                # stage never happened): stage, and journal the new keys before activating.
                shown = session.read(STAGE_HOST_KEYS)
                info = session.read(HOST_KEYS)
                keys.staged = list(info.staged_keys)
                keys.staged_fingerprints = list(shown.staged)
                self.journal.save()
            if not same_keys(info.active_keys, keys.staged):
                session.run("sysconf hostkey activate")
            session.drop()
            session.await_new_host_key()
        pins = self.state.load_pins()
        pins.data_host_keys = list(keys.current)
        self.state.save_pins(pins)

    def hsm_init(self) -> None:
        so = self.state.escrowed("so-pin")
        assert so is not None
        label = token_label(self.bundle)
        if not self.record.hsm_init_sent:
            self.record.hsm_init_sent = True
            self.journal.save()
        info = self.session.read(HSM_INFO)
        if not (info.initialised and info.label == label):
            self.session.run(f"hsm init --label {label}", [so])

    def co_pin(self) -> None:
        so, co = self.state.escrowed("so-pin"), self.state.escrowed("co-pin")
        assert so is not None and co is not None
        self.session.run("hsm co-pin set", [so, co])

    def domain(self) -> None:
        """``hsm domain set`` with the escrowed domain secret, if one was given; the same
        domain again changes nothing on the device, so a resumed run repeats it safely."""
        secret = self.state.escrowed("domain-secret")
        if secret is None:
            return
        so = self.state.escrowed("so-pin")
        assert so is not None
        self.session.run("hsm domain set", [so, secret])

    def audit_key(self) -> None:
        pins = self.state.load_pins()
        current = self.session.read(AUDIT_KEY)
        key_id, public_key = current.key_id, current.public_key
        before = self.record.audit_key_before
        if before is None or key_id == before:
            # Not rotated yet (or the rotation never reached the device): note the key
            # we rotate away from, then rotate.
            self.record.audit_key_before = key_id
            self.journal.save()
            rotated = self.session.read(ROTATE_AUDIT_KEY)
            key_id, public_key = rotated.key_id, rotated.public_key
        pins.audit_keys[key_id] = public_key
        self.state.save_pins(pins)
        self.record.audit_key_id = key_id
        self.journal.save()

    def collector(self) -> None:
        key = self.state.escrowed("audit-collector-key")
        assert key is not None
        public = _public_line(key, f"{self.bundle.tenant}-collector")
        self.session.run("user credential set audit", [public])
        self.session.run("user enable audit")
        pins = self.state.load_pins()
        pins.audit_account_key = public
        self.state.save_pins(pins)

    def clients(self) -> None:
        record = self.record
        if record.clients is None:
            # The set is committed before the first key is made: a rerun must ask for the
            # same (options.client_set_change).
            record.clients = [ClientKit(c.name, c.role) for c in self.opts.clients]
            self.journal.save()
        todo = [c for c in record.clients if c.kit is None]
        if not todo:
            return  # no --client: no client accounts
        listed = self.session.read(CLIENTS)
        for client in todo:
            self._client(client, listed)

    def _client(self, client: ClientKit, listed: Clients) -> None:
        """One client, as ``hsmctl client register`` makes it: key pair and kit in a
        directory beside the kit's place, the device told, the kit renamed into place."""
        host, name = self.bundle.appliance, client.name
        final = kit_dir(self.state, name)
        staging = final.with_name(f".{final.name}.takeover")
        on_device = listed.named(name)
        if on_device is not None and (
            on_device.fingerprint != client.fingerprint or on_device.role != client.role
        ):
            # Not the key (or role) this takeover chose: never overwrite a registration.
            raise IntegrityError(
                f"{host}: the device lists client {name} ({on_device.role}, key "
                f"{on_device.fingerprint}), which is not the {client.role} client with key "
                f"{client.fingerprint or '(none made yet)'} this takeover registers; it is "
                f"left as it is: revoke it (hsmctl client revoke {host} --name {name}) and "
                "rerun to register this takeover's"
            )
        here = self._kit_keys(client, (staging, final), registered=on_device is not None)
        assert client.public_key is not None
        if on_device is None:
            fact = register_client(name, client.role)
            out = self.session.run(fact.command, [client.public_key])
            shown = fact.process(out, host)
            if shown.fingerprint != client.fingerprint or shown.name != name:
                raise IntegrityError(
                    f"{host}: client register {name} answered for {shown.name} with key "
                    f"{shown.fingerprint}, not {client.fingerprint}"
                )
        if here == staging:
            finish_kit(
                staging,
                final,
                name=name,
                role=client.role,
                appliance=host,
                data_ip=self.bundle.data_ip,
                host_keys=self.state.load_pins().data_host_keys,
                label=token_label(self.bundle),
            )
            faults.reached(f"kit:{name}", self.session.conn)
        client.kit = str(final)
        self.journal.save()

    def _kit_keys(self, client: ClientKit, places: tuple[Path, Path], *, registered: bool) -> Path:
        """Where the client's key pair is (the staging directory or, renamed, the kit):
        the journaled one, or a new one written and journaled before anyone uses it."""
        staging = places[0]
        if client.public_key is not None:
            for place in places:
                line = kit_public_key(place, client.name)
                if _same_key(line, client.public_key) and key_path(place, client.name).is_file():
                    return place
            if registered:
                raise HsmctlError(
                    f"{self.bundle.appliance}: client {client.name} is registered with the "
                    f"key this takeover journaled, but its private key is in neither {staging} "
                    f"nor its kit; restore it, or revoke the client (hsmctl client revoke "
                    f"{self.bundle.appliance} --name {client.name}) and rerun: a new key is "
                    "then made"
                )
            # Lost before the device heard of it: a new key is as good.
        shutil.rmtree(staging, ignore_errors=True)
        private, line = new_key(client.name)
        start_kit(staging, client.name, line, private)  # written and fsynced
        client.public_key = line
        self.journal.save()
        return staging

    def prove(self) -> None:
        proof = prove(self.session, keep_monitor=self.opts.keep_monitor)
        self.record.checks = list(proof.checks)
        self.record.log_head = proof.log_head
        self.record.transfer_seq = proof.transfer_seq
        self.record.provisioned_seq = proof.provisioned_seq
        self.journal.save()
        failed = [c.name for c in proof.checks if not c.ok]
        if failed:
            raise IntegrityError(
                f"{self.bundle.appliance}: takeover checks failed: {', '.join(failed)}",
                detail={"checks": [c.as_dict() for c in proof.checks]},
            )

    def receipt(self) -> None:
        write_receipt(
            self.state.dir,
            self.bundle,
            self.record,
            self.state.load_pins(),
            keep_monitor=self.opts.keep_monitor,
            identity=self.identity,
        )


def check_client_kits(
    state: ApplianceDir, requested: Sequence[ClientRequest], journaled: Sequence[ClientKit] | None
) -> None:
    """Before anything is sent: each client's kit goes where ``hsmctl client register``
    puts it, so that place must be free, or hold this takeover's own kit (exit 2)."""
    mine = {c.name: c for c in journaled or ()}
    for request in requested:
        client = mine.get(request.name)
        if client is not None and client.kit is not None:
            continue  # done by an earlier run
        final = kit_dir(state, request.name)
        if not final.exists() or (final.is_dir() and not any(final.iterdir())):
            continue
        held = kit_public_key(final, request.name)
        if client is not None and _same_key(held, client.public_key):
            continue  # ours, renamed into place before an interruption
        raise UsageError(
            f"--client {request}: {final} exists and is not empty (the kit of an earlier "
            "registration?); move it away or choose another name"
        )


def _same_key(line: str | None, journaled: str | None) -> bool:
    """Whether a kit's public key line is the journaled one (a damaged line is not)."""
    if line is None or journaled is None:
        return False
    try:
        return PublicKey.parse(line) == PublicKey.parse(journaled)  # type and blob
    except KeyFormatError:
        return False


def _new_ssh_key() -> Secret:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return Secret(pem.decode("ascii").rstrip("\n"))


def _public_line(private: Secret, comment: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private.reveal().encode("ascii") + b"\n", None)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{pub.decode('ascii')} {comment}"
