/*
 * sseload - an epoll-based Server-Sent Events (SSE) load client.
 *
 * Opens N non-blocking HTTP/1.1 connections to one URL, asks for
 * text/event-stream, decodes chunked or un-chunked streaming bodies, parses
 * the SSE stream per the WHATWG rules and reports what was delivered:
 * connection outcomes, events/s, end-to-end latency (from a "ts" field in
 * the event data, unix nanoseconds, CLOCK_REALTIME), per-client sequence
 * gaps/duplicates (from a "seq" field), bytes and comments.
 *
 * Plain C11 + POSIX + Linux epoll; no third-party libraries.
 * Build: make            Usage: ./sseload --help
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define SSELOAD_VERSION "1.0"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (256 * 1024)
#define MAX_HDR_BYTES (64 * 1024)
#define MAX_LINE_BYTES (4 * 1024 * 1024)
#define MAX_DATA_BYTES (16 * 1024 * 1024)
#define MAX_EVENT_TYPE 64
#define MAX_ID 256 /* longest event id kept for Last-Event-ID (storm mode) */

/* ------------------------------------------------------------------ */
/* Latency histogram: log-linear buckets over nanoseconds.             */
/* Values < 128 ns are exact; above that every power-of-two range      */
/* [2^k, 2^(k+1)) is split into 64 equal buckets, so a bucket's width  */
/* is at most 1/64 of its lower bound. Reporting the bucket midpoint   */
/* bounds the relative error by 1/128 = 0.78%.                         */
/* ------------------------------------------------------------------ */
#define H_LINEAR 128
#define H_SUB 64
#define H_NBUCKETS (H_LINEAR + (64 - 7) * H_SUB)

static inline int hist_index(uint64_t v)
{
    if (v < H_LINEAR)
        return (int)v;
    int k = 63 - __builtin_clzll(v); /* k >= 7 */
    int shift = k - 6;
    return H_LINEAR + (k - 7) * H_SUB + (int)((v >> shift) - H_SUB);
}

static inline double hist_mid(int idx)
{
    if (idx < H_LINEAR)
        return (double)idx;
    int j = idx - H_LINEAR;
    int k = j / H_SUB + 7;
    uint64_t m = (uint64_t)(j % H_SUB) + H_SUB;
    int shift = k - 6;
    double low = (double)(m << shift);
    double width = (double)(1ULL << shift);
    return low + width / 2.0;
}

/* ------------------------------------------------------------------ */
/* Configuration                                                       */
/* ------------------------------------------------------------------ */
struct config {
    char host[256];
    char hostport[300];
    int port;
    char path[4096];
    struct sockaddr_in addr;
    int clients;
    double duration;
    double ramp;    /* connections per second, 0 = all at once */
    double warmup;  /* seconds discarded at the start */
    double connect_timeout;
    int threads;
    int json;
    int progress;
    int src_ips;    /* spread source addresses over 127.0.0.1..K */
    double batch_ms; /* min interval between epoll rounds (0 = read as soon as data arrives) */
    int no_quickack; /* clear TCP_QUICKACK after every read (fewer ACK segments) */
    char *ready_file;
    int64_t resume_seq; /* storm mode: a reconnected client has resumed once its seq reaches this */
    char *storm_file;   /* storm mode: "dropped" and "settled" lines are appended here */
    char *req;      /* the full HTTP request */
    size_t req_len;
    char *extra_headers;
    size_t extra_len;
};

static struct config G;
static volatile sig_atomic_t g_stop = 0;
static struct timespec g_start_mono;
static long g_settled = 0; /* atomically updated: clients connected or failed */
static int g_ready_written = 0;
static double g_all_settled_at = -1;
/* storm mode (--resume-seq): SIGUSR1 drops every stream, SIGUSR2 reconnects them all at once */
static volatile sig_atomic_t g_drop_req = 0, g_storm_req = 0;
static volatile double g_storm_at = -1; /* elapsed s when SIGUSR2 arrived */
static long g_threads_dropped = 0, g_dropped_total = 0, g_storm_done = 0, g_storm_resumed = 0;
static double g_all_resumed_at = -1, g_storm_settled_at = -1;

static inline double ts_diff(const struct timespec *a, const struct timespec *b)
{
    return (double)(a->tv_sec - b->tv_sec) + (double)(a->tv_nsec - b->tv_nsec) / 1e9;
}

static inline double elapsed_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return ts_diff(&now, &g_start_mono);
}

static inline uint64_t realtime_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Per-connection state                                                */
/* ------------------------------------------------------------------ */
enum cstate { CS_NEW = 0, CS_CONNECTING, CS_SENDING, CS_HEADERS, CS_STREAM, CS_CLOSED, CS_DROPPED };
enum chstate { CH_SIZE = 0, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_TRAILER, CH_DONE };
enum close_reason { CR_NONE = 0, CR_CONNECT_ERR, CR_TIMEOUT, CR_HTTP_STATUS, CR_BAD_RESPONSE,
                    CR_EOF, CR_ERROR, CR_PROTO, CR_END_OF_STREAM };

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t chunked;
    uint8_t has_cl;
    uint8_t last_cr;
    uint8_t bom_pos;      /* 0..3 bytes of a leading BOM matched; 255 = BOM phase over */
    uint8_t ch_state;
    uint8_t ever_streamed;
    uint8_t event_type_len;
    uint32_t ch_digits;
    uint32_t tr_linelen;
    uint32_t wr_off;
    uint64_t ch_size;
    uint64_t ch_rem;
    uint64_t cl_rem;
    char *hdr;  uint32_t hdr_len,  hdr_cap;
    char *line; uint32_t line_len, line_cap;
    char *data; uint32_t data_len, data_cap;
    char event_type[MAX_EVENT_TYPE];
    uint8_t reopened;     /* storm mode: reconnected after a drop */
    uint8_t storm_done;   /* storm mode: resumed, or failed/ended before it resumed */
    uint8_t resumed;      /* storm mode: reached --resume-seq after reconnecting */
    uint16_t id_len;      /* last event ID buffer (WHATWG), storm mode only */
    uint16_t last_id_len; /* last event ID string: set at each dispatch, sent on reconnect */
    char *ids;            /* storm mode: [0, MAX_ID) id buffer, [MAX_ID, 2*MAX_ID) last id */
    char *req;            /* storm mode: this client's request (with Last-Event-ID) */
    uint32_t req_len;
    int64_t seq_at_drop;
    double t_resumed;
    int64_t last_seq;     /* highest seq seen, -1 = none yet */
    uint64_t events;      /* events in the measured window */
    uint64_t gaps;        /* missing seq numbers in the window */
    double t_open;
    double t_connected;
    int status;
} conn_t;

/* ------------------------------------------------------------------ */
/* Per-thread statistics                                               */
/* ------------------------------------------------------------------ */
typedef struct stats {
    uint64_t events, warmup_events, events_with_ts, events_with_seq, events_typed;
    uint64_t comments, id_fields, retry_fields, last_retry_ms;
    uint64_t gaps, gap_incidents, dups;
    uint64_t neg_latency;
    uint64_t bytes, bytes_window;
    uint64_t connected, failed, connect_err, timeouts, bad_status, bad_response;
    uint64_t disconnected_early, eof_early, err_early, proto_err, end_of_stream;
    uint64_t non_sse_ctype;
    uint64_t storm_dropped, storm_connected, storm_failed, storm_resumed, storm_with_id, long_ids;
    uint64_t storm_connect_err, storm_timeouts, storm_bad_status, storm_bad_response;
    uint64_t status[600];
    uint64_t hist[H_NBUCKETS];
    uint64_t lat_count, lat_max;
    double lat_sum;
    uint64_t *per_sec;
    uint64_t *per_sec_lat_max;  /* ns */
    double *per_sec_lat_sum;    /* ns */
    uint64_t *per_sec_lat_n;
    int nsec;
} stats_t;

typedef struct thr {
    int id;
    int epfd;
    int n;           /* clients handled by this thread */
    int base;        /* global index of the first client */
    double ramp;     /* this thread's connections per second */
    conn_t *conns;
    char *rbuf;
    stats_t st;
    /* per-read timestamps */
    uint64_t now_real;
    double now_el;
    int in_window;
    pthread_t tid;
} thr_t;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sseload: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void warnx_(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sseload: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* ------------------------------------------------------------------ */
/* Buffers                                                             */
/* ------------------------------------------------------------------ */
static int buf_append(char **buf, uint32_t *len, uint32_t *cap, const char *p, size_t n, size_t max)
{
    if ((size_t)*len + n > max)
        return -1;
    if (*len + n > *cap) {
        size_t nc = *cap ? *cap : 256;
        while (nc < *len + n)
            nc *= 2;
        if (nc > max)
            nc = max;
        char *nb = realloc(*buf, nc);
        if (!nb)
            return -1;
        *buf = nb;
        *cap = (uint32_t)nc;
    }
    memcpy(*buf + *len, p, n);
    *len += (uint32_t)n;
    return 0;
}

static void conn_free_buffers(conn_t *c)
{
    free(c->hdr);  c->hdr = NULL;  c->hdr_len = c->hdr_cap = 0;
    free(c->line); c->line = NULL; c->line_len = c->line_cap = 0;
    free(c->data); c->data = NULL; c->data_len = c->data_cap = 0;
}

/* ------------------------------------------------------------------ */
/* Settling / ready signalling                                         */
/* ------------------------------------------------------------------ */
static void mark_settled(void)
{
    long v = __atomic_add_fetch(&g_settled, 1, __ATOMIC_SEQ_CST);
    if (v == G.clients) {
        g_all_settled_at = elapsed_now();
        if (G.ready_file && !__atomic_exchange_n(&g_ready_written, 1, __ATOMIC_SEQ_CST)) {
            FILE *f = fopen(G.ready_file, "w");
            if (f) {
                fprintf(f, "%.3f\n", g_all_settled_at);
                fclose(f);
            }
        }
        if (G.progress)
            fprintf(stderr, "sseload: all %d clients settled at t=%.2fs\n", G.clients, g_all_settled_at);
    }
}

/* Appends "<what> <elapsed s> <details>" to --storm-file (the bench polls it). */
static void storm_note(const char *what, double at, long count)
{
    if (!G.storm_file)
        return;
    FILE *f = fopen(G.storm_file, "a");
    if (f) {
        fprintf(f, "%s %.3f %ld\n", what, at, count);
        fclose(f);
    }
    if (G.progress)
        fprintf(stderr, "sseload: storm %s at t=%.2fs (%ld)\n", what, at, count);
}

/* A reconnected client is done with the storm: resumed, or failed/ended before it did. The last
   one writes "settled" (every dropped client accounted for). */
static void storm_client_done(conn_t *c, double now)
{
    if (c->storm_done)
        return;
    c->storm_done = 1;
    long resumed = c->resumed ? __atomic_add_fetch(&g_storm_resumed, 1, __ATOMIC_SEQ_CST)
                              : __atomic_load_n(&g_storm_resumed, __ATOMIC_SEQ_CST);
    long total = __atomic_load_n(&g_dropped_total, __ATOMIC_SEQ_CST);
    if (c->resumed && resumed == total)
        g_all_resumed_at = now;
    if (__atomic_add_fetch(&g_storm_done, 1, __ATOMIC_SEQ_CST) == total) {
        g_storm_settled_at = now;
        storm_note("settled", now, __atomic_load_n(&g_storm_resumed, __ATOMIC_SEQ_CST));
    }
}

static void conn_close(thr_t *t, conn_t *c, int reason)
{
    if (c->state == CS_CLOSED || c->state == CS_NEW || c->state == CS_DROPPED)
        return;
    int was_streaming = (c->state == CS_STREAM);
    if (c->fd >= 0) {
        epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->state = CS_CLOSED;
    conn_free_buffers(c);
    free(c->req);
    c->req = NULL;
    if (c->reopened) {
        /* storm mode: the reconnect ended (refused, timed out, or the stream went) */
        if (!was_streaming) {
            t->st.storm_failed++;
            if (reason == CR_TIMEOUT) t->st.storm_timeouts++;
            else if (reason == CR_HTTP_STATUS) t->st.storm_bad_status++;
            else if (reason == CR_BAD_RESPONSE || reason == CR_PROTO) t->st.storm_bad_response++;
            else t->st.storm_connect_err++;
        }
        else if (reason != CR_NONE && !g_stop)
            t->st.disconnected_early++;
        storm_client_done(c, elapsed_now());
        return;
    }
    if (was_streaming) {
        if (reason != CR_NONE && !g_stop) {
            t->st.disconnected_early++;
            if (reason == CR_EOF) t->st.eof_early++;
            else if (reason == CR_ERROR) t->st.err_early++;
            else if (reason == CR_PROTO) t->st.proto_err++;
            else if (reason == CR_END_OF_STREAM) t->st.end_of_stream++;
        }
    } else {
        /* never got to a stream: a failed client */
        t->st.failed++;
        switch (reason) {
        case CR_CONNECT_ERR: t->st.connect_err++; break;
        case CR_TIMEOUT: t->st.timeouts++; break;
        case CR_HTTP_STATUS: t->st.bad_status++; break;
        case CR_BAD_RESPONSE: case CR_PROTO: t->st.bad_response++; break;
        case CR_EOF: case CR_ERROR: default: t->st.connect_err++; break;
        }
        if (reason != CR_NONE)
            mark_settled();
    }
}

/* ------------------------------------------------------------------ */
/* SSE parsing (WHATWG "event stream interpretation")                   */
/* ------------------------------------------------------------------ */
static int parse_int_after(const char *data, size_t len, const char *key, size_t klen, int64_t *out)
{
    const char *p = memmem(data, len, key, klen);
    if (!p)
        return 0;
    const char *end = data + len;
    p += klen;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9')
        return 0;
    int64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        p++;
    }
    *out = neg ? -v : v;
    return 1;
}

static void sse_dispatch(thr_t *t, conn_t *c)
{
    if (c->ids) {
        /* WHATWG: the last event ID string is set from the buffer at every dispatch, even when
           the data buffer is empty (an id-only event moves the resume point) */
        memcpy(c->ids + MAX_ID, c->ids, c->id_len);
        c->last_id_len = c->id_len;
    }
    if (c->data_len == 0) {
        /* WHATWG: empty data buffer -> reset and do not dispatch */
        c->event_type_len = 0;
        return;
    }
    /* remove the trailing LF appended after the last data line */
    size_t dlen = c->data_len - 1;
    const char *d = c->data;
    stats_t *st = &t->st;

    int64_t seq = 0, ts = 0;
    int has_seq = parse_int_after(d, dlen, "\"seq\":", 6, &seq);
    int has_ts = parse_int_after(d, dlen, "\"ts\":", 5, &ts);

    if (has_seq) {
        if (c->last_seq >= 0) {
            if (seq > c->last_seq + 1) {
                if (t->in_window) {
                    uint64_t missing = (uint64_t)(seq - c->last_seq - 1);
                    st->gaps += missing;
                    st->gap_incidents++;
                    c->gaps += missing;
                }
            } else if (seq <= c->last_seq) {
                if (t->in_window)
                    st->dups++;
            }
        }
        if (seq > c->last_seq)
            c->last_seq = seq;
        if (c->reopened && !c->resumed && c->last_seq >= G.resume_seq) {
            c->resumed = 1;
            c->t_resumed = t->now_el;
            t->st.storm_resumed++;
            storm_client_done(c, t->now_el);
        }
    }

    if (!t->in_window) {
        st->warmup_events++;
    } else {
        st->events++;
        c->events++;
        if (c->event_type_len)
            st->events_typed++;
        int sec = (int)t->now_el;
        if (sec >= 0 && sec < st->nsec)
            st->per_sec[sec]++;
        if (has_seq)
            st->events_with_seq++;
        if (has_ts) {
            st->events_with_ts++;
            int64_t lat = (int64_t)t->now_real - ts;
            if (lat < 0) {
                st->neg_latency++;
                lat = 0;
            }
            uint64_t ul = (uint64_t)lat;
            if (sec >= 0 && sec < st->nsec) {
                if (ul > st->per_sec_lat_max[sec])
                    st->per_sec_lat_max[sec] = ul;
                st->per_sec_lat_sum[sec] += (double)ul;
                st->per_sec_lat_n[sec]++;
            }
            st->hist[hist_index(ul)]++;
            st->lat_count++;
            st->lat_sum += (double)ul;
            if (ul > st->lat_max)
                st->lat_max = ul;
        }
    }
    c->data_len = 0;
    c->event_type_len = 0;
}

static int sse_line(thr_t *t, conn_t *c, const char *p, size_t n)
{
    if (n == 0) {
        sse_dispatch(t, c);
        return 0;
    }
    if (p[0] == ':') {
        if (t->in_window)
            t->st.comments++;
        return 0;
    }
    const char *colon = memchr(p, ':', n);
    size_t nlen;
    const char *val;
    size_t vlen;
    if (colon) {
        nlen = (size_t)(colon - p);
        val = colon + 1;
        vlen = n - nlen - 1;
        if (vlen && *val == ' ') {
            val++;
            vlen--;
        }
    } else {
        nlen = n;
        val = "";
        vlen = 0;
    }
    if (nlen == 4 && memcmp(p, "data", 4) == 0) {
        if (buf_append(&c->data, &c->data_len, &c->data_cap, val, vlen, MAX_DATA_BYTES) < 0)
            return -1;
        if (buf_append(&c->data, &c->data_len, &c->data_cap, "\n", 1, MAX_DATA_BYTES) < 0)
            return -1;
    } else if (nlen == 5 && memcmp(p, "event", 5) == 0) {
        size_t k = vlen < MAX_EVENT_TYPE ? vlen : MAX_EVENT_TYPE;
        memcpy(c->event_type, val, k);
        c->event_type_len = (uint8_t)k;
    } else if (nlen == 2 && memcmp(p, "id", 2) == 0) {
        if (!memchr(val, '\0', vlen)) {
            if (t->in_window)
                t->st.id_fields++;
            if (G.resume_seq > 0) {
                if (!c->ids && !(c->ids = malloc(2 * MAX_ID)))
                    return -1;
                if (vlen > MAX_ID) {
                    t->st.long_ids++; /* cannot be resumed from faithfully: counted, not kept */
                } else {
                    memcpy(c->ids, val, vlen);
                    c->id_len = (uint16_t)vlen;
                }
            }
        }
    } else if (nlen == 5 && memcmp(p, "retry", 5) == 0) {
        int ok = vlen > 0;
        uint64_t v = 0;
        for (size_t i = 0; i < vlen; i++) {
            if (val[i] < '0' || val[i] > '9') {
                ok = 0;
                break;
            }
            v = v * 10 + (uint64_t)(val[i] - '0');
        }
        if (ok) {
            t->st.retry_fields++;
            t->st.last_retry_ms = v;
        }
    }
    /* any other field name is ignored, per spec */
    return 0;
}

static inline const char *find_eol(const char *p, size_t n)
{
    const char *lf = memchr(p, '\n', n);
    size_t lim = lf ? (size_t)(lf - p) : n;
    const char *cr = lim ? memchr(p, '\r', lim) : NULL;
    return cr ? cr : lf;
}

static int sse_feed_lines(thr_t *t, conn_t *c, const char *p, size_t n)
{
    while (n > 0) {
        if (c->last_cr) {
            c->last_cr = 0;
            if (*p == '\n') {
                p++;
                n--;
                continue;
            }
        }
        const char *e = find_eol(p, n);
        if (!e) {
            if (buf_append(&c->line, &c->line_len, &c->line_cap, p, n, MAX_LINE_BYTES) < 0)
                return -1;
            return 0;
        }
        size_t len = (size_t)(e - p);
        if (c->line_len) {
            if (buf_append(&c->line, &c->line_len, &c->line_cap, p, len, MAX_LINE_BYTES) < 0)
                return -1;
            int r = sse_line(t, c, c->line, c->line_len);
            c->line_len = 0;
            if (r < 0)
                return -1;
        } else {
            if (sse_line(t, c, p, len) < 0)
                return -1;
        }
        if (*e == '\r')
            c->last_cr = 1;
        p = e + 1;
        n -= len + 1;
    }
    return 0;
}

static const unsigned char BOM[3] = {0xEF, 0xBB, 0xBF};

/* Feeds decoded body bytes to the SSE parser; strips one leading BOM. */
static int sse_feed(thr_t *t, conn_t *c, const char *p, size_t n)
{
    while (c->bom_pos != 255 && n > 0) {
        if ((unsigned char)*p == BOM[c->bom_pos]) {
            c->bom_pos++;
            p++;
            n--;
            if (c->bom_pos == 3)
                c->bom_pos = 255; /* BOM consumed */
        } else {
            /* not a BOM: replay the bytes matched so far */
            uint8_t k = c->bom_pos;
            c->bom_pos = 255;
            if (k && sse_feed_lines(t, c, (const char *)BOM, k) < 0)
                return -1;
        }
    }
    if (n == 0)
        return 0;
    return sse_feed_lines(t, c, p, n);
}

/* ------------------------------------------------------------------ */
/* HTTP body decoding                                                  */
/* ------------------------------------------------------------------ */
static inline int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static int end_size_line(conn_t *c)
{
    if (!c->ch_digits)
        return -1;
    if (c->ch_size == 0) {
        c->ch_state = CH_TRAILER;
        c->tr_linelen = 0;
    } else {
        c->ch_rem = c->ch_size;
        c->ch_state = CH_DATA;
    }
    c->ch_size = 0;
    c->ch_digits = 0;
    return 0;
}

/* returns -1 protocol error, 1 end of stream, 0 continue */
static int chunked_feed(thr_t *t, conn_t *c, const char *p, size_t n)
{
    while (n > 0) {
        switch (c->ch_state) {
        case CH_SIZE: {
            char ch = *p;
            int v = hexval(ch);
            if (v >= 0) {
                if (c->ch_digits > 15)
                    return -1;
                c->ch_size = c->ch_size * 16 + (uint64_t)v;
                c->ch_digits++;
            } else if (ch == '\r') {
                c->ch_state = CH_SIZE_LF;
            } else if (ch == '\n') {
                if (end_size_line(c) < 0)
                    return -1;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                c->ch_state = CH_EXT;
            } else {
                return -1;
            }
            p++;
            n--;
            break;
        }
        case CH_EXT: {
            const char *lf = memchr(p, '\n', n);
            if (!lf) {
                n = 0;
                break;
            }
            n -= (size_t)(lf + 1 - p);
            p = lf + 1;
            if (end_size_line(c) < 0)
                return -1;
            break;
        }
        case CH_SIZE_LF:
            if (*p != '\n')
                return -1;
            p++;
            n--;
            if (end_size_line(c) < 0)
                return -1;
            break;
        case CH_DATA: {
            size_t k = n < c->ch_rem ? n : (size_t)c->ch_rem;
            if (sse_feed(t, c, p, k) < 0)
                return -1;
            p += k;
            n -= k;
            c->ch_rem -= k;
            if (c->ch_rem == 0)
                c->ch_state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (*p == '\r')
                c->ch_state = CH_DATA_LF;
            else if (*p == '\n')
                c->ch_state = CH_SIZE;
            else
                return -1;
            p++;
            n--;
            break;
        case CH_DATA_LF:
            if (*p != '\n')
                return -1;
            c->ch_state = CH_SIZE;
            p++;
            n--;
            break;
        case CH_TRAILER: {
            char ch = *p;
            p++;
            n--;
            if (ch == '\n') {
                if (c->tr_linelen == 0) {
                    c->ch_state = CH_DONE;
                    return 1;
                }
                c->tr_linelen = 0;
            } else if (ch != '\r') {
                c->tr_linelen++;
            }
            break;
        }
        case CH_DONE:
            return 1;
        }
    }
    return 0;
}

/* returns -1 protocol error, 1 end of stream, 0 continue */
static int body_feed(thr_t *t, conn_t *c, const char *p, size_t n)
{
    if (c->chunked)
        return chunked_feed(t, c, p, n);
    if (c->has_cl) {
        size_t k = n < c->cl_rem ? n : (size_t)c->cl_rem;
        if (k && sse_feed(t, c, p, k) < 0)
            return -1;
        c->cl_rem -= k;
        return c->cl_rem == 0 ? 1 : 0;
    }
    return sse_feed(t, c, p, n) < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* HTTP response header parsing                                        */
/* ------------------------------------------------------------------ */
static int ci_prefix(const char *p, size_t n, const char *name)
{
    size_t k = strlen(name);
    if (n < k)
        return 0;
    return strncasecmp(p, name, k) == 0;
}

static int ci_contains(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(p + i, needle, k) == 0)
            return 1;
    return 0;
}

/* Parses status line and headers in hdr[0..len); returns status or -1. */
static int parse_headers(thr_t *t, conn_t *c, const char *h, size_t len)
{
    const char *end = h + len;
    const char *eol = memchr(h, '\n', len);
    if (!eol)
        return -1;
    if (len < 12 || memcmp(h, "HTTP/1.", 7) != 0)
        return -1;
    const char *sp = memchr(h, ' ', (size_t)(eol - h));
    if (!sp || eol - sp < 4)
        return -1;
    int status = 0;
    for (int i = 1; i <= 3; i++) {
        if (sp[i] < '0' || sp[i] > '9')
            return -1;
        status = status * 10 + (sp[i] - '0');
    }
    int ctype_sse = 0;
    const char *p = eol + 1;
    while (p < end) {
        const char *le = memchr(p, '\n', (size_t)(end - p));
        if (!le)
            le = end;
        size_t ln = (size_t)(le - p);
        if (ln && p[ln - 1] == '\r')
            ln--;
        if (ln == 0)
            break;
        const char *colon = memchr(p, ':', ln);
        if (colon) {
            size_t nl = (size_t)(colon - p);
            const char *v = colon + 1;
            size_t vl = ln - nl - 1;
            while (vl && (*v == ' ' || *v == '\t')) {
                v++;
                vl--;
            }
            if (nl == 17 && ci_prefix(p, nl, "transfer-encoding")) {
                if (ci_contains(v, vl, "chunked"))
                    c->chunked = 1;
            } else if (nl == 14 && ci_prefix(p, nl, "content-length")) {
                uint64_t cl = 0;
                size_t i = 0;
                for (; i < vl && v[i] >= '0' && v[i] <= '9'; i++)
                    cl = cl * 10 + (uint64_t)(v[i] - '0');
                if (i > 0) {
                    c->has_cl = 1;
                    c->cl_rem = cl;
                }
            } else if (nl == 12 && ci_prefix(p, nl, "content-type")) {
                if (ci_contains(v, vl, "text/event-stream"))
                    ctype_sse = 1;
            }
        }
        p = le + 1;
    }
    if (c->chunked)
        c->has_cl = 0; /* chunked wins, RFC 9112 6.3 */
    if (status == 200 && !ctype_sse)
        t->st.non_sse_ctype++;
    return status;
}

/* ------------------------------------------------------------------ */
/* Connection I/O                                                      */
/* ------------------------------------------------------------------ */
static void conn_open(thr_t *t, conn_t *c, int gidx)
{
    c->t_open = elapsed_now();
    if (!c->reopened)
        c->last_seq = -1; /* a reconnect keeps it: continuity is checked across the storm */
    c->bom_pos = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = CS_CONNECTING; /* so that conn_close counts it */
        c->fd = -1;
        conn_close(t, c, CR_CONNECT_ERR);
        return;
    }
    c->fd = fd;
    c->state = CS_CONNECTING;
    if (G.src_ips > 1) {
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(gidx % G.src_ips));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            conn_close(t, c, CR_CONNECT_ERR);
            return;
        }
    }
    int r = connect(fd, (struct sockaddr *)&G.addr, sizeof G.addr);
    if (r < 0 && errno != EINPROGRESS) {
        conn_close(t, c, CR_CONNECT_ERR);
        return;
    }
    struct epoll_event ev;
    ev.events = EPOLLOUT | EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        conn_close(t, c, CR_CONNECT_ERR);
        return;
    }
}

static void conn_send(thr_t *t, conn_t *c)
{
    const char *req = c->req ? c->req : G.req;
    size_t req_len = c->req ? c->req_len : G.req_len;
    while (c->wr_off < req_len) {
        ssize_t w = send(c->fd, req + c->wr_off, req_len - c->wr_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                c->state = CS_SENDING;
                return;
            }
            if (errno == EINTR)
                continue;
            conn_close(t, c, CR_CONNECT_ERR);
            return;
        }
        c->wr_off += (uint32_t)w;
    }
    free(c->req);
    c->req = NULL;
    c->state = CS_HEADERS;
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    epoll_ctl(t->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_data(thr_t *t, conn_t *c, const char *p, size_t n)
{
    if (c->state == CS_HEADERS) {
        size_t old = c->hdr_len;
        size_t take = n;
        if (old + take > MAX_HDR_BYTES)
            take = MAX_HDR_BYTES - old;
        if (buf_append(&c->hdr, &c->hdr_len, &c->hdr_cap, p, take, MAX_HDR_BYTES) < 0) {
            conn_close(t, c, CR_BAD_RESPONSE);
            return;
        }
        /* look for the blank line ending the header block */
        size_t from = old > 3 ? old - 3 : 0;
        const char *h = c->hdr;
        size_t hl = c->hdr_len;
        size_t hend = 0;
        for (size_t i = from; i < hl; i++) {
            if (h[i] != '\n')
                continue;
            if (i >= 1 && h[i - 1] == '\n') { hend = i + 1; break; }
            if (i >= 2 && h[i - 1] == '\r' && h[i - 2] == '\n') { hend = i + 1; break; }
        }
        if (!hend) {
            if (c->hdr_len >= MAX_HDR_BYTES)
                conn_close(t, c, CR_BAD_RESPONSE);
            return;
        }
        int status = parse_headers(t, c, h, hend);
        c->status = status;
        if (status > 0 && status < 600)
            t->st.status[status]++;
        if (status != 200) {
            conn_close(t, c, status < 0 ? CR_BAD_RESPONSE : CR_HTTP_STATUS);
            return;
        }
        c->state = CS_STREAM;
        c->ever_streamed = 1;
        if (c->reopened) {
            t->st.storm_connected++;
        } else {
            c->t_connected = t->now_el;
            t->st.connected++;
            mark_settled();
        }
        /* body bytes that arrived with the headers */
        size_t body_in_hdr = hl - hend;
        size_t rest_off = take; /* bytes of p consumed into hdr */
        char *tmp = NULL;
        if (body_in_hdr) {
            tmp = malloc(body_in_hdr);
            if (!tmp) {
                conn_close(t, c, CR_ERROR);
                return;
            }
            memcpy(tmp, h + hend, body_in_hdr);
        }
        free(c->hdr);
        c->hdr = NULL;
        c->hdr_len = c->hdr_cap = 0;
        int r = 0;
        if (body_in_hdr)
            r = body_feed(t, c, tmp, body_in_hdr);
        free(tmp);
        if (r == 0 && rest_off < n)
            r = body_feed(t, c, p + rest_off, n - rest_off);
        if (r < 0)
            conn_close(t, c, CR_PROTO);
        else if (r > 0)
            conn_close(t, c, CR_END_OF_STREAM);
        return;
    }
    if (c->state == CS_STREAM) {
        int r = body_feed(t, c, p, n);
        if (r < 0)
            conn_close(t, c, CR_PROTO);
        else if (r > 0)
            conn_close(t, c, CR_END_OF_STREAM);
    }
}

static void on_event(thr_t *t, conn_t *c, uint32_t events)
{
    if (c->state == CS_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t el = sizeof err;
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
                conn_close(t, c, CR_CONNECT_ERR);
                return;
            }
            conn_send(t, c);
        }
        return;
    }
    if (c->state == CS_SENDING) {
        if (events & EPOLLOUT)
            conn_send(t, c);
        if (c->state == CS_SENDING && (events & (EPOLLERR | EPOLLHUP)))
            conn_close(t, c, CR_CONNECT_ERR);
        return;
    }
    if (c->state != CS_HEADERS && c->state != CS_STREAM)
        return;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        ssize_t r = recv(c->fd, t->rbuf, RBUF_SIZE, 0);
        if (r > 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            t->now_el = ts_diff(&now, &g_start_mono);
            t->now_real = realtime_ns();
            t->in_window = t->now_el >= G.warmup;
            if (G.no_quickack) {
                int zero = 0;
                setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
            }
            t->st.bytes += (uint64_t)r;
            if (t->in_window)
                t->st.bytes_window += (uint64_t)r;
            on_data(t, c, t->rbuf, (size_t)r);
        } else if (r == 0) {
            /* EOF: for un-delimited bodies this is the end of the stream */
            conn_close(t, c, CR_EOF);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            conn_close(t, c, CR_ERROR);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Storm mode: drop every stream, then reconnect them all at once      */
/* ------------------------------------------------------------------ */

/* SIGUSR1: close every open stream as a client whose node died would see it, keeping what a
   browser keeps (its last event id; here also its last seq, to check continuity). */
static void storm_drop(thr_t *t, int opened)
{
    long dropped = 0;
    for (int i = 0; i < opened; i++) {
        conn_t *c = &t->conns[i];
        if (c->state != CS_STREAM)
            continue;
        epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        conn_free_buffers(c);
        c->state = CS_DROPPED;
        c->seq_at_drop = c->last_seq;
        dropped++;
    }
    t->st.storm_dropped += (uint64_t)dropped;
    __atomic_add_fetch(&g_dropped_total, dropped, __ATOMIC_SEQ_CST);
    if (__atomic_add_fetch(&g_threads_dropped, 1, __ATOMIC_SEQ_CST) == G.threads)
        storm_note("dropped", elapsed_now(), __atomic_load_n(&g_dropped_total, __ATOMIC_SEQ_CST));
}

/* SIGUSR2: every dropped client reconnects at once, sending Last-Event-ID: <its last id>. */
static void storm_reconnect(thr_t *t, int opened)
{
    for (int i = 0; i < opened; i++) {
        conn_t *c = &t->conns[i];
        if (c->state != CS_DROPPED)
            continue;
        /* a fresh response to parse: reset the HTTP and SSE parser state */
        c->chunked = c->has_cl = c->last_cr = 0;
        c->ch_state = CH_SIZE;
        c->ch_digits = c->tr_linelen = c->wr_off = 0;
        c->ch_size = c->ch_rem = c->cl_rem = 0;
        c->event_type_len = 0;
        c->status = 0;
        c->reopened = 1;
        if (c->ids) {
            /* the id buffer starts from the last event ID string */
            memcpy(c->ids, c->ids + MAX_ID, c->last_id_len);
            c->id_len = c->last_id_len;
        }
        if (c->ids && c->last_id_len) {
            /* G.req ends with the blank line: insert the header before it */
            size_t head = G.req_len - 2;
            size_t cap = G.req_len + c->last_id_len + 32;
            c->req = malloc(cap);
            if (!c->req)
                die("out of memory");
            memcpy(c->req, G.req, head);
            int n = snprintf(c->req + head, cap - head, "Last-Event-ID: %.*s\r\n\r\n",
                             (int)c->last_id_len, c->ids + MAX_ID);
            c->req_len = (uint32_t)(head + (size_t)n);
            t->st.storm_with_id++;
        }
        conn_open(t, c, t->base + i);
    }
}

/* ------------------------------------------------------------------ */
/* Thread main loop                                                    */
/* ------------------------------------------------------------------ */
static void *thread_main(void *arg)
{
    thr_t *t = arg;
    struct epoll_event evs[1024];
    int opened = 0;
    double next_timeout_scan = 0.25;
    double last_round = 0;
    int dropped = 0, stormed = 0;
    for (;;) {
        if (g_stop)
            break;
        double el = elapsed_now();
        if (el >= G.duration)
            break;
        if (G.resume_seq > 0 && g_drop_req && !dropped) {
            dropped = 1;
            storm_drop(t, opened);
        }
        if (G.resume_seq > 0 && g_storm_req && dropped && !stormed) {
            stormed = 1;
            storm_reconnect(t, opened);
        }
        if (opened < t->n) {
            int target = t->n;
            if (t->ramp > 0) {
                double tg = el * t->ramp + 1.0;
                target = tg >= t->n ? t->n : (int)tg;
            }
            while (opened < target) {
                conn_open(t, &t->conns[opened], t->base + opened);
                opened++;
            }
        }
        if (el >= next_timeout_scan) {
            next_timeout_scan = el + 0.25;
            for (int i = 0; i < opened; i++) {
                conn_t *c = &t->conns[i];
                if ((c->state == CS_CONNECTING || c->state == CS_SENDING || c->state == CS_HEADERS) &&
                    el - c->t_open > G.connect_timeout)
                    conn_close(t, c, CR_TIMEOUT);
            }
        }
        int timeout_ms = G.resume_seq > 0 ? 10 : 100; /* storm mode: see the signals soon */
        if (opened < t->n && t->ramp > 0)
            timeout_ms = 2;
        double rem = G.duration - el;
        if (rem * 1000.0 < timeout_ms)
            timeout_ms = (int)(rem * 1000.0) + 1;
        if (G.batch_ms > 0) {
            /* let data accumulate: at most one epoll round per batch_ms */
            double since = elapsed_now() - last_round;
            if (since < G.batch_ms / 1000.0) {
                double w = G.batch_ms / 1000.0 - since;
                struct timespec ts = {0, (long)(w * 1e9)};
                nanosleep(&ts, NULL);
            }
            last_round = elapsed_now();
        }
        int n = epoll_wait(t->epfd, evs, 1024, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++)
            on_event(t, (conn_t *)evs[i].data.ptr, evs[i].events);
    }
    /* end of run: close everything without counting it as an early disconnect */
    for (int i = 0; i < opened; i++) {
        conn_t *c = &t->conns[i];
        if (c->state == CS_STREAM) {
            epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            c->state = CS_CLOSED;
            conn_free_buffers(c);
        } else if (c->state == CS_CONNECTING || c->state == CS_SENDING || c->state == CS_HEADERS) {
            /* still not connected when the run ended */
            conn_close(t, c, CR_TIMEOUT);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Argument parsing                                                    */
/* ------------------------------------------------------------------ */
static void usage(FILE *f)
{
    fprintf(f,
        "sseload %s - epoll SSE load client\n"
        "usage: sseload --url http://HOST:PORT/path?query [options]\n"
        "  --url URL            target (http only)\n"
        "  --clients N          number of concurrent SSE clients (default 1)\n"
        "  --duration S         total run time in seconds, from start (default 10)\n"
        "  --ramp R             open R connections per second (0 = all at once; default 0)\n"
        "  --warmup S           discard events/latencies received in the first S seconds (default 0)\n"
        "  --header 'K: V'      extra request header (repeatable)\n"
        "  --threads T          worker threads, each with its own epoll (default 1)\n"
        "  --connect-timeout S  give up on a client without response headers after S s (default 10)\n"
        "  --src-ips K          spread source addresses over 127.0.0.1..127.0.0.K (for > ~28k clients)\n"
        "  --ready-file PATH    write PATH once every client is connected or failed\n"
        "  --progress           print a progress line to stderr every second\n"
        "  --batch-ms MS        at most one epoll round per MS ms: fewer syscalls/ACKs, but up to\n"
        "                       MS ms is added to measured latency (default 0 = off)\n"
        "  --no-quickack        clear TCP_QUICKACK after each read (fewer pure ACK segments)\n"
        "  --resume-seq N       storm mode: SIGUSR1 closes every stream (each client keeps its\n"
        "                       last event id and seq), SIGUSR2 reconnects them all at once with\n"
        "                       Last-Event-ID; a client has resumed once its seq reaches N\n"
        "  --storm-file PATH    storm mode: 'dropped' and 'settled' lines are appended here\n"
        "  --json               print a machine-readable JSON summary on stdout\n"
        "Events whose data contains \"ts\":<unix ns> give latency = CLOCK_REALTIME - ts;\n"
        "\"seq\":<int> gives per-client gap/duplicate tracking.\n",
        SSELOAD_VERSION);
}

static void parse_url(const char *url)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) != 0)
        die("only http:// URLs are supported: %s", url);
    p += 7;
    const char *slash = strchr(p, '/');
    size_t hp_len = slash ? (size_t)(slash - p) : strlen(p);
    if (hp_len == 0 || hp_len >= sizeof G.hostport)
        die("bad host in URL");
    memcpy(G.hostport, p, hp_len);
    G.hostport[hp_len] = 0;
    const char *colon = memchr(p, ':', hp_len);
    size_t hl = colon ? (size_t)(colon - p) : hp_len;
    if (hl == 0 || hl >= sizeof G.host)
        die("bad host in URL");
    memcpy(G.host, p, hl);
    G.host[hl] = 0;
    G.port = colon ? atoi(colon + 1) : 80;
    if (G.port <= 0 || G.port > 65535)
        die("bad port in URL");
    snprintf(G.path, sizeof G.path, "%s", slash ? slash : "/");
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int e = getaddrinfo(G.host, NULL, &hints, &res);
    if (e || !res)
        die("cannot resolve %s: %s", G.host, gai_strerror(e));
    memcpy(&G.addr, res->ai_addr, sizeof G.addr);
    G.addr.sin_port = htons((uint16_t)G.port);
    freeaddrinfo(res);
}

static void add_header(const char *h)
{
    size_t n = strlen(h);
    if (!memchr(h, ':', n))
        die("--header needs 'Name: value': %s", h);
    if (strpbrk(h, "\r\n"))
        die("--header must not contain CR/LF");
    G.extra_headers = realloc(G.extra_headers, G.extra_len + n + 3);
    memcpy(G.extra_headers + G.extra_len, h, n);
    memcpy(G.extra_headers + G.extra_len + n, "\r\n", 3);
    G.extra_len += n + 2;
}

static void build_request(void)
{
    size_t cap = strlen(G.path) + strlen(G.hostport) + G.extra_len + 256;
    G.req = malloc(cap);
    int n = snprintf(G.req, cap,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s\r\n"
                     "Accept: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\n"
                     "User-Agent: sseload/%s\r\n"
                     "%s"
                     "\r\n",
                     G.path, G.hostport, SSELOAD_VERSION, G.extra_headers ? G.extra_headers : "");
    G.req_len = (size_t)n;
}

static void raise_nofile(int need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    rlim_t want = (rlim_t)need;
    if (rl.rlim_cur >= want)
        return;
    if (rl.rlim_max >= want) {
        rl.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &rl);
    } else {
        struct rlimit nr = {want, want};
        if (setrlimit(RLIMIT_NOFILE, &nr) < 0) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want)
        warnx_("RLIMIT_NOFILE is %llu, below the %llu needed; some clients will fail",
               (unsigned long long)rl.rlim_cur, (unsigned long long)want);
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void on_storm_signal(int sig)
{
    if (sig == SIGUSR1) {
        g_drop_req = 1;
    } else if (g_drop_req && !g_storm_req) {
        struct timespec now; /* clock_gettime is async-signal-safe */
        clock_gettime(CLOCK_MONOTONIC, &now);
        g_storm_at = ts_diff(&now, &g_start_mono);
        g_storm_req = 1;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double hist_pct(const uint64_t *h, uint64_t count, uint64_t maxv, double pct)
{
    if (!count)
        return 0;
    uint64_t rank = (uint64_t)ceil(pct / 100.0 * (double)count);
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    for (int i = 0; i < H_NBUCKETS; i++) {
        cum += h[i];
        if (cum >= rank) {
            double v = hist_mid(i);
            return v > (double)maxv ? (double)maxv : v;
        }
    }
    return (double)maxv;
}

static double cpu_seconds(struct rusage *ru, double *user, double *sys)
{
    *user = (double)ru->ru_utime.tv_sec + ru->ru_utime.tv_usec / 1e6;
    *sys = (double)ru->ru_stime.tv_sec + ru->ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

/* Checks the histogram's bucket error bound over 1 ns .. ~1e12 ns. */
static int selftest_hist(void)
{
    double worst = 0;
    uint64_t worst_v = 0;
    for (double x = 1; x < 1e12; x *= 1.0007) {
        uint64_t v = (uint64_t)x;
        for (uint64_t d = 0; d < 3; d++) {
            uint64_t w = v + d;
            int idx = hist_index(w);
            if (idx < 0 || idx >= H_NBUCKETS) {
                printf("index out of range for %" PRIu64 "\n", w);
                return 1;
            }
            double err = fabs(hist_mid(idx) - (double)w) / (double)w;
            if (err > worst) {
                worst = err;
                worst_v = w;
            }
        }
    }
    printf("histogram: %d buckets, worst relative error %.4f%% at %" PRIu64 " ns\n", H_NBUCKETS, worst * 100,
           worst_v);
    return worst <= 0.01 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--selftest-hist") == 0)
        return selftest_hist();
    const char *url = NULL;
    G.clients = 1;
    G.duration = 10;
    G.ramp = 0;
    G.warmup = 0;
    G.threads = 1;
    G.connect_timeout = 10;

    static struct option opts[] = {
        {"url", required_argument, 0, 'u'},
        {"clients", required_argument, 0, 'c'},
        {"duration", required_argument, 0, 'd'},
        {"ramp", required_argument, 0, 'r'},
        {"header", required_argument, 0, 'H'},
        {"json", no_argument, 0, 'j'},
        {"threads", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'w'},
        {"connect-timeout", required_argument, 0, 'T'},
        {"src-ips", required_argument, 0, 's'},
        {"ready-file", required_argument, 0, 'R'},
        {"progress", no_argument, 0, 'p'},
        {"batch-ms", required_argument, 0, 'B'},
        {"no-quickack", no_argument, 0, 'Q'},
        {"resume-seq", required_argument, 0, 'S'},
        {"storm-file", required_argument, 0, 'F'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "u:c:d:r:H:jt:w:T:s:R:phB:QS:F:", opts, NULL)) != -1) {
        switch (o) {
        case 'u': url = optarg; break;
        case 'c': G.clients = atoi(optarg); break;
        case 'd': G.duration = atof(optarg); break;
        case 'r': G.ramp = atof(optarg); break;
        case 'H': add_header(optarg); break;
        case 'j': G.json = 1; break;
        case 't': G.threads = atoi(optarg); break;
        case 'w': G.warmup = atof(optarg); break;
        case 'T': G.connect_timeout = atof(optarg); break;
        case 's': G.src_ips = atoi(optarg); break;
        case 'R': G.ready_file = optarg; break;
        case 'p': G.progress = 1; break;
        case 'B': G.batch_ms = atof(optarg); break;
        case 'Q': G.no_quickack = 1; break;
        case 'S': G.resume_seq = atoll(optarg); break;
        case 'F': G.storm_file = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!url) {
        usage(stderr);
        return 2;
    }
    if (G.clients < 1 || G.clients > 1000000)
        die("--clients must be 1..1000000");
    if (!(G.duration > 0) || G.duration > 86400)
        die("--duration must be in (0, 86400]");
    if (G.warmup < 0 || G.warmup >= G.duration)
        die("--warmup must be in [0, duration)");
    if (G.ramp < 0)
        die("--ramp must be >= 0");
    if (G.threads < 1 || G.threads > 64)
        die("--threads must be 1..64");
    if (G.threads > G.clients)
        G.threads = G.clients;
    if (G.src_ips < 0 || G.src_ips > 250)
        die("--src-ips must be 0..250");
    parse_url(url);
    build_request();
    raise_nofile(G.clients + 64 + 4 * G.threads);
    if (G.ready_file)
        unlink(G.ready_file);
    if (G.resume_seq < 0)
        die("--resume-seq must be >= 1");
    if (G.storm_file && G.resume_seq <= 0)
        die("--storm-file needs --resume-seq");
    if (G.storm_file)
        unlink(G.storm_file);

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (G.resume_seq > 0) {
        struct sigaction ss;
        memset(&ss, 0, sizeof ss);
        ss.sa_handler = on_storm_signal;
        sigaction(SIGUSR1, &ss, NULL);
        sigaction(SIGUSR2, &ss, NULL);
    }

    int nsec = (int)ceil(G.duration) + 1;
    thr_t *th = calloc((size_t)G.threads, sizeof *th);
    int base = 0;
    for (int i = 0; i < G.threads; i++) {
        thr_t *t = &th[i];
        t->id = i;
        t->n = G.clients / G.threads + (i < G.clients % G.threads ? 1 : 0);
        t->base = base;
        base += t->n;
        t->ramp = G.ramp > 0 ? G.ramp / G.threads : 0;
        t->conns = calloc((size_t)t->n, sizeof(conn_t));
        t->rbuf = malloc(RBUF_SIZE);
        t->epfd = epoll_create1(EPOLL_CLOEXEC);
        t->st.nsec = nsec;
        t->st.per_sec = calloc((size_t)nsec, sizeof(uint64_t));
        t->st.per_sec_lat_max = calloc((size_t)nsec, sizeof(uint64_t));
        t->st.per_sec_lat_sum = calloc((size_t)nsec, sizeof(double));
        t->st.per_sec_lat_n = calloc((size_t)nsec, sizeof(uint64_t));
        if (!t->conns || !t->rbuf || t->epfd < 0 || !t->st.per_sec || !t->st.per_sec_lat_max ||
            !t->st.per_sec_lat_sum || !t->st.per_sec_lat_n)
            die("out of memory / epoll_create failed");
        for (int j = 0; j < t->n; j++)
            t->conns[j].fd = -1;
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    clock_gettime(CLOCK_MONOTONIC, &g_start_mono);

    for (int i = 0; i < G.threads; i++)
        pthread_create(&th[i].tid, NULL, thread_main, &th[i]);

    /* main thread: progress + measured-window CPU sample */
    struct rusage ru_w0;
    int have_w0 = 0;
    double next_prog = 1.0;
    uint64_t prev_ev = 0;
    for (;;) {
        double el = elapsed_now();
        if (el >= G.duration || g_stop)
            break;
        if (!have_w0 && el >= G.warmup) {
            getrusage(RUSAGE_SELF, &ru_w0);
            have_w0 = 1;
        }
        if (G.progress && el >= next_prog) {
            next_prog += 1.0;
            uint64_t ev = 0, con = 0, fail = 0, disc = 0;
            for (int i = 0; i < G.threads; i++) {
                ev += __atomic_load_n(&th[i].st.events, __ATOMIC_RELAXED) +
                      __atomic_load_n(&th[i].st.warmup_events, __ATOMIC_RELAXED);
                con += __atomic_load_n(&th[i].st.connected, __ATOMIC_RELAXED);
                fail += __atomic_load_n(&th[i].st.failed, __ATOMIC_RELAXED);
                disc += __atomic_load_n(&th[i].st.disconnected_early, __ATOMIC_RELAXED);
            }
            fprintf(stderr, "sseload: t=%5.1fs connected=%" PRIu64 " failed=%" PRIu64
                            " dropped=%" PRIu64 " events=%" PRIu64 " (+%" PRIu64 "/s)\n",
                    el, con, fail, disc, ev, ev - prev_ev);
            prev_ev = ev;
        }
        double wait = 0.05;
        if (!have_w0 && G.warmup - el < wait)
            wait = G.warmup - el > 0 ? G.warmup - el : 0.0005;
        struct timespec ts = {0, (long)(wait * 1e9)};
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < G.threads; i++)
        pthread_join(th[i].tid, NULL);
    double run_s = elapsed_now();
    getrusage(RUSAGE_SELF, &ru1);
    if (!have_w0)
        ru_w0 = ru0;

    /* ---- merge ---- */
    stats_t S;
    memset(&S, 0, sizeof S);
    S.nsec = nsec;
    S.per_sec = calloc((size_t)nsec, sizeof(uint64_t));
    S.per_sec_lat_max = calloc((size_t)nsec, sizeof(uint64_t));
    S.per_sec_lat_sum = calloc((size_t)nsec, sizeof(double));
    S.per_sec_lat_n = calloc((size_t)nsec, sizeof(uint64_t));
    uint64_t nclients_streamed = 0;
    uint64_t *per_client = calloc((size_t)G.clients, sizeof(uint64_t));
    double *conn_ms = calloc((size_t)G.clients, sizeof(double));
    uint64_t nconn_ms = 0;
    uint64_t clients_with_gaps = 0, never_opened = 0;
    int64_t max_seq = -1;
    for (int i = 0; i < G.threads; i++) {
        stats_t *s = &th[i].st;
#define ADD(f) S.f += s->f
        ADD(events); ADD(warmup_events); ADD(events_with_ts); ADD(events_with_seq); ADD(events_typed);
        ADD(comments); ADD(id_fields); ADD(retry_fields);
        ADD(gaps); ADD(gap_incidents); ADD(dups); ADD(neg_latency);
        ADD(bytes); ADD(bytes_window);
        ADD(connected); ADD(failed); ADD(connect_err); ADD(timeouts); ADD(bad_status); ADD(bad_response);
        ADD(disconnected_early); ADD(eof_early); ADD(err_early); ADD(proto_err); ADD(end_of_stream);
        ADD(non_sse_ctype); ADD(lat_count); ADD(lat_sum);
        ADD(storm_dropped); ADD(storm_connected); ADD(storm_failed); ADD(storm_resumed);
        ADD(storm_with_id); ADD(long_ids);
        ADD(storm_connect_err); ADD(storm_timeouts); ADD(storm_bad_status); ADD(storm_bad_response);
#undef ADD
        if (s->last_retry_ms)
            S.last_retry_ms = s->last_retry_ms;
        if (s->lat_max > S.lat_max)
            S.lat_max = s->lat_max;
        for (int j = 0; j < 600; j++)
            S.status[j] += s->status[j];
        for (int j = 0; j < H_NBUCKETS; j++)
            S.hist[j] += s->hist[j];
        for (int j = 0; j < nsec; j++) {
            S.per_sec[j] += s->per_sec[j];
            if (s->per_sec_lat_max[j] > S.per_sec_lat_max[j])
                S.per_sec_lat_max[j] = s->per_sec_lat_max[j];
            S.per_sec_lat_sum[j] += s->per_sec_lat_sum[j];
            S.per_sec_lat_n[j] += s->per_sec_lat_n[j];
        }
        for (int j = 0; j < th[i].n; j++) {
            conn_t *c = &th[i].conns[j];
            if (c->state == CS_NEW) {
                never_opened++;
                continue;
            }
            if (c->ever_streamed) {
                per_client[nclients_streamed++] = c->events;
                conn_ms[nconn_ms++] = (c->t_connected - c->t_open) * 1000.0;
                if (c->gaps)
                    clients_with_gaps++;
                if (c->last_seq > max_seq)
                    max_seq = c->last_seq;
            }
        }
    }
    /* how far behind the freshest client each client ended (tail lag) */
    uint64_t *lag = calloc(nclients_streamed ? nclients_streamed : 1, sizeof(uint64_t));
    uint64_t nlag = 0;
    if (max_seq >= 0) {
        for (int i = 0; i < G.threads; i++)
            for (int j = 0; j < th[i].n; j++) {
                conn_t *c = &th[i].conns[j];
                if (c->ever_streamed && c->last_seq >= 0)
                    lag[nlag++] = (uint64_t)(max_seq - c->last_seq);
            }
    }
    /* storm mode: how far behind each dropped client was, what it never got, how long it took */
    double *resume_ms = calloc(S.storm_dropped ? S.storm_dropped : 1, sizeof(double));
    uint64_t nresume = 0, shortfall = 0;
    int64_t behind_min = -1, behind_max = -1;
    for (int i = 0; G.resume_seq > 0 && i < G.threads; i++)
        for (int j = 0; j < th[i].n; j++) {
            conn_t *c = &th[i].conns[j];
            if (!c->reopened && c->state != CS_DROPPED)
                continue;
            int64_t behind = G.resume_seq - (c->seq_at_drop > 0 ? c->seq_at_drop : 0);
            if (behind_min < 0 || behind < behind_min)
                behind_min = behind;
            if (behind > behind_max)
                behind_max = behind;
            int64_t got = c->last_seq > 0 ? c->last_seq : 0;
            if (got < G.resume_seq)
                shortfall += (uint64_t)(G.resume_seq - got);
            if (c->resumed)
                resume_ms[nresume++] = (c->t_resumed - g_storm_at) * 1000.0;
        }
    qsort(resume_ms, nresume, sizeof(double), cmp_dbl);
    qsort(per_client, nclients_streamed, sizeof(uint64_t), cmp_u64);
    qsort(conn_ms, nconn_ms, sizeof(double), cmp_dbl);
    qsort(lag, nlag, sizeof(uint64_t), cmp_u64);

    double window = run_s - G.warmup;
    if (window <= 0)
        window = 1e-9;
    double u0, s0, uw, sw, u1, s1;
    double c0 = cpu_seconds(&ru0, &u0, &s0);
    double cw = cpu_seconds(&ru_w0, &uw, &sw);
    double c1 = cpu_seconds(&ru1, &u1, &s1);
    double cpu_total = c1 - c0, cpu_window = c1 - cw;
    double evps = (double)S.events / window;
    double p50 = hist_pct(S.hist, S.lat_count, S.lat_max, 50) / 1e6;
    double p90 = hist_pct(S.hist, S.lat_count, S.lat_max, 90) / 1e6;
    double p99 = hist_pct(S.hist, S.lat_count, S.lat_max, 99) / 1e6;
    double p999 = hist_pct(S.hist, S.lat_count, S.lat_max, 99.9) / 1e6;
    double lmax = (double)S.lat_max / 1e6;
    double lmean = S.lat_count ? S.lat_sum / (double)S.lat_count / 1e6 : 0;
    uint64_t pc_min = nclients_streamed ? per_client[0] : 0;
    uint64_t pc_med = nclients_streamed ? per_client[nclients_streamed / 2] : 0;
    uint64_t pc_max = nclients_streamed ? per_client[nclients_streamed - 1] : 0;
    double cm50 = nconn_ms ? conn_ms[nconn_ms / 2] : 0;
    double cmax = nconn_ms ? conn_ms[nconn_ms - 1] : 0;
    uint64_t lag_med = nlag ? lag[nlag / 2] : 0, lag_max = nlag ? lag[nlag - 1] : 0;

    if (G.json) {
        FILE *f = stdout;
        fprintf(f, "{\"tool\":\"sseload\",\"version\":\"%s\",\"url\":", SSELOAD_VERSION);
        json_str(f, url);
        fprintf(f, ",\"clients\":%d,\"threads\":%d,\"duration_s\":%.3f,\"ramp_per_s\":%.1f,\"warmup_s\":%.3f",
                G.clients, G.threads, G.duration, G.ramp, G.warmup);
        fprintf(f, ",\"batch_ms\":%.3f,\"no_quickack\":%s", G.batch_ms, G.no_quickack ? "true" : "false");
        fprintf(f, ",\"run_s\":%.3f,\"window_s\":%.3f,\"interrupted\":%s", run_s, window, g_stop ? "true" : "false");
        fprintf(f, ",\"connected\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"never_opened\":%" PRIu64,
                S.connected, S.failed, never_opened);
        fprintf(f, ",\"fail_reasons\":{\"connect_error\":%" PRIu64 ",\"timeout\":%" PRIu64
                   ",\"http_status\":%" PRIu64 ",\"bad_response\":%" PRIu64 "}",
                S.connect_err, S.timeouts, S.bad_status, S.bad_response);
        fprintf(f, ",\"http_status\":{");
        int first = 1;
        for (int j = 100; j < 600; j++)
            if (S.status[j]) {
                fprintf(f, "%s\"%d\":%" PRIu64, first ? "" : ",", j, S.status[j]);
                first = 0;
            }
        fprintf(f, "},\"non_sse_content_type\":%" PRIu64, S.non_sse_ctype);
        fprintf(f, ",\"disconnected_early\":%" PRIu64 ",\"disconnect_reasons\":{\"eof\":%" PRIu64
                   ",\"error\":%" PRIu64 ",\"protocol\":%" PRIu64 ",\"end_of_chunked_stream\":%" PRIu64 "}",
                S.disconnected_early, S.eof_early, S.err_early, S.proto_err, S.end_of_stream);
        fprintf(f, ",\"all_settled_at_s\":%.3f,\"connect_ms\":{\"p50\":%.2f,\"max\":%.2f}",
                g_all_settled_at, cm50, cmax);
        fprintf(f, ",\"events\":%" PRIu64 ",\"events_per_s\":%.1f,\"events_warmup_discarded\":%" PRIu64,
                S.events, evps, S.warmup_events);
        fprintf(f, ",\"events_with_ts\":%" PRIu64 ",\"events_with_seq\":%" PRIu64 ",\"events_typed\":%" PRIu64,
                S.events_with_ts, S.events_with_seq, S.events_typed);
        fprintf(f, ",\"latency_ms\":{\"count\":%" PRIu64 ",\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f"
                   ",\"p999\":%.3f,\"max\":%.3f,\"negative_clamped\":%" PRIu64 "}",
                S.lat_count, lmean, p50, p90, p99, p999, lmax, S.neg_latency);
        fprintf(f, ",\"per_client_events\":{\"clients\":%" PRIu64 ",\"min\":%" PRIu64 ",\"median\":%" PRIu64
                   ",\"max\":%" PRIu64 "}",
                nclients_streamed, pc_min, pc_med, pc_max);
        fprintf(f, ",\"seq\":{\"gaps_missing_events\":%" PRIu64 ",\"gap_incidents\":%" PRIu64
                   ",\"clients_with_gaps\":%" PRIu64 ",\"duplicates_or_reordered\":%" PRIu64
                   ",\"max_seq\":%" PRId64 ",\"end_lag_median\":%" PRIu64 ",\"end_lag_max\":%" PRIu64 "}",
                S.gaps, S.gap_incidents, clients_with_gaps, S.dups, max_seq, lag_med, lag_max);
        fprintf(f, ",\"bytes\":%" PRIu64 ",\"bytes_window\":%" PRIu64 ",\"comments\":%" PRIu64
                   ",\"id_fields\":%" PRIu64 ",\"retry_fields\":%" PRIu64,
                S.bytes, S.bytes_window, S.comments, S.id_fields, S.retry_fields);
        fprintf(f, ",\"sseload_cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f,\"total_s\":%.3f,\"window_s\":%.3f"
                   ",\"window_pct_of_one_core\":%.1f}",
                u1 - u0, s1 - s0, cpu_total, cpu_window, cpu_window / window * 100.0);
        if (G.resume_seq > 0) {
            uint64_t p99i = nresume ? (uint64_t)ceil(0.99 * (double)nresume) - 1 : 0;
            fprintf(f, ",\"storm\":{\"resume_seq\":%" PRId64 ",\"dropped\":%" PRIu64
                       ",\"behind_at_drop\":{\"min\":%" PRId64 ",\"max\":%" PRId64 "}"
                       ",\"reconnected\":%" PRIu64 ",\"with_last_event_id\":%" PRIu64
                       ",\"failed\":%" PRIu64 ",\"resumed\":%" PRIu64 ",\"not_resumed\":%" PRIu64,
                    G.resume_seq, S.storm_dropped, behind_min, behind_max, S.storm_connected,
                    S.storm_with_id, S.storm_failed, S.storm_resumed, S.storm_dropped - S.storm_resumed);
            fprintf(f, ",\"fail_reasons\":{\"connect_error\":%" PRIu64 ",\"timeout\":%" PRIu64
                       ",\"http_status\":%" PRIu64 ",\"bad_response\":%" PRIu64 "}",
                    S.storm_connect_err, S.storm_timeouts, S.storm_bad_status, S.storm_bad_response);
            fprintf(f, ",\"started_at_s\":%.3f,\"all_resumed_s\":%.3f,\"settled_s\":%.3f",
                    g_storm_at, g_all_resumed_at >= 0 ? g_all_resumed_at - g_storm_at : -1.0,
                    g_storm_settled_at >= 0 ? g_storm_settled_at - g_storm_at : -1.0);
            fprintf(f, ",\"resume_ms\":{\"p50\":%.1f,\"p99\":%.1f,\"max\":%.1f}",
                    nresume ? resume_ms[nresume / 2] : 0.0, nresume ? resume_ms[p99i] : 0.0,
                    nresume ? resume_ms[nresume - 1] : 0.0);
            fprintf(f, ",\"lost\":%" PRIu64 ",\"shortfall\":%" PRIu64 ",\"gaps\":%" PRIu64
                       ",\"duplicates\":%" PRIu64 ",\"long_ids\":%" PRIu64 "}",
                    S.gaps + shortfall, shortfall, S.gaps, S.dups, S.long_ids);
        }
        fprintf(f, ",\"per_second_events\":[");
        int last = (int)ceil(run_s);
        if (last > nsec)
            last = nsec;
        for (int j = 0; j < last; j++)
            fprintf(f, "%s%" PRIu64, j ? "," : "", S.per_sec[j]);
        fprintf(f, "],\"per_second_latency_mean_ms\":[");
        for (int j = 0; j < last; j++)
            fprintf(f, "%s%.1f", j ? "," : "", S.per_sec_lat_n[j] ? S.per_sec_lat_sum[j] / S.per_sec_lat_n[j] / 1e6 : 0.0);
        fprintf(f, "],\"per_second_latency_max_ms\":[");
        for (int j = 0; j < last; j++)
            fprintf(f, "%s%.1f", j ? "," : "", S.per_sec_lat_max[j] / 1e6);
        fprintf(f, "]}\n");
    } else {
        printf("sseload %s  url=%s\n", SSELOAD_VERSION, url);
        printf("clients: %d requested, %" PRIu64 " connected, %" PRIu64 " failed (connect %" PRIu64
               ", timeout %" PRIu64 ", status %" PRIu64 ", bad response %" PRIu64 "), %" PRIu64
               " never opened\n",
               G.clients, S.connected, S.failed, S.connect_err, S.timeouts, S.bad_status, S.bad_response,
               never_opened);
        printf("http status:");
        for (int j = 100; j < 600; j++)
            if (S.status[j])
                printf(" %d=%" PRIu64, j, S.status[j]);
        printf("\ndisconnected early: %" PRIu64 " (eof %" PRIu64 ", error %" PRIu64 ", protocol %" PRIu64
               ", end of chunked stream %" PRIu64 ")\n",
               S.disconnected_early, S.eof_early, S.err_early, S.proto_err, S.end_of_stream);
        printf("all settled at: %.2fs   connect p50 %.1f ms, max %.1f ms\n", g_all_settled_at, cm50, cmax);
        printf("window: %.2fs (run %.2fs, warmup %.2fs)\n", window, run_s, G.warmup);
        printf("events: %" PRIu64 " in window, %.1f/s  (warmup discarded %" PRIu64 ")\n", S.events, evps,
               S.warmup_events);
        printf("latency ms (n=%" PRIu64 "): p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f  mean %.3f\n",
               S.lat_count, p50, p90, p99, p999, lmax, lmean);
        printf("per-client events: min %" PRIu64 "  median %" PRIu64 "  max %" PRIu64 "\n", pc_min, pc_med,
               pc_max);
        printf("seq: gaps %" PRIu64 " missing in %" PRIu64 " incidents (%" PRIu64 " clients), dup/reorder %" PRIu64
               ", end lag median %" PRIu64 " max %" PRIu64 "\n",
               S.gaps, S.gap_incidents, clients_with_gaps, S.dups, lag_med, lag_max);
        printf("bytes: %" PRIu64 " total, %" PRIu64 " in window; comments %" PRIu64 "; id fields %" PRIu64
               "; retry fields %" PRIu64 "\n",
               S.bytes, S.bytes_window, S.comments, S.id_fields, S.retry_fields);
        printf("sseload cpu: user %.2fs sys %.2fs; window %.2fs = %.1f%% of one core\n", u1 - u0, s1 - s0,
               cpu_window, cpu_window / window * 100.0);
        if (G.resume_seq > 0)
            printf("storm: %" PRIu64 " dropped, %" PRIu64 " reconnected (%" PRIu64 " with Last-Event-ID), %" PRIu64
                   " failed, %" PRIu64 " resumed to seq %" PRId64 " (all in %.3fs), lost %" PRIu64 ", dup/reorder %" PRIu64
                   "\n",
                   S.storm_dropped, S.storm_connected, S.storm_with_id, S.storm_failed, S.storm_resumed, G.resume_seq,
                   g_all_resumed_at >= 0 ? g_all_resumed_at - g_storm_at : -1.0, S.gaps + shortfall, S.dups);
    }
    return 0;
}
