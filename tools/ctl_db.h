/* ctl_db: paymentctl's database commands; see ctl_db.c. */
#ifndef PAYMENTD_CTL_DB_H
#define PAYMENTD_CTL_DB_H

#include "config.h"

int ctl_migrate(const struct config *cfg);
int ctl_create_account(const struct config *cfg, const char *name);
int ctl_create_key(const struct config *cfg, const char *account);
int ctl_revoke_key(const struct config *cfg, const char *key);

#endif
