/* listen.h — "HOST:PORT" listen addresses for the HTTP servers (intake,
 * metrics, mock). IPv4 only; "localhost" means 127.0.0.1; port 0 lets the
 * kernel pick one. */
#ifndef JF_LISTEN_H
#define JF_LISTEN_H

#include <netinet/in.h>
#include <stdbool.h>

/* Writes *out only on success. */
bool jf_listen_parse(struct sockaddr_in *out, const char *s);

#endif
