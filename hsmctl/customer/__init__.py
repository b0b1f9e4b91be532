"""What every customer-side workflow shares: the tenant's configuration and identity
(:mod:`context`) and the customer's state directory — pins, journals, escrowed secrets,
receipts, log archives (:mod:`store`). The workflows themselves live in their own
packages: ``takeover``, ``collect``, ``clients``, ``keys``; the release is a signed
document of ``handoff``."""
