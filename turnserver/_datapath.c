/* The media fast path: UDP ChannelData between clients and peers, without Python per packet.
 *
 * The TURN core (turnserver/turn/core.py) keeps every decision. For each channel of a UDP
 * allocation it installs a route here: (listener, client address, channel number) for the
 * uplink and (relay socket, peer address) for the downlink, with the route's expiry (the
 * earliest of the channel's, the permission's and the allocation's) and the allocation's two
 * token buckets. This module only forwards what a route fully allows, and counts it:
 *
 *   client ChannelData  -> listener recvmmsg -> route -> sendto on the relay socket
 *   peer datagram       -> relay recvmmsg    -> route -> 4-byte header -> sendmmsg on the listener
 *
 * Anything else (STUN, Send indications, a datagram without a route, an expired route, an
 * empty bucket, a malformed frame) goes to the Python callbacks unchanged, and the core
 * decides and counts as it always did. The listener and relay sockets are watched by one
 * epoll descriptor that the event loop watches; one wakeup drains every ready socket, and the
 * frames and replies toward UDP clients leave in one sendmmsg per listener.
 *
 * turnserver/io/datapath_py.py is the pure-Python twin with the same interface.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_SIZE 65536
#define LISTENER_BATCH 64   /* datagrams per recvmmsg on a listener */
#define RELAY_BATCH 16      /* datagrams per recvmmsg on a relay socket */
#define RX_SLOTS 128        /* relay receive buffers that queued frames may point into */
#define OUT_MAX 256         /* queued datagrams per listener before a flush */
#define EVENTS_MAX 256
#define UDP_PAYLOAD_MAX 65507 /* a bigger frame toward a client is the core's to refuse */

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ TokenBucket */

typedef struct {
    PyObject_HEAD
    double credit;
    double rate;
    double burst;
    double stamp;
} Bucket;

static void
bucket_set_rate(Bucket *b, double rate, double now)
{
    if (rate > 0) {
        b->rate = rate;
        b->burst = rate;
        if (b->credit > b->burst)
            b->credit = b->burst;
    } else {
        b->rate = b->burst = b->credit = INFINITY;
    }
    b->stamp = now;
}

/* Called when taking `size` made the credit negative (see turnserver/turn/limits.py). */
static int
bucket_refill(Bucket *b, double now, double size)
{
    double elapsed = now - b->stamp;
    double credit;
    if (isinf(b->rate))
        return 1;
    if (elapsed < 0)
        elapsed = 0; /* two clocks a few milliseconds apart: never take credit back */
    credit = b->credit + size + elapsed * b->rate;
    if (credit > b->burst)
        credit = b->burst;
    if (now > b->stamp)
        b->stamp = now;
    if (credit >= size) {
        b->credit = credit - size;
        return 1;
    }
    b->credit = credit;
    return 0;
}

/* One packet of `size` through an allocation's bucket and the server's: 1 when it may go.
 * When it may not, both credits are as they were (the Python slow path then decides). */
static int
buckets_take(Bucket *own, Bucket *server, double now, double size)
{
    own->credit -= size;
    if (own->credit < 0 && !bucket_refill(own, now, size))
        return 0;
    if (server != NULL) {
        server->credit -= size;
        if (server->credit < 0 && !bucket_refill(server, now, size)) {
            own->credit += size;
            return 0;
        }
    }
    return 1;
}

static int
Bucket_init(Bucket *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rate", "now", NULL};
    double rate, now;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dd", kwlist, &rate, &now))
        return -1;
    self->credit = INFINITY;
    bucket_set_rate(self, rate, now);
    return 0;
}

static PyObject *
Bucket_set_rate(Bucket *self, PyObject *args)
{
    double rate, now;
    if (!PyArg_ParseTuple(args, "dd", &rate, &now))
        return NULL;
    bucket_set_rate(self, rate, now);
    Py_RETURN_NONE;
}

static PyObject *
Bucket_refill(Bucket *self, PyObject *args)
{
    double now, size;
    if (!PyArg_ParseTuple(args, "dd", &now, &size))
        return NULL;
    return PyBool_FromLong(bucket_refill(self, now, size));
}

static PyMethodDef Bucket_methods[] = {
    {"set_rate", (PyCFunction)Bucket_set_rate, METH_VARARGS,
     "Change the rate (a reload); the credit is kept, capped at the new burst."},
    {"refill", (PyCFunction)Bucket_refill, METH_VARARGS,
     "Called when taking size made the credit negative: True when the packet fits after all."},
    {NULL}};

static PyMemberDef Bucket_members[] = {
    {"credit", T_DOUBLE, offsetof(Bucket, credit), 0, NULL},
    {"rate", T_DOUBLE, offsetof(Bucket, rate), 0, NULL},
    {"burst", T_DOUBLE, offsetof(Bucket, burst), 0, NULL},
    {"stamp", T_DOUBLE, offsetof(Bucket, stamp), 0, NULL},
    {NULL}};

static PyTypeObject BucketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "turnserver._datapath.TokenBucket",
    .tp_doc = "Bytes per second with a burst of one second's worth; rate <= 0: unlimited.",
    .tp_basicsize = sizeof(Bucket),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Bucket_init,
    .tp_methods = Bucket_methods,
    .tp_members = Bucket_members,
};

/* ------------------------------------------------------------------ addresses and keys */

typedef struct {
    int32_t fd;
    uint16_t family; /* 4 or 6 */
    uint16_t port;   /* network order */
    uint8_t ip[16];
    uint32_t number; /* channel number for uplink keys, 0xFFFFFFFF for downlink keys */
    uint32_t pad;    /* zero: the key is hashed and compared as 32 bytes */
} Key;

static int
key_from_sockaddr(Key *k, int fd, const struct sockaddr_storage *sa, uint32_t number)
{
    memset(k, 0, sizeof(*k));
    k->fd = fd;
    k->number = number;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)sa;
        k->family = 4;
        k->port = s->sin_port;
        memcpy(k->ip, &s->sin_addr, 4);
        return 0;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)sa;
        k->family = 6;
        k->port = s->sin6_port;
        memcpy(k->ip, &s->sin6_addr, 16);
        return 0;
    }
    return -1;
}

/* ("ip", port) -> sockaddr; -1 with an exception set when it is not an address. */
static int
sockaddr_from_tuple(PyObject *addr, struct sockaddr_storage *sa, socklen_t *len)
{
    const char *ip;
    int port;
    memset(sa, 0, sizeof(*sa));
    if (!PyArg_ParseTuple(addr, "si", &ip, &port))
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return -1;
    }
    if (strchr(ip, ':') == NULL) {
        struct sockaddr_in *s = (struct sockaddr_in *)sa;
        s->sin_family = AF_INET;
        s->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &s->sin_addr) != 1)
            goto bad;
        *len = sizeof(*s);
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)sa;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, ip, &s->sin6_addr) != 1)
            goto bad;
        *len = sizeof(*s);
    }
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", ip);
    return -1;
}

static PyObject *
tuple_from_sockaddr(const struct sockaddr_storage *sa)
{
    char text[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s->sin_addr, text, sizeof(text));
        return Py_BuildValue("(si)", text, (int)ntohs(s->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s->sin6_addr, text, sizeof(text));
        return Py_BuildValue("(si)", text, (int)ntohs(s->sin6_port));
    }
    return Py_BuildValue("(si)", "", 0);
}

/* ------------------------------------------------------------------ routes */

typedef struct Route {
    struct Route *up_next;
    struct Route *down_next;
    Key up_key;
    Key down_key;
    uint64_t up_hash, down_hash;
    uint32_t slot;
    uint32_t gen;
    int listener_fd;
    int relay_fd;
    struct sockaddr_storage client;
    socklen_t client_len;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    uint16_t number;
    double expires_at;
    Bucket *up;
    Bucket *down;
    /* A peer on our own relay address must be on a port some worker holds: its byte in the
     * shared held-port map (set_shared), checked per packet toward the peer; NULL: no check. */
    const volatile unsigned char *held;
    uint64_t bytes_up, packets_up, bytes_down, packets_down; /* since the last take */
    int dirty;
} Route;

typedef struct {
    Route **heads;
    size_t mask;
} Table;

/* A datagram waiting for the listener's sendmmsg. */
typedef struct {
    struct iovec iov;
    struct sockaddr_storage to;
    socklen_t to_len;
    PyObject *ref;    /* a reply's bytes, kept alive until sent; NULL for a relayed frame */
    uint32_t slot;    /* the route of a relayed frame (to take back what is not sent) */
    uint32_t gen;
    uint32_t size;
} Out;

typedef struct Listener {
    int fd;
    PyObject *ctx;
    Out out[OUT_MAX];
    int out_len;
    struct Listener *next_pending;
    int pending;
    int dead; /* removed during a run: freed when the run ends */
} Listener;

typedef struct {
    PyObject_HEAD
    PyObject *loop;
    PyObject *on_client;
    PyObject *on_peer;
    PyObject *relays;     /* fd -> relay object (for the slow path) */
    PyObject *listeners;  /* fd -> capsule-free index: Listener pointers live in lst[] */
    Listener **lst;
    int lst_len, lst_cap;
    int epfd;
    int inited;
    int started;
    int running;
    uint64_t seed;
    Table up, down;
    size_t route_count;
    Route **slots;
    uint32_t slots_cap;
    uint32_t *free_slots;
    uint32_t free_len;
    uint32_t next_gen;
    uint32_t *dirty;
    uint32_t dirty_len, dirty_cap;
    Bucket *server_up;
    Bucket *server_down;
    Py_buffer shared; /* the held-port map shared by worker processes, when set */
    int has_shared;
    /* receive buffers */
    unsigned char *lrx;   /* LISTENER_BATCH * RECV_SIZE */
    unsigned char *rrx;   /* RX_SLOTS * (RECV_SIZE + 4) */
    int rx_used;
    Listener *pending_head;
    /* counters */
    unsigned long long fast_up, fast_down, slow_client, slow_peer, send_failed, wakeups;
} DataPlane;

static uint64_t
key_hash(const DataPlane *dp, const Key *k)
{
    uint64_t w[sizeof(Key) / 8];
    uint64_t h = dp->seed;
    size_t i;
    memcpy(w, k, sizeof(w));
    for (i = 0; i < sizeof(Key) / 8; i++) {
        h ^= w[i];
        h *= 0x9E3779B97F4A7C15ULL;
        h ^= h >> 29;
    }
    return h;
}

static int
table_init(Table *t, size_t size)
{
    t->heads = PyMem_Calloc(size, sizeof(Route *));
    if (t->heads == NULL)
        return -1;
    t->mask = size - 1;
    return 0;
}

static int
tables_grow(DataPlane *dp)
{
    size_t size = (dp->up.mask + 1) * 2, i;
    Table up, down;
    if (table_init(&up, size) < 0)
        return -1;
    if (table_init(&down, size) < 0) {
        PyMem_Free(up.heads);
        return -1;
    }
    for (i = 0; i <= dp->up.mask; i++) {
        Route *r = dp->up.heads[i], *next;
        for (; r != NULL; r = next) {
            next = r->up_next;
            r->up_next = up.heads[r->up_hash & up.mask];
            up.heads[r->up_hash & up.mask] = r;
        }
        r = dp->down.heads[i];
        for (; r != NULL; r = next) {
            next = r->down_next;
            r->down_next = down.heads[r->down_hash & down.mask];
            down.heads[r->down_hash & down.mask] = r;
        }
    }
    PyMem_Free(dp->up.heads);
    PyMem_Free(dp->down.heads);
    dp->up = up;
    dp->down = down;
    return 0;
}

static Route *
find_up(DataPlane *dp, const Key *k)
{
    uint64_t h = key_hash(dp, k);
    Route *r = dp->up.heads[h & dp->up.mask];
    for (; r != NULL; r = r->up_next)
        if (r->up_hash == h && memcmp(&r->up_key, k, sizeof(Key)) == 0)
            return r;
    return NULL;
}

static Route *
find_down(DataPlane *dp, const Key *k)
{
    uint64_t h = key_hash(dp, k);
    Route *r = dp->down.heads[h & dp->down.mask];
    for (; r != NULL; r = r->down_next)
        if (r->down_hash == h && memcmp(&r->down_key, k, sizeof(Key)) == 0)
            return r;
    return NULL;
}

static void
unlink_route(DataPlane *dp, Route *route)
{
    Route **p = &dp->up.heads[route->up_hash & dp->up.mask];
    for (; *p != NULL; p = &(*p)->up_next)
        if (*p == route) {
            *p = route->up_next;
            break;
        }
    p = &dp->down.heads[route->down_hash & dp->down.mask];
    for (; *p != NULL; p = &(*p)->down_next)
        if (*p == route) {
            *p = route->down_next;
            break;
        }
}

static int
mark_dirty(DataPlane *dp, Route *r)
{
    if (r->dirty)
        return 0;
    if (dp->dirty_len == dp->dirty_cap) {
        uint32_t cap = dp->dirty_cap ? dp->dirty_cap * 2 : 256;
        uint32_t *grown = PyMem_Realloc(dp->dirty, cap * sizeof(uint32_t));
        if (grown == NULL)
            return -1; /* counted next time it moves */
        dp->dirty = grown;
        dp->dirty_cap = cap;
    }
    dp->dirty[dp->dirty_len++] = r->slot;
    r->dirty = 1;
    return 0;
}

static Route *
route_at(DataPlane *dp, PyObject *handle)
{
    long slot = PyLong_AsLong(handle);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || (uint32_t)slot >= dp->slots_cap || dp->slots[slot] == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such route");
        return NULL;
    }
    return dp->slots[slot];
}

/* ------------------------------------------------------------------ sending */

static void
take_back(DataPlane *dp, Out *o)
{
    Route *r;
    dp->send_failed++;
    if (o->ref != NULL)
        return;
    if (o->slot < dp->slots_cap && (r = dp->slots[o->slot]) != NULL && r->gen == o->gen) {
        r->bytes_down -= o->size;
        r->packets_down -= 1;
    }
}

static void
flush_listener(DataPlane *dp, Listener *l)
{
    struct mmsghdr msgs[OUT_MAX];
    int n = l->out_len, i, start = 0;
    for (i = 0; i < n; i++) {
        memset(&msgs[i], 0, sizeof(msgs[i]));
        msgs[i].msg_hdr.msg_name = &l->out[i].to;
        msgs[i].msg_hdr.msg_namelen = l->out[i].to_len;
        msgs[i].msg_hdr.msg_iov = &l->out[i].iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (start < n) {
        int sent = sendmmsg(l->fd, msgs + start, (unsigned int)(n - start), 0);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            take_back(dp, &l->out[start]); /* a full buffer or an error: media, so drop it */
            start += 1;
        } else {
            start += sent;
        }
    }
    for (i = 0; i < n; i++)
        Py_CLEAR(l->out[i].ref);
    l->out_len = 0;
}

static void
flush_all(DataPlane *dp)
{
    Listener *l = dp->pending_head, *next;
    for (; l != NULL; l = next) {
        next = l->next_pending;
        flush_listener(dp, l);
        l->pending = 0;
        l->next_pending = NULL;
    }
    dp->pending_head = NULL;
    dp->rx_used = 0;
}

static Out *
queue_on(DataPlane *dp, Listener *l)
{
    if (l->out_len == OUT_MAX)
        flush_listener(dp, l);
    if (!l->pending) {
        l->pending = 1;
        l->next_pending = dp->pending_head;
        dp->pending_head = l;
    }
    return &l->out[l->out_len++];
}

static Listener *
listener_for(DataPlane *dp, int fd)
{
    int i;
    for (i = 0; i < dp->lst_len; i++)
        if (dp->lst[i]->fd == fd && !dp->lst[i]->dead)
            return dp->lst[i];
    return NULL;
}

/* ------------------------------------------------------------------ draining */

static void
slow_client_call(DataPlane *dp, Listener *l, const unsigned char *data, size_t len,
                 const struct sockaddr_storage *from, socklen_t from_len, double now)
{
    PyObject *bytes, *addr, *reply;
    dp->slow_client++;
    bytes = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    addr = tuple_from_sockaddr(from);
    if (bytes == NULL || addr == NULL) {
        Py_XDECREF(bytes);
        Py_XDECREF(addr);
        PyErr_WriteUnraisable(dp->on_client);
        return;
    }
    reply = PyObject_CallFunction(dp->on_client, "OOOd", l->ctx, bytes, addr, now);
    Py_DECREF(bytes);
    Py_DECREF(addr);
    if (reply == NULL) {
        PyErr_WriteUnraisable(dp->on_client);
        return;
    }
    if (PyBytes_Check(reply) && PyBytes_GET_SIZE(reply) > 0) {
        Out *o = queue_on(dp, l);
        o->iov.iov_base = PyBytes_AS_STRING(reply);
        o->iov.iov_len = (size_t)PyBytes_GET_SIZE(reply);
        memcpy(&o->to, from, sizeof(*from));
        o->to_len = from_len;
        o->ref = reply; /* the reference is the queue's now */
        o->size = 0;
        return;
    }
    Py_DECREF(reply);
}

static void
drain_listener(DataPlane *dp, Listener *l, double now)
{
    struct mmsghdr msgs[LISTENER_BATCH];
    struct iovec iov[LISTENER_BATCH];
    struct sockaddr_storage from[LISTENER_BATCH];
    int n, i;
    for (i = 0; i < LISTENER_BATCH; i++) {
        iov[i].iov_base = dp->lrx + (size_t)i * RECV_SIZE;
        iov[i].iov_len = RECV_SIZE;
        memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    n = recvmmsg(l->fd, msgs, LISTENER_BATCH, MSG_DONTWAIT, NULL);
    if (n <= 0)
        return;
    for (i = 0; i < n; i++) {
        const unsigned char *d = iov[i].iov_base;
        size_t len = msgs[i].msg_len;
        if (len == 0 || (msgs[i].msg_hdr.msg_flags & MSG_TRUNC))
            continue;
        if (d[0] >= 0x40 && d[0] < 0x80 && len >= 4) {
            Key k;
            Route *r;
            uint32_t number = ((uint32_t)d[0] << 8) | d[1];
            size_t length = ((size_t)d[2] << 8) | d[3];
            if (key_from_sockaddr(&k, l->fd, &from[i], number) == 0 && (r = find_up(dp, &k)) != NULL
                && now < r->expires_at && len >= 4 + length && (r->held == NULL || *r->held)
                && buckets_take(r->up, dp->server_up, now, (double)length)) {
                ssize_t sent = sendto(r->relay_fd, d + 4, length, 0,
                                      (struct sockaddr *)&r->peer, r->peer_len);
                if (sent < 0) {
                    dp->send_failed++;
                } else {
                    r->bytes_up += length;
                    r->packets_up += 1;
                    dp->fast_up++;
                    mark_dirty(dp, r);
                }
                continue;
            }
        }
        slow_client_call(dp, l, d, len, &from[i], msgs[i].msg_hdr.msg_namelen, now);
        if (l->dead)
            break; /* the callback removed this listener */
    }
}

static void
drain_relay(DataPlane *dp, int fd, double now)
{
    struct mmsghdr msgs[RELAY_BATCH];
    struct iovec iov[RELAY_BATCH];
    struct sockaddr_storage from[RELAY_BATCH];
    int n, i, want;
    if (dp->rx_used + RELAY_BATCH > RX_SLOTS)
        flush_all(dp);
    want = RELAY_BATCH;
    for (i = 0; i < want; i++) {
        iov[i].iov_base = dp->rrx + (size_t)(dp->rx_used + i) * (RECV_SIZE + 4) + 4;
        iov[i].iov_len = RECV_SIZE;
        memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    n = recvmmsg(fd, msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
    if (n <= 0)
        return;
    dp->rx_used += n; /* these buffers stay in use until the flush */
    for (i = 0; i < n; i++) {
        unsigned char *d = iov[i].iov_base;
        size_t len = msgs[i].msg_len;
        Key k;
        Route *r;
        if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
            continue;
        if (key_from_sockaddr(&k, fd, &from[i], 0xFFFFFFFFu) == 0 && (r = find_down(dp, &k)) != NULL
            && now < r->expires_at && len + 4 <= UDP_PAYLOAD_MAX
            && buckets_take(r->down, dp->server_down, now, (double)len)) {
            Listener *l = listener_for(dp, r->listener_fd);
            if (l != NULL) {
                Out *o;
                d[-4] = (unsigned char)(r->number >> 8);
                d[-3] = (unsigned char)(r->number & 0xFF);
                d[-2] = (unsigned char)(len >> 8);
                d[-1] = (unsigned char)(len & 0xFF);
                o = queue_on(dp, l);
                o->iov.iov_base = d - 4;
                o->iov.iov_len = len + 4;
                memcpy(&o->to, &r->client, sizeof(r->client));
                o->to_len = r->client_len;
                o->ref = NULL;
                o->slot = r->slot;
                o->gen = r->gen;
                o->size = (uint32_t)len;
                r->bytes_down += len;
                r->packets_down += 1;
                dp->fast_down++;
                mark_dirty(dp, r);
                continue;
            }
            r->down->credit += (double)len; /* no listener: give the credit back */
            if (dp->server_down != NULL)
                dp->server_down->credit += (double)len;
        }
        {
            PyObject *relay = NULL, *key, *bytes, *addr, *res;
            dp->slow_peer++;
            key = PyLong_FromLong(fd);
            if (key != NULL) {
                relay = PyDict_GetItemWithError(dp->relays, key);
                Py_DECREF(key);
            }
            if (relay == NULL) {
                PyErr_Clear();
                continue; /* a socket being closed */
            }
            Py_INCREF(relay);
            bytes = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)len);
            addr = tuple_from_sockaddr(&from[i]);
            if (bytes != NULL && addr != NULL) {
                res = PyObject_CallFunction(dp->on_peer, "OOOd", relay, bytes, addr, now);
                if (res == NULL)
                    PyErr_WriteUnraisable(dp->on_peer);
                Py_XDECREF(res);
            } else {
                PyErr_WriteUnraisable(dp->on_peer);
            }
            Py_XDECREF(bytes);
            Py_XDECREF(addr);
            Py_DECREF(relay);
        }
    }
}

/* ------------------------------------------------------------------ DataPlane methods */

static int
DataPlane_init(DataPlane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "on_client", "on_peer", NULL};
    PyObject *loop, *on_client, *on_peer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &loop, &on_client, &on_peer))
        return -1;
    if (self->inited) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    self->inited = 1;
    self->epfd = -1;
    Py_INCREF(loop);
    Py_INCREF(on_client);
    Py_INCREF(on_peer);
    self->loop = loop;
    self->on_client = on_client;
    self->on_peer = on_peer;
    self->relays = PyDict_New();
    self->listeners = PyDict_New();
    if (self->relays == NULL || self->listeners == NULL)
        return -1;
    if (getrandom(&self->seed, sizeof(self->seed), 0) != sizeof(self->seed))
        self->seed = (uint64_t)monotonic_now() * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    if (table_init(&self->up, 1024) < 0 || table_init(&self->down, 1024) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->lrx = mmap(NULL, (size_t)LISTENER_BATCH * RECV_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    self->rrx = mmap(NULL, (size_t)RX_SLOTS * (RECV_SIZE + 4), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (self->lrx == MAP_FAILED || self->rrx == MAP_FAILED) {
        self->lrx = self->rrx = NULL;
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void
DataPlane_dealloc(DataPlane *self)
{
    uint32_t i;
    int j;
    for (j = 0; j < self->lst_len; j++) {
        Listener *l = self->lst[j];
        int k;
        for (k = 0; k < l->out_len; k++)
            Py_CLEAR(l->out[k].ref);
        Py_CLEAR(l->ctx);
        PyMem_Free(l);
    }
    PyMem_Free(self->lst);
    for (i = 0; i < self->slots_cap; i++) {
        Route *r = self->slots[i];
        if (r != NULL) {
            Py_XDECREF(r->up);
            Py_XDECREF(r->down);
            PyMem_Free(r);
        }
    }
    PyMem_Free(self->slots);
    PyMem_Free(self->free_slots);
    PyMem_Free(self->dirty);
    PyMem_Free(self->up.heads);
    PyMem_Free(self->down.heads);
    if (self->lrx != NULL)
        munmap(self->lrx, (size_t)LISTENER_BATCH * RECV_SIZE);
    if (self->rrx != NULL)
        munmap(self->rrx, (size_t)RX_SLOTS * (RECV_SIZE + 4));
    if (self->inited && self->epfd >= 0)
        close(self->epfd);
    Py_XDECREF(self->server_up);
    Py_XDECREF(self->server_down);
    if (self->has_shared)
        PyBuffer_Release(&self->shared);
    Py_XDECREF(self->loop);
    Py_XDECREF(self->on_client);
    Py_XDECREF(self->on_peer);
    Py_XDECREF(self->relays);
    Py_XDECREF(self->listeners);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
DataPlane_run(DataPlane *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event events[EVENTS_MAX];
    int n, i;
    double now;
    if (self->epfd < 0)
        Py_RETURN_NONE;
    n = epoll_wait(self->epfd, events, EVENTS_MAX, 0);
    if (n <= 0)
        Py_RETURN_NONE;
    self->wakeups++;
    self->running = 1;
    now = monotonic_now();
    for (i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        int fd = (int)(tag >> 1);
        if (tag & 1) {
            Listener *l = listener_for(self, fd);
            if (l != NULL) {
                PyObject *ctx = l->ctx;
                Py_INCREF(ctx); /* the callback may remove the listener */
                drain_listener(self, l, now);
                Py_DECREF(ctx);
            }
        } else {
            drain_relay(self, fd, now);
        }
    }
    flush_all(self);
    self->running = 0;
    for (i = 0; i < self->lst_len;) {
        Listener *l = self->lst[i];
        if (l->dead) {
            Py_CLEAR(l->ctx);
            PyMem_Free(l);
            self->lst[i] = self->lst[--self->lst_len];
        } else {
            i++;
        }
    }
    Py_RETURN_NONE;
}

static int
watch(DataPlane *self, int fd, int is_listener)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = ((uint64_t)(uint32_t)fd << 1) | (uint64_t)(is_listener ? 1 : 0);
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *
DataPlane_start(DataPlane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *run, *res;
    if (self->started)
        Py_RETURN_NONE;
    run = PyObject_GetAttrString((PyObject *)self, "run");
    if (run == NULL)
        return NULL;
    res = PyObject_CallMethod(self->loop, "add_reader", "iO", self->epfd, run);
    Py_DECREF(run);
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_close(DataPlane *self, PyObject *Py_UNUSED(ignored))
{
    if (self->started) {
        PyObject *res = PyObject_CallMethod(self->loop, "remove_reader", "i", self->epfd);
        if (res == NULL)
            PyErr_Clear();
        Py_XDECREF(res);
        self->started = 0;
    }
    flush_all(self);
    Py_RETURN_NONE;
}

/* Drop fd's entry from one of the fd -> object dicts; none there is fine. */
static void
forget_fd(PyObject *dict, int fd)
{
    PyObject *key = PyLong_FromLong(fd);
    if (key == NULL || PyDict_DelItem(dict, key) < 0)
        PyErr_Clear();
    Py_XDECREF(key);
}

static PyObject *
DataPlane_add_listener(DataPlane *self, PyObject *args)
{
    PyObject *sock, *ctx, *key;
    Listener *l;
    int fd;
    if (!PyArg_ParseTuple(args, "OO", &sock, &ctx))
        return NULL;
    if ((fd = PyObject_AsFileDescriptor(sock)) < 0)
        return NULL;
    if (listener_for(self, fd) != NULL) {
        PyErr_SetString(PyExc_ValueError, "listener already added");
        return NULL;
    }
    if (self->lst_len == self->lst_cap) {
        int cap = self->lst_cap ? self->lst_cap * 2 : 8;
        Listener **grown = PyMem_Realloc(self->lst, (size_t)cap * sizeof(Listener *));
        if (grown == NULL)
            return PyErr_NoMemory();
        self->lst = grown;
        self->lst_cap = cap;
    }
    l = PyMem_Calloc(1, sizeof(Listener));
    if (l == NULL)
        return PyErr_NoMemory();
    l->fd = fd;
    Py_INCREF(ctx);
    l->ctx = ctx;
    if (watch(self, fd, 1) < 0) {
        Py_DECREF(ctx);
        PyMem_Free(l);
        return NULL;
    }
    self->lst[self->lst_len++] = l;
    key = PyLong_FromLong(fd);
    if (key == NULL || PyDict_SetItem(self->listeners, key, sock) < 0) {
        Py_XDECREF(key);
        return NULL;
    }
    Py_DECREF(key);
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_remove_listener(DataPlane *self, PyObject *sock)
{
    int fd, i;
    if ((fd = PyObject_AsFileDescriptor(sock)) < 0)
        return NULL;
    for (i = 0; i < self->lst_len; i++) {
        Listener *l = self->lst[i];
        if (l->fd == fd && !l->dead) {
            /* Send what is queued for it, and take it off the pending list, before it goes. */
            if (l->pending) {
                Listener **p = &self->pending_head;
                flush_listener(self, l);
                for (; *p != NULL; p = &(*p)->next_pending)
                    if (*p == l) {
                        *p = l->next_pending;
                        break;
                    }
            }
            epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
            if (self->running) {
                l->dead = 1; /* a drain may still be looking at it */
            } else {
                Py_CLEAR(l->ctx);
                PyMem_Free(l);
                self->lst[i] = self->lst[--self->lst_len];
            }
            break;
        }
    }
    forget_fd(self->listeners, fd);
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_add_relay(DataPlane *self, PyObject *args)
{
    PyObject *sock, *relay, *key;
    int fd;
    if (!PyArg_ParseTuple(args, "OO", &sock, &relay))
        return NULL;
    if ((fd = PyObject_AsFileDescriptor(sock)) < 0)
        return NULL;
    key = PyLong_FromLong(fd);
    if (key == NULL)
        return NULL;
    if (PyDict_SetItem(self->relays, key, relay) < 0) {
        Py_DECREF(key);
        return NULL;
    }
    if (watch(self, fd, 0) < 0) {
        PyDict_DelItem(self->relays, key);
        Py_DECREF(key);
        return NULL;
    }
    Py_DECREF(key);
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_remove_relay(DataPlane *self, PyObject *sock)
{
    int fd;
    if ((fd = PyObject_AsFileDescriptor(sock)) < 0)
        return NULL;
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL);
    forget_fd(self->relays, fd);
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_set_server_buckets(DataPlane *self, PyObject *args)
{
    PyObject *up, *down;
    if (!PyArg_ParseTuple(args, "O!O!", &BucketType, &up, &BucketType, &down))
        return NULL;
    Py_INCREF(up);
    Py_INCREF(down);
    Py_XSETREF(self->server_up, (Bucket *)up);
    Py_XSETREF(self->server_down, (Bucket *)down);
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_set_shared(DataPlane *self, PyObject *map)
{
    if (self->has_shared) {
        PyBuffer_Release(&self->shared);
        self->has_shared = 0;
    }
    if (PyObject_GetBuffer(map, &self->shared, PyBUF_SIMPLE) < 0)
        return NULL;
    self->has_shared = 1;
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_add_route(DataPlane *self, PyObject *args)
{
    PyObject *listener, *client, *relay, *peer, *up, *down;
    int number;
    double expires_at;
    int lfd, rfd;
    Route *r;
    uint32_t slot;
    Py_ssize_t held = -1;
    if (!PyArg_ParseTuple(args, "OOiOOdO!O!|n", &listener, &client, &number, &relay, &peer,
                          &expires_at, &BucketType, &up, &BucketType, &down, &held))
        return NULL;
    if (held >= 0 && (!self->has_shared || held >= self->shared.len)) {
        PyErr_SetString(PyExc_ValueError, "held offset outside the shared map");
        return NULL;
    }
    if ((lfd = PyObject_AsFileDescriptor(listener)) < 0 || (rfd = PyObject_AsFileDescriptor(relay)) < 0)
        return NULL;
    if (number < 0x4000 || number > 0x7FFF) {
        PyErr_SetString(PyExc_ValueError, "channel number out of range");
        return NULL;
    }
    r = PyMem_Calloc(1, sizeof(Route));
    if (r == NULL)
        return PyErr_NoMemory();
    if (sockaddr_from_tuple(client, &r->client, &r->client_len) < 0
        || sockaddr_from_tuple(peer, &r->peer, &r->peer_len) < 0) {
        PyMem_Free(r);
        return NULL;
    }
    key_from_sockaddr(&r->up_key, lfd, &r->client, (uint32_t)number);
    key_from_sockaddr(&r->down_key, rfd, &r->peer, 0xFFFFFFFFu);
    if (find_up(self, &r->up_key) != NULL || find_down(self, &r->down_key) != NULL) {
        PyMem_Free(r);
        PyErr_SetString(PyExc_ValueError, "a route with that key exists");
        return NULL;
    }
    if (self->free_len == 0) {
        uint32_t cap = self->slots_cap ? self->slots_cap * 2 : 1024, i;
        Route **grown = PyMem_Realloc(self->slots, cap * sizeof(Route *));
        uint32_t *free_grown;
        if (grown == NULL) {
            PyMem_Free(r);
            return PyErr_NoMemory();
        }
        self->slots = grown;
        free_grown = PyMem_Realloc(self->free_slots, cap * sizeof(uint32_t));
        if (free_grown == NULL) {
            PyMem_Free(r);
            return PyErr_NoMemory();
        }
        self->free_slots = free_grown;
        for (i = self->slots_cap; i < cap; i++)
            self->slots[i] = NULL;
        for (i = cap; i > self->slots_cap; i--)
            self->free_slots[self->free_len++] = i - 1;
        self->slots_cap = cap;
    }
    if (self->route_count + 1 > self->up.mask + 1 && tables_grow(self) < 0) {
        PyMem_Free(r);
        return PyErr_NoMemory();
    }
    slot = self->free_slots[--self->free_len];
    r->slot = slot;
    r->gen = ++self->next_gen;
    r->listener_fd = lfd;
    r->relay_fd = rfd;
    r->number = (uint16_t)number;
    r->expires_at = expires_at;
    Py_INCREF(up);
    Py_INCREF(down);
    r->up = (Bucket *)up;
    r->down = (Bucket *)down;
    r->held = held >= 0 ? (const unsigned char *)self->shared.buf + held : NULL;
    r->up_hash = key_hash(self, &r->up_key);
    r->down_hash = key_hash(self, &r->down_key);
    r->up_next = self->up.heads[r->up_hash & self->up.mask];
    self->up.heads[r->up_hash & self->up.mask] = r;
    r->down_next = self->down.heads[r->down_hash & self->down.mask];
    self->down.heads[r->down_hash & self->down.mask] = r;
    self->slots[slot] = r;
    self->route_count++;
    return PyLong_FromUnsignedLong(slot);
}

static PyObject *
DataPlane_set_expiry(DataPlane *self, PyObject *args)
{
    PyObject *handle;
    double expires_at;
    Route *r;
    if (!PyArg_ParseTuple(args, "Od", &handle, &expires_at))
        return NULL;
    if ((r = route_at(self, handle)) == NULL)
        return NULL;
    r->expires_at = expires_at;
    Py_RETURN_NONE;
}

static PyObject *
DataPlane_remove_route(DataPlane *self, PyObject *handle)
{
    Route *r = route_at(self, handle);
    PyObject *counts;
    if (r == NULL)
        return NULL;
    counts = Py_BuildValue("(KKKK)", (unsigned long long)r->bytes_up, (unsigned long long)r->packets_up,
                           (unsigned long long)r->bytes_down, (unsigned long long)r->packets_down);
    if (counts == NULL)
        return NULL;
    unlink_route(self, r);
    self->slots[r->slot] = NULL;
    self->free_slots[self->free_len++] = r->slot;
    self->route_count--;
    Py_XDECREF(r->up);
    Py_XDECREF(r->down);
    PyMem_Free(r);
    return counts;
}

static PyObject *
DataPlane_take_counts(DataPlane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    uint32_t i;
    if (out == NULL)
        return NULL;
    for (i = 0; i < self->dirty_len; i++) {
        uint32_t slot = self->dirty[i];
        Route *r = slot < self->slots_cap ? self->slots[slot] : NULL;
        PyObject *item;
        if (r == NULL || !r->dirty)
            continue; /* removed since: remove_route gave its counts */
        r->dirty = 0;
        item = Py_BuildValue("(IKKKK)", slot, (unsigned long long)r->bytes_up,
                             (unsigned long long)r->packets_up, (unsigned long long)r->bytes_down,
                             (unsigned long long)r->packets_down);
        r->bytes_up = r->packets_up = r->bytes_down = r->packets_down = 0;
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    self->dirty_len = 0;
    return out;
}

static PyObject *
DataPlane_stats(DataPlane *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{sKsKsKsKsKsKsn}", "fast_client_to_peer", self->fast_up,
                         "fast_peer_to_client", self->fast_down, "slow_from_client", self->slow_client,
                         "slow_from_peer", self->slow_peer, "send_failed", self->send_failed,
                         "wakeups", self->wakeups, "routes", (Py_ssize_t)self->route_count);
}

static PyMethodDef DataPlane_methods[] = {
    {"run", (PyCFunction)DataPlane_run, METH_NOARGS, "Drain every ready socket (the loop calls it)."},
    {"start", (PyCFunction)DataPlane_start, METH_NOARGS, "Watch the sockets from the event loop."},
    {"close", (PyCFunction)DataPlane_close, METH_NOARGS, "Stop watching; send what is queued."},
    {"add_listener", (PyCFunction)DataPlane_add_listener, METH_VARARGS, NULL},
    {"remove_listener", (PyCFunction)DataPlane_remove_listener, METH_O, NULL},
    {"add_relay", (PyCFunction)DataPlane_add_relay, METH_VARARGS, NULL},
    {"remove_relay", (PyCFunction)DataPlane_remove_relay, METH_O, NULL},
    {"set_server_buckets", (PyCFunction)DataPlane_set_server_buckets, METH_VARARGS, NULL},
    {"set_shared", (PyCFunction)DataPlane_set_shared, METH_O,
     "The shared held-port map that routes with a held offset read."},
    {"add_route", (PyCFunction)DataPlane_add_route, METH_VARARGS, NULL},
    {"set_expiry", (PyCFunction)DataPlane_set_expiry, METH_VARARGS, NULL},
    {"remove_route", (PyCFunction)DataPlane_remove_route, METH_O, NULL},
    {"take_counts", (PyCFunction)DataPlane_take_counts, METH_NOARGS, NULL},
    {"stats", (PyCFunction)DataPlane_stats, METH_NOARGS, NULL},
    {NULL}};

static PyTypeObject DataPlaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "turnserver._datapath.DataPlane",
    .tp_doc = "The UDP ChannelData fast path (see turnserver/io/datapath_py.py for the twin).",
    .tp_basicsize = sizeof(DataPlane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DataPlane_init,
    .tp_dealloc = (destructor)DataPlane_dealloc,
    .tp_methods = DataPlane_methods,
};

/* ------------------------------------------------------------------ module */

static PyObject *
datapath_monotonic(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(monotonic_now());
}

static PyMethodDef module_methods[] = {
    {"monotonic", datapath_monotonic, METH_NOARGS, "The clock the data plane reads (CLOCK_MONOTONIC)."},
    {NULL}};

static struct PyModuleDef datapath_module = {
    PyModuleDef_HEAD_INIT, "turnserver._datapath", "The compiled media fast path.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__datapath(void)
{
    PyObject *m;
    if (PyType_Ready(&BucketType) < 0 || PyType_Ready(&DataPlaneType) < 0)
        return NULL;
    m = PyModule_Create(&datapath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BucketType);
    if (PyModule_AddObject(m, "TokenBucket", (PyObject *)&BucketType) < 0)
        goto fail;
    Py_INCREF(&DataPlaneType);
    if (PyModule_AddObject(m, "DataPlane", (PyObject *)&DataPlaneType) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
