/* A FUSE file system whose statfs does not answer while a gate file exists: a disk that
 * hangs, for tests/node/test_hung_disk.py. Its root is an empty directory.
 *
 * usage: hungfs GATE MOUNTPOINT [FUSE options, e.g. -f]
 */
#define FUSE_USE_VERSION 31
#include <errno.h>
#include <fuse.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static const char *gate;

static int hung_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    (void) fi;
    memset(st, 0, sizeof *st);
    if (strcmp(path, "/") != 0)
        return -ENOENT;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    return 0;
}

static int hung_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t offset,
                        struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    (void) offset;
    (void) fi;
    (void) flags;
    if (strcmp(path, "/") != 0)
        return -ENOENT;
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    return 0;
}

static int hung_statfs(const char *path, struct statvfs *st)
{
    (void) path;
    while (access(gate, F_OK) == 0)  /* blocked, as a dead server or a failing drive */
        usleep(20000);
    memset(st, 0, sizeof *st);
    st->f_bsize = st->f_frsize = 4096;
    st->f_blocks = 1 << 18;  /* 1 GiB, half of it free */
    st->f_bfree = st->f_bavail = 1 << 17;
    st->f_namemax = 255;
    return 0;
}

static const struct fuse_operations operations = {
    .getattr = hung_getattr,
    .readdir = hung_readdir,
    .statfs = hung_statfs,
};

int main(int argc, char *argv[])
{
    if (argc < 3)
        return 2;
    gate = argv[1];
    argv[1] = argv[0];
    return fuse_main(argc - 1, argv + 1, &operations, NULL);
}
