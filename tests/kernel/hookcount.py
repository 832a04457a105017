"""A second observer of the state-change hook, apart from the tracer: the
TCP state changes of sockets on one local port that the kernel's raw
tracepoint inet_sock_set_state hands to a BPF program, counted in the
kernel. The runs of it the kernel skipped are in its fdinfo
(recursion_misses), read by the test like the tracer's
(bench/run.py bpf_recursion_misses).

    hookcount.py PORT     prints "ready" once attached; on SIGINT, one
                          JSON line {"seen": N}, and exits

Why a test needs it (tests/kernel/test_bench_smoke.py): under saturating
loopback churn this kernel (6.18) now and then hands no program at that
hook a connection's LISTEN -> SYN_RECV and SYN_RECV -> ESTABLISHED, and
counts nothing. This program alone, with no tracer running, fell short of
what bench/churn.c made in 23 of 60 one-second runs (about 420,000 state
changes each), always by such pairs (the connections' later transitions
all there), in 2 of them by more than all the runs the kernel said it
skipped; beside the tracer it fell short by a pair in runs where it
skipped none. So what the workload made is not always what the hook
gave; but what the hook gave one program, another must have seen or
counted as skipped. It reads the socket's fields at the
offsets the tracer's program uses (kernel/btf.py StateOffsets), not through
the tracer's code.
"""

import json
import signal
import sys

from bcc import BPF

from closewait_trace.kernel import btf, kernel_headers

SOURCE = r"""
BPF_PERCPU_ARRAY(seen, u64, 1);

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    u16 protocol = 0, sport = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(sk + PROTOCOL_OFF));
    bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + SPORT_OFF));
    if (protocol != 6 || __builtin_bswap16(sport) != PORT)
        return 0;
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        (*n)++;
    return 0;
}
"""


def main() -> int:
    port = int(sys.argv[1])
    blob = btf.read_bounded(btf.VMLINUX)
    offsets = btf.state_offsets_from(blob) if blob is not None else None
    if offsets is None:
        print("no BTF offsets for the socket's fields", file=sys.stderr)
        return 1
    kernel_headers.apply(kernel_headers.choose_headers())
    program = BPF(text=SOURCE, cflags=[f"-DPORT={port}", f"-DPROTOCOL_OFF={offsets.protocol}",
                                       f"-DSPORT_OFF={offsets.sport}"])
    # Blocked, then waited for: a SIGINT sent as soon as "ready" is read is
    # taken whenever it comes.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    print("ready", flush=True)
    signal.sigwait({signal.SIGINT})
    seen = sum(program["seen"][0])
    print(json.dumps({"seen": seen}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
