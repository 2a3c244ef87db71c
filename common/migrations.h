/* migrations: the sql/ migrations compiled into the programs (cmake/embed_sql.cmake). */
#ifndef PAYMENTD_MIGRATIONS_H
#define PAYMENTD_MIGRATIONS_H

struct migration {
    int version;
    const char *name;
    const char *sql;
};

extern const struct migration migrations[];
extern const int migrations_count;

#endif
