"""User-facing errors and the exit codes documented in the README."""

EXIT_USAGE = 2          # bad option value or argument (click's own code too)
EXIT_NOT_ROOT = 3       # live tracing needs root (CAP_BPF + CAP_PERFMON; CAP_SYS_ADMIN
                        # to attach where perf events are restricted)
EXIT_NO_BCC = 4         # bcc's Python binding cannot be imported
EXIT_NO_HEADERS = 5     # no kernel header tree for bcc to compile against
EXIT_NO_BPF = 6         # the kernel refused the program, or no tracepoint
EXIT_FILE = 7           # a recording cannot be read or written
EXIT_GATHER = 8         # snapshot: the sockets and owners could not be read (in time, or no worker)
EXIT_INTERRUPTED = 130  # unused by design: Ctrl-C is a normal end (exit 0)


class UserError(Exception):
    """A problem the user can fix: printed as one line, never a traceback."""

    def __init__(self, message: str, exit_code: int, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.hint = hint

    def one_line(self) -> str:
        if self.hint:
            return f"closewait-trace: {self.message}; {self.hint}"
        return f"closewait-trace: {self.message}"
