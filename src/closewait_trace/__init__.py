"""closewait-trace: find TCP sockets lingering in CLOSE_WAIT and who holds them."""

__version__ = "0.1.0"
