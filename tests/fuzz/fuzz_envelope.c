/* fuzz_envelope — the job envelope parser, and a differential between its
 * two implementations: jf_envelope_scan (the one-pass fast path) must give
 * exactly what jf_envelope_parse (jansson) gives for every input: the same
 * verdict, the same error text, the same fields.
 *
 * Input layout: byte 0 chooses the subject and max_payload, the rest is the
 * message (see the comments below); seeds are "<mode byte><JSON>". */
#include "fuzz.h"

#include "envelope.h"

/* Byte 0, bits 0-1: the subject. */
enum { SUBJ_NONE, SUBJ_MATCH, SUBJ_MISMATCH, SUBJ_RAW };
/* Bits 2-3: max_payload. */
enum { MAXP_NONE, MAXP_EXACT, MAXP_SHORT, MAXP_MIB };
/* Bits 4-5: how SUBJ_MISMATCH differs from the envelope's own subject. */
enum { MIS_PRIORITY, MIS_TYPE, MIS_PREFIX, MIS_SERVICE };

#define SUBJECT_CAP 600 /* > jobs.<128>.normal.<128> and any raw subject (255) */

/* The envelope's own subject, from a parse without one; a fixed subject
 * when the message is not valid (then both parsers refuse it anyway). */
static void own_subject(char *buf, const uint8_t *body, size_t len, int how, bool mismatch)
{
    jf_envelope *env = NULL;
    snprintf(buf, SUBJECT_CAP, "jobs.llm.normal.enrich");
    if (jf_envelope_parse(&env, body, len, NULL, 0, NULL) != JF_OK)
        return;
    const char *prefix = "jobs";
    jf_priority prio = env->priority;
    const char *svc_pre = "", *type_post = "";
    if (mismatch) {
        switch (how) {
        case MIS_PRIORITY:
            prio = (jf_priority)((prio + 1) % JF_PRIO_COUNT);
            break;
        case MIS_TYPE:
            type_post = "x";
            break;
        case MIS_PREFIX:
            prefix = "dlq";
            break;
        default:
            svc_pre = "x";
            break;
        }
    }
    snprintf(buf, SUBJECT_CAP, "%s.%s%s.%s.%s%s", prefix, svc_pre, env->service,
             jf_priority_name(prio), env->type, type_post);
    jf_envelope_destroy(env);
}

static bool same_str(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static void check_fields(const jf_envelope *env, const char *subject)
{
    size_t n = strlen(env->id);
    FUZZ_CHECK(n >= 1 && n <= JF_ID_MAX && fuzz_one_line(env->id), "accepted id \"%s\"", env->id);
    FUZZ_CHECK(jf_token_valid(env->service), "accepted service \"%s\"", env->service);
    FUZZ_CHECK(jf_token_valid(env->type), "accepted type \"%s\"", env->type);
    FUZZ_CHECK((unsigned)env->priority < JF_PRIO_COUNT, "priority %d", (int)env->priority);
    if (env->tenant != NULL) {
        n = strlen(env->tenant);
        FUZZ_CHECK(n >= 1 && n <= JF_ID_MAX && fuzz_one_line(env->tenant),
                   "accepted tenant \"%s\"", env->tenant);
    }
    if (subject != NULL) {
        char want[SUBJECT_CAP];
        FUZZ_CHECK(jf_subject_format(want, sizeof want, "jobs", env->service, env->priority,
                                     env->type) == JF_OK &&
                       strcmp(want, subject) == 0,
                   "accepted under subject \"%s\"", subject);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    const uint8_t mode = data[0];
    const uint8_t *body = data + 1;
    size_t len = size - 1;
    const int smode = mode & 3, pmode = (mode >> 2) & 3, how = (mode >> 4) & 3;

    char subject[SUBJECT_CAP];
    const char *subj = NULL;
    if (smode == SUBJ_RAW) {
        /* Next byte: the subject's length, then the subject itself (any
         * bytes; a NUL ends it early), then the message. */
        size_t k = len > 0 ? body[0] : 0;
        if (len > 0) {
            body++;
            len--;
        }
        if (k > len)
            k = len;
        memcpy(subject, body, k);
        subject[k] = '\0';
        body += k;
        len -= k;
        subj = subject;
    } else if (smode != SUBJ_NONE) {
        own_subject(subject, body, len, how, smode == SUBJ_MISMATCH);
        subj = subject;
    }
    size_t maxp = 0;
    switch (pmode) {
    case MAXP_EXACT:
        maxp = len;
        break;
    case MAXP_SHORT:
        maxp = len > 1 ? len - 1 : 1;
        break;
    case MAXP_MIB:
        maxp = (size_t)1 << 20;
        break;
    default:
        break;
    }

    jf_envelope *const sentinel = (jf_envelope *)&subject;
    jf_envelope *a = sentinel, *b = sentinel;
    jf_error ea, eb;
    memset(&ea, 'A', sizeof ea);
    ea.msg[JF_ERROR_MAX - 1] = '\0';
    memset(&eb, 'B', sizeof eb);
    eb.msg[JF_ERROR_MAX - 1] = '\0';
    const jf_status sa = jf_envelope_parse(&a, body, len, subj, maxp, &ea);
    const jf_status sb = jf_envelope_scan(&b, body, len, subj, maxp, &eb);

    FUZZ_CHECK(sa == sb, "parse says %s (%s), scan says %s (%s)", jf_status_name(sa),
               sa == JF_OK ? "-" : ea.msg, jf_status_name(sb), sb == JF_OK ? "-" : eb.msg);
    if (sa != JF_OK) {
        FUZZ_CHECK(a == sentinel && b == sentinel, "output written on error");
        FUZZ_CHECK(strcmp(ea.msg, eb.msg) == 0, "errors differ:\n  parse: %s\n  scan:  %s",
                   ea.msg, eb.msg);
        FUZZ_CHECK(ea.msg[0] != '\0' && fuzz_one_line(ea.msg), "error \"%s\"", ea.msg);
        return 0;
    }
    FUZZ_CHECK(a != sentinel && a != NULL && b != sentinel && b != NULL, "no output on success");
    FUZZ_CHECK(same_str(a->id, b->id), "id \"%s\" vs \"%s\"", a->id, b->id);
    FUZZ_CHECK(same_str(a->service, b->service), "service \"%s\" vs \"%s\"", a->service,
               b->service);
    FUZZ_CHECK(same_str(a->type, b->type), "type \"%s\" vs \"%s\"", a->type, b->type);
    FUZZ_CHECK(same_str(a->tenant, b->tenant), "tenant \"%s\" vs \"%s\"",
               a->tenant ? a->tenant : "(absent)", b->tenant ? b->tenant : "(absent)");
    FUZZ_CHECK(a->priority == b->priority, "priority %d vs %d", (int)a->priority,
               (int)b->priority);
    FUZZ_CHECK(a->has_created_at == b->has_created_at &&
                   (!a->has_created_at || a->created_at_ms == b->created_at_ms),
               "created_at %d:%lld vs %d:%lld", a->has_created_at, (long long)a->created_at_ms,
               b->has_created_at, (long long)b->created_at_ms);
    FUZZ_CHECK(a->has_deadline == b->has_deadline &&
                   (!a->has_deadline || a->deadline_ms == b->deadline_ms),
               "deadline %d:%lld vs %d:%lld", a->has_deadline, (long long)a->deadline_ms,
               b->has_deadline, (long long)b->deadline_ms);
    check_fields(a, subj);
    jf_envelope_destroy(a);
    jf_envelope_destroy(b);
    return 0;
}
