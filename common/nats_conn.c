/* nats_conn.c — one NATS connection from the [nats] section.
 *
 * The first connect is retried until connect_timeout has passed (a fleet is
 * often started together with its server); once connected, nats.c reconnects
 * forever with jitter and we log each disconnect and reconnect.
 *
 * nats.c 3.4.1 signs the server's nonce for an nkey user only when it is
 * given the public key as well as the seed file (natsOptions_SetNKeyFromSeed),
 * and it has no public call that derives one from the other. The [nats]
 * section names only the seed file (as the nats CLI does), so the public key
 * is derived here with OpenSSL's Ed25519; signing stays in nats.c. */
#include "nats_conn.h"

#include <openssl/evp.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define MAX_SERVERS   64
#define URL_MAX       1024
#define SEED_FILE_MAX 65536 /* a seed file is ~60 bytes; anything larger is not one */

/* ------------------------------------------------------------------------- */
/* URLs without credentials, for messages and logs.                          */

/* Copies url into buf without a "user:pass@" part. */
static void redact_url(char *buf, size_t cap, const char *url)
{
    const char *scheme = strstr(url, "://");
    const char *start = scheme ? scheme + 3 : url;
    const char *end = start + strcspn(start, "/?#");
    const char *at = NULL;

    for (const char *p = start; p < end; p++)
        if (*p == '@')
            at = p;
    if (at != NULL) {
        snprintf(buf, cap, "%.*s%s", (int)(start - url), url, at + 1);
        return;
    }
    snprintf(buf, cap, "%s", url);
}

/* The whole comma list, redacted, for "cannot connect to …". */
static void redact_list(char *buf, size_t cap, char **urls, int n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && len + 1 < cap; i++) {
        char one[URL_MAX];
        redact_url(one, sizeof one, urls[i]);
        int w = snprintf(buf + len, cap - len, "%s%s", i ? "," : "", one);
        if (w < 0)
            break;
        len += (size_t)w < cap - len ? (size_t)w : cap - len - 1;
    }
}

/* Splits the comma-separated list into trimmed, non-empty entries. *copy
 * owns the storage the entries point into. */
static jf_status split_urls(char **copy, char **urls, int *n, const char *list, jf_error *err)
{
    char *s = strdup(list ? list : "");
    if (s == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    int count = 0;
    char *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ' || *tok == '\t')
            tok++;
        char *e = tok + strlen(tok);
        while (e > tok && (e[-1] == ' ' || e[-1] == '\t'))
            *--e = '\0';
        if (*tok == '\0')
            continue;
        if (count == MAX_SERVERS) {
            free(s);
            jf_error_set(err, "[nats] url: more than %d servers", MAX_SERVERS);
            return JF_ERR_INVALID;
        }
        if (strlen(tok) >= URL_MAX) {
            free(s);
            jf_error_set(err, "[nats] url: a server URL is longer than %d bytes", URL_MAX - 1);
            return JF_ERR_INVALID;
        }
        urls[count++] = tok;
    }
    if (count == 0) {
        free(s);
        jf_error_set(err, "[nats] url: no server given");
        return JF_ERR_INVALID;
    }
    *copy = s;
    *n = count;
    return JF_OK;
}

const char *jf_nats_error_text(natsStatus s)
{
    natsStatus last = NATS_OK;
    const char *t = nats_GetLastError(&last);
    if (t == NULL || *t == '\0' || last != s)
        return natsStatus_GetText(s);
    /* nats.c prefixes its own source position; a user needs only the words. */
    if (t[0] == '(') {
        const char *e = strstr(t, "): ");
        if (e != NULL && (size_t)(e - t) < 64)
            t = e + 3;
    }
    return t;
}

/* ------------------------------------------------------------------------- */
/* nkey seed -> public key.                                                  */

/* pub = the Ed25519 public key of a 32-byte private seed. nats.c 3.4.1
 * needs the public key next to the seed file and has no call deriving it;
 * OpenSSL (which nats.c links for TLS anyway) does the curve arithmetic. */
static bool ed25519_public(uint8_t pub[32], const uint8_t seed[32])
{
    size_t len = 32;
    EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32);
    bool ok = k != NULL && EVP_PKEY_get_raw_public_key(k, pub, &len) == 1 && len == 32;
    EVP_PKEY_free(k);
    return ok;
}

/* nkeys: base32 (RFC 4648, no padding) of prefix bytes + key + CRC-16/XMODEM. */
static const char b32_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

static uint16_t crc16_xmodem(const uint8_t *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

static size_t b32_encode(char *out, const uint8_t *in, size_t n)
{
    size_t len = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 5) {
            out[len++] = b32_alphabet[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0)
        out[len++] = b32_alphabet[(acc << (5 - bits)) & 31];
    out[len] = '\0';
    return len;
}

/* Decodes n base32 characters into out (cap bytes); -1 on a bad character. */
static int b32_decode(uint8_t *out, size_t cap, const char *in, size_t n)
{
    size_t len = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        const char *pos = strchr(b32_alphabet, in[i]);
        if (in[i] == '\0' || pos == NULL)
            return -1;
        acc = (acc << 5) | (uint32_t)(pos - b32_alphabet);
        bits += 5;
        if (bits >= 8) {
            if (len == cap)
                return -1;
            out[len++] = (uint8_t)(acc >> (bits - 8));
            bits -= 8;
        }
    }
    return (int)len;
}

#define NKEY_SEED_LEN    58 /* 'S', the key type, 56 more characters */
#define NKEY_PUB_LEN     56
#define NKEY_PREFIX_SEED (18 << 3)

/* Reads the seed file (a bare seed, or one wrapped in the "-----BEGIN … NKEY
 * SEED-----" lines nsc writes) and writes the matching public key. */
static jf_status nkey_public_from_file(char pub[NKEY_PUB_LEN + 1], const char *path, jf_error *err)
{
    jf_status st = JF_ERR_INVALID;
    char text[SEED_FILE_MAX + 1];
    uint8_t raw[40], key[32], enc[35];
    size_t n = 0;

    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        jf_error_set(err, "[nats] nkey_seed: cannot open %s: %s", path, strerror(errno));
        return JF_ERR_INVALID; /* a config error (exit 2) in both programs */
    }
    n = fread(text, 1, SEED_FILE_MAX + 1, f);
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        jf_error_set(err, "[nats] nkey_seed: cannot read %s", path);
        st = JF_ERR_IO;
        goto out;
    }
    if (n > SEED_FILE_MAX) {
        jf_error_set(err, "[nats] nkey_seed: %s is larger than %d bytes, not a seed file", path,
                     SEED_FILE_MAX);
        goto out;
    }
    text[n] = '\0';

    /* The seed is the first word of exactly 58 base32 characters starting with 'S'. */
    const char *seed = NULL;
    for (size_t i = 0; i < n;) {
        size_t w = strspn(text + i, b32_alphabet);
        if (w == NKEY_SEED_LEN && text[i] == 'S') {
            seed = text + i;
            break;
        }
        i += w ? w : 1;
    }
    if (seed == NULL) {
        jf_error_set(err, "[nats] nkey_seed: no nkey seed (S…, %d characters) in %s", NKEY_SEED_LEN,
                     path);
        goto out;
    }
    if (b32_decode(raw, sizeof raw, seed, NKEY_SEED_LEN) != 36 ||
        (raw[0] & 0xf8) != NKEY_PREFIX_SEED) {
        jf_error_set(err, "[nats] nkey_seed: the seed in %s is malformed", path);
        goto out;
    }
    uint16_t crc = crc16_xmodem(raw, 34);
    if (raw[34] != (uint8_t)(crc & 0xff) || raw[35] != (uint8_t)(crc >> 8)) {
        jf_error_set(err, "[nats] nkey_seed: the seed in %s fails its checksum", path);
        goto out;
    }
    /* The public key carries the seed's key type (user, account, …) as its prefix. */
    uint8_t type = (uint8_t)(((raw[0] & 7) << 5) | ((raw[1] & 0xf8) >> 3));
    enc[0] = type;
    if (!ed25519_public(key, raw + 2)) {
        jf_error_set(err, "[nats] nkey_seed: cannot derive the public key of the seed in %s", path);
        goto out;
    }
    memcpy(enc + 1, key, 32);
    crc = crc16_xmodem(enc, 33);
    enc[33] = (uint8_t)(crc & 0xff);
    enc[34] = (uint8_t)(crc >> 8);
    b32_encode(pub, enc, sizeof enc);
    st = JF_OK;
out:
    explicit_bzero(text, sizeof text);
    explicit_bzero(raw, sizeof raw);
    return st;
}

/* ------------------------------------------------------------------------- */
/* Connection events.                                                        */

/* Lives as long as the connection: freed by the closed callback, which nats.c
 * runs for every connection that was established, even during nats_Close. */
typedef struct conn_events {
    jf_nats_callbacks cbs;
    /* The server last connected to, redacted: at a disconnect nats.c no
     * longer reports one. Written by the connecting thread and the callback
     * thread, hence the lock. */
    pthread_mutex_t mu;
    char url[URL_MAX];
} conn_events;

static void remember_url(conn_events *ev, const char *url)
{
    pthread_mutex_lock(&ev->mu);
    snprintf(ev->url, sizeof ev->url, "%s", url);
    pthread_mutex_unlock(&ev->mu);
}

static void connected_url(natsConnection *nc, char *buf, size_t cap)
{
    char raw[URL_MAX];
    if (natsConnection_GetConnectedUrl(nc, raw, sizeof raw) != NATS_OK || raw[0] == '\0')
        snprintf(raw, sizeof raw, "%s", "unknown");
    redact_url(buf, cap, raw);
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    conn_events *ev = closure;
    /* natsConnection_Destroy also reports a disconnect; that one was asked for. */
    if (natsConnection_IsClosed(nc))
        return;
    char url[URL_MAX];
    pthread_mutex_lock(&ev->mu);
    snprintf(url, sizeof url, "%s", ev->url);
    pthread_mutex_unlock(&ev->mu);
    jf_log(JF_LOG_WARN, "nats disconnected", JF_S("url", url));
    if (ev->cbs.on_disconnected)
        ev->cbs.on_disconnected(nc, ev->cbs.closure);
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    conn_events *ev = closure;
    char url[URL_MAX];
    connected_url(nc, url, sizeof url);
    remember_url(ev, url);
    jf_log(JF_LOG_INFO, "nats reconnected", JF_S("url", url));
    if (ev->cbs.on_reconnected)
        ev->cbs.on_reconnected(nc, ev->cbs.closure);
}

static void on_closed(natsConnection *nc, void *closure)
{
    conn_events *ev = closure;
    /* Not logged: a connection is only closed on the way out, after the
     * program's own last line ("consumer stopped"), which must stay last. */
    pthread_mutex_destroy(&ev->mu);
    free(ev);
}

static void on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus s, void *closure)
{
    const char *subject = sub ? natsSubscription_GetSubject(sub) : NULL;
    jf_log(JF_LOG_WARN, "nats asynchronous error", JF_S("error", natsStatus_GetText(s)),
           JF_S("subject", subject));
}

/* ------------------------------------------------------------------------- */

static jf_status opts_fail(natsStatus s, const char *what, jf_error *err)
{
    jf_error_set(err, "%s: %s", what, jf_nats_error_text(s));
    return s == NATS_NO_MEMORY ? JF_ERR_NOMEM : JF_ERR_INVALID;
}

static bool set(const char *s)
{
    return s != NULL && *s != '\0';
}

/* Every option from [nats]; errors name the key. */
static jf_status build_options(natsOptions *o, const jf_nats_config *nc, const char *default_name,
                               char **urls, int nurls, conn_events *ev, jf_error *err)
{
    natsStatus s;

    if ((s = natsOptions_SetServers(o, (const char **)urls, nurls)) != NATS_OK)
        return opts_fail(s, "[nats] url", err);
    if ((s = natsOptions_SetName(o, set(nc->name) ? nc->name : default_name)) != NATS_OK)
        return opts_fail(s, "[nats] name", err);

    if (set(nc->user) || set(nc->password)) {
        if (!set(nc->user)) {
            jf_error_set(err, "[nats] password is set but user is not");
            return JF_ERR_INVALID;
        }
        if ((s = natsOptions_SetUserInfo(o, nc->user, nc->password ? nc->password : "")) != NATS_OK)
            return opts_fail(s, "[nats] user", err);
    }
    if (set(nc->token) && (s = natsOptions_SetToken(o, nc->token)) != NATS_OK)
        return opts_fail(s, "[nats] token", err);
    if (set(nc->creds) && set(nc->nkey_seed)) {
        /* nats.c keeps only the last of the two; refuse rather than guess. */
        jf_error_set(err, "[nats] creds and nkey_seed cannot both be set");
        return JF_ERR_INVALID;
    }
    /* nats.c opens the file only when it connects, and its message names
     * neither the key nor a config error: check it here. */
    if (set(nc->creds) && access(nc->creds, R_OK) != 0) {
        jf_error_set(err, "[nats] creds: cannot read %s: %s", nc->creds, strerror(errno));
        return JF_ERR_INVALID;
    }
    if (set(nc->creds) &&
        (s = natsOptions_SetUserCredentialsFromFiles(o, nc->creds, NULL)) != NATS_OK)
        return opts_fail(s, "[nats] creds", err);
    if (set(nc->nkey_seed)) {
        char pub[NKEY_PUB_LEN + 1];
        jf_status st = nkey_public_from_file(pub, nc->nkey_seed, err);
        if (st != JF_OK)
            return st;
        if ((s = natsOptions_SetNKeyFromSeed(o, pub, nc->nkey_seed)) != NATS_OK)
            return opts_fail(s, "[nats] nkey_seed", err);
    }

    if (set(nc->tls_ca) || set(nc->tls_cert) || set(nc->tls_key)) {
        if ((s = natsOptions_SetSecure(o, true)) != NATS_OK)
            return opts_fail(s, "[nats] tls", err);
        if (set(nc->tls_ca) &&
            (s = natsOptions_LoadCATrustedCertificates(o, nc->tls_ca)) != NATS_OK) {
            jf_error_set(err, "[nats] tls_ca: cannot load %s: %s", nc->tls_ca, jf_nats_error_text(s));
            return JF_ERR_INVALID;
        }
        if (set(nc->tls_cert) != set(nc->tls_key)) {
            jf_error_set(err, "[nats] tls_cert and tls_key must be set together");
            return JF_ERR_INVALID;
        }
        if (set(nc->tls_cert) &&
            (s = natsOptions_LoadCertificatesChain(o, nc->tls_cert, nc->tls_key)) != NATS_OK) {
            jf_error_set(err, "[nats] tls_cert/tls_key: cannot load %s / %s: %s", nc->tls_cert,
                         nc->tls_key, jf_nats_error_text(s));
            return JF_ERR_INVALID;
        }
    }

    int64_t connect_ms = nc->connect_timeout_ms > 0 ? nc->connect_timeout_ms : 5000;
    int64_t wait_ms = nc->reconnect_wait_ms > 0 ? nc->reconnect_wait_ms : 2000;
    /* Reconnect forever: a job fleet outlives any one server restart. Pings
     * every 20 s (nats.c's default is 2 min) notice a dead link within ~1 min;
     * the I/O buffer size and send-asap stay at nats.c's defaults, which suit
     * both the publisher's bursts and the consumer's acks. */
    if ((s = natsOptions_SetTimeout(o, connect_ms)) != NATS_OK ||
        (s = natsOptions_SetMaxReconnect(o, -1)) != NATS_OK ||
        (s = natsOptions_SetReconnectWait(o, wait_ms)) != NATS_OK ||
        (s = natsOptions_SetReconnectJitter(o, 1000, 1000)) != NATS_OK ||
        (s = natsOptions_SetPingInterval(o, 20000)) != NATS_OK ||
        (s = natsOptions_SetMaxPingsOut(o, 3)) != NATS_OK ||
        (s = natsOptions_SetDisconnectedCB(o, on_disconnected, ev)) != NATS_OK ||
        (s = natsOptions_SetReconnectedCB(o, on_reconnected, ev)) != NATS_OK ||
        (s = natsOptions_SetClosedCB(o, on_closed, ev)) != NATS_OK ||
        (s = natsOptions_SetErrorHandler(o, on_async_error, NULL)) != NATS_OK)
        return opts_fail(s, "[nats] options", err);
    return JF_OK;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A failure that another attempt may cure (the server is starting, or the
 * network is briefly down); authentication and TLS errors are final. */
static bool retryable(natsStatus s)
{
    return s == NATS_NO_SERVER || s == NATS_TIMEOUT || s == NATS_IO_ERROR ||
           s == NATS_CONNECTION_CLOSED || s == NATS_CONNECTION_DISCONNECTED;
}

jf_status jf_nats_connect(natsConnection **out, const jf_config *cfg, const char *default_name,
                          const jf_nats_callbacks *cbs, jf_error *err)
{
    jf_status st;
    natsStatus s;
    natsOptions *o = NULL;
    natsConnection *nc = NULL;
    char *urlbuf = NULL;
    char *urls[MAX_SERVERS];
    int nurls = 0;
    char shown[2048];

    conn_events *ev = calloc(1, sizeof *ev);
    if (ev == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    if (cbs != NULL)
        ev->cbs = *cbs;
    pthread_mutex_init(&ev->mu, NULL);

    const char *list = set(cfg->nats.url) ? cfg->nats.url : "nats://127.0.0.1:4222";
    if ((st = split_urls(&urlbuf, urls, &nurls, list, err)) != JF_OK)
        goto fail_ev;
    redact_list(shown, sizeof shown, urls, nurls);

    if ((s = natsOptions_Create(&o)) != NATS_OK) {
        st = opts_fail(s, "nats options", err);
        goto fail_urls;
    }
    if ((st = build_options(o, &cfg->nats, default_name, urls, nurls, ev, err)) != JF_OK)
        goto fail_opts;
    if (cbs != NULL && cbs->global_delivery &&
        (s = natsOptions_UseGlobalMessageDelivery(o, true)) != NATS_OK) {
        st = opts_fail(s, "nats options", err);
        goto fail_opts;
    }

    int64_t budget = cfg->nats.connect_timeout_ms > 0 ? cfg->nats.connect_timeout_ms : 5000;
    int64_t deadline = mono_ms() + budget;
    int64_t pause = 100;
    for (;;) {
        s = natsConnection_Connect(&nc, o);
        if (s == NATS_OK)
            break;
        int64_t left = deadline - mono_ms();
        if (!retryable(s) || left <= 0) {
            const char *why = jf_nats_error_text(s);
            char hint[JF_ERROR_MAX];
            /* A server that rejects the client certificate (TLS 1.3 checks it
             * after the handshake) just closes: nats.c then reports an empty
             * PONG or a failed SSL write, which tells the user nothing. */
            if ((set(cfg->nats.tls_ca) || set(cfg->nats.tls_cert) || set(cfg->nats.tls_key)) &&
                ((s == NATS_PROTOCOL_ERROR && strstr(why, "got ''") != NULL) ||
                 (s == NATS_IO_ERROR && strncmp(why, "SSL_", 4) == 0))) {
                snprintf(hint, sizeof hint,
                         "the server closed the connection after the TLS handshake (%s): it "
                         "requires a client certificate it trusts ([nats] tls_cert, tls_key)",
                         why);
                why = hint;
            }
            jf_error_set(err, "cannot connect to %s: %s", shown, why);
            st = s == NATS_CONNECTION_AUTH_FAILED || s == NATS_NOT_PERMITTED ? JF_ERR_NATS
                 : retryable(s)                                              ? JF_ERR_TIMEOUT
                                                                             : JF_ERR_NATS;
            goto fail_opts;
        }
        jf_log(JF_LOG_DEBUG, "nats connect failed, retrying", JF_S("url", shown),
               JF_S("error", natsStatus_GetText(s)));
        sleep_ms(pause < left ? pause : left);
        pause = pause * 2 > 1000 ? 1000 : pause * 2;
    }
    natsOptions_Destroy(o);
    free(urlbuf);

    char url[URL_MAX];
    connected_url(nc, url, sizeof url);
    remember_url(ev, url);
    jf_log(JF_LOG_DEBUG, "nats connected", JF_S("url", url),
           JF_I("max_payload", natsConnection_GetMaxPayload(nc)));
    *out = nc;
    return JF_OK; /* ev now belongs to the connection (freed by on_closed) */

fail_opts:
    natsOptions_Destroy(o);
fail_urls:
    free(urlbuf);
fail_ev:
    /* No connection was made, so nats.c will never call on_closed. */
    pthread_mutex_destroy(&ev->mu);
    free(ev);
    return st;
}
