"""ZeroMQ front, protocol and client (see docs/protocol.md)."""
