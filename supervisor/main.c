/*
 * main - the paymentd program: the supervisor by default, or one role
 * process with --role NAME --index N (how the supervisor starts its
 * children, and how an operator runs one role alone for debugging).
 * Offers main(). A bad command line exits 2. Calls supervisor, role.
 */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "role.h"
#include "supervisor.h"

#ifndef PAYMENTD_VERSION
#define PAYMENTD_VERSION "0.0.0"
#endif

static void
usage(FILE *out)
{
    fprintf(out, "usage: paymentd [--config FILE] [--role api|worker|outbox|exporter --index N]\n"
                 "       paymentd --check [--config FILE]   validate the configuration\n"
                 "       paymentd --version\n");
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"role", required_argument, NULL, 'r'},
                                         {"index", required_argument, NULL, 'i'},
                                         {"version", no_argument, NULL, 'V'},
                                         {"check", no_argument, NULL, 't'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *config_path = NULL, *role_name = NULL;
    long index = 0;
    int opt;
    bool check = false;

    while ((opt = getopt_long(argc, argv, "c:r:i:Vht", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'r':
            role_name = optarg;
            break;
        case 'i':
            if (config_parse_int(optarg, 0, 31, &index) < 0) {
                fprintf(stderr, "paymentd: --index must be an integer from 0 to 31\n");
                return 2;
            }
            break;
        case 't':
            check = true;
            break;
        case 'V':
            printf("paymentd %s\n", PAYMENTD_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (check) {
        struct config cfg;
        char err[512];
        if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
            fprintf(stderr, "paymentd: configuration: %s\n", err);
            return 2;
        }
        config_free(&cfg);
        printf("configuration ok\n");
        return 0;
    }
    if (role_name) {
        enum role_kind role;
        if (shm_role_parse(role_name, &role) < 0 || role == ROLE_SUPERVISOR) {
            fprintf(stderr, "paymentd: --role must be api, worker, outbox or exporter\n");
            return 2;
        }
        return role_run(role, (int)index, config_path);
    }
    return supervisor_run(config_path);
}
