/* The main thread exits with pthread_exit; a worker thread accepts one
 * connection and holds it forever. The process lives on with a zombie
 * leader (state Z) whose own fd table is gone. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int listener;

static void *worker(void *arg)
{
    (void)arg;
    int c = accept(listener, NULL, NULL);
    (void)c;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    int one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (void *)&a, sizeof a) || listen(listener, 8))
        return 1;
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_exit(NULL);
}
