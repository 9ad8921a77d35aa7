"""A cluster of engram_shm nodes, coordinated by etcd (DESIGN.md section 8).

coord.py is the only module that talks to etcd: membership under leases, and
the space table (space -> owner node and epoch) changed only by transactions.
etcd_process.py starts a private etcd for tests and benchmarks.
"""
