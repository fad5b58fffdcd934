"""What guardfab's HTTPS services share: TLS material, access tokens, bearer roles.

The HGS and the guarded-host agent's management API both authenticate people
by role-bound bearer tokens over TLS from a private CA; this package is that
one implementation (:mod:`.tls`, :mod:`.tokens`, :mod:`.bearer`).
"""
