/* placeholder: being written */
#include "publisher.h"

int jf_cmd_serve(int argc, char **argv, const jf_pub_globals *g)
{
    (void)argc;
    (void)argv;
    (void)g;
    return jf_pub_usage_error("serve", "not available in this build yet");
}
