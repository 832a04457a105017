"""Why a socket is not closed: the diagnosis, and where each holder waits (user stacks from bounded ELF parsing)."""
