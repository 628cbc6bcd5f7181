/* fuzz.h — what every fuzz target of tests/fuzz shares: the libFuzzer entry
 * point (also called by replay.c, the plain driver the ctest tests use) and
 * the checks that turn a broken invariant into a crash libFuzzer keeps. */
#ifndef JF_FUZZ_H
#define JF_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken invariant: say which and why on stderr, then abort, so libFuzzer
 * saves the input as a crash and a replayed regression fails its test. */
#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz check failed at %s:%d: %s\n  ", __FILE__, __LINE__, #cond);      \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Error messages are one log line: no control byte may reach them. */
static inline bool fuzz_one_line(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

/* A NUL-terminated heap copy of data[0..n) (n + 1 bytes, so ASan sees a read
 * past the terminator); NULL only when out of memory. */
static inline char *fuzz_cstr(const uint8_t *data, size_t n)
{
    char *s = malloc(n + 1);
    if (s != NULL) {
        if (n > 0)
            memcpy(s, data, n);
        s[n] = '\0';
    }
    return s;
}

#endif
