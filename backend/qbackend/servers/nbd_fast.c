/* NBD READs and in-place WRITEs served in C, and the loop that serves
 * many plain connections with them.
 *
 * qb_nbd_serve is sans-I/O: it takes the requests at the front of the
 * bytes a connection received and, for each plain READ whose bytes the
 * export's read map locates (qbackend.block.read_map) and each plain WRITE
 * whose clusters the map locates in a writable file, does the I/O and puts
 * the reply (with a READ's data) into `out`.  It stops at the first request
 * it does not serve and says why (`stop`) and how far it got: `consumed`
 * bytes of `in`, `produced` bytes of `out`.  Python goes on from there, so
 * it still checks and answers everything else, errors included.  Per
 * request, the checks are those of the Python protocol (qbackend.protocol.nbd,
 * _check) for a request it accepts.
 *
 * qb_nbd_loop_wait is the transmission loop's poll: it waits on the loop's
 * epoll set and serves every ready connection that is in native state
 * (receive, qb_nbd_serve, send) until that connection needs Python: a
 * request this file does not serve, replies the socket would not take at
 * once, the end of the stream or an error.  Then the connection is handed
 * over (`handed_over`, its unserved bytes at the front of `received`, its unsent
 * replies in `out`) and reported, with every connection in Python state that
 * is ready.  Python gives a connection back (state NATIVE) once it has
 * nothing of it pending.  Only the loop's thread calls these functions for a
 * connection of the loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nbd_fast.h"
#include "../block/read_map_impl.h"

/* Wire numbers of qbackend.protocol.nbd (tests/test_wire_constants.py checks each against it). */
#define REQUEST_MAGIC 0x25609513u
#define EXTENDED_REQUEST_MAGIC 0x21e41c71u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define EXTENDED_REPLY_MAGIC 0x6e8a278cu
#define CMD_READ 0
#define CMD_WRITE 1
#define FLAG_DF (1u << 2)
#define REPLY_FLAG_DONE 1
#define CHUNK_NONE 0
#define CHUNK_OFFSET_DATA 1
#define REQUEST_SIZE 28
#define EXTENDED_REQUEST_SIZE 32
#define SIMPLE_REPLY_SIZE 16
#define STRUCTURED_REPLY_SIZE 20
#define EXTENDED_REPLY_SIZE 32
#define CHUNK_OFFSET_SIZE 8 /* an OFFSET_DATA chunk's payload starts with the offset */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

/* All of [host, host+length) read into data (or written from it); 0, or -1 for anything short of that. */
static int file_io(int fd, uint8_t *data, uint64_t length, uint64_t host, int write)
{
	while (length) {
		ssize_t n = write ? pwrite(fd, data, length, (off_t)host) : pread(fd, data, length, (off_t)host);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		data += n;
		host += (uint64_t)n;
		length -= (uint64_t)n;
	}
	return 0;
}

/* Every byte of [offset, offset+length) mapped: read into (or written from) data, run by run. */
static int map_io(struct qb_read_map *map, uint8_t *data, uint64_t offset, uint64_t length, int write)
{
	uint64_t done, run = 0, host;
	int ok = 1;

	pthread_rwlock_rdlock(&map->lock);
	for (done = 0; ok && done < length; done += run) {
		/* Checks the export's size too; clusters apart in the file take an I/O call each. */
		host = qb_read_map_run(map, offset + done, length - done, &run);
		ok = host != UINT64_MAX && file_io(map->fd, data + done, run, host, write) == 0;
	}
	pthread_rwlock_unlock(&map->lock);
	return ok;
}

/* Whether all of [offset, offset+length) is mapped now (a WRITE waits for its payload only then). */
static int mapped(struct qb_read_map *map, uint64_t offset, uint64_t length)
{
	uint64_t done, run = 0;
	int ok = 1;

	pthread_rwlock_rdlock(&map->lock);
	for (done = 0; ok && done < length; done += run)
		ok = qb_read_map_run(map, offset + done, length - done, &run) != UINT64_MAX;
	pthread_rwlock_unlock(&map->lock);
	return ok;
}

/* The header of a reply to (cookie, offset) at p: a READ's of `length` data bytes, or a done reply. */
static void reply_header(uint8_t *p, int mode, uint64_t cookie, uint64_t offset, uint64_t length, int data)
{
	if (mode == QB_NBD_SIMPLE) {
		put32(p, SIMPLE_REPLY_MAGIC);
		put32(p + 4, 0);
		put64(p + 8, cookie);
	} else if (mode == QB_NBD_STRUCTURED) {
		put32(p, STRUCTURED_REPLY_MAGIC);
		put16(p + 4, REPLY_FLAG_DONE);
		put16(p + 6, data ? CHUNK_OFFSET_DATA : CHUNK_NONE);
		put64(p + 8, cookie);
		put32(p + 16, data ? (uint32_t)(CHUNK_OFFSET_SIZE + length) : 0);
		if (data)
			put64(p + 20, offset);
	} else {
		put32(p, EXTENDED_REPLY_MAGIC);
		put16(p + 4, REPLY_FLAG_DONE);
		put16(p + 6, data ? CHUNK_OFFSET_DATA : CHUNK_NONE);
		put64(p + 8, cookie);
		put64(p + 16, offset);
		put64(p + 24, data ? CHUNK_OFFSET_SIZE + length : 0);
		if (data)
			put64(p + 32, offset);
	}
}

static uint32_t reply_size(int mode, int data)
{
	if (mode == QB_NBD_SIMPLE)
		return SIMPLE_REPLY_SIZE;
	if (mode == QB_NBD_STRUCTURED)
		return STRUCTURED_REPLY_SIZE + (data ? CHUNK_OFFSET_SIZE : 0);
	return EXTENDED_REPLY_SIZE + (data ? CHUNK_OFFSET_SIZE : 0);
}

/* Serve the request at in[pos:]: its size, or 0 with b->stop saying why not. */
static uint32_t serve_one(struct qb_read_map *map, struct qb_nbd_batch *b, uint32_t pos)
{
	const uint8_t *req = b->input + pos;
	uint32_t size = b->mode == QB_NBD_EXTENDED ? EXTENDED_REQUEST_SIZE : REQUEST_SIZE, header;
	uint16_t flags, command;
	uint64_t cookie, offset, length, reply;
	int is_read;

	if (b->in_len - pos < size) {
		b->stop = QB_STOP_PARTIAL;
		return 0;
	}
	b->stop = QB_STOP_PYTHON;
	if (get32(req) != (b->mode == QB_NBD_EXTENDED ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC))
		return 0;
	flags = get16(req + 4);
	command = get16(req + 6);
	cookie = get64(req + 8);
	offset = get64(req + 16);
	length = b->mode == QB_NBD_EXTENDED ? get64(req + 24) : get32(req + 24);
	if (command == CMD_READ) {
		if ((flags & ~FLAG_DF) || ((flags & FLAG_DF) && b->mode == QB_NBD_SIMPLE))
			return 0;
	} else if (command != CMD_WRITE || flags) {
		return 0; /* FUA writes go to Python's pool, so a flush does not stall this loop */
	}
	if (length == 0 || length > b->max_length)
		return 0;
	is_read = command == CMD_READ;
	header = reply_size(b->mode, is_read);
	reply = header + (is_read ? length : 0);
	if (reply > b->out_size - b->produced) {
		if (b->produced)
			b->stop = QB_STOP_FULL;
		return 0;
	}
	/* Past the soft limit only with the batch's first reply. */
	if (b->produced && (b->produced >= b->soft_limit || reply > b->soft_limit - b->produced)) {
		b->stop = QB_STOP_FULL;
		return 0;
	}
	if (is_read) {
		if (!map_io(map, b->out + b->produced + header, offset, length, 0))
			return 0;
	} else {
		if (!map->writable || !mapped(map, offset, length))
			return 0;
		if (b->in_len - pos - size < length) {
			b->stop = QB_STOP_PARTIAL; /* its payload is still coming */
			return 0;
		}
		/* The same bytes again if Python has to take over half-way: a write may be repeated. */
		if (!map_io(map, (uint8_t *)req + size, offset, length, 1))
			return 0;
		size += (uint32_t)length;
	}
	reply_header(b->out + b->produced, b->mode, cookie, offset, length, is_read);
	b->produced += (uint32_t)reply;
	if (is_read) {
		b->reads++;
		b->bytes_read += length;
	} else {
		b->writes++;
		b->bytes_written += length;
	}
	return size;
}

/* Serve from the front of b->input; returns the number of requests served. */
int qb_nbd_serve(void *opaque, struct qb_nbd_batch *b)
{
	struct qb_read_map *map = opaque;
	uint32_t used;

	b->consumed = 0;
	b->produced = 0;
	b->reads = 0;
	b->writes = 0;
	b->bytes_read = 0;
	b->bytes_written = 0;
	b->stop = QB_STOP_END;
	if (b->mode > QB_NBD_EXTENDED) {
		b->stop = QB_STOP_PYTHON;
		return 0;
	}
	while (b->consumed < b->in_len && (used = serve_one(map, b, b->consumed)))
		b->consumed += used;
	if (b->consumed == b->in_len)
		b->stop = QB_STOP_END;
	return (int)(b->reads + b->writes);
}

/* -- the loop ------------------------------------------------------------------------------ */

int qb_nbd_loop_new(void)
{
	int fd = epoll_create1(EPOLL_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

int qb_nbd_loop_watch(int epfd, int op, struct qb_nbd_conn *conn, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = conn };

	return epoll_ctl(epfd, op, conn->fd, &ev) ? -errno : 0;
}

/* Send out[0:len] without blocking; how much the socket took (len: all), or -1 if it is gone. */
static ssize_t send_some(int fd, const uint8_t *out, uint32_t len)
{
	uint32_t sent = 0;

	while (sent < len) {
		ssize_t n = send(fd, out + sent, len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n < 0)
			return -1;
		sent += (uint32_t)n;
	}
	return sent;
}

static void count(struct qb_nbd_counts *counts, const struct qb_nbd_batch *b)
{
	counts->reads += b->reads;
	counts->writes += b->writes;
	counts->bytes_read += b->bytes_read;
	counts->bytes_written += b->bytes_written;
}

/* Since when c waits for the rest of a request, after a receive that served what it could. */
static void note_waiting(struct qb_nbd_conn *c)
{
	struct timespec now;

	if (!c->received_len) {
		c->waiting_since_ns = 0;
		return;
	}
	clock_gettime(CLOCK_MONOTONIC, &now);
	c->waiting_since_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* A ready connection in native state: serve it until the socket has nothing more now
 * (0) or Python must take over (1; what is pending is left in the connection). */
static int serve_conn(struct qb_nbd_conn *c, struct qb_nbd_counts *counts)
{
	struct qb_nbd_batch *b = &c->batch;
	int rounds;

	/* A bounded number of receives: a client that keeps its socket full must not keep
	 * the others waiting (epoll reports it again). */
	for (rounds = 0; rounds < 16; rounds++) {
		uint32_t room = c->received_size - c->received_len, pos = 0;
		ssize_t n = recv(c->fd, c->received + c->received_len, room, MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		if (n <= 0)
			return 1; /* the end, or an error: Python's own receive sees it too */
		c->received_len += (uint32_t)n;
		do {
			ssize_t sent;

			b->input = c->received + pos;
			b->in_len = c->received_len - pos;
			qb_nbd_serve(c->map, b);
			count(counts, b);
			pos += b->consumed;
			sent = b->produced ? send_some(c->fd, b->out, b->produced) : 0;
			if (sent < 0 || (uint32_t)sent < b->produced) {
				/* The socket is full (or gone): Python holds the rest of the replies. */
				c->out_start = sent < 0 ? 0 : (uint32_t)sent;
				c->out_len = b->produced - c->out_start;
				memmove(c->received, c->received + pos, c->received_len - pos);
				c->received_len -= pos;
				return 1;
			}
		} while (b->stop == QB_STOP_FULL);
		memmove(c->received, c->received + pos, c->received_len - pos);
		c->received_len -= pos;
		note_waiting(c);
		if (b->stop == QB_STOP_PYTHON || c->received_len == c->received_size)
			return 1;
		if ((uint32_t)n < room)
			return 0; /* most likely all the socket had: epoll says when more comes */
	}
	return 0;
}

int qb_nbd_loop_wait(int epfd, struct qb_nbd_ready *ready, int max, int timeout_ms, struct qb_nbd_counts *counts)
{
	struct epoll_event events[QB_NBD_LOOP_EVENTS];

	if (max > QB_NBD_LOOP_EVENTS)
		max = QB_NBD_LOOP_EVENTS;
	for (;;) {
		int n = epoll_wait(epfd, events, max, timeout_ms), i, out = 0;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return 0;
		for (i = 0; i < n; i++) {
			struct qb_nbd_conn *c = events[i].data.ptr;

			if (c->state == QB_CONN_NATIVE && serve_conn(c, counts) == 0)
				continue;
			if (c->state == QB_CONN_NATIVE) {
				c->state = QB_CONN_PYTHON;
				c->handed_over = 1;
			}
			ready[out].fd = c->fd;
			ready[out].events = events[i].events;
			out++;
		}
		if (out)
			return out;
	}
}
