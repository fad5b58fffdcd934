"""A software stand-in for a guarded host's TPM and firmware, for demos and tests.

Not used by the product: no guardfab service or command imports it. It lives in
the package (not under tests/) so that ``scripts/demo_host.py`` runs from the
runtime virtualenv, without pytest or the test harness (ADR 0019):

- :mod:`guardfab.softhost.swtpm`: an swtpm manufactured with a local vendor CA
  and EK certificate, and a measured boot replayed into its PCRs;
- :mod:`guardfab.softhost.boot`: a synthetic UEFI boot (:class:`~guardfab.softhost.boot.Boot`)
  and the CI policy file it measures;
- :mod:`guardfab.softhost.eventlog`: the TCG PC Client log serializer and
  reference replay behind it, written independently of guardfab's parser.
"""
