/* Holds a TCP connection whose peer closes it (CLOSE_WAIT), with pointers
 * into an executable mapping of a FUSE file on its stack, then waits in
 * pause(): the tracer's stack scan would read the code before each pointer
 * from /proc/PID/mem, a page only the FUSE server can supply. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    char *code = mmap(NULL, 65536, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (code == MAP_FAILED) { perror("mmap"); return 1; }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    volatile uintptr_t pointers[64];
    for (int i = 0; i < 64; i++) pointers[i] = (uintptr_t)(code + 64 + 512 * i);
    printf("ready\n");
    fflush(stdout);
    pause();
    return pointers[0] == 0;
}
