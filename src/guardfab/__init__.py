"""guardfab: a guarded fabric for Linux/KVM.

Hosts prove their health to a Host Guardian Service (HGS); the HGS releases a
shielded VM's keys only to hosts it found healthy. See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
