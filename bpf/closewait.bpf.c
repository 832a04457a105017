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

// Values from the kernel's uapi headers, which this file must not include.
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define IPPROTO_TCP_NUM 6
#define AF_INET_NUM 2

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

#ifdef ALL_TRANSITIONS
// Last transition time of every socket seen, for the time-in-previous-state
// of the next one. Entries go when the socket reaches TCP_CLOSE.
BPF_F_TABLE("hash", u64, u64, cw_last_ts, MAX_TRACKED, BPF_F_NO_PREALLOC);
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
static __always_inline void cw_stream(void *ctx, struct cw_tp *tp, u64 now)
{
    u64 sk = tp->skaddr;
    struct cw_event ev = {};
    struct cw_counters *c = cw_counts();
    u64 *last = cw_last_ts.lookup(&sk);

    cw_fill(&ev, tp, now);
    ev.ep.netns = cw_netns(sk);
    ev.kind = EV_TRANSITION;
    if (last)
        ev.duration_ns = now - *last;
    if (tp->newstate == TCP_CLOSE)    // the socket is done
        cw_last_ts.delete(&sk);
    else
        cw_last_ts.update(&sk, &now);
    if (c)
        c->transitions++;
    cw_submit(ctx, &ev);
}
#endif

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP_NUM)
        return 0;
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

    u64 now = cw_now();
#ifdef ALL_TRANSITIONS
    cw_stream(args, &tp, now);
#endif
    if (tp.newstate == TCP_CLOSE_WAIT)
        cw_enter(&tp, now);
    else if (tp.oldstate == TCP_CLOSE_WAIT)
        cw_exit(args, &tp, now);
    return 0;
}
