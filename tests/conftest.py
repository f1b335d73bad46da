"""Shared pytest configuration: unit tests need no sockets, interop tests start engines."""
