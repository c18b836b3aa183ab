/* NBD READ requests served in C, from bytes received to bytes to send.
 *
 * Sans-I/O: the Python connection receives and sends (plain, TLS, in the
 * transmission loop or a thread of its own); this takes the requests at
 * the front of what it received and, for each plain READ whose bytes the
 * export's read map locates (qbackend.block.read_map), puts the reply and
 * the data read from the image file into `out`.  It stops at the first
 * request it does not serve (another command, flags, a partial request, an
 * unmapped cluster, a short read, a reply that would not fit in `out`, or
 * one that would take the batch past `soft_limit` when it is not the first) and
 * says how far it got: `consumed` bytes of `in`, `produced` bytes of `out`.
 * Python goes on from there, so it still checks and answers everything
 * else, errors included.  Per request, the checks are those of the
 * Python protocol (qbackend.protocol.nbd, _check) for a READ it accepts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "nbd_fast.h"
#include "../block/read_map_impl.h"

#define REQUEST_MAGIC 0x25609513u
#define EXTENDED_REQUEST_MAGIC 0x21e41c71u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define EXTENDED_REPLY_MAGIC 0x6e8a278cu
#define CMD_READ 0
#define FLAG_DF (1u << 2)
#define REPLY_FLAG_DONE 1
#define CHUNK_OFFSET_DATA 1

enum mode { SIMPLE = 0, STRUCTURED = 1, EXTENDED = 2 };

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

/* Read all of [host, host+length) into data; 0, or -1 for anything short of that. */
static int read_all(int fd, uint8_t *data, uint64_t length, uint64_t host)
{
	while (length) {
		ssize_t n = pread(fd, data, length, (off_t)host);

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

/* Serve the request at in[pos:]; its size, or 0 to leave it (and all after it) to Python. */
static uint32_t serve_one(struct qb_read_map *map, struct qb_nbd_batch *b, uint32_t pos)
{
	const uint8_t *req = b->input + pos;
	uint32_t size = b->mode == EXTENDED ? 32 : 28, header;
	uint16_t flags, command;
	uint64_t cookie, offset, length, host, done, run = 0;
	uint8_t *reply;
	int ok;

	if (b->in_len - pos < size)
		return 0;
	if (get32(req) != (b->mode == EXTENDED ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC))
		return 0;
	flags = get16(req + 4);
	command = get16(req + 6);
	cookie = get64(req + 8);
	offset = get64(req + 16);
	length = b->mode == EXTENDED ? get64(req + 24) : get32(req + 24);
	if (command != CMD_READ || (flags & ~FLAG_DF) || ((flags & FLAG_DF) && b->mode == SIMPLE))
		return 0;
	if (length == 0 || length > b->max_length)
		return 0;
	header = b->mode == EXTENDED ? 40 : b->mode == STRUCTURED ? 28 : 16;
	if (length > b->out_size - b->produced || header > b->out_size - b->produced - length)
		return 0;
	/* Past the soft limit only with the batch's first reply. */
	if (b->produced && (b->produced >= b->soft_limit || header + length > b->soft_limit - b->produced))
		return 0;
	reply = b->out + b->produced;

	ok = 1;
	pthread_rwlock_rdlock(&map->lock);
	for (done = 0; ok && done < length; done += run) {
		/* Checks the export's size too; a read over clusters apart in the file takes a pread each. */
		host = qb_read_map_run(map, offset + done, length - done, &run);
		ok = host != UINT64_MAX && read_all(map->fd, reply + header + done, run, host) == 0;
	}
	pthread_rwlock_unlock(&map->lock);
	if (!ok)
		return 0;

	if (b->mode == SIMPLE) {
		put32(reply, SIMPLE_REPLY_MAGIC);
		put32(reply + 4, 0);
		put64(reply + 8, cookie);
	} else if (b->mode == STRUCTURED) {
		put32(reply, STRUCTURED_REPLY_MAGIC);
		put16(reply + 4, REPLY_FLAG_DONE);
		put16(reply + 6, CHUNK_OFFSET_DATA);
		put64(reply + 8, cookie);
		put32(reply + 16, (uint32_t)(8 + length));
		put64(reply + 20, offset);
	} else {
		put32(reply, EXTENDED_REPLY_MAGIC);
		put16(reply + 4, REPLY_FLAG_DONE);
		put16(reply + 6, CHUNK_OFFSET_DATA);
		put64(reply + 8, cookie);
		put64(reply + 16, offset);
		put64(reply + 24, 8 + length);
		put64(reply + 32, offset);
	}
	b->produced += header + (uint32_t)length;
	b->served++;
	b->bytes_read += length;
	return size;
}

/* Serve from the front of b->input; returns the number of requests served. */
int qb_nbd_serve_reads(void *opaque, struct qb_nbd_batch *b)
{
	struct qb_read_map *map = opaque;
	uint32_t used;

	b->consumed = 0;
	b->produced = 0;
	b->served = 0;
	b->bytes_read = 0;
	if (b->mode > EXTENDED)
		return 0;
	while (b->consumed < b->in_len && (used = serve_one(map, b, b->consumed)))
		b->consumed += used;
	return (int)b->served;
}
