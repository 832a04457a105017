"""Sockets and their holders: sock_diag and /proc/net tables per network namespace, /proc read defensively, the capabilities those reads need."""
