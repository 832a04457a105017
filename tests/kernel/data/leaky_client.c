/*
 * A client that leaks its connection: fetch_user connects and returns the
 * socket, the caller never reads or closes it. When the server closes its
 * end, the client's socket sits in CLOSE_WAIT for as long as this process
 * lives. Built -O2 without frame pointers, as Debian builds C.
 *
 *   leaky_client PORT
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((noinline)) static int fetch_user(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        return -1;
    return s;               /* handed out, and never closed */
}

int main(int argc, char **argv)
{
    if (fetch_user(atoi(argv[1])) < 0)
        return 1;
    printf("connected\n");
    fflush(stdout);
    for (;;)
        pause();
}
