// SPDX-License-Identifier: Apache-2.0
//
// closewait-trace kernel side: times TCP sockets in CLOSE_WAIT.
//
// Reads the fields of the sock:inet_sock_set_state tracepoint, whose layout
// bcc takes from the running kernel's tracefs format file, and, when user
// space found them in the kernel's BTF, two words at given offsets for the
// socket's network namespace. Keep it that way: no kernel struct types and
// no kernel #includes, so that the generic distro headers are enough to
// build it on any kernel.
//
// Cost model: a socket that passes through CLOSE_WAIT quickly costs one hash
// insert and one delete here (and, with the BTF offsets, two 8- and 4-byte
// kernel reads for its namespace) and nothing in user space. Only a socket that
// leaves CLOSE_WAIT after lingering at least THRESHOLD_NS produces an event;
// user space finds the ones still lingering by reading cw_tracking each tick.
//
// Compile-time options, passed by user space as -D flags:
//   THRESHOLD_NS         linger threshold (required)
//   MAX_TRACKED          capacity of cw_tracking (required)
//   USE_RINGBUF          ring buffer (5.8+) instead of the perf buffer
//   USE_BOOT_CLOCK       bpf_ktime_get_boot_ns (5.8+) instead of ktime
//   FILTER_FAMILY        only this address family (2 = AF_INET, 10 = AF_INET6)
//   FILTER_LPORT         only local ports present in cw_lports
//   FILTER_RPORT         only remote ports present in cw_rports
//   ALL_TRANSITIONS      also stream every transition (the --all mode)
//   NETNS_SK_NET_OFF     offset of skc_net.net (struct net *) in struct sock
//   NETNS_INUM_OFF       offset of ns.inum (u32) in struct net; both from
//                        BTF (kernel/btf.py). Without them netns stays 0
//                        (unknown) and user space matches by address only.
//   USE_PROBE_READ_KERNEL  bpf_probe_read_kernel (5.5+) over bpf_probe_read
//   EOF_CAPTURE          also attach to sock:sock_recv_length (not in 6.1;
//                        x86-64; bpf_task_pt_regs, 5.15):
//                        where a socket in CLOSE_WAIT was read to its end
//   MAX_EOF_CAPTURES     capacity of cw_eof (with EOF_CAPTURE)
//   EOF_STACK_BYTES      bytes of the reader's user stack kept (power of two,
//                        at most 4096: one page, see cw_copy_stack)
//   CAPTURES_PER_S       captures of each kind per CPU per second, at most
//   CAPTURES_PER_PROC_S  captures of each kind per process per second, at most
//   OPEN_CAPTURE         also keep where client sockets were connect()ed
//   MAX_OPEN_CAPTURES    capacity of cw_open (with OPEN_CAPTURE)
//   MAX_EXEC_TRACKED     capacity of cw_exec_ns (with either capture)
//   MAX_EXEC_NEW         capacity of cw_exec_new (with either capture)
//   MAX_PY_PROCS         capacity of cw_py: CPython processes whose Python
//                        frames a capture also copies (with either capture)

#if defined(EOF_CAPTURE) || defined(OPEN_CAPTURE)
#define EOF_STACK_BYTES_OR_1 EOF_STACK_BYTES
#else
#define EOF_STACK_BYTES_OR_1 1
#endif

// Values from the kernel's uapi headers, which this file must not include.
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define IPPROTO_TCP_NUM 6
#define AF_INET_NUM 2

// Python frames a capture copies, and thread states it looks through for
// the capturing thread's (powers of two: indices are masked).
#define PY_MAX_FRAMES 16
#define PY_MAX_THREADS 64
// cw_eof.py_status
#define CW_PY_NONE 0          // not a CPython process user space registered
#define CW_PY_COPIED 1        // frames copied (py_frames of them)
#define CW_PY_NO_THREAD 2     // its thread state not among the first PY_MAX_THREADS
#define CW_PY_UNREADABLE 3    // the interpreter's state could not be read

// Event kinds; decoded by closewait_trace.events.
#define EV_CLOSED 1           // left CLOSE_WAIT after lingering >= threshold
#define EV_UNTRACKED_EXIT 2   // left CLOSE_WAIT, but its entry was never seen
#define EV_TRANSITION 3       // any transition (--all only)

// A connection's two ends as the tracepoint gives them (IPv4 addresses in
// the first 4 bytes). The one definition of the address fields: the event,
// the tracking entry and the tracepoint copy all embed it as `ep`.
struct cw_endpoint {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u16 family;
    u16 _pad;
    u32 netns;      // network namespace inode; 0 = unknown (no BTF offsets)
    u32 _pad2;
};

// One event sent to user space. This is the only definition of the layout:
// user space takes it from bcc, which parses this file.
struct cw_event {
    u64 ts_ns;          // kernel clock at the transition
    u64 skaddr;         // socket address: identity while the socket lives
    u64 duration_ns;    // time in the state being left; 0 = unknown
    u32 pid;            // tgid current at the transition (may be unrelated
    u32 tid;            //   to the socket when run from softirq)
    struct cw_endpoint ep;
    u8 oldstate;
    u8 newstate;
    u8 kind;
    u8 _pad[5];
    char comm[16];
};

// What cw_tracking remembers about a socket in CLOSE_WAIT.
struct cw_entry {
    u64 enter_ns;
    struct cw_endpoint ep;
    u64 eof_ns;         // when a read first returned end of stream; 0 = not
                        //   seen (or EOF_CAPTURE off)
};

// Where the process was when it read the end of a socket in CLOSE_WAIT: its
// user registers and the top of its user stack, unwound later in user space
// (as perf --call-graph dwarf does), because the function that read EOF
// may have returned long before anyone asks. Kept by socket in cw_eof until
// user space reports the socket (and reads it) or the socket leaves.
struct cw_eof {
    u64 ts_ns;
    u32 pid;
    u32 tid;
    u64 ip;             // user registers at the system call (x86-64 pt_regs)
    u64 sp;
    u64 bp;
    u32 stack_len;      // bytes of stack copied from sp
    u32 py_status;      // CW_PY_*: whether Python frames were copied
    char comm[16];
    // A CPython process's Python frames at the event (cw_py_frames): each
    // frame's code object and last instruction, innermost first. The
    // interpreter's frames live on its heap and are reused as soon as the
    // function returns: only here, at the event, are they the reader's.
    u32 py_frames;
    u32 _pad2;
    u64 py_code[PY_MAX_FRAMES];
    u64 py_instr[PY_MAX_FRAMES];
    u8 stack[EOF_STACK_BYTES_OR_1];
};

// Per-CPU counters; user space sums them by field name.
struct cw_counters {
    u64 cw_enter;        // sockets that entered CLOSE_WAIT
    u64 cw_exit;         // tracked sockets that left CLOSE_WAIT (timed)
    u64 exit_untracked;  // left CLOSE_WAIT with no entry (pre-existing, or map full)
    u64 map_full;        // entries not tracked because cw_tracking was full
    u64 events_lost;     // events the ring/perf buffer had no room for
    u64 transitions;     // transitions streamed (--all only)
    u64 submitted;       // events the buffer took: what user space has not
                         //   read of them at exit is counted, not silent
    u64 hist_sum_ns;     // sum of every duration counted in cw_hist (exact,
                         //   for a Prometheus histogram's _sum); not a count
    u64 eof_captured;    // EOF reads of tracked sockets kept in cw_eof
    u64 eof_map_full;    // EOF reads not kept: cw_eof was full
    u64 eof_stack_short; // kept with less than EOF_STACK_BYTES of stack (the
                         //   stack's top was nearer than that), or none
    u64 eof_rate_limited;// EOF reads not kept: over CAPTURES_PER_S
    u64 open_captured;   // connect()s kept in cw_open
    u64 open_map_full;   // connect()s not kept: cw_open was full
    u64 open_rate_limited; // connect()s not kept: over CAPTURES_PER_S
    u64 exec_map_full;   // exec()s not remembered: cw_exec_ns was full
    u64 exec_new_full;   // exec()s user space was not told of: cw_exec_new
                         //   was full (found when first diagnosed instead)
};

// Preallocated: an insert and a delete per connection are the whole cost of
// a prompt close, and taking elements from a per-CPU free list measured about
// 3.5% more connections/s at saturation than allocating each one
// (docs/benchmarks.md). The price is MAX_TRACKED elements of kernel memory
// reserved up front (--max-tracked).
BPF_F_TABLE("hash", u64, struct cw_entry, cw_tracking, MAX_TRACKED, 0);
BPF_PERCPU_ARRAY(cw_counters, struct cw_counters, 1);
// log2 histogram of CLOSE_WAIT durations in microseconds: slot i counts
// durations in [2^(i-1), 2^i) us, slot 0 counts durations under 1 us.
BPF_PERCPU_ARRAY(cw_hist, u64, 64);

#ifdef FILTER_LPORT
BPF_HASH(cw_lports, u16, u8, 64);
#endif
#ifdef FILTER_RPORT
BPF_HASH(cw_rports, u16, u8, 64);
#endif

#if defined(EOF_CAPTURE) || defined(OPEN_CAPTURE)
// Preallocated for the same reason as cw_tracking; MAX_EOF_CAPTURES times
// about 4.2 KiB of kernel memory. An entry lives from the EOF read until the
// socket leaves CLOSE_WAIT or user space takes it (when it reports the
// socket), so it holds only sockets not yet closed after reading EOF.
BPF_F_TABLE("hash", u64, struct cw_eof, cw_eof, MAX_EOF_CAPTURES, 0);
// The same, for connect(): from SYN_SENT until the socket is closed or
// reported; MAX_OPEN_CAPTURES of them.
BPF_F_TABLE("hash", u64, struct cw_eof, cw_open, MAX_OPEN_CAPTURES, 0);
// Built here, then copied into cw_eof: a BPF stack is 512 bytes.
BPF_PERCPU_ARRAY(cw_eof_scratch, struct cw_eof, 1);

// Captures taken on this CPU in the current one-second window, of each
// kind. A capture costs about 0.8 us (bench/hook_cost.py); a server whose
// clients close first reads EOF on every connection, and a client opens
// them as fast, so at tens of thousands of connections a second captures
// are a sample, not every one (a leak has few call sites: a sample names
// them). An EOF read is still marked in cw_tracking, so user space says
// "not kept", never "none seen".
struct cw_eof_budget {
    u64 window_ns;
    u64 used_eof;
    u64 used_open;
};
BPF_PERCPU_ARRAY(cw_eof_budget, struct cw_eof_budget, 1);

// The same, per process: a busy service that closes its sockets promptly
// reads EOF on every connection, and with only the per-CPU budget it spent
// it on sockets that never linger, leaving none for the process that leaks
// (seen on a shared host: half the lingering sockets without a place). Each
// process gets its own CAPTURES_PER_PROC_S a second; the per-CPU budget
// stays as the bound on the total cost. LRU: a process that stops capturing
// ages out.
struct cw_proc_budget {
    u64 window_ns;
    u64 used_eof;
    u64 used_open;
};
BPF_TABLE("lru_hash", u32, struct cw_proc_budget, cw_proc_budget, 4096);

// When each process last exec()ed, while it lives: a capture taken before
// its process ran another program must not be unwound against the new one
// (its pid still holds the socket, its memory is another program's).
BPF_F_TABLE("hash", u32, u64, cw_exec_ns, MAX_EXEC_TRACKED, 0);
// The processes that exec()ed since user space last looked (it takes and
// deletes them each tick): a CPython program started after the trace is
// registered in cw_py before its first EOF read, not after its first
// lingering socket. Kept apart from cw_exec_ns, which holds every live
// process that exec()ed, so that a look costs what happened since the last.
BPF_F_TABLE("hash", u32, u64, cw_exec_new, MAX_EXEC_NEW, 0);

// CPython processes, by pid, that user space found and checked (the
// interpreter's _PyRuntime by name in its binary, a layout it knows): where
// the thread states start and the offsets to walk them. Written only by
// user space; deleted here when the process exits or exec()s.
struct cw_py_proc {
    u64 interp_head;          // address of _PyRuntime.interpreters.head
    u16 interp_threads_head;  // PyInterpreterState.threads.head
    u16 tstate_next;          // PyThreadState.next
    u16 tstate_native_tid;    // PyThreadState.native_thread_id
    u16 tstate_cframe;        // PyThreadState.cframe (3.13: .current_frame)
    u16 cframe_current;       // _PyCFrame.current_frame; CW_PY_NONE_OFF (3.13):
                              // none, tstate_cframe holds the frame itself
    u16 frame_code;           // _PyInterpreterFrame.f_code (3.13: .f_executable)
    u16 frame_previous;       // _PyInterpreterFrame.previous
    u16 frame_prev_instr;     // _PyInterpreterFrame.prev_instr (3.13: .instr_ptr)
    u16 frame_owner;          // _PyInterpreterFrame.owner (3.12 on); CW_PY_NONE_OFF:
                              // none (3.11). Frames the C stack owns are skipped.
    u16 spare[3];
    // The process's pid namespace (nsfs device, kernel encoding, and inode):
    // the interpreter's native_thread_id is the thread's id there (in a
    // container, not the id the kernel's pid_tgid gives).
    u64 pidns_dev;
    u64 pidns_ino;
};
BPF_HASH(cw_py, u32, struct cw_py_proc, MAX_PY_PROCS);
// The processes those fork() (task_newtask; no thread, no new pid
// namespace), with their parent's entry: a child runs the same program at
// the same addresses, so a pre-fork server's workers' first EOF reads carry
// their frames too (user space would know them only once diagnosed).
// Written only here, each from an entry user space checked; an LRU of its
// own, so that one user's forks cannot fill cw_py, whose places user space
// shares fairly among users (another user's forked entries may go, and
// their reads are then as before: no frames until diagnosed).
BPF_TABLE("lru_hash", u32, struct cw_py_proc, cw_py_forked, MAX_PY_PROCS);
#define CW_PY_NONE_OFF 0xFFFF        // cw_py_proc: no such field in this version
#define CW_PY_OWNED_BY_CSTACK 3      // FRAME_OWNED_BY_CSTACK: an entry shim, not code
#endif

#ifdef ALL_TRANSITIONS
// Last transition time of every socket seen, for the time-in-previous-state
// of the next one. Entries go when the socket reaches TCP_CLOSE.
// Preallocated (issue 20): every connection inserts and deletes an entry,
// and an allocating map paid a kernel allocation and an RCU-deferred free
// for each; the price is memory reserved up front (--max-tracked entries).
BPF_HASH(cw_last_ts, u64, u64, MAX_TRACKED);
#endif

// Never read or written by this program: it hands user space the ctypes
// class of struct cw_event (bcc derives one per map from this file; its
// decoder for perf/ring-buffer events cannot handle the nested endpoint).
BPF_ARRAY(cw_event_layout, struct cw_event, 1);

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(cw_events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(cw_events);
#endif

static __always_inline u64 cw_now(void)
{
#ifdef USE_BOOT_CLOCK
    return bpf_ktime_get_boot_ns();
#else
    return bpf_ktime_get_ns();
#endif
}

// The socket's network namespace inode, 0 when unknown. Two reads of kernel
// memory at offsets from BTF; called once per socket entering CLOSE_WAIT
// (kept in its cw_tracking entry) and for events with no entry.
static __always_inline u32 cw_netns(u64 sk)
{
#if defined(NETNS_SK_NET_OFF) && defined(NETNS_INUM_OFF)
    u64 net = 0;
    u32 inum = 0;
#ifdef USE_PROBE_READ_KERNEL
    if (bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk + NETNS_SK_NET_OFF)) != 0 || !net)
        return 0;
    if (bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NETNS_INUM_OFF)) != 0)
        return 0;
#else
    if (bpf_probe_read(&net, sizeof(net), (void *)(sk + NETNS_SK_NET_OFF)) != 0 || !net)
        return 0;
    if (bpf_probe_read(&inum, sizeof(inum), (void *)(net + NETNS_INUM_OFF)) != 0)
        return 0;
#endif
    return inum;
#else
    return 0;
#endif
}

static __always_inline struct cw_counters *cw_counts(void)
{
    int zero = 0;
    return cw_counters.lookup(&zero);
}

static __always_inline void cw_submit(void *ctx, struct cw_event *ev)
{
    struct cw_counters *c = cw_counts();
#ifdef USE_RINGBUF
    int err = cw_events.ringbuf_output(ev, sizeof(*ev), 0);
#else
    int err = cw_events.perf_submit(ctx, ev, sizeof(*ev));
#endif
    if (!c)
        return;
    if (err == 0)
        c->submitted++;
    else
        c->events_lost++;
}

// The tracepoint's fields, copied once: bcc declares the tracepoint's own
// struct only at TRACEPOINT_PROBE, so helpers cannot take it.
struct cw_tp {
    u64 skaddr;
    struct cw_endpoint ep;
    u8 oldstate;
    u8 newstate;
};

static __always_inline void cw_fill(struct cw_event *ev, struct cw_tp *tp, u64 now)
{
    u64 id = bpf_get_current_pid_tgid();

    ev->ts_ns = now;
    ev->skaddr = tp->skaddr;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->ep = tp->ep;
    ev->oldstate = tp->oldstate;
    ev->newstate = tp->newstate;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
}

static __always_inline int cw_filtered_out(u16 family, u16 lport, u16 rport)
{
#ifdef FILTER_FAMILY
    if (family != FILTER_FAMILY)
        return 1;
#endif
#ifdef FILTER_LPORT
    if (!cw_lports.lookup(&lport))
        return 1;
#endif
#ifdef FILTER_RPORT
    if (!cw_rports.lookup(&rport))
        return 1;
#endif
    return 0;
}

static __always_inline void cw_enter(struct cw_tp *tp, u64 now)
{
    u64 sk = tp->skaddr;
    struct cw_entry e = {};
    struct cw_counters *c = cw_counts();

    e.enter_ns = now;
    e.ep = tp->ep;
    e.ep.netns = cw_netns(sk);
    int failed = cw_tracking.update(&sk, &e) != 0;
    // Counted only after the map has the entry: user space reads the map
    // when cw_enter moves, and must then find the entry there (counted
    // first, a reader on another CPU could miss it until the next change;
    // seen under QEMU on 6.1 and 6.12).
    if (c) {
        if (failed)
            c->map_full++;
        c->cw_enter++;
    }
}

static __always_inline void cw_exit(void *ctx, struct cw_tp *tp, u64 now)
{
    u64 sk = tp->skaddr;
    struct cw_counters *c = cw_counts();
    struct cw_entry *e = cw_tracking.lookup(&sk);
    struct cw_event ev = {};

    if (!e) {
        // Rare by construction: sockets already in CLOSE_WAIT when tracing
        // began, or not tracked because the map was full. User space matches
        // them against its start-up snapshot.
        if (c)
            c->exit_untracked++;
        cw_fill(&ev, tp, now);
        ev.ep.netns = cw_netns(sk);
        ev.kind = EV_UNTRACKED_EXIT;
        cw_submit(ctx, &ev);
        return;
    }

    u64 dur = now - e->enter_ns;
    int idx = bpf_log2l(dur / 1000 + 1);
    if (idx > 63)
        idx = 63;
    if (dur >= THRESHOLD_NS) {
        cw_fill(&ev, tp, now);
        ev.ep.netns = e->ep.netns;      // read at entry: no second read
        ev.kind = EV_CLOSED;
        ev.duration_ns = dur;
        cw_submit(ctx, &ev);
    }
#ifdef EOF_CAPTURE
    if (e->eof_ns)
        cw_eof.delete(&sk);     // user space may have taken it already
#endif
    cw_tracking.delete(&sk);
    // After the delete, as cw_enter after the insert: a reader that sees
    // the count move sees the map as it now is.
    u64 *bucket = cw_hist.lookup(&idx);
    if (bucket)
        (*bucket)++;
    if (c) {
        c->cw_exit++;
        c->hist_sum_ns += dur;
    }
}

#ifdef ALL_TRANSITIONS
// The transition's record, filled where it will be read: on the ring
// buffer reserved in place (no copy from the stack). No namespace is read:
// a transition's output does not show it (records.transition), so netns
// stays 0 in these records.
static __always_inline void cw_stream_fill(struct cw_event *ev, struct cw_tp *tp, u64 now,
                                           u64 *last)
{
    u64 id = bpf_get_current_pid_tgid();

    ev->ts_ns = now;
    ev->skaddr = tp->skaddr;
    ev->duration_ns = last ? now - *last : 0;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->ep = tp->ep;
    ev->oldstate = tp->oldstate;
    ev->newstate = tp->newstate;
    ev->kind = EV_TRANSITION;
    __builtin_memset(ev->_pad, 0, sizeof(ev->_pad));
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
}

static __always_inline void cw_stream(void *ctx, struct cw_tp *tp, u64 now)
{
    u64 sk = tp->skaddr;
    struct cw_counters *c = cw_counts();
    u64 *last = cw_last_ts.lookup(&sk);
#ifdef USE_RINGBUF
    struct cw_event *ev = cw_events.ringbuf_reserve(sizeof(struct cw_event));
    if (ev) {
        cw_stream_fill(ev, tp, now, last);
        cw_events.ringbuf_submit(ev, 0);
    }
#else
    struct cw_event stack_ev = {};
    cw_stream_fill(&stack_ev, tp, now, last);
    int err = cw_events.perf_submit(ctx, &stack_ev, sizeof(stack_ev));
#endif
    if (tp->newstate == TCP_CLOSE)    // the socket is done
        cw_last_ts.delete(&sk);
    else
        cw_last_ts.update(&sk, &now);
    if (c) {
        c->transitions++;
#ifdef USE_RINGBUF
        if (ev)
#else
        if (err == 0)
#endif
            c->submitted++;
        else
            c->events_lost++;
    }
}
#endif
#if defined(EOF_CAPTURE) || defined(OPEN_CAPTURE)
// The x86-64 user registers the kernel saved at the system call (struct
// pt_regs, the ptrace ABI: a fixed layout, not a kernel struct that moves).
#define PT_REGS_WORDS 21
#define PT_BP 4
#define PT_IP 16
#define PT_SP 19

// bpf_probe_read_user by another name: bcc, at every call of that name it
// compiles, loads all of /proc/kallsyms (about 0.1 s here, 120,000 symbols)
// to see whether the kernel has it, for a fallback older kernels need.
// Captures need 5.15, which has it; three call sites cost 0.3 s of the
// start-up (measured: bench/run.py startup, docs/benchmarks.md).
static long (*cw_probe_read_user)(void *dst, u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_user;

// The top of the user stack from sp. The whole EOF_STACK_BYTES when mapped;
// a stack's top may be nearer than that (a shallow main thread), and then
// the read of the whole fails: copy to the end of sp's page instead, which
// is mapped since sp is.
static __always_inline u32 cw_copy_stack(struct cw_eof *c, u64 sp)
{
    if (cw_probe_read_user(c->stack, EOF_STACK_BYTES, (void *)sp) == 0)
        return EOF_STACK_BYTES;
    u32 n = (4096 - (sp & 4095)) & (EOF_STACK_BYTES - 1);
    if (n == 0 || cw_probe_read_user(c->stack, n, (void *)sp) != 0)
        return 0;
    return n;
}

// One capture of `kind` taken from a one-second budget of `limit` (the
// per-process one and the per-CPU one alike): 0 when it is spent.
static __always_inline int cw_take(u64 now, int open, u64 limit, u64 *window_ns,
                                   u64 *used_eof, u64 *used_open)
{
    if (now - *window_ns >= 1000000000ULL) {
        *window_ns = now;
        *used_eof = 0;
        *used_open = 0;
    }
    u64 *used = open ? used_open : used_eof;
    if (*used >= limit)
        return 0;
    (*used)++;
    return 1;
}

// Whether another capture of `kind` may be taken now: within this process's
// budget (cw_proc_budget), then this CPU's (cw_eof_budget).
static __always_inline int cw_capture_allowed(u64 now, int open, struct cw_counters *counts)
{
    int zero = 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct cw_proc_budget fresh = {.window_ns = now};
    struct cw_proc_budget *mine = cw_proc_budget.lookup(&tgid);
    if (!mine) {
        cw_proc_budget.update(&tgid, &fresh);
        mine = cw_proc_budget.lookup(&tgid);
    }
    struct cw_eof_budget *budget = cw_eof_budget.lookup(&zero);
    if (!budget)
        return 0;
    if ((mine && !cw_take(now, open, CAPTURES_PER_PROC_S, &mine->window_ns,
                          &mine->used_eof, &mine->used_open))
        || !cw_take(now, open, CAPTURES_PER_S, &budget->window_ns, &budget->used_eof,
                    &budget->used_open)) {
        if (counts) {
            if (open)
                counts->open_rate_limited++;
            else
                counts->eof_rate_limited++;
        }
        return 0;
    }
    return 1;
}

static __always_inline int cw_read_ptr(u64 *out, u64 addr)
{
    *out = 0;
    return cw_probe_read_user(out, sizeof(*out), (void *)addr);
}

// The capturing thread's Python frames, if its process is a CPython one
// user space registered: find the thread's state by the thread's id in
// the process's own pid namespace (native_thread_id: in a container, not
// the kernel's global tid) among the interpreter's first PY_MAX_THREADS, then copy (code, last
// instruction) of up to PY_MAX_FRAMES frames. Every pointer is the
// process's own memory, read with bpf_probe_read_user (a bad one fails the
// read, never more); both walks are bounded; user space checks what the
// copied pointers point to before it believes them.
static __always_inline void cw_py_frames(struct cw_eof *c)
{
    c->py_status = CW_PY_NONE;
    c->py_frames = 0;
    u32 tgid = c->pid;
    struct cw_py_proc *py = cw_py.lookup(&tgid);
    if (!py)
        py = cw_py_forked.lookup(&tgid);
    if (!py)
        return;
    c->py_status = CW_PY_UNREADABLE;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(py->pidns_dev, py->pidns_ino, &ns, sizeof(ns)))
        return;
    u64 interp, tstate, tid, frame;
    if (cw_read_ptr(&interp, py->interp_head) || !interp)
        return;
    if (cw_read_ptr(&tstate, interp + py->interp_threads_head))
        return;
    int found = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_THREADS; i++) {
        if (!tstate)
            break;
        if (cw_read_ptr(&tid, tstate + py->tstate_native_tid))
            return;
        if (tid == ns.pid) {        // the thread's id in its own namespace
            found = 1;
            break;
        }
        if (cw_read_ptr(&tstate, tstate + py->tstate_next))
            return;
    }
    if (!found) {
        c->py_status = CW_PY_NO_THREAD;
        return;
    }
    if (cw_read_ptr(&frame, tstate + py->tstate_cframe))
        return;
    if (py->cframe_current != CW_PY_NONE_OFF) {      // 3.11, 3.12: through the _PyCFrame
        if (!frame || cw_read_ptr(&frame, frame + py->cframe_current))
            return;
    }
    c->py_status = CW_PY_COPIED;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (!frame)
            break;
        u64 code, instr;
        if (py->frame_owner != CW_PY_NONE_OFF) {
            // An entry shim the C stack owns (one per call from C into
            // Python, never two in a row): step over it within this step.
            u8 owner = 0;
            if (bpf_probe_read_user(&owner, 1, (void *)(frame + py->frame_owner)))
                break;
            if (owner == CW_PY_OWNED_BY_CSTACK &&
                (cw_read_ptr(&frame, frame + py->frame_previous) || !frame))
                break;
        }
        if (cw_read_ptr(&code, frame + py->frame_code))
            break;
        cw_read_ptr(&instr, frame + py->frame_prev_instr);
        c->py_code[i & (PY_MAX_FRAMES - 1)] = code;
        c->py_instr[i & (PY_MAX_FRAMES - 1)] = instr;
        c->py_frames = i + 1;
        if (cw_read_ptr(&frame, frame + py->frame_previous))
            break;
    }
}

// The current task's registers and the top of its user stack into the
// per-CPU scratch capture, which the caller then stores by socket.
static __always_inline struct cw_eof *cw_capture(u64 now)
{
    int zero = 0;
    struct cw_eof *c = cw_eof_scratch.lookup(&zero);
    if (!c)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    c->ts_ns = now;
    c->pid = id >> 32;
    c->tid = (u32)id;
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    u64 regs[PT_REGS_WORDS] = {};
    void *task = (void *)bpf_get_current_task_btf();
    void *pt = (void *)bpf_task_pt_regs(task);
    c->ip = c->sp = c->bp = 0;
    c->stack_len = 0;
    if (bpf_probe_read_kernel(regs, sizeof(regs), pt) == 0) {
        c->ip = regs[PT_IP];
        c->sp = regs[PT_SP];
        c->bp = regs[PT_BP];
        c->stack_len = cw_copy_stack(c, c->sp);
    }
    cw_py_frames(c);
    return c;
}
#endif

#ifdef OPEN_CAPTURE
// A client socket's connect(): CLOSE -> SYN_SENT runs in the connecting
// thread. Kept by socket until it reaches TCP_CLOSE or user space takes it
// (when it reports the socket lingering).
static __always_inline void cw_opened(u64 sk, u16 family, u16 dport)
{
    struct cw_counters *counts = cw_counts();
    u64 now = cw_now();
#ifdef FILTER_FAMILY
    if (family != FILTER_FAMILY)
        return;
#endif
#ifdef FILTER_RPORT
    if (!cw_rports.lookup(&dport))
        return;
#endif
    if (!cw_capture_allowed(now, 1, counts))
        return;
    struct cw_eof *c = cw_capture(now);
    if (!c)
        return;
    int full = cw_open.update(&sk, c) != 0;
    if (counts) {
        if (full)
            counts->open_map_full++;
        else
            counts->open_captured++;
    }
}
#endif

// A state change that passed the filters, its fields in tp: timed, and
// streamed with --all. Both ways of attaching (below) end here.
static __always_inline void cw_state_change(void *ctx, struct cw_tp *tp)
{
    u64 now = cw_now();
#ifdef ALL_TRANSITIONS
    cw_stream(ctx, tp, now);
#endif
    if (tp->newstate == TCP_CLOSE_WAIT)
        cw_enter(tp, now);
    else if (tp->oldstate == TCP_CLOSE_WAIT)
        cw_exit(ctx, tp, now);
}

#ifdef OPEN_CAPTURE
// A client socket's connect() (SYN_SENT) is kept; a socket reaching CLOSE
// drops what was kept. Returns whether the state change goes on to
// cw_state_change (a connect() does only with --all).
static __always_inline int cw_open_tracking(u64 sk, u8 newstate, u16 family, u16 dport)
{
    if (newstate == TCP_SYN_SENT) {
        // The local port is not chosen yet (sport is 0): only the family
        // and remote-port filters can apply.
        cw_opened(sk, family, dport);
#ifndef ALL_TRANSITIONS
        return 0;
#endif
    } else if (newstate == TCP_CLOSE) {
        cw_open.delete(&sk);        // a miss for most: one hash probe
    }
    return 1;
}
#endif

#ifdef RAW_STATE_CHANGE
// The raw tracepoint: its arguments are the socket and both states, and the
// fields the tracepoint would copy are read from the socket at offsets from
// the kernel's BTF (kernel/btf.py StateOffsets). Why not the tracepoint's
// perf event: the kernel skips a BPF program attached there when another
// program runs on the CPU (counted: recursion_misses), and its perf layer
// can also drop a hit without any count (seen here: a connection's
// LISTEN->SYN_RECV and SYN_RECV->ESTABLISHED missing, recursion_misses
// unchanged, where a raw-tracepoint program on the same kernel saw both;
// docs/how-it-works.md). A raw tracepoint runs the program straight from
// the tracepoint and counts every run it skips.
static __always_inline void cw_read(void *dst, u32 size, u64 src)
{
#ifdef USE_PROBE_READ_KERNEL
    if (bpf_probe_read_kernel(dst, size, (void *)src) != 0)
#else
    if (bpf_probe_read(dst, size, (void *)src) != 0)
#endif
        __builtin_memset(dst, 0, size);
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    u8 oldstate = ctx->args[1];
    u8 newstate = ctx->args[2];
#ifndef ALL_TRANSITIONS
    // Default mode: only transitions into or out of CLOSE_WAIT matter (and,
    // for the connect() captures, into SYN_SENT and CLOSE), decided before
    // reading the socket at all.
    if (newstate != TCP_CLOSE_WAIT && oldstate != TCP_CLOSE_WAIT
#ifdef OPEN_CAPTURE
        && newstate != TCP_SYN_SENT && newstate != TCP_CLOSE
#endif
        )
        return 0;
#endif
    u16 protocol = 0;
    cw_read(&protocol, sizeof(protocol), sk + SK_PROTOCOL_OFF);
    if (protocol != IPPROTO_TCP_NUM)
        return 0;
    struct cw_tp tp = {};
    u16 sport = 0, dport = 0;
    cw_read(&tp.ep.family, sizeof(tp.ep.family), sk + SK_FAMILY_OFF);
    cw_read(&dport, sizeof(dport), sk + SK_DPORT_OFF);
    tp.ep.dport = __builtin_bswap16(dport);     // network order, as ntohs
#ifdef OPEN_CAPTURE
    if (!cw_open_tracking(sk, newstate, tp.ep.family, tp.ep.dport))
        return 0;
#ifndef ALL_TRANSITIONS
    if (newstate != TCP_CLOSE_WAIT && oldstate != TCP_CLOSE_WAIT)
        return 0;
#endif
#endif
    cw_read(&sport, sizeof(sport), sk + SK_SPORT_OFF);
    tp.ep.sport = __builtin_bswap16(sport);
    if (cw_filtered_out(tp.ep.family, tp.ep.sport, tp.ep.dport))
        return 0;
    tp.skaddr = sk;
    tp.oldstate = oldstate;
    tp.newstate = newstate;
    if (tp.ep.family == AF_INET_NUM) {
        cw_read(tp.ep.saddr, 4, sk + SK_SADDR_OFF);
        cw_read(tp.ep.daddr, 4, sk + SK_DADDR_OFF);
    } else {
        cw_read(tp.ep.saddr, 16, sk + SK_V6_SADDR_OFF);
        cw_read(tp.ep.daddr, 16, sk + SK_V6_DADDR_OFF);
    }
    cw_state_change(ctx, &tp);
    return 0;
}
#else
// Without the kernel's BTF: the tracepoint's own fields, through its perf
// event (its layout from the running kernel's tracefs format file).
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP_NUM)
        return 0;
#ifdef OPEN_CAPTURE
    if (!cw_open_tracking((u64)args->skaddr, args->newstate, args->family, args->dport))
        return 0;
#endif
#ifndef ALL_TRANSITIONS
    // Default mode: only transitions into or out of CLOSE_WAIT matter, and
    // the test is first so that every other transition costs two compares.
    if (args->newstate != TCP_CLOSE_WAIT && args->oldstate != TCP_CLOSE_WAIT)
        return 0;
#endif
    if (cw_filtered_out(args->family, args->sport, args->dport))
        return 0;

    struct cw_tp tp = {};
    tp.skaddr = (u64)args->skaddr;
    tp.ep.sport = args->sport;
    tp.ep.dport = args->dport;
    tp.ep.family = args->family;
    tp.oldstate = args->oldstate;
    tp.newstate = args->newstate;
    if (args->family == AF_INET_NUM) {
        __builtin_memcpy(tp.ep.saddr, args->saddr, 4);
        __builtin_memcpy(tp.ep.daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(tp.ep.saddr, args->saddr_v6, 16);
        __builtin_memcpy(tp.ep.daddr, args->daddr_v6, 16);
    }
    cw_state_change(args, &tp);
    return 0;
}
#endif

#ifdef EOF_CAPTURE
// Every socket read on the machine passes here: an ordinary read (ret > 0)
// or an error costs one compare. Only a read that returned end of stream on
// a socket in cw_tracking, the first time, does more.
TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->ret != 0 || args->protocol != IPPROTO_TCP_NUM)
        return 0;
    u64 sk = (u64)args->sk;
    struct cw_entry *e = cw_tracking.lookup(&sk);
    // In CLOSE_WAIT the peer's FIN is queued: a read returning 0 is the end
    // of the stream (a read asking for 0 bytes also returns 0; rare, and
    // then the place is still where the socket was read).
    if (!e || e->eof_ns)
        return 0;
    u64 now = cw_now();
    e->eof_ns = now;        // once per socket: later reads cost a lookup
    struct cw_counters *counts = cw_counts();
    if (!cw_capture_allowed(now, 0, counts))
        return 0;
    struct cw_eof *c = cw_capture(now);
    if (!c)
        return 0;
    int full = cw_eof.update(&sk, c) != 0;
    if (counts) {
        if (full)
            counts->eof_map_full++;
        else
            counts->eof_captured++;
        if (!full && c->stack_len < EOF_STACK_BYTES)
            counts->eof_stack_short++;
    }
    return 0;
}
#endif

#if defined(EOF_CAPTURE) || defined(OPEN_CAPTURE)
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = cw_now();
    cw_py.delete(&tgid);        // another program now: not the one registered
    cw_py_forked.delete(&tgid);
    if (cw_exec_ns.update(&tgid, &now) != 0) {
        struct cw_counters *counts = cw_counts();
        if (counts)
            counts->exec_map_full++;
    }
    if (cw_exec_new.update(&tgid, &now) != 0) {
        struct cw_counters *counts = cw_counts();
        if (counts)
            counts->exec_new_full++;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (u32)(id >> 32))
        return 0;               // a thread, not its process
    u32 tgid = id >> 32;
    cw_exec_ns.delete(&tgid);
    cw_py.delete(&tgid);
    cw_py_forked.delete(&tgid);
    return 0;
}

// Values from the kernel's uapi sched.h, which this file must not include.
#define CW_CLONE_THREAD 0x00010000
#define CW_CLONE_NEWPID 0x20000000

TRACEPOINT_PROBE(task, task_newtask)
{
    // A thread shares its process's entry; a child in a new pid namespace
    // has other thread ids than the ones the entry's namespace gives.
    if (args->clone_flags & (CW_CLONE_THREAD | CW_CLONE_NEWPID))
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    struct cw_py_proc *py = cw_py.lookup(&parent);
    if (!py)
        py = cw_py_forked.lookup(&parent);
    if (!py)
        return 0;
    u32 child = args->pid;
    struct cw_py_proc copy = *py;
    cw_py_forked.update(&child, &copy);
    return 0;
}
#endif
