/*
 * The leak this test set is about, in C built the Debian way (-O2, no frame
 * pointers): handle_client reads the connection to its end and returns to
 * the accept loop without closing it. By the time anyone looks, no thread
 * is in handle_client any more: only the kernel's copy at the EOF read
 * can name it.
 *
 *   eof_server PORT [hostile]
 *
 * hostile: read EOF from a stack the process crafted to mislead an
 * unwinder: RBP points at itself and every word of the stack points back
 * into it, so a walk that trusts it never ends.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) static long handle_client(int fd)
{
    char buf[512];
    long total = 0, n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        total += n;
    return total;          /* and fd is never closed */
}

static unsigned long crafted[1024] __attribute__((aligned(64)));

/* read(fd) on a crafted stack: every word of it points back into it, and
 * RBP points at itself. Restores the real stack after the system call. */
__attribute__((noinline)) static long read_on_crafted_stack(int fd)
{
    static char buf[512];
    long ret;
    for (int i = 0; i < 1024; i++)
        crafted[i] = (unsigned long)&crafted[(i * 7) % 1024];
    unsigned long top = (unsigned long)&crafted[512];
    do {
        __asm__ volatile(
            "mov %%rsp, %%r12\n\t"
            "mov %%rbp, %%r13\n\t"
            "mov %[top], %%rsp\n\t"
            "mov %[top], %%rbp\n\t"
            "syscall\n\t"
            "mov %%r12, %%rsp\n\t"
            "mov %%r13, %%rbp\n\t"
            : "=a"(ret)
            : "a"((long)SYS_read), "D"((long)fd), "S"(buf), "d"((long)sizeof buf),
              [top] "r"(top)
            : "rcx", "r11", "r12", "r13", "memory");
    } while (ret > 0);
    return ret;
}

int main(int argc, char **argv)
{
    int hostile = argc > 2 && strcmp(argv[2], "hostile") == 0;
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64))
        return 1;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0)
            continue;
        if (hostile)
            read_on_crafted_stack(c);
        else
            handle_client(c);
    }
}
