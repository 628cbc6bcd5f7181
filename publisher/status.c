/* placeholder: being written */
#include "publisher.h"

int jf_cmd_status(int argc, char **argv, const jf_pub_globals *g)
{
    (void)argc;
    (void)argv;
    (void)g;
    return jf_pub_usage_error("status", "not available in this build yet");
}
