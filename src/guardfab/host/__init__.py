"""The guarded-host agent: evidence from the host's TPM, attestation and key requests.

``host.tpm`` is the edge where the TPM lives (tpm2-pytss over ``/dev/tpmrm0``, or
swtpm in tests) behind the small ``TpmDevice`` protocol, so the agent's logic can be
tested with a simulator and every device failure arrives as one ``TpmDeviceError``.
"""
