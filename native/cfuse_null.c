/*
 * A filesystem that takes writes and discards them, served by the C
 * mount's own workers (kvfsd._cfuse.Mount with dispatch None): one
 * directory with at most one file, "f", which reads as zeros. `kvfs bench
 * --fuse` runs it beside the mount, in the same run, as the ceilings no
 * libfuse filesystem can beat on that machine: writes (the kernel's FUSE
 * round trip and the copy out of /dev/fuse, nothing stored), reads that
 * reach the daemon (the round trip and the reply's copy, nothing read or
 * verified) and reads from the kernel's page cache of a FUSE file.
 */
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "cfuse.h"

static atomic_llong fsize;
static atomic_int exists;

static void attr(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0644;
    st->st_nlink = 1;
    st->st_size = ino == FUSE_ROOT_ID ? 0 : atomic_load(&fsize);
    st->st_blksize = 1 << 20;  /* as the kvfs mount: `cp` then writes 1 MiB at a time */
}

static void entry(fuse_req_t req) {
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = 2;
    attr(2, &e.attr);
    e.attr_timeout = e.entry_timeout = 1.0;
    fuse_reply_entry(req, &e);
}

static void n_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    (void)parent;
    if (atomic_load(&exists) && strcmp(name, "f") == 0)
        entry(req);
    else
        fuse_reply_err(req, ENOENT);
}

static void n_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    attr(ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}

static void n_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *a, int to_set, struct fuse_file_info *fi) {
    (void)fi;
    if (to_set & FUSE_SET_ATTR_SIZE) atomic_store(&fsize, a->st_size);
    n_getattr(req, ino, NULL);
}

static void n_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    (void)parent;
    (void)mode;
    if (strcmp(name, "f") != 0) {
        fuse_reply_err(req, EPERM);
        return;
    }
    atomic_store(&exists, 1);
    atomic_store(&fsize, 0);
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = 2;
    attr(2, &e.attr);
    e.attr_timeout = e.entry_timeout = 1.0;
    fuse_reply_create(req, &e, fi);
}

static void n_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    fi->keep_cache = 1;  /* as the mount's objects */
    fuse_reply_open(req, fi);
}

static const char zeros[1 << 20];

static void n_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino;
    (void)fi;
    long long end = atomic_load(&fsize);
    size_t n = off >= end ? 0 : (size_t)(end - off < (long long)size ? end - off : (long long)size);
    struct iovec iov[8];
    int k = 0;
    for (size_t left = n; left && k < 8; k++) {
        iov[k].iov_base = (void *)zeros;
        iov[k].iov_len = left < sizeof zeros ? left : sizeof zeros;
        left -= iov[k].iov_len;
    }
    fuse_reply_iov(req, iov, k);
}

static void n_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)ino;
    (void)buf;
    (void)fi;
    long long end = (long long)off + (long long)size, cur = atomic_load(&fsize);
    while (end > cur && !atomic_compare_exchange_weak(&fsize, &cur, end)) {
    }
    fuse_reply_write(req, size);
}

static void n_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void n_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
    (void)parent;
    (void)name;
    atomic_store(&exists, 0);
    fuse_reply_err(req, 0);
}

const struct fuse_lowlevel_ops cf_null_ops = {
    .lookup = n_lookup,
    .getattr = n_getattr,
    .setattr = n_setattr,
    .create = n_create,
    .open = n_open,
    .read = n_read,
    .write = n_write,
    .flush = n_ok,
    .release = n_ok,
    .unlink = n_unlink,
};
