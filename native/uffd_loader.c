// SPDX-License-Identifier: Apache-2.0
/*
 * uffd_loader: serve userfaultfd page faults of a restoring process from a memory image.
 *
 * The restoring process registers its memory with a userfaultfd, connects to our Unix socket and
 * sends Firecracker's handshake (a JSON array of regions plus the uffd via SCM_RIGHTS). We then
 * install every page it touches from the image, optionally prefetching a hot list first.
 * docs/uffd.md describes the protocol, the --memfd extension and the error behaviour.
 *
 * Design decisions:
 * - Linux AIO is driven through the raw io_setup/io_submit/io_getevents syscalls instead of
 *   libaio, so the loader needs nothing beyond libc and the kernel headers.
 * - Helpers return 0 or -errno; the first failure stores a one-line reason and unwinds to main,
 *   which prints it, kills the client (a client whose faults nobody serves would hang forever)
 *   and exits 1.
 * - Demand faults always go first: the uffd is polled with a zero timeout between prefetch batches.
 * - The client is gone when its socket connection closes or the kernel reports ESRCH for its mm;
 *   both end the loader with exit status 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
/* cachestat(2), Linux 6.5; the same number on every architecture. */
#ifndef SYS_cachestat
#define SYS_cachestat 451
#endif

#define MAX_REGIONS 64
#define HANDSHAKE_MAX 65536
#define UFFD_MSGS 64
#define MAX_READ (512u << 10)
#define DEFAULT_FAULT_AROUND_KIB 64
#define DEFAULT_QUEUE_DEPTH 64
#define PREFETCH_MIN_ZERO 16
#define HOLE_AROUND 512
#define DEMAND_BIT (1ull << 63)
#define SUBMIT_BATCH 8
#define MAX_PREFETCH_THREADS 64
#define DEFAULT_PREFETCH_THREADS 8

enum page_state { MISSING, INFLIGHT, PRESENT, REMOVED };

/* How prefetch reads: through the page cache when the range is cached, else O_DIRECT (auto);
 * or always one way (--buffered, --direct). */
enum io_mode { IO_AUTO, IO_BUFFERED, IO_DIRECT };

/* The kernel's struct cachestat_range and struct cachestat, under our own names because older
 * headers lack them. */
struct cache_range {
	uint64_t off, len;
};

struct cache_stat {
	uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

struct region {
	uint64_t base, size, offset;
};

enum chunk_state { CHUNK_IDLE, CHUNK_REQUESTED, CHUNK_INSTALLING, CHUNK_DONE };

/* A data extent of the image in chunk mode: where its bytes go, and what we know of it. */
struct chunk {
	uint64_t off, size;
	double demanded_at; /* when a fault first waited for it, 0 if none is waiting */
	uint8_t state;
	bool prefetch, gave_head, gave_tail;
};

/* A page whose bytes come from more than one chunk (or one chunk and zeros past the file end),
 * assembled in buf as the chunks arrive. */
struct split {
	uint64_t page;
	uint32_t need, have;
	uint8_t *buf;
};

/* One file of the image: the files given with --image, one after another, are the image. */
struct image {
	const char *path;
	int fd, aio_fd;
	uint8_t *map; /* the file, read-only: cached ranges are installed from it */
	uint64_t first, npages; /* image pages this file holds */
};

struct slot {
	struct iocb cb;
	uint8_t *buf;
	uint64_t first, npages;
	bool busy;
};

struct stats {
	uint64_t faults, demand_pages, prefetch_pages, prefetch_bytes, direct_bytes, removed_pages;
	_Atomic uint64_t zero_pages;
	uint64_t chunks;
	double prefetch_start, prefetch_end, handshake, first_served, last_install;
	uint64_t *lat_ns;
	size_t nlat, cap_lat;
};

/* A chunk an install thread is to install, with the memfd of its bytes; and its answer. */
struct job {
	size_t index;
	int fd;
};

struct report {
	uint64_t index, count;
	double at;
	int64_t ret;
};

struct worker {
	struct loader *l;
	pthread_t tid;
	bool started;
	aio_context_t aio;
	struct slot *slots;
	unsigned nslots, inflight;
	uint64_t pages, bytes, direct_bytes;
	double start, end;
};

struct loader {
	/* options */
	const char *socket_path, *hot_path, *record_path, *stats_path;
	uint64_t fault_around;
	unsigned queue_depth, nworkers;
	bool memfd_mode;
	enum io_mode io_mode;
	atomic_bool no_cachestat;
	/* image */
	struct image *images;
	size_t nimages;
	uint64_t img_size, npages, ps;
	_Atomic uint8_t *state;
	/* connection */
	int listen_fd, conn_fd, uffd, memfd, errfd;
	bool client_may_hang;
	uint8_t *memfd_map;
	struct region regions[MAX_REGIONS];
	size_t nregions;
	/* prefetch: the rules for what the threads share are above start_workers */
	uint64_t *hot;
	size_t nhot, hot_pos;
	struct worker *workers;
	pthread_mutex_t mu;
	pthread_cond_t progress;
	pthread_rwlock_t events;
	unsigned running;
	int worker_ret;
	atomic_bool stop;
	/* chunk mode: the rules are at its section */
	int feed_fd, layout_fd;
	uint64_t file_size;
	struct chunk *chunks;
	size_t nchunks, *order, norder, order_pos;
	unsigned window, inflight_prefetch;
	struct split *splits;
	size_t nsplits, cap_splits;
	uint8_t *part_buf;
	pthread_t *installers;
	unsigned ninstallers;
	pthread_cond_t jobs;
	struct job *queue;
	size_t qhead, qlen;
	struct report *reports;
	size_t rhead, rlen;
	int reports_fd;
	/* demand */
	uint8_t *fault_buf;
	FILE *record;
	struct stats st;
	char err[256];
};

static int fail(struct loader *l, int err, const char *fmt, ...)
{
	static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	va_list ap;

	pthread_mutex_lock(&lock);
	if (!l->err[0]) {
		va_start(ap, fmt);
		vsnprintf(l->err, sizeof(l->err), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&lock);
	return -err;
}

static uint8_t page_state(const struct loader *l, uint64_t page)
{
	return atomic_load_explicit(&l->state[page], memory_order_relaxed);
}

static void set_state(struct loader *l, uint64_t page, uint8_t s)
{
	atomic_store_explicit(&l->state[page], s, memory_order_relaxed);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- image and hot list ---- */

/* The file holding an image page (binary search: files are few, and in page order). */
static const struct image *image_of_page(const struct loader *l, uint64_t page)
{
	size_t lo = 0, hi = l->nimages;

	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		if (l->images[mid].first <= page)
			lo = mid;
		else
			hi = mid;
	}
	return &l->images[lo];
}

/* Reads pages [page, page + n) of the image, which lie in one of its files. */
static int read_full(struct loader *l, void *buf, uint64_t page, uint64_t n)
{
	const struct image *img = image_of_page(l, page);
	uint64_t done = 0, len = n * l->ps, off = (page - img->first) * l->ps;

	while (done < len) {
		ssize_t got = pread(img->fd, (uint8_t *)buf + done, len - done, off + done);

		if (got < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (got < 0)
			return fail(l, errno, "reading %s at %" PRIu64 ": %s", img->path, off + done, strerror(errno));
		if (got == 0)
			return fail(l, EIO, "image truncated: short read of %s at offset %" PRIu64, img->path, off + done);
		done += got;
	}
	return 0;
}

/* O_DIRECT keeps prefetch from doubling memory through the page cache; tmpfs and some FUSE
 * mounts refuse it at open or at the first read, so probe once and fall back to buffered I/O.
 * The mapping serves cached ranges with one copy (page cache to the client's page) where a
 * buffered read would copy twice (page cache to a staging buffer, then to the client). */
static int open_aio_fd(struct loader *l, struct image *img)
{
	void *probe;
	int fd;

	img->aio_fd = img->fd;
	if (img->npages && !l->memfd_mode && l->io_mode != IO_DIRECT) {
		img->map = mmap(NULL, img->npages * l->ps, PROT_READ, MAP_SHARED, img->fd, 0);
		if (img->map == MAP_FAILED)
			img->map = NULL;
	}
	if (l->io_mode == IO_BUFFERED || img->npages == 0)
		return 0;
	fd = open(img->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (fd < 0)
		return 0;
	probe = mmap(NULL, l->ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (probe == MAP_FAILED) {
		close(fd);
		return fail(l, errno, "mmap: %s", strerror(errno));
	}
	if (pread(fd, probe, l->ps, 0) != (ssize_t)l->ps) {
		close(fd);
		fd = img->fd;
	}
	munmap(probe, l->ps);
	img->aio_fd = fd;
	return 0;
}

/* Two descriptors per image file (buffered and O_DIRECT): a dump of many segment files may
 * need more than the usual soft limit of 1024, so take what the hard limit allows. */
static void raise_fd_limit(void)
{
	struct rlimit rl;

	if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static int open_image(struct loader *l)
{
	raise_fd_limit();
	for (size_t i = 0; i < l->nimages; i++) {
		struct image *img = &l->images[i];
		struct stat sb;
		int ret;

		img->fd = open(img->path, O_RDONLY | O_CLOEXEC);
		if (img->fd < 0)
			return fail(l, errno, "open %s: %s", img->path, strerror(errno));
		if (fstat(img->fd, &sb) < 0)
			return fail(l, errno, "stat %s: %s", img->path, strerror(errno));
		if (sb.st_size % l->ps)
			return fail(l, EINVAL, "image truncated: %s is %" PRIu64 " bytes, not a multiple of the page size %" PRIu64,
				    img->path, (uint64_t)sb.st_size, l->ps);
		img->first = l->npages;
		img->npages = sb.st_size / l->ps;
		l->npages += img->npages;
		if ((ret = open_aio_fd(l, img)))
			return ret;
	}
	l->img_size = l->npages * l->ps;
	l->state = calloc(l->npages ? l->npages : 1, sizeof(*l->state));
	if (!l->state)
		return fail(l, ENOMEM, "out of memory");
	return 0;
}

/* Parses a hot-list line (without its newline) as a whole decimal number: no sign, no
 * white space, nothing after the digits. Returns false on anything else or on overflow. */
static bool parse_page(const char *s, size_t len, uint64_t *page)
{
	*page = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned char)s[i] - '0';

		if (d > 9 || *page > (UINT64_MAX - d) / 10)
			return false;
		*page = *page * 10 + d;
	}
	return len > 0;
}

static int load_hot_list(struct loader *l)
{
	FILE *f = fopen(l->hot_path, "re");
	char *line = NULL;
	size_t lineno = 0, cap = 0, line_cap = 0;
	ssize_t n;
	int ret = 0;

	if (!f)
		return fail(l, errno, "open %s: %s", l->hot_path, strerror(errno));
	while ((n = getline(&line, &line_cap, f)) >= 0) {
		size_t len = n && line[n - 1] == '\n' ? n - 1 : n;
		uint64_t page;

		lineno++;
		if (len == 0)
			continue;
		if (!parse_page(line, len, &page)) {
			ret = fail(l, EINVAL, "hot list line %zu: not a page index", lineno);
			break;
		}
		if (page >= l->npages) {
			ret = fail(l, EINVAL, "hot list line %zu: page %" PRIu64 " is past the image end", lineno, page);
			break;
		}
		if (l->nhot == cap) {
			uint64_t *hot = realloc(l->hot, (cap = cap ? cap * 2 : 4096) * sizeof(*hot));

			if (!hot) {
				ret = fail(l, ENOMEM, "out of memory");
				break;
			}
			l->hot = hot;
		}
		l->hot[l->nhot++] = page;
	}
	if (!ret && ferror(f))
		ret = fail(l, EIO, "reading %s: %s", l->hot_path, strerror(errno));
	free(line);
	fclose(f);
	return ret;
}

/* ---- handshake ---- */

/* Skips white space, then takes `c` if it comes next. */
static bool eat(const char **p, char c)
{
	*p += strspn(*p, " \t\n\r");
	if (**p != c)
		return false;
	(*p)++;
	return true;
}

/*
 * Parses one object of Firecracker's region list. Only unsigned integer values occur in it, so
 * that is all this accepts; unknown keys are ignored so that newer senders keep working. Keys
 * with escapes are refused: none of ours has one, and skipping them right would need a string
 * decoder. Firecracker has sent the page size in bytes under both names; either is accepted.
 */
static int parse_region(struct loader *l, const char **p, struct region *r)
{
	static const char *const keys[] = { "base_host_virt_addr", "size", "offset", "page_size", "page_size_kib" };
	uint64_t val[5];
	bool seen[5] = { false };
	size_t n = l->nregions;

	if (!eat(p, '{'))
		return fail(l, EPROTO, "malformed handshake: expected a JSON object");
	do {
		const char *key, *end;
		size_t klen;
		uint64_t v;

		if (!eat(p, '"'))
			return fail(l, EPROTO, "malformed handshake: expected a key");
		key = *p;
		klen = strcspn(key, "\"\\");
		if (key[klen] != '"')
			return fail(l, EPROTO, "malformed handshake: unterminated key or escape in a key");
		*p = key + klen + 1;
		if (!eat(p, ':'))
			return fail(l, EPROTO, "malformed handshake: expected ':'");
		*p += strspn(*p, " \t\n\r");
		errno = 0;
		v = strtoull(*p, (char **)&end, 10);
		if (**p < '0' || **p > '9' || errno)
			return fail(l, EPROTO, "malformed handshake: value of %.*s is not an unsigned 64-bit integer",
				    (int)klen, key);
		*p = end;
		for (size_t k = 0; k < 5; k++)
			if (strlen(keys[k]) == klen && !memcmp(key, keys[k], klen))
				val[k] = v, seen[k] = true;
	} while (eat(p, ','));
	if (!eat(p, '}'))
		return fail(l, EPROTO, "malformed handshake: expected ',' or '}'");
	if (!seen[0] || !seen[1] || !seen[2] || !(seen[3] || seen[4]))
		return fail(l, EPROTO, "malformed handshake: region %zu lacks base_host_virt_addr, size, offset or page_size", n);
	if (seen[3] && seen[4] && val[3] != val[4])
		return fail(l, EPROTO, "malformed handshake: region %zu: page_size %" PRIu64 " != page_size_kib %" PRIu64,
			    n, val[3], val[4]);
	if (val[seen[3] ? 3 : 4] != l->ps)
		return fail(l, EINVAL, "region %zu: page size %" PRIu64 " not supported (loader serves %" PRIu64 ")",
			    n, val[seen[3] ? 3 : 4], l->ps);
	*r = (struct region){ .base = val[0], .size = val[1], .offset = val[2] };
	return 0;
}

/* Parses the handshake: a non-empty JSON array of region objects and nothing after it. */
static int parse_regions(struct loader *l, const char *p)
{
	int ret;

	if (!eat(&p, '['))
		return fail(l, EPROTO, "malformed handshake: expected a JSON array");
	if (eat(&p, ']'))
		return fail(l, EPROTO, "malformed handshake: no regions");
	do {
		if (l->nregions == MAX_REGIONS)
			return fail(l, EPROTO, "malformed handshake: more than %d regions", MAX_REGIONS);
		if ((ret = parse_region(l, &p, &l->regions[l->nregions])))
			return ret;
		l->nregions++;
	} while (eat(&p, ','));
	if (!eat(&p, ']'))
		return fail(l, EPROTO, "malformed handshake: expected ',' or ']'");
	if (*(p + strspn(p, " \t\n\r")))
		return fail(l, EPROTO, "malformed handshake: trailing data after the array");
	return 0;
}

static int validate_regions(struct loader *l)
{
	for (size_t i = 0; i < l->nregions; i++) {
		const struct region *r = &l->regions[i];

		if (!r->size || (r->base | r->size | r->offset) % l->ps)
			return fail(l, EINVAL, "region %zu: base, size and offset must be non-zero multiples of the page size", i);
		if (r->size > UINT64_MAX - r->base)
			return fail(l, EINVAL, "region %zu: base + size overflows", i);
		if (r->size > UINT64_MAX - r->offset || r->offset + r->size > l->img_size)
			return fail(l, EINVAL, "region %zu: offset %" PRIu64 " + size %" PRIu64 " is outside the image (%" PRIu64 " bytes)",
				    i, r->offset, r->size, l->img_size);
		for (size_t j = 0; j < i; j++) {
			const struct region *o = &l->regions[j];

			if (r->base < o->base + o->size && o->base < r->base + r->size)
				return fail(l, EINVAL, "region %zu overlaps region %zu in memory", i, j);
			if (r->offset < o->offset + o->size && o->offset < r->offset + r->size)
				return fail(l, EINVAL, "region %zu overlaps region %zu in the image", i, j);
		}
	}
	return 0;
}

static int send_memfd(struct loader *l)
{
	char msg[64], cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { msg, 0 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

	iov.iov_len = snprintf(msg, sizeof(msg), "{\"memfd_size\": %" PRIu64 "}", l->img_size);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &l->memfd, sizeof(int));
	if (sendmsg(l->conn_fd, &mh, MSG_NOSIGNAL) != (ssize_t)iov.iov_len)
		return fail(l, errno, "sending the memfd: %s", strerror(errno));
	return 0;
}

static bool is_userfaultfd(int fd)
{
	char path[64], target[32];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return false;
	target[n] = '\0';
	return !strcmp(target, "anon_inode:[userfaultfd]");
}

static int receive_handshake(struct loader *l)
{
	char *buf = malloc(HANDSHAKE_MAX + 1);
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov = { buf, HANDSHAKE_MAX };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	int nfds = 0, ret, err;
	ssize_t n;

	if (!buf)
		return fail(l, ENOMEM, "out of memory");
	do
		n = recvmsg(l->conn_fd, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	err = errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); n >= 0 && c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++, nfds++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (nfds == 0)
				l->uffd = fd;
			else
				close(fd);
		}
	}
	/* Only a client that handed over a uffd can have memory waiting on us (see kill_client). */
	l->client_may_hang = l->uffd >= 0 && is_userfaultfd(l->uffd);
	if (n < 0)
		ret = fail(l, err, "receiving the handshake: %s", strerror(err));
	else if (n == 0)
		ret = fail(l, EPROTO, "malformed handshake: client closed the connection without one");
	else if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC) || n == HANDSHAKE_MAX)
		ret = fail(l, EPROTO, "malformed handshake: message too large");
	else if (nfds != 1)
		ret = fail(l, EPROTO, "malformed handshake: expected exactly one file descriptor, got %d", nfds);
	else if (!l->client_may_hang)
		ret = fail(l, EPROTO, "malformed handshake: the file descriptor is not a userfaultfd");
	else if (memchr(buf, '\0', n))
		ret = fail(l, EPROTO, "malformed handshake: a NUL byte in the region list");
	else {
		buf[n] = '\0';
		ret = parse_regions(l, buf);
	}
	free(buf);
	if (!ret)
		ret = validate_regions(l);
	/* poll() on a blocking uffd always reports POLLERR, so switch the shared description. */
	if (!ret && fcntl(l->uffd, F_SETFL, fcntl(l->uffd, F_GETFL) | O_NONBLOCK) < 0)
		ret = fail(l, errno, "uffd: %s", strerror(errno));
	return ret;
}

static int accept_client(struct loader *l)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	if (strlen(l->socket_path) >= sizeof(sa.sun_path))
		return fail(l, ENAMETOOLONG, "socket path too long: %s", l->socket_path);
	strcpy(sa.sun_path, l->socket_path);
	l->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l->listen_fd < 0)
		return fail(l, errno, "socket: %s", strerror(errno));
	unlink(l->socket_path);
	if (bind(l->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(l->listen_fd, 1) < 0)
		return fail(l, errno, "listen on %s: %s", l->socket_path, strerror(errno));
	/* In chunk mode the feeder may fail before a client comes: its socket closing ends the wait. */
	for (;;) {
		struct pollfd pfd[2] = { { l->listen_fd, POLLIN, 0 }, { l->feed_fd, POLLIN, 0 } };

		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			return fail(l, errno, "poll: %s", strerror(errno));
		if (pfd[1].revents & (POLLIN | POLLHUP | POLLERR))
			return fail(l, EPIPE, "the chunk feeder went away before a client connected");
		if (!(pfd[0].revents & POLLIN))
			continue;
		l->conn_fd = accept4(l->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (l->conn_fd >= 0 || (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED))
			break;
	}
	if (l->conn_fd < 0)
		return fail(l, errno, "accept: %s", strerror(errno));
	/* One client per loader: stop accepting so later connects fail fast instead of hanging. */
	close(l->listen_fd);
	l->listen_fd = -1;
	unlink(l->socket_path);
	return l->memfd_mode ? send_memfd(l) : 0;
}

/*
 * Kills a client that could hang: one that handed over a userfaultfd, and so may have memory
 * registered that nobody will serve. A peer that sent none (a liveness probe that connected and
 * closed, a client that got the protocol wrong) has nothing waiting on us and is left alone.
 * A pidfd cannot hit a recycled pid; SO_PEERCRED is the fallback for kernels before 6.5.
 */
static void kill_client(struct loader *l)
{
	struct ucred cred;
	socklen_t len = sizeof(int);
	int pidfd;

	if (l->conn_fd < 0 || !l->client_may_hang)
		return;
	if (!getsockopt(l->conn_fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len)) {
		syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
		close(pidfd);
		return;
	}
	len = sizeof(cred);
	if (!getsockopt(l->conn_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) && cred.pid > 0)
		kill(cred.pid, SIGKILL);
}

/* ---- page installation ---- */

static const struct region *region_of_addr(const struct loader *l, uint64_t addr)
{
	for (size_t i = 0; i < l->nregions; i++)
		if (addr - l->regions[i].base < l->regions[i].size)
			return &l->regions[i];
	return NULL;
}

static const struct region *region_of_page(const struct loader *l, uint64_t page)
{
	uint64_t off = page * l->ps;

	for (size_t i = 0; i < l->nregions; i++)
		if (off - l->regions[i].offset < l->regions[i].size)
			return &l->regions[i];
	return NULL;
}

static uint64_t page_addr(const struct loader *l, const struct region *r, uint64_t page)
{
	return r->base + page * l->ps - r->offset;
}

static bool is_zero(const uint8_t *p, uint64_t len)
{
	return p[0] == 0 && !memcmp(p, p + 1, len - 1);
}

/*
 * One UFFDIO_COPY/ZEROPAGE/CONTINUE over [dst, dst+len). EEXIST means the page is already there
 * (a racing fault or an earlier install) and is skipped; EAGAIN means a non-cooperative event is
 * pending and the kernel refuses until we read it, and ENOENT that the range is no longer
 * mapped, so in both cases we stop and report how far we got: the caller wakes the faulting
 * thread, which faults again after the event has been handled.
 */
static int install(struct loader *l, unsigned long req, uint64_t dst, const uint8_t *src, uint64_t len,
		   bool dontwake, uint64_t *done)
{
	/* COPY, ZEROPAGE and CONTINUE spell DONTWAKE with the same bit. */
	uint64_t mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0;

	*done = 0;
	while (*done < len) {
		int64_t progress;
		int r, err;

		if (req == UFFDIO_COPY) {
			struct uffdio_copy a = { dst + *done, (uintptr_t)(src + *done), len - *done, mode, 0 };

			r = ioctl(l->uffd, req, &a);
			progress = a.copy;
		} else if (req == UFFDIO_ZEROPAGE) {
			struct uffdio_zeropage a = { { dst + *done, len - *done }, mode, 0 };

			r = ioctl(l->uffd, req, &a);
			progress = a.zeropage;
		} else {
			struct uffdio_continue a = { { dst + *done, len - *done }, mode, 0 };

			r = ioctl(l->uffd, req, &a);
			progress = a.mapped;
		}
		/* Read before anything else can make a system call and overwrite it (the wake below). */
		err = errno;
		if (!r) {
			*done = len;
			break;
		}
		if (progress > 0)
			*done += progress;
		/* The kernel wakes nothing when the ioctl fails, so a skipped page needs its own wake. */
		if (err == EEXIST && !dontwake) {
			struct uffdio_range w = { dst + *done, l->ps };

			ioctl(l->uffd, UFFDIO_WAKE, &w);
		}
		if (err == EEXIST)
			*done += l->ps;
		else if (err == EAGAIN && progress > 0)
			continue;
		else if (err == EAGAIN || err == ENOENT)
			/* ENOENT: the client unmapped the range (its UNMAP event may not be read yet).
			 * Like EAGAIN, not ours to fail on: the pages stay missing until it is. */
			return -EAGAIN;
		else if (err == ESRCH)
			return -ESRCH;
		else if (err != EINTR)
			return fail(l, err, "installing pages at 0x%" PRIx64 ": %s", dst + *done, strerror(err));
	}
	return 0;
}

static int wake(struct loader *l, uint64_t addr, uint64_t len)
{
	struct uffdio_range r = { addr, len };

	if (ioctl(l->uffd, UFFDIO_WAKE, &r) < 0 && errno != ESRCH)
		return fail(l, errno, "UFFDIO_WAKE: %s", strerror(errno));
	return 0;
}

static int install_span(struct loader *l, const struct region *r, uint64_t first, uint64_t n,
			const uint8_t *buf, unsigned long req, bool dontwake)
{
	uint64_t done;
	int ret = install(l, req, page_addr(l, r, first), buf, n * l->ps, dontwake, &done);

	for (uint64_t k = 0; k < done / l->ps; k++)
		set_state(l, first + k, PRESENT);
	if (req == UFFDIO_ZEROPAGE)
		l->st.zero_pages += done / l->ps;
	return ret;
}

static uint64_t zero_pages_at(const struct loader *l, const uint8_t *buf, uint64_t i, uint64_t n)
{
	uint64_t j = i;

	while (j < n && is_zero(buf + j * l->ps, l->ps))
		j++;
	return j - i;
}

/*
 * Installs pages [first, first+n) of region r whose content sits at buf: CONTINUE for the
 * memfd, otherwise COPY, with ZEROPAGE for zero runs so holes cost no memory. A prefetch batch
 * installs without waking (its caller wakes the whole read once) and copies zero runs shorter
 * than PREFETCH_MIN_ZERO: splitting a batch into many small ioctls cost a third of the install
 * rate in measurements. A demand install wakes the faulting thread and zero-fills every zero page.
 */
static int install_run(struct loader *l, const struct region *r, uint64_t first, uint64_t n,
		       const uint8_t *buf, bool prefetch)
{
	uint64_t min_zero = prefetch ? PREFETCH_MIN_ZERO : 1, i = 0;
	int ret;

	if (l->memfd_mode)
		return install_span(l, r, first, n, buf, UFFDIO_CONTINUE, prefetch);
	while (i < n) {
		uint64_t j = i, z = 0;

		while (j < n && (z = zero_pages_at(l, buf, j, n)) < min_zero)
			j = j + z + 1 < n ? j + z + 1 : n;
		if (j > i && (ret = install_span(l, r, first + i, j - i, buf + i * l->ps, UFFDIO_COPY, prefetch)))
			return ret;
		if (j == n)
			break;
		if ((ret = install_span(l, r, first + j, z, buf + j * l->ps, UFFDIO_ZEROPAGE, prefetch)))
			return ret;
		i = j + z;
	}
	return 0;
}

/* ---- prefetch ---- */

/*
 * Prefetch runs in worker threads, each with its own AIO context and slots, so the copies into
 * the client's memory (the limit of a single thread: about 2 GB/s from the page cache) run in
 * parallel while the main thread serves demand faults. Shared state and its rules:
 * - l->mu guards the hot-list cursor, running and worker_ret; progress is signalled on it
 *   whenever a worker finishes a read, so the main thread can wait for an INFLIGHT page.
 * - Page states are atomics. Only a worker turns MISSING into INFLIGHT (under l->mu) and an
 *   INFLIGHT page back into PRESENT or MISSING; the main thread may install any page itself
 *   (the loser of a race gets EEXIST, which is benign) and marks REMOVED.
 * - A worker installs under the read side of l->events; the main thread holds the write side
 *   from before it reads the uffd until it has marked the removed ranges it read (serve_faults),
 *   so no worker copies stale image bytes over a page the client discarded.
 * - A worker that stops leaves no INFLIGHT page behind (it drains its reads first).
 */
static int worker_setup(struct worker *w)
{
	struct loader *l = w->l;

	if (syscall(SYS_io_setup, w->nslots, &w->aio) < 0)
		return fail(l, errno, "io_setup: %s", strerror(errno));
	w->slots = calloc(w->nslots, sizeof(*w->slots));
	if (!w->slots)
		return fail(l, ENOMEM, "out of memory");
	if (l->memfd_mode)
		return 0;
	for (unsigned i = 0; i < w->nslots; i++) {
		void *buf = mmap(NULL, MAX_READ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (buf == MAP_FAILED)
			return fail(l, errno, "mmap: %s", strerror(errno));
		w->slots[i].buf = buf;
	}
	return 0;
}

/* The end (exclusive) of the pages that one read starting at `page` of region r may cover:
 * the region's end or its file's, whichever comes first. */
static uint64_t read_end(const struct loader *l, const struct region *r, uint64_t page)
{
	const struct image *img = image_of_page(l, page);
	uint64_t region_end = (r->offset + r->size) / l->ps, file_end = img->first + img->npages;

	return region_end < file_end ? region_end : file_end;
}

/* Takes the next run of consecutive, still-missing hot pages (hot-list order, one region, one
 * file). Called with l->mu held. */
static bool next_run(struct loader *l, uint64_t *first, uint64_t *n)
{
	while (l->hot_pos < l->nhot) {
		uint64_t p = l->hot[l->hot_pos++];
		const struct region *r = region_of_page(l, p);
		uint64_t end;

		if (!r || page_state(l, p) != MISSING)
			continue;
		end = read_end(l, r, p);
		*first = p;
		*n = 1;
		set_state(l, p, INFLIGHT);
		while (l->hot_pos < l->nhot && *n < MAX_READ / l->ps) {
			uint64_t q = l->hot[l->hot_pos];

			if (q != p + *n || q >= end || page_state(l, q) != MISSING)
				break;
			set_state(l, q, INFLIGHT);
			(*n)++;
			l->hot_pos++;
		}
		return true;
	}
	return false;
}

/*
 * The descriptor a prefetch read of pages [first, first+n) goes through. A range wholly in the
 * page cache (dirty pages included: an image just written or pulled) is read from it, which is a
 * copy; O_DIRECT would go to the disk instead, and first write back the dirty pages. A range not
 * wholly cached is read with O_DIRECT, so prefetch does not double the memory through the page
 * cache. Where cachestat(2) is missing (before Linux 6.5) every read is O_DIRECT, as before it.
 */
static int prefetch_fd(struct loader *l, const struct image *img, uint64_t first, uint64_t n)
{
	struct cache_range range = { (first - img->first) * l->ps, n * l->ps };
	struct cache_stat cs;

	if (l->io_mode != IO_AUTO || img->aio_fd == img->fd || atomic_load(&l->no_cachestat))
		return img->aio_fd;
	if (syscall(SYS_cachestat, img->fd, &range, &cs, 0) < 0) {
		if (errno == ENOSYS)
			atomic_store(&l->no_cachestat, true);
		return img->aio_fd;
	}
	return cs.nr_cache >= n ? img->fd : img->aio_fd;
}

static void settle(struct loader *l, uint64_t first, uint64_t n);
static int install_read(struct worker *w, struct slot *s, long res);

/* Installs a cached run straight from the image's mapping, without a read. */
static int install_mapped(struct worker *w, const struct image *img, uint64_t first, uint64_t n)
{
	struct loader *l = w->l;
	struct slot s = { .first = first, .npages = n, .buf = img->map + (first - img->first) * l->ps };
	int ret;

	s.cb.aio_fildes = img->fd;
	ret = install_read(w, &s, n * l->ps);
	settle(l, first, n);
	pthread_mutex_lock(&l->mu);
	pthread_cond_broadcast(&l->progress);
	pthread_mutex_unlock(&l->mu);
	return ret;
}

/* Takes up to SUBMIT_BATCH runs of the hot list: a cached run that the image's mapping holds is
 * installed at once, any other fills a free slot, and those reads are submitted together
 * (buffered reads are copied inside io_submit, and long submits delay the first completions).
 * *more tells whether any run was left to take. */
static int submit_prefetch(struct worker *w, bool *more)
{
	struct loader *l = w->l;
	struct iocb *cbs[SUBMIT_BATCH];
	unsigned nr = 0, taken = 0;
	int ret = 0;

	*more = false;
	pthread_mutex_lock(&l->mu);
	for (unsigned i = 0; i < w->nslots && taken < SUBMIT_BATCH && !ret;) {
		struct slot *s = &w->slots[i];
		const struct image *img;
		uint64_t first, n;
		int fd;

		if (s->busy) {
			i++;
			continue;
		}
		if (!next_run(l, &first, &n))
			break;
		*more = true;
		taken++;
		if (w->start == 0)
			w->start = now();
		img = image_of_page(l, first);
		fd = prefetch_fd(l, img, first, n);
		if (fd == img->fd && img->map) {
			pthread_mutex_unlock(&l->mu);
			ret = install_mapped(w, img, first, n);
			pthread_mutex_lock(&l->mu);
			continue;
		}
		s->first = first;
		s->npages = n;
		s->busy = true;
		memset(&s->cb, 0, sizeof(s->cb));
		s->cb.aio_data = i++;
		s->cb.aio_lio_opcode = IOCB_CMD_PREAD;
		s->cb.aio_fildes = fd;
		s->cb.aio_buf = (uintptr_t)(l->memfd_mode ? l->memfd_map + first * l->ps : s->buf);
		s->cb.aio_nbytes = n * l->ps;
		s->cb.aio_offset = (first - img->first) * l->ps;
		cbs[nr++] = &s->cb;
	}
	pthread_mutex_unlock(&l->mu);
	for (unsigned done = 0; done < nr;) {
		long r = syscall(SYS_io_submit, w->aio, nr - done, cbs + done);

		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (r < 0) {
			/* Reads not submitted never complete: settle their pages here. */
			for (unsigned k = done; k < nr; k++) {
				struct slot *s = &w->slots[cbs[k]->aio_data];

				settle(l, s->first, s->npages);
				s->busy = false;
			}
			w->inflight += done;
			return fail(l, errno, "io_submit: %s", strerror(errno));
		}
		done += r;
	}
	w->inflight += nr;
	return ret;
}

/* Installs the INFLIGHT pages of one finished read as a prefetch batch (pages a demand fault
 * installed meanwhile are PRESENT and skipped), then wakes the read's range once. */
static int install_read(struct worker *w, struct slot *s, long res)
{
	struct loader *l = w->l;
	const struct region *r = region_of_page(l, s->first);
	const uint8_t *buf = l->memfd_mode ? l->memfd_map + s->first * l->ps : s->buf;
	int ret = 0;

	if (res < 0)
		return fail(l, -res, "prefetch read at %" PRIu64 ": %s", s->first * l->ps, strerror(-res));
	if ((uint64_t)res != s->npages * l->ps)
		return fail(l, EIO, "image truncated: short prefetch read at offset %" PRIu64, s->first * l->ps);
	pthread_rwlock_rdlock(&l->events);
	for (uint64_t i = 0; i < s->npages && !ret;) {
		uint64_t j = i;

		while (j < s->npages && page_state(l, s->first + j) == INFLIGHT)
			j++;
		if (j > i) {
			ret = install_run(l, r, s->first + i, j - i, buf + i * l->ps, true);
			w->pages += j - i;
		}
		i = j + (j == i);
	}
	pthread_rwlock_unlock(&l->events);
	w->bytes += s->npages * l->ps;
	if (s->cb.aio_fildes != (uint32_t)image_of_page(l, s->first)->fd)
		w->direct_bytes += s->npages * l->ps;
	w->end = now();
	if (ret && ret != -EAGAIN)
		return ret;
	return wake(l, page_addr(l, r, s->first), s->npages * l->ps);
}

/* Pages of a finished run still INFLIGHT (not installed) go back to MISSING. */
static void settle(struct loader *l, uint64_t first, uint64_t n)
{
	for (uint64_t k = 0; k < n; k++)
		if (page_state(l, first + k) == INFLIGHT)
			set_state(l, first + k, MISSING);
}

/* Reaps at least min_nr finished reads; installs them unless the worker is stopping. Every
 * reaped page that is still INFLIGHT goes back to MISSING, and waiters hear of it. */
static int reap(struct worker *w, long min_nr, bool install)
{
	struct loader *l = w->l;
	struct io_event evs[64];
	long n;
	int ret = 0;

	do
		n = syscall(SYS_io_getevents, w->aio, min_nr, 64, evs, NULL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return fail(l, errno, "io_getevents: %s", strerror(errno));
	for (long i = 0; i < n; i++) {
		struct slot *s = &w->slots[evs[i].data];

		if (install && !ret)
			ret = install_read(w, s, evs[i].res);
		settle(l, s->first, s->npages);
		s->busy = false;
		w->inflight--;
	}
	pthread_mutex_lock(&l->mu);
	pthread_cond_broadcast(&l->progress);
	pthread_mutex_unlock(&l->mu);
	return ret;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct loader *l = w->l;
	int ret = worker_setup(w);

	while (!ret && !atomic_load(&l->stop)) {
		bool more;

		if ((ret = submit_prefetch(w, &more)))
			break;
		if (w->inflight)
			ret = reap(w, 1, true);
		else if (!more)
			break;
	}
	while (w->inflight && !reap(w, w->inflight, false))
		;
	pthread_mutex_lock(&l->mu);
	if (ret && ret != -ESRCH && !l->worker_ret)
		l->worker_ret = ret;
	l->running--;
	pthread_cond_broadcast(&l->progress);
	pthread_mutex_unlock(&l->mu);
	if (ret && ret != -ESRCH)
		eventfd_write(l->errfd, 1);
	return NULL;
}

static int start_workers(struct loader *l)
{
	unsigned n = l->nworkers;

	l->errfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->errfd < 0)
		return fail(l, errno, "eventfd: %s", strerror(errno));
	l->workers = calloc(n, sizeof(*l->workers));
	if (!l->workers)
		return fail(l, ENOMEM, "out of memory");
	for (unsigned i = 0; i < n; i++) {
		struct worker *w = &l->workers[i];
		int err;

		w->l = l;
		w->nslots = (l->queue_depth + n - 1 - i) / n;
		if (!w->nslots)
			continue;
		pthread_mutex_lock(&l->mu);
		l->running++;
		pthread_mutex_unlock(&l->mu);
		if ((err = pthread_create(&w->tid, NULL, worker_main, w))) {
			pthread_mutex_lock(&l->mu);
			l->running--;
			pthread_mutex_unlock(&l->mu);
			return fail(l, err, "starting a prefetch thread: %s", strerror(err));
		}
		w->started = true;
	}
	return 0;
}

/* Stops the workers (they finish or drain the reads in flight), then adds up their figures. */
static void stop_workers(struct loader *l)
{
	atomic_store(&l->stop, true);
	for (unsigned i = 0; l->workers && i < l->nworkers; i++) {
		struct worker *w = &l->workers[i];

		if (w->started)
			pthread_join(w->tid, NULL);
		if (w->start && (!l->st.prefetch_start || w->start < l->st.prefetch_start))
			l->st.prefetch_start = w->start;
		if (w->end > l->st.prefetch_end)
			l->st.prefetch_end = w->end;
		l->st.prefetch_pages += w->pages;
		l->st.prefetch_bytes += w->bytes;
		l->st.direct_bytes += w->direct_bytes;
	}
}

/* The main thread waits for a page a worker is reading rather than reading it twice: for the
 * memfd the read's target is the very page the client would see. */
static int wait_inflight(struct loader *l, uint64_t page)
{
	int ret = 0;

	pthread_mutex_lock(&l->mu);
	while (page_state(l, page) == INFLIGHT && l->running && !l->worker_ret)
		pthread_cond_wait(&l->progress, &l->mu);
	ret = l->worker_ret;
	pthread_mutex_unlock(&l->mu);
	return ret;
}

/* ---- demand faults ---- */

static int record_latency(struct loader *l, double start)
{
	if (l->st.nlat == l->st.cap_lat) {
		size_t cap = l->st.cap_lat ? l->st.cap_lat * 2 : 65536;
		uint64_t *lat = realloc(l->st.lat_ns, cap * sizeof(*lat));

		if (!lat)
			return fail(l, ENOMEM, "out of memory");
		l->st.lat_ns = lat;
		l->st.cap_lat = cap;
	}
	if (!l->st.first_served)
		l->st.first_served = now();
	l->st.lat_ns[l->st.nlat++] = (uint64_t)((now() - start) * 1e9);
	return 0;
}

static int zero_fill(struct loader *l, const struct region *r, uint64_t page)
{
	uint64_t addr = page_addr(l, r, page), done;
	unsigned char resident = 0;
	int ret;

	/* A removed memfd page was either only unmapped (MADV_DONTNEED: content kept in the page
	 * cache, map it again) or punched out (MADV_REMOVE: it reads as zeros now). */
	if (l->memfd_mode && !mincore(l->memfd_map + page * l->ps, l->ps, &resident) && (resident & 1))
		ret = install(l, UFFDIO_CONTINUE, addr, NULL, l->ps, false, &done);
	else
		ret = install(l, UFFDIO_ZEROPAGE, addr, NULL, l->ps, false, &done);
	return ret;
}

/*
 * Reads the faulting page, plus the missing pages after it up to the fault-around size on a first
 * touch, and installs the faulting page alone first: the client resumes while the rest goes in.
 * A fault on a PRESENT page raced its install; copying it again gets EEXIST, which wakes.
 * Only these reads count in the latency statistics.
 */
static int demand_read(struct loader *l, const struct region *r, uint64_t page, double start)
{
	uint64_t n = 1, end = read_end(l, r, page);
	uint8_t *buf = l->memfd_mode ? l->memfd_map + page * l->ps : l->fault_buf;
	int ret;

	while (page_state(l, page) == MISSING && n < l->fault_around / l->ps && page + n < end &&
	       page_state(l, page + n) == MISSING)
		n++;
	if ((ret = read_full(l, buf, page, n)))
		return ret;
	l->st.demand_pages += n;
	if ((ret = install_run(l, r, page, 1, buf, false)) || (ret = record_latency(l, start)) || n == 1)
		return ret;
	ret = install_run(l, r, page + 1, n - 1, buf + l->ps, false);
	return ret == -EAGAIN ? 0 : ret;
}

/* ---- pages from the store's chunks (--chunks) ----
 *
 * The image is a file of a snapshot: data extents (chunks) and holes. A feeder process (uffd-serve)
 * owns the store; we send it a chunk's index and it answers with a sealed memfd of the chunk's
 * verified bytes, which we map read-only and install from: the bytes never pass through a
 * buffer of ours except for pages that straddle a chunk cut. docs/uffd.md has the protocol.
 *
 * The main thread owns the chunk and split-page tables and installs what a fault waits for.
 * Install threads (--prefetch-threads) install the whole pages of the other chunks, so that
 * the copies into the client (one thread tops out at about 2 GB/s) run in parallel. They share:
 * - the queue of jobs (l->mu, l->jobs): a chunk's index and memfd; the main thread gives the
 *   chunk's parts of split pages first and marks it CHUNK_INSTALLING, so no one else touches
 *   its pages until the thread's report is read;
 * - the reports (l->mu, and l->reports_fd, an eventfd, to wake the main thread's poll): the
 *   pages installed, or the error, per job; the main thread settles the chunk when it takes
 *   the report (state, figures, prefetch window). A chunk counts in the prefetch window from
 *   its request to its report, so the queue and the reports never hold more than the window;
 * - page states (atomics) and l->events, as the file-mode prefetch threads do (above
 *   start_workers): a thread installs under the read side, so it never copies over a page
 *   the client discarded after the thread looked at its state.
 * A fault on a page of a chunk being installed waits for the thread's wake; if that install
 * met an event and left the page missing, reading the report wakes the chunk again and the
 * fault comes back to a settled chunk.
 */

/* Layout memfd, little-endian u64s: file size, chunk count, (offset, size) per chunk in file
 * order, prefetch count, chunk indices in prefetch order. */
static int read_u64s(struct loader *l, const uint64_t *words, size_t nwords, size_t *pos, uint64_t *v)
{
	if (*pos >= nwords)
		return fail(l, EPROTO, "chunk layout truncated");
	*v = words[(*pos)++];
	return 0;
}

/* Counts page p as split (its bytes come from more than one chunk, or from one chunk and the
 * zeros past the file end) and adds a chunk that overlaps it. Chunks come in file order, so the
 * split pages do too. */
static int add_split(struct loader *l, uint64_t p)
{
	if (l->nsplits && l->splits[l->nsplits - 1].page == p) {
		l->splits[l->nsplits - 1].need++;
		return 0;
	}
	if (l->nsplits == l->cap_splits) {
		size_t cap = l->cap_splits ? l->cap_splits * 2 : 1024;
		struct split *s = realloc(l->splits, cap * sizeof(*s));

		if (!s)
			return fail(l, ENOMEM, "out of memory");
		l->splits = s;
		l->cap_splits = cap;
	}
	l->splits[l->nsplits++] = (struct split){ .page = p, .need = 1 };
	return 0;
}

static bool whole_in(const struct loader *l, const struct chunk *c, uint64_t p)
{
	return c->off <= p * l->ps && (p + 1) * l->ps <= c->off + c->size;
}

static int load_layout(struct loader *l)
{
	struct stat sb;
	uint64_t *words, n = 0, end = 0;
	size_t nwords, pos = 0;
	int ret = 0;

	if (fstat(l->layout_fd, &sb) < 0)
		return fail(l, errno, "chunk layout: %s", strerror(errno));
	nwords = sb.st_size / 8;
	words = malloc(nwords ? nwords * 8 : 1);
	if (!words)
		return fail(l, ENOMEM, "out of memory");
	if (pread(l->layout_fd, words, nwords * 8, 0) != (ssize_t)(nwords * 8))
		ret = fail(l, EIO, "chunk layout: short read");
	if (!ret && !(ret = read_u64s(l, words, nwords, &pos, &l->file_size)))
		ret = read_u64s(l, words, nwords, &pos, &n);
	if (!ret && n > nwords / 2)
		ret = fail(l, EPROTO, "chunk layout truncated");
	if (!ret && !(l->chunks = calloc(n ? n : 1, sizeof(*l->chunks))))
		ret = fail(l, ENOMEM, "out of memory");
	for (uint64_t i = 0; !ret && i < n; i++) {
		struct chunk *c = &l->chunks[i];

		if ((ret = read_u64s(l, words, nwords, &pos, &c->off)) || (ret = read_u64s(l, words, nwords, &pos, &c->size)))
			break;
		if (c->off < end || !c->size || c->size > l->file_size - c->off || c->off > l->file_size)
			ret = fail(l, EPROTO, "chunk layout: chunk %" PRIu64 " overlaps another or the file end", i);
		end = c->off + c->size;
		l->nchunks++;
	}
	if (!ret)
		ret = read_u64s(l, words, nwords, &pos, &n);
	if (!ret && n > nwords - pos)
		ret = fail(l, EPROTO, "chunk layout truncated");
	if (!ret && !(l->order = calloc(n ? n : 1, sizeof(*l->order))))
		ret = fail(l, ENOMEM, "out of memory");
	for (uint64_t i = 0; !ret && i < n; i++) {
		l->order[l->norder] = words[pos++];
		if (l->order[l->norder++] >= l->nchunks)
			ret = fail(l, EPROTO, "chunk layout: prefetch entry %" PRIu64 " names no chunk", i);
	}
	free(words);
	for (size_t i = 0; !ret && i < l->nchunks; i++) {
		struct chunk *c = &l->chunks[i];
		uint64_t head = c->off / l->ps, tail = (c->off + c->size - 1) / l->ps;

		if (!whole_in(l, c, head))
			ret = add_split(l, head);
		if (!ret && tail != head && !whole_in(l, c, tail))
			ret = add_split(l, tail);
	}
	if (ret)
		return ret;
	l->npages = (l->file_size + l->ps - 1) / l->ps;
	l->img_size = l->npages * l->ps;
	l->state = calloc(l->npages ? l->npages : 1, sizeof(*l->state));
	if (!l->state)
		return fail(l, ENOMEM, "out of memory");
	return 0;
}

static struct split *split_of(struct loader *l, uint64_t page)
{
	size_t lo = 0, hi = l->nsplits;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (l->splits[mid].page < page)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < l->nsplits && l->splits[lo].page == page ? &l->splits[lo] : NULL;
}

/* The first chunk that ends after byte `off` (nchunks if none). */
static size_t chunk_after(const struct loader *l, uint64_t off)
{
	size_t lo = 0, hi = l->nchunks;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (l->chunks[mid].off + l->chunks[mid].size <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int request_chunk(struct loader *l, size_t i, bool prefetch)
{
	uint64_t msg = i | (prefetch ? 0 : DEMAND_BIT);

	if (send(l->feed_fd, &msg, sizeof(msg), MSG_NOSIGNAL) != sizeof(msg))
		return fail(l, errno, "asking the chunk feeder for chunk %zu: %s", i, strerror(errno));
	l->chunks[i].state = CHUNK_REQUESTED;
	l->chunks[i].prefetch = prefetch;
	l->inflight_prefetch += prefetch;
	return 0;
}

/* Whether any byte of the chunk lies in a region the client registered. */
static bool chunk_wanted(const struct loader *l, const struct chunk *c)
{
	for (size_t i = 0; i < l->nregions; i++)
		if (c->off < l->regions[i].offset + l->regions[i].size && l->regions[i].offset < c->off + c->size)
			return true;
	return false;
}

/* Keeps `window` prefetch requests in flight, in prefetch order. */
static int top_up_prefetch(struct loader *l)
{
	int ret;

	while (l->inflight_prefetch < l->window && l->order_pos < l->norder) {
		size_t i = l->order[l->order_pos++];

		if (l->chunks[i].state == CHUNK_IDLE && chunk_wanted(l, &l->chunks[i]) && (ret = request_chunk(l, i, true)))
			return ret;
	}
	if (!l->inflight_prefetch && l->st.prefetch_start && !l->st.prefetch_end)
		l->st.prefetch_end = now();
	return 0;
}

/* Installs the MISSING pages of [first, first+n), whose bytes are at src, region by region. An
 * -EAGAIN (event pending, range unmapped) leaves the rest MISSING: a fault there asks again. */
static int install_pages(struct loader *l, uint64_t first, uint64_t n, const uint8_t *src, uint64_t *count)
{
	for (uint64_t i = 0; i < n;) {
		const struct region *r = region_of_page(l, first + i);
		uint64_t j = i + 1, end;
		int ret;

		if (!r || page_state(l, first + i) != MISSING) {
			i++;
			continue;
		}
		end = (r->offset + r->size) / l->ps - first;
		while (j < n && j < end && page_state(l, first + j) == MISSING)
			j++;
		if ((ret = install_run(l, r, first + i, j - i, src + i * l->ps, true)))
			return ret;
		*count += j - i;
		i = j;
	}
	return 0;
}

/* Wakes whoever faulted in [first, first+n), region by region. */
static int wake_pages(struct loader *l, uint64_t first, uint64_t n)
{
	for (size_t i = 0; i < l->nregions; i++) {
		const struct region *r = &l->regions[i];
		uint64_t lo = r->offset / l->ps, hi = (r->offset + r->size) / l->ps;
		int ret;

		lo = lo > first ? lo : first;
		hi = hi < first + n ? hi : first + n;
		if (lo < hi && (ret = wake(l, page_addr(l, r, lo), (hi - lo) * l->ps)))
			return ret;
	}
	return 0;
}

static int install_split(struct loader *l, struct split *s, uint64_t *count)
{
	int ret = install_pages(l, s->page, 1, s->buf, count);

	if (!ret && page_state(l, s->page) != MISSING) {
		free(s->buf);
		s->buf = NULL;
	}
	return ret;
}

/* Adds chunk c's bytes of split page p, [lo, hi) of the image at `part`; installs the page once
 * every chunk of it gave its part. The buffer stays until the page is in, so asking for a chunk
 * again never counts it twice. */
static int give_split(struct loader *l, struct chunk *c, const uint8_t *part, uint64_t p, uint64_t lo, uint64_t hi,
		      uint64_t *count)
{
	struct split *s = split_of(l, p);

	if (!s->buf && !(s->buf = calloc(1, l->ps)))
		return fail(l, ENOMEM, "out of memory");
	memcpy(s->buf + (lo - p * l->ps), part, hi - lo);
	if (!(lo == c->off ? c->gave_head : c->gave_tail)) {
		*(lo == c->off ? &c->gave_head : &c->gave_tail) = true;
		s->have++;
	}
	return s->have == s->need ? install_split(l, s, count) : 0;
}

/* Gives chunk c's parts of the split pages at its ends, from its mapping or, without one, read
 * from its memfd. A part whose install met an event (-EAGAIN) is given all the same. */
static int give_splits(struct loader *l, struct chunk *c, const uint8_t *map, int fd, uint64_t *count)
{
	uint64_t ends[2] = { c->off / l->ps, (c->off + c->size - 1) / l->ps };
	int ret = 0;

	for (int k = 0; k < (ends[1] > ends[0] ? 2 : 1); k++) {
		uint64_t p = ends[k];
		uint64_t lo = p * l->ps > c->off ? p * l->ps : c->off;
		uint64_t hi = (p + 1) * l->ps < c->off + c->size ? (p + 1) * l->ps : c->off + c->size;
		const uint8_t *part = map ? map + (lo - c->off) : l->part_buf;
		int r;

		if (whole_in(l, c, p))
			continue;
		if (!map && pread(fd, l->part_buf, hi - lo, lo - c->off) != (ssize_t)(hi - lo))
			return fail(l, EIO, "reading the memfd of a chunk at image byte %" PRIu64, c->off);
		if ((r = give_split(l, c, part, p, lo, hi, count)) && r != -EAGAIN)
			return r;
		ret = ret ? ret : r;
	}
	return ret;
}

/* Installs the MISSING pages that lie wholly in chunk c from its mapping, without a wake. */
static int install_whole_pages(struct loader *l, const struct chunk *c, const uint8_t *map, uint64_t *count)
{
	uint64_t head = c->off / l->ps, tail = (c->off + c->size - 1) / l->ps;
	uint64_t first = whole_in(l, c, head) ? head : head + 1, last = whole_in(l, c, tail) ? tail : tail - 1;

	if (first <= last && last != UINT64_MAX)
		return install_pages(l, first, last - first + 1, map + (first * l->ps - c->off), count);
	return 0;
}

/* Wakes whoever faulted on chunk c's pages (the split ones too) once `ret`, how its install
 * went, allows: -EAGAIN left pages missing, and the wake makes their faults come again. */
static int wake_chunk(struct loader *l, const struct chunk *c, int ret)
{
	uint64_t head = c->off / l->ps, tail = (c->off + c->size - 1) / l->ps;

	return ret && ret != -EAGAIN ? ret : wake_pages(l, head, tail - head + 1);
}

static void count_installed(struct loader *l, const struct chunk *c, uint64_t count, double at)
{
	if (c->prefetch)
		l->st.prefetch_pages += count;
	else
		l->st.demand_pages += count;
	if (count && at > l->st.last_install)
		l->st.last_install = at;
}

/* Installs chunk c on the main thread, from its mapping. */
static int install_chunk(struct loader *l, struct chunk *c, const uint8_t *map)
{
	uint64_t count = 0;
	int ret = give_splits(l, c, map, -1, &count);

	if (!ret || ret == -EAGAIN)
		ret = install_whole_pages(l, c, map, &count);
	count_installed(l, c, count, now());
	c->state = CHUNK_DONE;
	return wake_chunk(l, c, ret);
}

/* An install thread's job: chunk c's whole pages from its memfd. */
static int install_job(struct loader *l, const struct chunk *c, int fd, uint64_t *count)
{
	uint8_t *map = mmap(NULL, c->size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	int ret;

	if (map == MAP_FAILED)
		return fail(l, errno, "mmap of the chunk at image byte %" PRIu64 ": %s", c->off, strerror(errno));
	pthread_rwlock_rdlock(&l->events);
	ret = install_whole_pages(l, c, map, count);
	pthread_rwlock_unlock(&l->events);
	munmap(map, c->size);
	return wake_chunk(l, c, ret);
}

static void *installer_main(void *arg)
{
	struct loader *l = arg;

	for (;;) {
		struct job j;
		struct report rp = { 0 };

		pthread_mutex_lock(&l->mu);
		while (!l->qlen && !atomic_load(&l->stop))
			pthread_cond_wait(&l->jobs, &l->mu);
		if (atomic_load(&l->stop)) {
			pthread_mutex_unlock(&l->mu);
			return NULL;
		}
		j = l->queue[l->qhead];
		l->qhead = (l->qhead + 1) % l->window;
		l->qlen--;
		pthread_mutex_unlock(&l->mu);
		rp.index = j.index;
		rp.ret = install_job(l, &l->chunks[j.index], j.fd, &rp.count);
		rp.at = now();
		close(j.fd);
		pthread_mutex_lock(&l->mu);
		l->reports[(l->rhead + l->rlen++) % l->window] = rp;
		pthread_mutex_unlock(&l->mu);
		eventfd_write(l->reports_fd, 1);
	}
}

static int start_installers(struct loader *l)
{
	int err;

	if (l->nworkers < 2)
		return 0;
	l->reports_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->reports_fd < 0)
		return fail(l, errno, "eventfd: %s", strerror(errno));
	l->queue = calloc(l->window, sizeof(*l->queue));
	l->reports = calloc(l->window, sizeof(*l->reports));
	l->part_buf = malloc(l->ps);
	l->installers = calloc(l->nworkers, sizeof(*l->installers));
	if (!l->queue || !l->reports || !l->part_buf || !l->installers)
		return fail(l, ENOMEM, "out of memory");
	for (; l->ninstallers < l->nworkers; l->ninstallers++)
		if ((err = pthread_create(&l->installers[l->ninstallers], NULL, installer_main, l)))
			return fail(l, err, "starting an install thread: %s", strerror(err));
	return 0;
}

static void stop_installers(struct loader *l)
{
	atomic_store(&l->stop, true);
	pthread_mutex_lock(&l->mu);
	pthread_cond_broadcast(&l->jobs);
	pthread_mutex_unlock(&l->mu);
	for (unsigned i = 0; i < l->ninstallers; i++)
		pthread_join(l->installers[i], NULL);
	for (; l->qlen; l->qlen--, l->qhead = (l->qhead + 1) % l->window)
		close(l->queue[l->qhead].fd);
}

/* Hands chunk c, whose split parts are given, to the install threads; the job owns fd. */
static void queue_job(struct loader *l, struct chunk *c, int fd)
{
	pthread_mutex_lock(&l->mu);
	l->queue[(l->qhead + l->qlen++) % l->window] = (struct job){ (size_t)(c - l->chunks), fd };
	pthread_cond_signal(&l->jobs);
	pthread_mutex_unlock(&l->mu);
	c->state = CHUNK_INSTALLING;
}

/* Takes the install threads' reports: each settles its chunk. */
static int take_reports(struct loader *l)
{
	eventfd_t ignored;

	eventfd_read(l->reports_fd, &ignored);
	for (;;) {
		struct report rp;
		struct chunk *c;
		int ret;

		pthread_mutex_lock(&l->mu);
		if (!l->rlen) {
			pthread_mutex_unlock(&l->mu);
			return 0;
		}
		rp = l->reports[l->rhead];
		l->rhead = (l->rhead + 1) % l->window;
		l->rlen--;
		pthread_mutex_unlock(&l->mu);
		c = &l->chunks[rp.index];
		c->state = CHUNK_DONE;
		l->inflight_prefetch -= c->prefetch;
		count_installed(l, c, rp.count, rp.at);
		if (rp.ret)
			return rp.ret;
		if (c->demanded_at) {
			if ((ret = wake_chunk(l, c, 0)) || (ret = record_latency(l, c->demanded_at)))
				return ret;
			c->demanded_at = 0;
		}
		if ((ret = top_up_prefetch(l)))
			return ret;
	}
}

/* Takes one answer of the feeder: a sealed memfd of chunk i's bytes, or why it has none. */
static int receive_chunk(struct loader *l)
{
	struct {
		uint64_t index;
		uint8_t status;
		char text[512];
	} __attribute__((packed)) msg;
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &msg, sizeof(msg) - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	struct stat sb;
	struct chunk *c;
	uint8_t *map;
	int fd = -1, ret;
	ssize_t n = recvmsg(l->feed_fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return -EAGAIN;
	for (cm = CMSG_FIRSTHDR(&mh); n > 0 && cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int)))
			memcpy(&fd, CMSG_DATA(cm), sizeof(int));
	if (n < 0)
		return fail(l, errno, "reading from the chunk feeder: %s", strerror(errno));
	if (n == 0)
		return fail(l, EPIPE, "the chunk feeder went away");
	if (n < 9 || msg.index >= l->nchunks || l->chunks[msg.index].state != CHUNK_REQUESTED) {
		ret = fail(l, EPROTO, "the chunk feeder answered outside the protocol");
		goto out;
	}
	c = &l->chunks[msg.index];
	if (msg.status) {
		msg.text[n - 9] = '\0';
		ret = fail(l, EIO, "chunk %" PRIu64 " (image bytes %" PRIu64 "-%" PRIu64 "): %s", msg.index, c->off,
			   c->off + c->size, msg.text);
		goto out;
	}
	/* Sealed against writes and shrinking, the bytes we install are the bytes that were checked. */
	if (fd < 0 || fstat(fd, &sb) < 0 || (uint64_t)sb.st_size != c->size ||
	    (fcntl(fd, F_GET_SEALS) & (F_SEAL_WRITE | F_SEAL_SHRINK)) != (F_SEAL_WRITE | F_SEAL_SHRINK)) {
		ret = fail(l, EPROTO, "the chunk feeder sent chunk %" PRIu64 " without a sealed memfd of its size", msg.index);
		goto out;
	}
	l->st.prefetch_bytes += c->size;
	l->st.chunks++;
	/* A prefetched chunk goes to the install threads, and counts in the prefetch window until
	 * their report; one a fault waits for is installed here, at once. */
	if (l->ninstallers && !c->demanded_at) {
		uint64_t count = 0;

		ret = give_splits(l, c, NULL, fd, &count);
		count_installed(l, c, count, now());
		if (ret && ret != -EAGAIN)
			goto out;
		queue_job(l, c, fd);
		return 0;
	}
	/* Populated: one call maps the chunk's pages instead of a fault per few pages in the copy. */
	map = mmap(NULL, c->size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (map == MAP_FAILED) {
		ret = fail(l, errno, "mmap of chunk %" PRIu64 ": %s", msg.index, strerror(errno));
		goto out;
	}
	l->inflight_prefetch -= c->prefetch;
	ret = install_chunk(l, c, map);
	munmap(map, c->size);
	if (!ret && c->demanded_at) {
		ret = record_latency(l, c->demanded_at);
		c->demanded_at = 0;
	}
	if (!ret)
		ret = top_up_prefetch(l);
out:
	if (fd >= 0)
		close(fd);
	return ret;
}

/* A fault in chunk mode: holes and the tail past the file end are zero pages; a page whose
 * chunks are all in but is still missing (an install met an unmapped range) is asked for again;
 * otherwise its chunks are asked for now, ahead of the prefetch, and their arrival wakes it. */
static int serve_chunk_fault(struct loader *l, const struct region *r, uint64_t page, double start)
{
	uint64_t lo = page * l->ps, hi = lo + l->ps, count = 0;
	struct split *s = split_of(l, page);
	size_t i = chunk_after(l, lo);
	int ret;

	if (i == l->nchunks || l->chunks[i].off >= hi) {
		/* A hole: zero-fill up to HOLE_AROUND of it at once, as a first touch seldom stays alone. */
		uint64_t end = i == l->nchunks ? l->npages : l->chunks[i].off / l->ps, n = 1;

		end = end < (r->offset + r->size) / l->ps ? end : (r->offset + r->size) / l->ps;
		while (n < HOLE_AROUND && page + n < end && page_state(l, page + n) == MISSING)
			n++;
		return install_span(l, r, page, n, NULL, UFFDIO_ZEROPAGE, false);
	}
	if (s && s->buf && s->have == s->need)
		return (ret = install_split(l, s, &count)) ? ret : wake_pages(l, page, 1);
	for (; i < l->nchunks && l->chunks[i].off < hi; i++) {
		struct chunk *c = &l->chunks[i];
		bool gave = s && (c->off >= lo ? c->gave_head : c->gave_tail);

		if ((c->state == CHUNK_IDLE || c->state == CHUNK_DONE) && !gave && (ret = request_chunk(l, i, false)))
			return ret;
		if (!c->demanded_at)
			c->demanded_at = start;
	}
	return 0;
}

static int serve_fault(struct loader *l, uint64_t addr, double start)
{
	const struct region *r = region_of_addr(l, addr);
	uint64_t page, done;
	uint8_t state;
	int ret;

	if (!r)
		return fail(l, EFAULT, "fault at 0x%" PRIx64 " outside every region", addr);
	page = (r->offset + (addr - r->base)) / l->ps;
	l->st.faults++;
	state = page_state(l, page);
	if (l->record && (state == MISSING || state == INFLIGHT))
		fprintf(l->record, "%" PRIu64 "\n", page);
	if (state == INFLIGHT && (ret = wait_inflight(l, page)))
		return ret;
	state = page_state(l, page);
	if (state == REMOVED)
		ret = zero_fill(l, r, page);
	else if (l->feed_fd >= 0)
		ret = state == PRESENT ? -EAGAIN : serve_chunk_fault(l, r, page, start);
	else if (l->memfd_mode && state == PRESENT)
		ret = install(l, UFFDIO_CONTINUE, page_addr(l, r, page), NULL, l->ps, false, &done);
	else
		ret = demand_read(l, r, page, start);
	return ret == -EAGAIN ? wake(l, page_addr(l, r, page), l->ps) : ret;
}

/* Called under the write side of l->events (serve_faults). */
static void mark_removed(struct loader *l, uint64_t start, uint64_t end)
{
	for (uint64_t a = start & ~(l->ps - 1); a < end; a += l->ps) {
		const struct region *r = region_of_addr(l, a);

		if (r) {
			set_state(l, (r->offset + (a - r->base)) / l->ps, REMOVED);
			l->st.removed_pages++;
		}
	}
}

/*
 * Reads the queued messages and marks the removed ranges under the write side of l->events,
 * then serves the faults; returns 0 when the queue is empty. The client's madvise or munmap
 * zaps its range once its event is read, and a prefetch or install thread's UFFDIO_COPY after
 * that would put image bytes back where the client discarded them: so no thread installs from
 * just before the read until the range is marked (while the event is unread the kernel refuses
 * copies with EAGAIN). A batch's events go before its faults: a fault and a discard of one page in one
 * batch were concurrent in the client, and a zero page is one of their outcomes.
 */
static int serve_faults(struct loader *l)
{
	struct uffd_msg msgs[UFFD_MSGS];

	for (;;) {
		ssize_t n;
		double start;
		int err;

		pthread_rwlock_wrlock(&l->events);
		n = read(l->uffd, msgs, sizeof(msgs));
		err = errno;
		start = now();
		for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof(msgs[0]); i++)
			if (msgs[i].event == UFFD_EVENT_REMOVE || msgs[i].event == UFFD_EVENT_UNMAP)
				mark_removed(l, msgs[i].arg.remove.start, msgs[i].arg.remove.end);
		pthread_rwlock_unlock(&l->events);
		if (n < 0 && err == EINTR)
			continue;
		if (n < 0 && err == EAGAIN)
			return 0;
		if (n < 0)
			return fail(l, err, "reading the uffd: %s", strerror(err));
		if (n == 0)
			return -ESRCH;
		if (n % sizeof(msgs[0]))
			return fail(l, EIO, "short read from the uffd");
		for (size_t i = 0; i < n / sizeof(msgs[0]); i++) {
			const struct uffd_msg *m = &msgs[i];
			int ret = 0;

			if (m->event == UFFD_EVENT_PAGEFAULT)
				ret = serve_fault(l, m->arg.pagefault.address, start);
			else if (m->event != UFFD_EVENT_REMOVE && m->event != UFFD_EVENT_UNMAP)
				ret = fail(l, EPROTO, "unexpected uffd event %u", m->event);
			if (ret)
				return ret;
		}
	}
}

/* ---- main loop ---- */

static int client_gone(struct loader *l, short revents)
{
	char c;
	ssize_t n;

	if (!(revents & (POLLIN | POLLHUP | POLLERR)))
		return 0;
	n = recv(l->conn_fd, &c, 1, MSG_DONTWAIT);
	if (n > 0)
		return fail(l, EPROTO, "protocol error: the client sent data after the handshake");
	return n < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -ESRCH;
}

/* Demand faults are the main thread's only job; prefetch threads run beside it. */
static int serve(struct loader *l)
{
	int ret;

	l->st.handshake = now();
	if (l->nhot && (ret = start_workers(l)))
		return ret;
	if (l->feed_fd >= 0) {
		l->st.prefetch_start = now();
		if ((ret = start_installers(l)) || (ret = top_up_prefetch(l)))
			return ret;
	}
	for (;;) {
		struct pollfd pfd[5] = {
			{ l->uffd, POLLIN, 0 }, { l->conn_fd, POLLIN, 0 }, { l->errfd, POLLIN, 0 }, { l->feed_fd, POLLIN, 0 },
			{ l->reports_fd, POLLIN, 0 },
		};

		if (poll(pfd, 5, -1) < 0 && errno != EINTR)
			return fail(l, errno, "poll: %s", strerror(errno));
		if (pfd[2].revents & POLLIN) {
			pthread_mutex_lock(&l->mu);
			ret = l->worker_ret;
			pthread_mutex_unlock(&l->mu);
			return ret;
		}
		if ((ret = client_gone(l, pfd[1].revents)))
			return ret;
		if (pfd[0].revents & (POLLERR | POLLHUP))
			return fail(l, EPROTO, "the uffd reports an error (UFFDIO_API not done?)");
		if ((pfd[0].revents & POLLIN) && (ret = serve_faults(l)))
			return ret;
		if ((pfd[4].revents & POLLIN) && (ret = take_reports(l)))
			return ret;
		/* A few chunks at a time, so that faults waiting in the uffd are read in between. */
		for (int k = 0; k < 4 && (pfd[3].revents & (POLLIN | POLLHUP | POLLERR)); k++) {
			ret = receive_chunk(l);
			if (ret == -EAGAIN)
				break;
			if (ret)
				return ret;
		}
	}
}

/* ---- setup, stats and cleanup ---- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static double percentile_us(const struct stats *st, double q)
{
	return st->nlat ? st->lat_ns[(size_t)(q * (st->nlat - 1))] / 1e3 : 0;
}

static void write_stats(struct loader *l)
{
	struct stats *st = &l->st;
	double secs = st->prefetch_end - st->prefetch_start;
	FILE *f = fopen(l->stats_path, "we");

	if (!f)
		return;
	qsort(st->lat_ns, st->nlat, sizeof(*st->lat_ns), cmp_u64);
	fprintf(f,
		"{\"demand_faults\": %" PRIu64 ", \"demand_pages\": %" PRIu64 ", \"zero_pages\": %" PRIu64
		", \"removed_pages\": %" PRIu64 ", \"prefetch_pages\": %" PRIu64 ", \"prefetch_bytes\": %" PRIu64
		", \"prefetch_seconds\": %.6f, \"prefetch_gbps\": %.3f, \"direct_bytes\": %" PRIu64
		", \"chunks\": %" PRIu64 ", \"handshake_at\": %.6f, \"first_served_at\": %.6f, \"last_install_at\": %.6f"
		", \"fault_latency_us\": {\"samples\": %zu, \"p50\": %.2f, \"p99\": %.2f, \"max\": %.2f}}\n",
		st->faults, st->demand_pages, st->zero_pages, st->removed_pages, st->prefetch_pages,
		st->prefetch_bytes, secs, secs > 0 ? st->prefetch_bytes / secs / 1e9 : 0,
		st->direct_bytes, st->chunks, st->handshake, st->first_served, st->last_install, st->nlat, percentile_us(st, 0.5), percentile_us(st, 0.99),
		percentile_us(st, 1.0));
	fclose(f);
}

static int setup(struct loader *l)
{
	int ret;

	if ((ret = l->feed_fd >= 0 ? load_layout(l) : open_image(l)))
		return ret;
	if (l->hot_path && (ret = load_hot_list(l)))
		return ret;
	if (l->record_path && !(l->record = fopen(l->record_path, "we")))
		return fail(l, errno, "open %s: %s", l->record_path, strerror(errno));
	l->fault_buf = mmap(NULL, l->fault_around, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (l->fault_buf == MAP_FAILED)
		return fail(l, errno, "mmap: %s", strerror(errno));
	if (l->memfd_mode) {
		l->memfd = memfd_create("snapstore-image", MFD_CLOEXEC);
		if (l->memfd < 0 || ftruncate(l->memfd, l->img_size) < 0)
			return fail(l, errno, "memfd: %s", strerror(errno));
		l->memfd_map = mmap(NULL, l->img_size, PROT_READ | PROT_WRITE, MAP_SHARED, l->memfd, 0);
		if (l->memfd_map == MAP_FAILED)
			return fail(l, errno, "mmap memfd: %s", strerror(errno));
	}
	return 0;
}

static void cleanup(struct loader *l)
{
	int fds[] = { l->listen_fd, l->conn_fd, l->uffd, l->memfd, l->errfd, l->feed_fd, l->layout_fd, l->reports_fd };

	for (unsigned i = 0; l->workers && i < l->nworkers; i++) {
		struct worker *w = &l->workers[i];

		if (w->aio)
			syscall(SYS_io_destroy, w->aio);
		for (unsigned j = 0; w->slots && j < w->nslots; j++)
			if (w->slots[j].buf)
				munmap(w->slots[j].buf, MAX_READ);
		free(w->slots);
	}
	free(l->workers);
	if (l->memfd_map && l->memfd_map != MAP_FAILED)
		munmap(l->memfd_map, l->img_size);
	if (l->fault_buf && l->fault_buf != MAP_FAILED)
		munmap(l->fault_buf, l->fault_around);
	if (l->record)
		fclose(l->record);
	for (size_t i = 0; i < l->nimages; i++) {
		if (l->images[i].map)
			munmap(l->images[i].map, l->images[i].npages * l->ps);
		if (l->images[i].aio_fd >= 0 && l->images[i].aio_fd != l->images[i].fd)
			close(l->images[i].aio_fd);
		if (l->images[i].fd >= 0)
			close(l->images[i].fd);
	}
	free(l->images);
	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (l->listen_fd >= 0)
		unlink(l->socket_path);
	for (size_t i = 0; i < l->nsplits; i++)
		free(l->splits[i].buf);
	free(l->splits);
	free(l->part_buf);
	free(l->queue);
	free(l->reports);
	free(l->installers);
	free(l->chunks);
	free(l->order);
	free(l->state);
	free(l->hot);
	free(l->st.lat_ns);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: uffd_loader --image FILE [--image FILE...] --socket PATH [--hot FILE] [--record FILE] [--memfd]\n"
		"       uffd_loader --chunks FD --layout FD --socket PATH [--record FILE] [--queue-depth N]\n"
		"                   [--fault-around-kib N] [--queue-depth N] [--prefetch-threads N] [--buffered | --direct]\n"
		"                   [--stats-json FILE]\n");
}

static bool parse_u64(const char *s, uint64_t *v)
{
	char *end;

	errno = 0;
	*v = strtoull(s, &end, 10);
	return !errno && end != s && !*end && s[0] != '-';
}

/* Each --image adds a file; the files, in the order given, are the image. */
static int add_image(struct loader *l, const char *path)
{
	struct image *images = realloc(l->images, (l->nimages + 1) * sizeof(*images));

	if (!images)
		return -1;
	l->images = images;
	images[l->nimages++] = (struct image){ .path = path, .fd = -1, .aio_fd = -1 };
	return 0;
}

static int parse_args(struct loader *l, int argc, char **argv)
{
	uint64_t v;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--memfd"))
			l->memfd_mode = true;
		else if (!strcmp(a, "--buffered") && l->io_mode != IO_DIRECT)
			l->io_mode = IO_BUFFERED;
		else if (!strcmp(a, "--direct") && l->io_mode != IO_BUFFERED)
			l->io_mode = IO_DIRECT;
		else if (!val)
			return -1;
		else if (!strcmp(a, "--image")) {
			if (add_image(l, val))
				return -1;
		} else if (!strcmp(a, "--socket"))
			l->socket_path = val;
		else if (!strcmp(a, "--hot"))
			l->hot_path = val;
		else if (!strcmp(a, "--record"))
			l->record_path = val;
		else if (!strcmp(a, "--stats-json"))
			l->stats_path = val;
		else if (!strcmp(a, "--chunks") && parse_u64(val, &v) && v <= INT32_MAX)
			l->feed_fd = v;
		else if (!strcmp(a, "--layout") && parse_u64(val, &v) && v <= INT32_MAX)
			l->layout_fd = v;
		else if (!strcmp(a, "--fault-around-kib") && parse_u64(val, &v) && v <= MAX_READ >> 10)
			l->fault_around = v << 10;
		else if (!strcmp(a, "--queue-depth") && parse_u64(val, &v) && v >= 1 && v <= 1024)
			l->queue_depth = v;
		else if (!strcmp(a, "--prefetch-threads") && parse_u64(val, &v) && v >= 1 && v <= MAX_PREFETCH_THREADS)
			l->nworkers = v;
		else
			return -1;
		if (strcmp(a, "--memfd") && strcmp(a, "--buffered") && strcmp(a, "--direct"))
			i++;
	}
	/* Chunk mode takes its image, and its prefetch order, from the layout. */
	if ((l->feed_fd >= 0) != (l->layout_fd >= 0) ||
	    (l->feed_fd >= 0 && (l->nimages || l->hot_path || l->memfd_mode)))
		return -1;
	return (l->nimages || l->feed_fd >= 0) && l->socket_path ? 0 : -1;
}

/* One prefetch thread per CPU, up to DEFAULT_PREFETCH_THREADS: see docs/uffd.md for the sweep. */
static unsigned default_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n < 1 ? 1 : n > DEFAULT_PREFETCH_THREADS ? DEFAULT_PREFETCH_THREADS : (unsigned)n;
}

int main(int argc, char **argv)
{
	struct loader l = {
		.fault_around = DEFAULT_FAULT_AROUND_KIB << 10, .queue_depth = DEFAULT_QUEUE_DEPTH,
		.listen_fd = -1, .conn_fd = -1, .uffd = -1, .memfd = -1, .errfd = -1, .feed_fd = -1, .layout_fd = -1,
		.reports_fd = -1, .mu = PTHREAD_MUTEX_INITIALIZER, .progress = PTHREAD_COND_INITIALIZER,
		.jobs = PTHREAD_COND_INITIALIZER,
		/* Threads hold the read side around each install, often several at once: a waiting
		 * writer (the main thread reading events) goes first, or it could wait for the whole
		 * prefetch. */
		.events = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP,
	};
	int ret;

	l.ps = sysconf(_SC_PAGESIZE);
	if (parse_args(&l, argc, argv)) {
		usage();
		return 2;
	}
	if (l.fault_around < l.ps)
		l.fault_around = l.ps;
	if (!l.nworkers)
		l.nworkers = default_workers();
	l.window = l.queue_depth;
	signal(SIGPIPE, SIG_IGN);
	ret = setup(&l);
	if (!ret)
		ret = accept_client(&l);
	if (!ret)
		ret = receive_handshake(&l);
	if (!ret)
		ret = serve(&l);
	if (ret && ret != -ESRCH) {
		fprintf(stderr, "uffd_loader: %s\n", l.err[0] ? l.err : strerror(-ret));
		kill_client(&l);
	}
	stop_workers(&l);
	stop_installers(&l);
	if (l.stats_path)
		write_stats(&l);
	cleanup(&l);
	return ret && ret != -ESRCH;
}
