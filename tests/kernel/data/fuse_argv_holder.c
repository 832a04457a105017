/* tests/kernel/test_fuse_live.py: holds a TCP connection in CLOSE_WAIT with its command line's pages
 * replaced by a mapping of a FUSE file: reading /proc/PID/cmdline faults
 * those pages in from a server that may never answer. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) return 2;           /* FILE PORT PADDING(long) */
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t first = ((uintptr_t)argv[3] + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t end = ((uintptr_t)argv[3] + strlen(argv[3])) & ~(uintptr_t)(page - 1);
    if (end <= first) { fprintf(stderr, "padding too short\n"); return 1; }
    printf("ready\n");
    fflush(stdout);
    if (mmap((void *)first, end - first, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) {
        perror("mmap"); return 1; }
    pause();
    return 0;
}
