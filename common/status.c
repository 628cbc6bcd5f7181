#include "status.h"

#include <stdarg.h>
#include <stdio.h>

void jf_error_set(jf_error *err, const char *fmt, ...)
{
    if (err == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

const char *jf_status_name(jf_status s)
{
    switch (s) {
    case JF_OK:
        return "ok";
    case JF_ERR_INVALID:
        return "invalid";
    case JF_ERR_NOMEM:
        return "nomem";
    case JF_ERR_IO:
        return "io";
    case JF_ERR_NATS:
        return "nats";
    case JF_ERR_MISMATCH:
        return "mismatch";
    case JF_ERR_NOTFOUND:
        return "notfound";
    case JF_ERR_TIMEOUT:
        return "timeout";
    }
    return "unknown";
}
