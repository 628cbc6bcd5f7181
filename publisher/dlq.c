/* placeholder: being written */
#include "publisher.h"

int jf_cmd_dlq(int argc, char **argv, const jf_pub_globals *g)
{
    (void)argc;
    (void)argv;
    (void)g;
    return jf_pub_usage_error("dlq", "not available in this build yet");
}
