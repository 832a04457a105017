/*
 * The price of a hook on sock:sock_recv_length per read: one process reads a
 * loopback TCP connection one byte at a time (each read returns data: the
 * common case, which the EOF capture rejects with one compare), the bytes
 * written in advance by a child. Prints nanoseconds per read.
 *
 *   recv_cost READS
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
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

int main(int argc, char **argv)
{
    long reads = argc > 1 ? atol(argv[1]) : 1000000;
    int l = socket(AF_INET, SOCK_STREAM, 0), big = 1 << 22;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&a, &len))
        return 1;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(c, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    if (connect(c, (struct sockaddr *)&a, sizeof a))
        return 1;
    int s = accept(l, NULL, NULL);
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    pid_t child = fork();
    if (child == 0) {
        static char chunk[65536];
        long left = reads;
        while (left > 0) {
            ssize_t n = write(c, chunk, left < (long)sizeof chunk ? left : (long)sizeof chunk);
            if (n <= 0)
                _exit(1);
            left -= n;
        }
        _exit(0);
    }
    close(c);
    char b;
    double t0 = now();
    for (long i = 0; i < reads; i++)
        if (read(s, &b, 1) != 1)
            return 1;
    double t = now() - t0;
    waitpid(child, NULL, 0);
    printf("%.1f\n", t * 1e9 / reads);
    return 0;
}
