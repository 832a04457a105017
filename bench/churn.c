/*
 * Loopback connection churn in which every connection passes through
 * CLOSE_WAIT on the server side: the client connects and closes first; the
 * server reads EOF, then closes. Compiled so that the workload's own cost
 * stays out of the way of what is measured.
 *
 *   churn PORT SECONDS CLIENTS SERVERS [RATE]  -> prints "connections seconds"
 *
 * RATE (connections per second, all clients together) paces the clients;
 * without it they go as fast as they can.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void serve(int listener)
{
    char buf[512];
    for (;;) {
        int c = accept(listener, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        while (read(c, buf, sizeof buf) > 0)
            ;
        close(c);
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
    pid_t server_pids[64];
    for (int i = 0; i < servers && i < 64; i++)
        if ((server_pids[i] = fork()) == 0)
            serve(listener);

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
    for (int i = 0; i < servers && i < 64; i++)
        kill(server_pids[i], SIGKILL);
    while (wait(NULL) > 0)
        ;
    printf("%ld %.3f\n", total, elapsed);
    return 0;
}
