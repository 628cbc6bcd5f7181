/* replay — runs a fuzz target's LLVMFuzzerTestOneInput over files, without
 * libFuzzer, so the seed corpus and every regression input replay as an
 * ordinary test in any build (gcc, clang, ASan+UBSan, valgrind).
 *
 *   replay_<target> PATH…
 *
 * A PATH is a file, or a directory whose regular files (not dot files,
 * in name order) are fed one by one. A failed check aborts, naming the
 * input first. Exit 0 when every input passed; 2 when a path cannot be read
 * or no input was found at all (an empty corpus proves nothing). */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

#define INPUT_MAX (16 * 1024 * 1024) /* larger than any corpus file we keep */

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "replay: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    uint8_t *buf = malloc(cap);
    int rc = -1;
    while (buf != NULL) {
        if (len == cap) {
            if (cap >= INPUT_MAX) {
                fprintf(stderr, "replay: %s: larger than %d bytes\n", path, INPUT_MAX);
                goto done;
            }
            uint8_t *nb = realloc(buf, cap * 2);
            if (nb == NULL)
                break;
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f)) {
                fprintf(stderr, "replay: cannot read %s: %s\n", path, strerror(errno));
                goto done;
            }
            break;
        }
    }
    if (buf == NULL) {
        fprintf(stderr, "replay: out of memory reading %s\n", path);
        goto done;
    }
    /* An exact-size copy: a read past the input's end is then a heap
     * overflow that ASan reports, as under libFuzzer. */
    uint8_t *exact = malloc(len > 0 ? len : 1);
    if (exact == NULL) {
        fprintf(stderr, "replay: out of memory reading %s\n", path);
        goto done;
    }
    if (len > 0)
        memcpy(exact, buf, len);
    fprintf(stderr, "replay: %s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    rc = 0;
done:
    free(buf);
    fclose(f);
    return rc;
}

static int skip_dot(const struct dirent *e)
{
    return e->d_name[0] != '.';
}

/* Returns the number of inputs run, or -1. */
static long run_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return run_file(path) == 0 ? 1 : -1;

    struct dirent **names = NULL;
    int n = scandir(path, &names, skip_dot, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: cannot list %s: %s\n", path, strerror(errno));
        return -1;
    }
    long count = 0;
    for (int i = 0; i < n; i++) {
        char file[4096];
        if (count >= 0) {
            snprintf(file, sizeof file, "%s/%s", path, names[i]->d_name);
            if (stat(file, &st) == 0 && S_ISREG(st.st_mode))
                count = run_file(file) == 0 ? count + 1 : -1;
        }
        free(names[i]);
    }
    free(names);
    return count;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: %s PATH...\n"
                "Feeds every file of each PATH (a file or a directory) to the fuzz target.\n",
                argv[0]);
        return argc < 2 ? 2 : 0;
    }
    long total = 0;
    for (int i = 1; i < argc; i++) {
        long n = run_path(argv[i]);
        if (n < 0)
            return 2;
        total += n;
    }
    if (total == 0) {
        fprintf(stderr, "replay: no input found\n");
        return 2;
    }
    printf("replay: %ld inputs passed\n", total);
    return 0;
}
