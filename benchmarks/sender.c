/* UDP packet sender for benchmarks/suite.py: sends small datagrams with sendmmsg(2) on an
 * unconnected socket for a fixed time and prints what it sent.
 *
 * Unconnected on purpose: every datagram carries its own destination, so the kernel performs a
 * route lookup (and walks the fib rules) per packet, as it does for forwarded traffic and for
 * the many short flows a node carries. A connected socket would cache the route and hide the
 * cost the benchmark is about.
 *
 *   sender DST_IP PORT SECONDS [PAYLOAD_BYTES]
 *   -> "sent=N errors=E seconds=S cpu=C"
 *      errors: sendmmsg calls the kernel refused in part or whole; seconds: wall time;
 *      cpu: user + system CPU time of this process, which includes the kernel's work on the
 *      packets done in its context (routing, tc egress programs, the veth transfer).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s DST_IP PORT SECONDS [PAYLOAD_BYTES]\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[3]);
    size_t payload_len = argc > 4 ? (size_t)atoi(argv[4]) : 18;
    if (payload_len < 1 || payload_len > 1400 || seconds <= 0) {
        fprintf(stderr, "bad SECONDS or PAYLOAD_BYTES\n");
        return 2;
    }
    struct sockaddr_storage dst;
    socklen_t dst_len;
    int family;
    memset(&dst, 0, sizeof(dst));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&dst;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&dst;
    if (inet_pton(AF_INET, argv[1], &v4->sin_addr) == 1) {
        family = AF_INET;
        v4->sin_family = AF_INET;
        v4->sin_port = htons(atoi(argv[2]));
        dst_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, argv[1], &v6->sin6_addr) == 1) {
        family = AF_INET6;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(atoi(argv[2]));
        dst_len = sizeof(*v6);
    } else {
        fprintf(stderr, "bad DST_IP %s\n", argv[1]);
        return 2;
    }
    int fd = socket(family, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    static char payload[1400];
    memset(payload, 'x', sizeof(payload));
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = payload_len;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = dst_len;
    }
    unsigned long long sent = 0, errors = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n < 0) {
            /* The first datagram was refused (unreachable, no buffer space): count it and go
             * on; sendmmsg stops at the first failure, so one error per call. */
            errors++;
        } else {
            sent += (unsigned)n;
            if (n < BATCH)
                errors++;
        }
        t = now();
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                 + ru.ru_stime.tv_usec / 1e6;
    printf("sent=%llu errors=%llu seconds=%.6f cpu=%.6f\n", sent, errors, t - start, cpu);
    return 0;
}
