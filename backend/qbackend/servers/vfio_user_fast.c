/* The vfio-user receive loop, in C, for region accesses that need no Python.
 *
 * A guest vCPU waits for every trapped access, and in Python the parse, the
 * call into the device and the reply cost more than the socket round trip
 * itself.  This loop receives, serves every REGION_READ that falls wholly
 * inside a window the device declared plain memory (bytes to copy, no side
 * effect) and every REGION_WRITE of a whole writable window, replies, and
 * goes on; it returns to Python with anything else: another command, fds,
 * a malformed or partial message, any other access, a write whose guard
 * word is not zero.  So
 * Python still sees, checks and answers everything but the plain accesses,
 * and the replies leave in the order the requests came.  The device lock
 * (a pthread mutex shared with Python, qbackend.plumbing.native_lock) is
 * held for each access, as the Python path holds it.  Adaptive polling is
 * as in the Python loop (qbackend.servers.vfio_user).
 *
 * A pause (a hand-over to a new process, qbackend.servers.vfio_user) sets
 * loop->pause and signals loop->wake_fd: the blocking wait is a poll on the
 * socket and that eventfd, so the loop returns QB_PAUSED between messages,
 * with everything it received answered and the socket untouched.
 *
 * Returns 1 with loop->buf[pos:end) (and loop->fds[0:nfds)) for Python,
 * QB_PAUSED, 0 at the end of the stream, or -errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vfio_user_fast.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vfio-user is little-endian on the wire; this loop copies fields as they are"
#endif

/* Wire numbers of qbackend.protocol.vfio_user (tests/test_wire_constants.py checks each against it). */
#define REGION_READ 9
#define REGION_WRITE 10
#define FLAG_NO_REPLY 0x10
#define TYPE_REPLY 1
#define HEADER_SIZE 16
#define REGION_ACCESS_SIZE 16 /* offset, region, count */
#define ACCESS_SIZE (HEADER_SIZE + REGION_ACCESS_SIZE)

struct access {
	uint16_t id;
	uint16_t command;
	uint32_t size;
	uint32_t flags;
	uint32_t error;
	uint64_t offset;
	uint32_t region;
	uint32_t count;
};

_Static_assert(sizeof(struct access) == ACCESS_SIZE, "wire layout");

static int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static ssize_t receive(struct qb_access_loop *loop, int flags)
{
	union {
		char bytes[CMSG_SPACE(QB_SCM_MAX_FD * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = { loop->buf, loop->bufsize };
	struct msghdr msg = { 0 };
	struct cmsghdr *cmsg;
	ssize_t n;

	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.bytes;
	msg.msg_controllen = sizeof(control.bytes);
	do
		n = recvmsg(loop->fd, &msg, flags | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	loop->nfds = 0;
	for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
		size_t count, i;
		int fd;

		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < count; i++) {
			memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
			if (loop->nfds < loop->max_fds)
				loop->fds[loop->nfds++] = fd;
			else
				close(fd); /* cannot happen: max_fds is the kernel's limit */
		}
	}
	return n;
}

static int send_all(int fd, const uint8_t *data, size_t size)
{
	while (size) {
		ssize_t n = write(fd, data, size);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		data += n;
		size -= (size_t)n;
	}
	return 0;
}

static const struct qb_window *find_window(const struct qb_access_loop *loop, const struct access *a)
{
	uint32_t i, n = __atomic_load_n(&loop->nwindows, __ATOMIC_RELAXED); /* 0 while traced */

	for (i = 0; i < n; i++) {
		const struct qb_window *w = &loop->windows[i];

		if (w->region != a->region)
			continue;
		if (a->command == REGION_READ) {
			if (a->offset >= w->start && a->offset <= w->end && a->count <= w->end - a->offset)
				return w;
		} else if (w->writable && a->offset == w->start && a->count == w->end - w->start) {
			return w; /* only a write of the whole window is plain */
		}
	}
	return NULL;
}

/* Serve the access at buf[pos:]; its length, or 0 to leave it (and all after it) to Python. */
static uint32_t serve_one(struct qb_access_loop *loop, uint32_t pos, uint32_t end, uint32_t *outlen)
{
	const uint8_t *message = loop->buf + pos;
	const struct qb_window *w;
	struct access a;
	uint32_t reply_size;
	uint8_t *reply;
	uint32_t guard;

	memcpy(&a, message, sizeof(a));
	/* Mirrors the Python rule, qbackend.protocol.vfio_user: ServerConnection.serve_access's
	 * checks (flags, command, size) and access_in_limits (the range; here max_count is at
	 * most the connection's max_xfer, and find_window keeps offset + count inside a window,
	 * so inside 64 bits).  Change the two together: tests/test_vfio_user_native.py compares
	 * their replies byte for byte. */
	if (a.flags & ~FLAG_NO_REPLY || a.count == 0 || a.count > loop->max_count)
		return 0;
	if (a.command == REGION_READ) {
		if (a.size != ACCESS_SIZE)
			return 0;
		reply_size = ACCESS_SIZE + a.count;
	} else if (a.command == REGION_WRITE) {
		if (a.size != ACCESS_SIZE + a.count || a.size > end - pos)
			return 0;
		reply_size = ACCESS_SIZE;
	} else {
		return 0;
	}
	if (a.region >= loop->nregions || !(w = find_window(loop, &a)))
		return 0;
	if (*outlen + reply_size > loop->outsize) {
		if (send_all(loop->fd, loop->out, *outlen) < 0)
			return 0; /* Python's send finds the error again */
		*outlen = 0;
	}
	reply = loop->out + *outlen;
	pthread_mutex_lock(loop->lock);
	if (!loop->nwindows) { /* a trace began (qbackend.devices.trace): this access is Python's */
		pthread_mutex_unlock(loop->lock);
		return 0;
	}
	if (a.command == REGION_WRITE) {
		if (w->guard) {
			memcpy(&guard, w->guard, sizeof(guard));
			if (guard) {
				pthread_mutex_unlock(loop->lock);
				return 0;
			}
		}
		memcpy(w->base + (a.offset - w->start), message + ACCESS_SIZE, a.count);
	} else {
		memcpy(reply + ACCESS_SIZE, w->base + (a.offset - w->start), a.count);
	}
	loop->counts[a.region]++;
	pthread_mutex_unlock(loop->lock);
	loop->served++;
	if (!(a.flags & FLAG_NO_REPLY)) {
		a.size = reply_size;
		a.flags = TYPE_REPLY;
		a.error = 0;
		memcpy(reply, &a, sizeof(a));
		*outlen += reply_size;
	}
	return a.command == REGION_READ ? ACCESS_SIZE : ACCESS_SIZE + a.count;
}

/* Block until the socket has bytes (then receive them without blocking) or the wake
 * eventfd is signalled (then -EINTR: the caller looks at loop->pause). */
static ssize_t wait_and_receive(struct qb_access_loop *loop)
{
	for (;;) {
		struct pollfd fds[2] = { { loop->fd, POLLIN, 0 }, { loop->wake_fd, POLLIN, 0 } };
		ssize_t n;

		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (fds[1].revents)
			return -EINTR;
		n = receive(loop, MSG_DONTWAIT);
		if (n != -EAGAIN && n != -EWOULDBLOCK)
			return n;
	}
}

int qb_serve_accesses(struct qb_access_loop *loop)
{
	for (;;) {
		ssize_t n = -EAGAIN;
		uint32_t pos = 0, outlen = 0, used;
		int rc;

		if (__atomic_load_n(&loop->pause, __ATOMIC_ACQUIRE))
			return QB_PAUSED;
		if (loop->spinning) {
			int64_t deadline = now_ns() + loop->spin_ns;

			for (;;) {
				n = receive(loop, MSG_DONTWAIT);
				if (n != -EAGAIN && n != -EWOULDBLOCK)
					break;
				if (now_ns() > deadline)
					break;
				sched_yield();
			}
			loop->spinning = n >= 0;
		}
		if (n < 0) { /* nothing came while spinning, or an error the blocking receive reports */
			int64_t waited = now_ns();

			n = wait_and_receive(loop);
			if (n == -EINTR)
				return QB_PAUSED;
			loop->spinning = now_ns() - waited < loop->spin_window_ns;
		}
		if (n <= 0)
			return (int)n;
		if (loop->nfds) {
			loop->pos = 0;
			loop->end = (uint32_t)n;
			return 1;
		}
		while ((uint32_t)n - pos >= ACCESS_SIZE && (used = serve_one(loop, pos, (uint32_t)n, &outlen)))
			pos += used;
		if (outlen && (rc = send_all(loop->fd, loop->out, outlen)) < 0)
			return rc;
		if (pos < (uint32_t)n) {
			loop->pos = pos;
			loop->end = (uint32_t)n;
			return 1;
		}
	}
}
