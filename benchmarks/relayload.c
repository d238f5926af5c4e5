/*
 * relayload: a closed-loop and fixed-rate load generator for a TURN relay, over loopback.
 *
 * benchmarks/closedloop.py sets up the allocations (Allocate, then ChannelBind or
 * CreatePermission toward a plain UDP "peer" socket), connects each client socket to the
 * server, and hands every socket to this program as an inherited file descriptor, listed in a
 * spec file:
 *
 *     c <thread> <fd> <channel> <peer_port>     one client socket (one allocation)
 *     p <thread> <fd>                           one peer socket
 *
 * A client socket sends ChannelData (4-byte header + payload), or with --method send a Send
 * indication (XOR-PEER-ADDRESS + DATA, no MESSAGE-INTEGRITY: an indication needs none). The
 * server relays the payload to the peer; each peer socket echoes every datagram back to the
 * address it came from (the allocation's relayed address), and the server delivers it to the
 * client as ChannelData (or a Data indication). One round trip is two relayed datagrams.
 * The payload carries a magic number, a slot, a sequence number and the CLOCK_MONOTONIC send
 * time, so the latency of each round trip is measured where it ends.
 *
 * Modes:
 *   --mode closed   W round trips in flight in total (--window); each one that completes sends
 *                   the next. One that has not come back after --loss-timeout-ms is counted
 *                   lost and replaced, so the window never drains.
 *   --mode rate     R round trips per second in total (--rate), paced from a timer whatever
 *                   comes back (open loop); after the window, --drain seconds for stragglers.
 *
 * Timeline: start, --warmup seconds, then the measured window of --duration seconds. The main
 * thread prints {"event":"window_start"} and {"event":"window_end"} on stdout at the window's
 * edges (the caller reads the server's CPU time then), and at the end one JSON line with the
 * results. Every address is the caller's (127.0.0.1 in the harness); this program opens no
 * socket of its own. A hard limit (SIGALRM) ends it if anything hangs.
 *
 * Build: gcc -O2 -pthread -o relayload relayload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x52544c44u          /* payload marker */
#define BATCH 64                   /* datagrams per recvmmsg / sendmmsg */
#define MAX_DGRAM 2048
#define MAX_PAYLOAD 1400
#define MIN_PAYLOAD 24             /* magic, slot, seq, send time */
#define HIST_BUCKETS 200000        /* 1 us buckets up to 200 ms; beyond: overflow (max kept) */
#define MAX_THREADS 64
#define STUN_COOKIE 0x2112A442u
#define SEND_INDICATION 0x0016
#define DATA_INDICATION 0x0017
#define ATTR_XOR_PEER 0x0012
#define ATTR_DATA 0x0013
#define SEND_HEADER 36             /* 20 header + 12 XOR-PEER-ADDRESS + 4 DATA header */
#define TAG_PEER 1u
#define TAG_CLIENT 2u
#define TAG_TIMER 3u

struct payload {
    uint32_t magic;
    uint32_t slot;
    uint64_t seq;
    uint64_t sent_ns;
};

struct alloc {
    int fd;
    uint16_t channel;
    uint16_t peer_port;
};

struct slot {
    uint32_t alloc;
    uint64_t seq;
    uint64_t sent_ns;
};

/* Buffers for one batch of datagrams. */
struct batch {
    uint8_t bufs[BATCH][MAX_DGRAM];
    struct sockaddr_in names[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    uint32_t slots[BATCH];
};

struct worker {
    int id;
    struct batch *rx, *tx;  /* rx: peer echo and client receive; tx: closed-loop sends */
    pthread_t thread;
    struct alloc *allocs;
    int nallocs, cap_allocs;
    int *peers;
    int npeers, cap_peers;
    int window;      /* closed loop: slots of this thread */
    double rate;     /* fixed rate: round trips/s of this thread */
    int epfd, tfd;
    struct slot *slots;
    uint64_t next_seq;
    int measuring;
    /* fixed rate: the window's sequence numbers are [seq_lo, seq_hi) */
    uint64_t seq_lo, seq_hi, issued;
    uint8_t *seen;
    uint64_t seen_bits;
    /* counted in the measured window */
    uint64_t sent, received, lost, late, dups, send_errors, bad, echoed;
    uint64_t *hist;
    uint64_t overflow, max_ns, sum_ns;
    char error[160];
};

static struct {
    int closed;          /* 1: closed loop, 0: fixed rate */
    int send_method;     /* 1: Send / Data indications, 0: ChannelData */
    int window;
    double rate;
    double warmup_s, duration_s, drain_s;
    int payload;
    uint64_t loss_timeout_ns;
    uint64_t tick_ns;
    uint64_t t0, t_warm, t_end, t_stop;
} cfg = {1, 0, 256, 15000.0, 1.0, 5.0, 0.5, 200, 200000000ull, 100000ull, 0, 0, 0, 0};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {(time_t)(t / 1000000000ull), (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "relayload: hard time limit reached\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

/* ------------------------------------------------------------------------ messages */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

/* The datagram a client sends for one round trip; returns its length. */
static int build(const struct alloc *a, uint32_t slot, uint64_t seq, uint64_t sent_ns, uint8_t *buf) {
    struct payload pl = {MAGIC, slot, seq, sent_ns};
    int len = cfg.payload;
    if (!cfg.send_method) {
        put16(buf, a->channel);
        put16(buf + 2, (uint16_t)len);
        memcpy(buf + 4, &pl, sizeof pl);
        return 4 + len;  /* over UDP, ChannelData needs no padding (RFC 8656 §12.5) */
    }
    int padded = (len + 3) & ~3;
    put16(buf, SEND_INDICATION);
    put16(buf + 2, (uint16_t)(12 + 4 + padded));
    put32(buf + 4, STUN_COOKIE);
    /* transaction ID: any 96 bits; the sequence number and the thread's slot */
    memcpy(buf + 8, &seq, 8);
    memcpy(buf + 16, &slot, 4);
    put16(buf + 20, ATTR_XOR_PEER);
    put16(buf + 22, 8);
    buf[24] = 0;
    buf[25] = 1;  /* IPv4 */
    put16(buf + 26, (uint16_t)(a->peer_port ^ (STUN_COOKIE >> 16)));
    put32(buf + 28, 0x7F000001u ^ STUN_COOKIE);  /* 127.0.0.1 */
    put16(buf + 32, ATTR_DATA);
    put16(buf + 34, (uint16_t)len);
    memcpy(buf + SEND_HEADER, &pl, sizeof pl);
    if (padded > len)
        memset(buf + SEND_HEADER + len, 0, (size_t)(padded - len));
    return SEND_HEADER + padded;
}

/* The payload of what came back to a client, or NULL when it is not one of ours. */
static const struct payload *parse(const struct alloc *a, const uint8_t *buf, int n, struct payload *out) {
    const uint8_t *data = NULL;
    int dlen = 0;
    if (!cfg.send_method) {
        if (n < 4 || (buf[0] & 0xC0) != 0x40 || get16(buf) != a->channel)
            return NULL;
        dlen = get16(buf + 2);
        if (dlen > n - 4)
            return NULL;
        data = buf + 4;
    } else {
        if (n < 20 || buf[0] >= 0x40 || get16(buf) != DATA_INDICATION)
            return NULL;
        int end = 20 + get16(buf + 2);
        if (end > n)
            return NULL;
        for (int off = 20; off + 4 <= end;) {
            int type = get16(buf + off), alen = get16(buf + off + 2);
            if (off + 4 + alen > end)
                return NULL;
            if (type == ATTR_DATA) {
                data = buf + off + 4;
                dlen = alen;
                break;
            }
            off += 4 + ((alen + 3) & ~3);
        }
        if (!data)
            return NULL;
    }
    if (dlen < (int)sizeof *out)
        return NULL;
    memcpy(out, data, sizeof *out);
    return out->magic == MAGIC ? out : NULL;
}

/* ------------------------------------------------------------------------ one worker thread */

/* At the window's start, forget the warm-up; true while `now` is inside the window. */
static int in_window(struct worker *w, uint64_t now) {
    if (!w->measuring && now >= cfg.t_warm) {
        w->sent = w->received = w->lost = w->late = w->dups = w->send_errors = w->bad = w->echoed = 0;
        memset(w->hist, 0, sizeof(uint64_t) * HIST_BUCKETS);
        w->overflow = w->max_ns = w->sum_ns = 0;
        w->measuring = 1;
    }
    return w->measuring && now < cfg.t_end;
}

static void record_latency(struct worker *w, uint64_t ns) {
    uint64_t us = ns / 1000;
    if (us < HIST_BUCKETS)
        w->hist[us]++;
    else
        w->overflow++;
    if (ns > w->max_ns)
        w->max_ns = ns;
    w->sum_ns += ns;
    w->received++;
}

/* Echo everything waiting on one peer socket back to where it came from (bounded per call). */
static void peer_echo(struct worker *w, int fd) {
    struct batch *b = w->rx;
    uint8_t (*bufs)[MAX_DGRAM] = b->bufs;
    struct sockaddr_in *names = b->names;
    struct iovec *iov = b->iov;
    struct mmsghdr *msgs = b->msgs;
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAX_DGRAM;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            return;
        for (int i = 0; i < n; i++)
            iov[i].iov_len = msgs[i].msg_len;  /* name and namelen already say where to */
        int done = 0;
        while (done < n) {
            int s = sendmmsg(fd, msgs + done, (unsigned)(n - done), MSG_DONTWAIT);
            if (s <= 0)
                break;
            done += s;
        }
        if (in_window(w, now_ns())) {
            w->echoed += (uint64_t)done;
            w->send_errors += (uint64_t)(n - done);
        }
        if (n < BATCH)
            return;
    }
}

/* Closed loop: send the listed slots' next round trips on allocation `ai` in one sendmmsg. */
static void send_slots(struct worker *w, int ai, const uint32_t *slots, int count, uint64_t now) {
    uint8_t (*bufs)[MAX_DGRAM] = w->tx->bufs;
    struct iovec *iov = w->tx->iov;
    struct mmsghdr *msgs = w->tx->msgs;
    const struct alloc *a = &w->allocs[ai];
    for (int i = 0; i < count; i++) {
        struct slot *s = &w->slots[slots[i]];
        s->alloc = (uint32_t)ai;
        s->seq = w->next_seq++;
        s->sent_ns = now;
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = (size_t)build(a, slots[i], s->seq, now, bufs[i]);
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int done = 0;
    while (done < count) {
        int s = sendmmsg(a->fd, msgs + done, (unsigned)(count - done), MSG_DONTWAIT);
        if (s <= 0)
            break;  /* full buffer: those slots time out and count as lost */
        done += s;
    }
    if (in_window(w, now)) {
        w->sent += (uint64_t)count;
        w->send_errors += (uint64_t)(count - done);
    }
}

static int shift_of(const struct worker *w) {
    /* A completed slot moves on to another allocation, so every allocation carries traffic. */
    int shift = w->window % w->nallocs;
    return shift ? shift : (w->nallocs > 1 ? 1 : 0);
}

static void client_recv(struct worker *w, int ai) {
    uint8_t (*bufs)[MAX_DGRAM] = w->rx->bufs;
    struct iovec *iov = w->rx->iov;
    struct mmsghdr *msgs = w->rx->msgs;
    uint32_t *next = w->rx->slots;
    const struct alloc *a = &w->allocs[ai];
    int target = (ai + shift_of(w)) % w->nallocs;
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAX_DGRAM;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(a->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            return;
        uint64_t now = now_ns();
        int counting = in_window(w, now);
        int count = 0;
        for (int i = 0; i < n; i++) {
            struct payload pl;
            if (!parse(a, bufs[i], (int)msgs[i].msg_len, &pl)) {
                if (counting)
                    w->bad++;
                continue;
            }
            if (cfg.closed) {
                if (pl.slot >= (uint32_t)w->window || w->slots[pl.slot].seq != pl.seq ||
                    w->slots[pl.slot].alloc != (uint32_t)ai) {
                    if (counting)
                        w->late++;  /* came back after its slot had timed out */
                    continue;
                }
                if (counting)
                    record_latency(w, now - pl.sent_ns);
                next[count++] = pl.slot;
            } else {
                if (pl.seq >= w->seen_bits) {
                    w->bad++;
                    continue;
                }
                uint8_t bit = (uint8_t)(1u << (pl.seq & 7));
                if (w->seen[pl.seq >> 3] & bit) {
                    if (pl.seq >= w->seq_lo && pl.seq < w->seq_hi)
                        w->dups++;
                    continue;
                }
                w->seen[pl.seq >> 3] |= bit;
                if (pl.seq >= w->seq_lo && pl.seq < w->seq_hi)
                    record_latency(w, now - pl.sent_ns);  /* sent inside the window */
            }
        }
        if (cfg.closed && count && now < cfg.t_end)
            send_slots(w, target, next, count, now);
        if (n < BATCH)
            return;
    }
}

static void closed_timeouts(struct worker *w, uint64_t now) {
    int shift = shift_of(w);
    for (int i = 0; i < w->window; i++) {
        struct slot *s = &w->slots[i];
        if (now - s->sent_ns < cfg.loss_timeout_ns)
            continue;
        if (in_window(w, now))
            w->lost++;
        uint32_t one = (uint32_t)i;
        send_slots(w, (int)((s->alloc + (uint32_t)shift) % (uint32_t)w->nallocs), &one, 1, now);
    }
}

/* Fixed rate: send what is due by now, round robin over the allocations. */
static void rate_send(struct worker *w, uint64_t now) {
    if (now >= cfg.t_end) {
        if (w->seq_hi == UINT64_MAX)
            w->seq_hi = w->next_seq;
        return;
    }
    int counting = in_window(w, now);
    if (counting && w->seq_lo == UINT64_MAX)
        w->seq_lo = w->next_seq;
    uint64_t due = (uint64_t)(w->rate * (double)(now - cfg.t0) / 1e9);
    uint64_t burst = due > w->issued ? due - w->issued : 0;
    if (burst > 4 * BATCH)
        burst = 4 * BATCH;  /* after a stall, catch up over several ticks, not in one flood */
    uint8_t buf[MAX_DGRAM];
    for (uint64_t k = 0; k < burst; k++) {
        uint64_t seq = w->next_seq;
        if (seq >= w->seen_bits)
            return;  /* the bitmap's end: never reached at the planned rate */
        w->next_seq++;
        w->issued++;
        const struct alloc *a = &w->allocs[seq % (uint64_t)w->nallocs];
        int len = build(a, 0, seq, now, buf);
        if (counting)
            w->sent++;
        if (send(a->fd, buf, (size_t)len, MSG_DONTWAIT) != len && counting)
            w->send_errors++;
    }
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    struct epoll_event events[256];
    uint64_t last_scan = 0, now = now_ns();
    if (cfg.closed) {
        for (int i = 0; i < w->window; i++) {
            uint32_t one = (uint32_t)i;
            send_slots(w, i % w->nallocs, &one, 1, now);
        }
    }
    for (;;) {
        now = now_ns();
        in_window(w, now);
        if (cfg.closed && now >= cfg.t_end)
            break;
        if (!cfg.closed) {
            if (now >= cfg.t_stop)
                break;
            if (now >= cfg.t_end && w->seq_hi != UINT64_MAX && w->received >= w->sent)
                break;  /* everything of the window came back: no need to wait for the drain */
        }
        int n = epoll_wait(w->epfd, events, 256, cfg.closed ? 5 : 2);
        if (n < 0 && errno != EINTR) {
            snprintf(w->error, sizeof w->error, "epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            uint32_t tag = (uint32_t)(events[i].data.u64 >> 32);
            uint32_t idx = (uint32_t)events[i].data.u64;
            if (tag == TAG_PEER) {
                peer_echo(w, w->peers[idx]);
            } else if (tag == TAG_CLIENT) {
                client_recv(w, (int)idx);
            } else if (tag == TAG_TIMER) {
                uint64_t ticks;
                ssize_t ignored = read(w->tfd, &ticks, sizeof ticks);
                (void)ignored;
            }
        }
        now = now_ns();
        if (cfg.closed) {
            if (now - last_scan >= 10000000ull) {
                closed_timeouts(w, now);
                last_scan = now;
            }
        } else {
            rate_send(w, now);
        }
    }
    if (!cfg.closed && w->seq_hi == UINT64_MAX)
        w->seq_hi = w->next_seq;
    return NULL;
}

/* ------------------------------------------------------------------------ set-up and report */

static struct worker workers[MAX_THREADS];
static int nthreads;

static void die(const char *msg) {
    fprintf(stderr, "relayload: %s\n", msg);
    exit(2);
}

static struct worker *worker_of(int t) {
    if (t < 0 || t >= MAX_THREADS)
        die("thread index out of range in the spec");
    if (t >= nthreads)
        nthreads = t + 1;
    workers[t].id = t;
    return &workers[t];
}

static void read_spec(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot open the spec file");
    char kind;
    int t, fd;
    while (fscanf(f, " %c %d %d", &kind, &t, &fd) == 3) {
        struct worker *w = worker_of(t);
        if (kind == 'c') {
            unsigned channel, port;
            if (fscanf(f, " %u %u", &channel, &port) != 2)
                die("bad client line in the spec");
            if (w->nallocs == w->cap_allocs) {
                w->cap_allocs = w->cap_allocs ? 2 * w->cap_allocs : 64;
                w->allocs = realloc(w->allocs, sizeof *w->allocs * (size_t)w->cap_allocs);
            }
            w->allocs[w->nallocs++] = (struct alloc){fd, (uint16_t)channel, (uint16_t)port};
        } else if (kind == 'p') {
            if (w->npeers == w->cap_peers) {
                w->cap_peers = w->cap_peers ? 2 * w->cap_peers : 16;
                w->peers = realloc(w->peers, sizeof *w->peers * (size_t)w->cap_peers);
            }
            w->peers[w->npeers++] = fd;
        } else {
            die("unknown line in the spec");
        }
    }
    fclose(f);
}

static void add_fd(int epfd, int fd, uint32_t tag, uint32_t idx) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)tag << 32) | idx};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl failed (is every listed descriptor open?)");
}

static void setup_worker(struct worker *w, int share_window, double share_rate) {
    if (w->nallocs == 0 || w->npeers == 0)
        die("every thread needs at least one client and one peer socket");
    w->window = share_window;
    w->rate = share_rate;
    w->epfd = epoll_create1(0);
    w->hist = calloc(HIST_BUCKETS, sizeof(uint64_t));
    w->rx = calloc(1, sizeof *w->rx);
    w->tx = calloc(1, sizeof *w->tx);
    w->seq_lo = w->seq_hi = UINT64_MAX;
    if (w->epfd < 0 || !w->hist || !w->rx || !w->tx)
        die("out of resources");
    int big = 4 << 20;
    for (int i = 0; i < w->nallocs; i++) {
        setsockopt(w->allocs[i].fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        setsockopt(w->allocs[i].fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        add_fd(w->epfd, w->allocs[i].fd, TAG_CLIENT, (uint32_t)i);
    }
    for (int i = 0; i < w->npeers; i++) {
        setsockopt(w->peers[i], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        setsockopt(w->peers[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        add_fd(w->epfd, w->peers[i], TAG_PEER, (uint32_t)i);
    }
    if (cfg.closed) {
        w->slots = calloc((size_t)(w->window > 0 ? w->window : 1), sizeof *w->slots);
        if (!w->slots)
            die("out of memory");
    } else {
        double total_s = cfg.warmup_s + cfg.duration_s + 1.0;
        w->seen_bits = (uint64_t)(w->rate * total_s * 1.1) + 1024;
        w->seen = calloc((size_t)(w->seen_bits / 8 + 1), 1);
        w->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        if (!w->seen || w->tfd < 0)
            die("out of resources");
        struct itimerspec its = {{0, (long)cfg.tick_ns}, {0, (long)cfg.tick_ns}};
        timerfd_settime(w->tfd, 0, &its, NULL);
        add_fd(w->epfd, w->tfd, TAG_TIMER, 0);
    }
}

static double percentile_us(const uint64_t *hist, uint64_t total, double q, double max_us) {
    if (total == 0)
        return -1;
    uint64_t rank = (uint64_t)ceil(q * (double)total);
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        cum += hist[i];
        if (cum >= rank)
            return i + 0.5;  /* the middle of the 1 us bucket */
    }
    return max_us;  /* in the overflow: only the maximum is known */
}

static void usage(void) {
    fprintf(stderr,
            "usage: relayload --spec FILE [--mode closed|rate] [--method channel|send] [--window W]\n"
            "       [--rate R] [--duration S] [--warmup S] [--drain S] [--payload BYTES]\n"
            "       [--loss-timeout-ms MS] [--tick-us US]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *spec = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--spec")) spec = v;
        else if (!strcmp(a, "--mode")) cfg.closed = !strcmp(v, "closed") ? 1 : (!strcmp(v, "rate") ? 0 : -1);
        else if (!strcmp(a, "--method")) cfg.send_method = !strcmp(v, "send") ? 1 : (!strcmp(v, "channel") ? 0 : -1);
        else if (!strcmp(a, "--window")) cfg.window = atoi(v);
        else if (!strcmp(a, "--rate")) cfg.rate = atof(v);
        else if (!strcmp(a, "--duration")) cfg.duration_s = atof(v);
        else if (!strcmp(a, "--warmup")) cfg.warmup_s = atof(v);
        else if (!strcmp(a, "--drain")) cfg.drain_s = atof(v);
        else if (!strcmp(a, "--payload")) cfg.payload = atoi(v);
        else if (!strcmp(a, "--loss-timeout-ms")) cfg.loss_timeout_ns = (uint64_t)(atof(v) * 1e6);
        else if (!strcmp(a, "--tick-us")) cfg.tick_ns = (uint64_t)(atof(v) * 1e3);
        else usage();
    }
    if (!spec || cfg.closed < 0 || cfg.send_method < 0 || cfg.window < 1 || cfg.window > (1 << 20) ||
        cfg.rate <= 0 || cfg.rate > 1e7 || cfg.duration_s <= 0 || cfg.duration_s > 600 ||
        cfg.warmup_s < 0 || cfg.warmup_s > 60 || cfg.drain_s < 0 || cfg.drain_s > 10 ||
        cfg.payload < MIN_PAYLOAD || cfg.payload > MAX_PAYLOAD || cfg.loss_timeout_ns < 1000000ull ||
        cfg.tick_ns < 10000ull || cfg.tick_ns >= 1000000000ull)
        usage();
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(cfg.warmup_s + cfg.duration_s + cfg.drain_s) + 10);
    signal(SIGPIPE, SIG_IGN);

    read_spec(spec);
    if (nthreads == 0)
        die("the spec lists no socket");
    if (cfg.closed && cfg.window < nthreads)
        die("the window must be at least the number of threads");
    for (int t = 0; t < nthreads; t++) {
        int share = cfg.window / nthreads + (t < cfg.window % nthreads ? 1 : 0);
        setup_worker(&workers[t], share, cfg.rate / nthreads);
    }

    cfg.t0 = now_ns() + 10000000ull;  /* 10 ms for the threads to start */
    cfg.t_warm = cfg.t0 + (uint64_t)(cfg.warmup_s * 1e9);
    cfg.t_end = cfg.t_warm + (uint64_t)(cfg.duration_s * 1e9);
    cfg.t_stop = cfg.t_end + (uint64_t)(cfg.drain_s * 1e9);
    sleep_until(cfg.t0);
    for (int t = 0; t < nthreads; t++)
        if (pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]) != 0)
            die("pthread_create failed");

    sleep_until(cfg.t_warm);
    double cpu0 = cpu_s();
    uint64_t w0 = now_ns();
    printf("{\"event\":\"window_start\"}\n");
    fflush(stdout);
    sleep_until(cfg.t_end);
    double cpu1 = cpu_s();
    uint64_t w1 = now_ns();
    printf("{\"event\":\"window_end\"}\n");
    fflush(stdout);
    for (int t = 0; t < nthreads; t++)
        pthread_join(workers[t].thread, NULL);

    uint64_t sent = 0, received = 0, lost = 0, late = 0, dups = 0, send_errors = 0, bad = 0, echoed = 0;
    uint64_t overflow = 0, max_ns = 0, sum_ns = 0;
    uint64_t *hist = calloc(HIST_BUCKETS, sizeof(uint64_t));
    const char *error = NULL;
    for (int t = 0; t < nthreads; t++) {
        struct worker *w = &workers[t];
        sent += w->sent;
        received += w->received;
        lost += cfg.closed ? w->lost : (w->sent > w->received ? w->sent - w->received : 0);
        late += w->late;
        dups += w->dups;
        send_errors += w->send_errors;
        bad += w->bad;
        echoed += w->echoed;
        overflow += w->overflow;
        sum_ns += w->sum_ns;
        if (w->max_ns > max_ns)
            max_ns = w->max_ns;
        for (int i = 0; i < HIST_BUCKETS; i++)
            hist[i] += w->hist[i];
        if (w->error[0] && !error)
            error = w->error;
    }
    double window_s = (double)(w1 - w0) / 1e9;
    double max_us = (double)max_ns / 1e3;
    int nallocs = 0, npeers = 0;
    for (int t = 0; t < nthreads; t++) {
        nallocs += workers[t].nallocs;
        npeers += workers[t].npeers;
    }
    printf("{\"mode\":\"%s\",\"method\":\"%s\",\"allocations\":%d,\"peers\":%d,\"threads\":%d,"
           "\"window\":%d,\"rate\":%.1f,\"payload\":%d,\"warmup_s\":%.3f,\"duration_s\":%.3f,"
           "\"window_s\":%.6f,\"round_trips_per_s\":%.1f,\"sent\":%" PRIu64 ",\"received\":%" PRIu64
           ",\"lost\":%" PRIu64 ",\"late\":%" PRIu64 ",\"duplicates\":%" PRIu64 ",\"send_errors\":%" PRIu64
           ",\"bad\":%" PRIu64 ",\"peer_echoed\":%" PRIu64 ","
           "\"latency_us\":{\"p50\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f,\"mean\":%.1f,"
           "\"over_200ms\":%" PRIu64 "},"
           "\"generator_cpu_s\":%.4f,\"generator_cpu_pct\":%.1f,\"error\":%s%s%s}\n",
           cfg.closed ? "closed" : "rate", cfg.send_method ? "send" : "channel", nallocs, npeers, nthreads,
           cfg.window, cfg.rate, cfg.payload, cfg.warmup_s, cfg.duration_s, window_s,
           window_s > 0 ? (double)received / cfg.duration_s : 0.0, sent, received, lost, late, dups,
           send_errors, bad, echoed,
           percentile_us(hist, received, 0.50, max_us),
           percentile_us(hist, received, 0.99, max_us),
           percentile_us(hist, received, 0.999, max_us), max_us,
           received ? (double)sum_ns / 1e3 / (double)received : -1.0, overflow,
           cpu1 - cpu0, window_s > 0 ? 100.0 * (cpu1 - cpu0) / window_s : 0.0,
           error ? "\"" : "", error ? error : "null", error ? "\"" : "");
    fflush(stdout);
    return 0;
}
