"""Who may connect (CURVE keys, keys.py), what each key may do (acl.py), and
the front's check of every message (gate.py). docs/security.md is the guide."""
