"""Attestation: evidence verification per mode and policy evaluation (pure, no I/O).

The HGS service calls, per request:

* :func:`guardfab.attestation.evidence.load_evidence` (request body bytes) or
  ``evidence_from_dict`` (parsed JSON) to get typed evidence;
* the mode's verifier with a :class:`~guardfab.attestation.trust.TrustState`,
  the checked nonce and the time:
  :func:`~guardfab.attestation.tpm_mode.verify_tpm_evidence`,
  :func:`~guardfab.attestation.hostkey_mode.verify_host_key_evidence`,
  :func:`~guardfab.attestation.admin_group_mode.verify_admin_group_evidence`;
  each returns an :class:`~guardfab.attestation.result.AttestationResult`;
* on ActivationRequired, :func:`~guardfab.attestation.activation.activation_challenge`,
  then ``check_activation_response`` and ``binding_for``;
* for administration: :mod:`~guardfab.attestation.baseline` (baselines, diffs,
  candidates), :func:`~guardfab.attestation.policies.set_policy_state`,
  :func:`~guardfab.attestation.whatif.what_if`.

Nothing here reads a clock, a file, the network or a store. Submodules are
not imported here, so that a host importing :mod:`.binding` stays light.
"""
