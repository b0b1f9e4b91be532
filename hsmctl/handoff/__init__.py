"""Provider/tenant cryptography: hand-off bundles, tenant-signed receipts and releases.

* :mod:`.identity` - the tenant identity (OpenSSH ECDSA P-256 key file) and the
  provider's Ed25519 signing key; OpenSSH fingerprints; private-file I/O.
* :mod:`.bundle` - the provider-signed hand-off bundle with the one-time password
  encrypted to the tenant (ECIES P-256 / HKDF-SHA256 / AES-256-GCM).
* :mod:`.signed` - canonical signed JSON documents signed by the tenant identity
  (receipts, releases).

docs/crypto.md explains the choices. Library only: nothing here prints or exits.
"""

from hsmctl.handoff.bundle import (
    FORMAT,
    OTP_ALG,
    Bundle,
    BundleExpired,
    OpenedBundle,
    bundle_id,
    make_bundle,
    open_bundle,
    open_bundle_data,
    read_bundle,
    verify_bundle,
    write_bundle,
)
from hsmctl.handoff.identity import (
    TenantIdentity,
    ensure_provider_signing_key,
    load_provider_public_key,
    load_provider_signing_key,
    ssh_fingerprint,
    tenant_public_key,
)
from hsmctl.handoff.signed import (
    RELEASE_FORMAT,
    TENANT_SIG_ALG,
    make_release,
    read_document,
    sign_document,
    verify_document,
    verify_release,
    write_document,
)

__all__ = [
    "FORMAT",
    "OTP_ALG",
    "RELEASE_FORMAT",
    "TENANT_SIG_ALG",
    "Bundle",
    "BundleExpired",
    "OpenedBundle",
    "TenantIdentity",
    "bundle_id",
    "ensure_provider_signing_key",
    "load_provider_public_key",
    "load_provider_signing_key",
    "make_bundle",
    "make_release",
    "open_bundle",
    "open_bundle_data",
    "read_bundle",
    "read_document",
    "sign_document",
    "ssh_fingerprint",
    "tenant_public_key",
    "verify_bundle",
    "verify_document",
    "verify_release",
    "write_bundle",
    "write_document",
]
