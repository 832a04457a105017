/*
 * Loopback connection churn in which every connection passes through
 * CLOSE_WAIT on the server side: the client connects and closes first; the
 * server reads EOF, then closes. Compiled so that the workload's own cost
 * stays out of the way of what is measured.
 *
 *   churn PORT SECONDS CLIENTS SERVERS [RATE]
 *       -> prints "connections seconds served"
 *
 * RATE (connections per second, all clients together) paces the clients;
 * without it they go as fast as they can.
 *
 * "served": connections the servers accepted and closed. "transitions":
 * how many state changes the workload made on the server's side of PORT,
 * i.e. what a tracer filtered to the local port PORT must see, known per
 * connection (see serve()), plus the listener's two (CLOSE->LISTEN,
 * LISTEN->CLOSE). The servers are stopped only once they have served every
 * connection the clients made (or after 10 s): killed earlier, with
 * connections still in the accept queue, those made four transitions (the
 * listener's close resets them) and the count was no longer known.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Per server, in memory shared with the parent: connections served, and
 * the transitions they made on this side. */
struct served {
    long connections;
    long transitions;
    long by_count[7];       /* connections by the transitions counted: 3-6 */
};

/* Each accepted connection made LISTEN->SYN_RECV->ESTABLISHED; then, as a
 * rule, ->CLOSE_WAIT (the client's FIN), ->LAST_ACK (our FIN), ->CLOSE:
 * five. But the client's orphaned socket may be gone before our FIN
 * reaches it (with TIME_WAIT off it does not wait in FIN_WAIT2): what we
 * send it then is answered by a reset, and a reset that arrives while we
 * are still in CLOSE_WAIT makes CLOSE_WAIT->CLOSE: four (seen here in 1-34
 * of the 11,000-28,000 connections of a 1 s saturating run). A bare close()
 * cannot tell which happened, so the server closes in steps that can:
 * shutdown() moves CLOSE_WAIT to LAST_ACK under the socket's lock, so a
 * reset came either before it (the socket in CLOSE, its error EPIPE:
 * tcp_reset's error for CLOSE_WAIT) or after it (LAST_ACK->CLOSE: five).
 * close() on a socket still in LAST_ACK makes one more, LAST_ACK->LAST_ACK
 * (tcp_close_state), so close() waits for LAST_ACK to end (the peer's ACK
 * or reset: microseconds on loopback), counting that one if it has not
 * after 2 s. A read that fails (a reset before the client's FIN, which
 * this workload does not make) counts ESTABLISHED->CLOSE: three. */
static long finish(int c, ssize_t got)
{
    if (got != 0)
        return 3;
    int err = 0;
    socklen_t len = sizeof err;
    shutdown(c, SHUT_WR);
    getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &len);
    long made = err == EPIPE ? 4 : 5;
    for (double limit = now() + 2;;) {
        struct tcp_info info;
        len = sizeof info;
        if (getsockopt(c, IPPROTO_TCP, TCP_INFO, &info, &len) || info.tcpi_state != TCP_LAST_ACK)
            break;
        if (now() > limit) {
            made++;
            break;
        }
        sched_yield();
    }
    return made;
}

static void serve(int listener, struct served *served)
{
    char buf[512];
    for (;;) {
        int c = accept(listener, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        ssize_t got;
        while ((got = read(c, buf, sizeof buf)) > 0)
            ;
        long made = finish(c, got);
        close(c);
        __atomic_add_fetch(&served->transitions, made, __ATOMIC_RELAXED);
        __atomic_add_fetch(&served->by_count[made], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&served->connections, 1, __ATOMIC_RELEASE);
    }
}

static long client(struct sockaddr_in *addr, double start, double deadline, double rate)
{
    long n = 0;
    while (now() < deadline) {
        if (rate > 0) {
            double due = start + n / rate;
            double wait = due - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            continue;
        if (connect(s, (struct sockaddr *)addr, sizeof *addr) == 0)
            n++;
        close(s);
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: churn PORT SECONDS CLIENTS SERVERS [RATE]\n");
        return 2;
    }
    double rate = argc == 6 ? atof(argv[5]) : 0;
    int port = atoi(argv[1]), clients = atoi(argv[3]), servers = atoi(argv[4]);
    double seconds = atof(argv[2]);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 4096)) {
        perror("listen");
        return 1;
    }
    /* One counter per server, in memory the forked servers share. */
    struct served *served = mmap(NULL, 64 * sizeof *served, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (served == MAP_FAILED)
        return 1;
    pid_t server_pids[64];
    for (int i = 0; i < servers && i < 64; i++)
        if ((server_pids[i] = fork()) == 0)
            serve(listener, &served[i]);

    int pipefd[2];
    if (pipe(pipefd))
        return 1;
    double start = now(), deadline = start + seconds;
    for (int i = 0; i < clients; i++) {
        if (fork() == 0) {
            long n = client(&addr, start, deadline, rate / clients);
            if (write(pipefd[1], &n, sizeof n) != sizeof n)
                _exit(1);
            _exit(0);
        }
    }
    long total = 0, n;
    for (int i = 0; i < clients; i++)
        if (read(pipefd[0], &n, sizeof n) == sizeof n)
            total += n;
    double elapsed = now() - start;
    /* Every connection a client made is served before the servers go (the
     * last ones may still be in the accept queue); not part of the rate. */
    long done = 0;
    for (double limit = now() + 10; now() < limit; ) {
        done = 0;
        for (int i = 0; i < servers && i < 64; i++)
            done += __atomic_load_n(&served[i].connections, __ATOMIC_ACQUIRE);
        if (done >= total)
            break;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    for (int i = 0; i < servers && i < 64; i++)
        kill(server_pids[i], SIGKILL);
    while (wait(NULL) > 0)
        ;
    long transitions = 2;       /* the listener's: it is closed as we exit */
    done = 0;                   /* a server may have served one more since */
    for (int i = 0; i < servers && i < 64; i++) {
        done += served[i].connections;
        transitions += served[i].transitions;
    }
    printf("%ld %.3f %ld %ld\n", total, elapsed, done, transitions);
    /* How each connection was counted (stderr: the benchmark reads only
     * stdout), so that a count the kernel disagrees with says which rule
     * it came from. */
    fprintf(stderr, "connections by transitions counted:");
    for (int k = 3; k <= 6; k++) {
        long n = 0;
        for (int i = 0; i < servers && i < 64; i++)
            n += served[i].by_count[k];
        fprintf(stderr, " %d:%ld", k, n);
    }
    fprintf(stderr, "\n");
    return 0;
}
