/* virtio-blk requests on split virtqueues served in C (vhost-user-blk).
 *
 * qb_vu_drain takes the chains the driver made available, in order, and
 * serves those that are plain: IN and OUT whose every byte the export's read
 * map locates (qbackend.block.read_map; OUT only in a writable map), FLUSH,
 * GET_ID.  Each chain is walked and checked as the Python model walks it
 * (qbackend.models.virtqueue: the avail index may not run more than the
 * queue size ahead, heads and `next` inside their table, no loops, indirect
 * tables well formed and inside guest memory, buffers inside guest memory,
 * nothing device-readable after something device-writable, at most 2^32
 * bytes) and parsed as qbackend.models.virtio_blk parses it.  Anything else,
 * a chain that breaks one of those rules, a request refused, an I/O that
 * fails or comes up short, stops the drain *before* that chain is consumed:
 * `last_avail_idx` names it and Python serves it (its model is the
 * reference, errors and all), then calls again.  So every request is
 * answered in ring order, and the C side never answers anything odd.
 *
 * Descriptors are copied out of guest memory once and used from the copy;
 * the data goes straight between guest memory and the image file
 * (preadv/pwritev, run by run of the read map).  Used entries are published
 * one by one (release store of used idx); the call eventfd is signalled by
 * the virtio rules (VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event with
 * VIRTIO_F_EVENT_IDX), as SplitVirtqueue.should_notify decides.
 *
 * qb_vu_run is a queue worker's loop: wait for a kick, take the queue's lock,
 * drain, notify, let go; it returns to Python when Python has to act (a
 * chain for it, the wake eventfd, a reload).  Each queue has its own lock,
 * so queues run in parallel; the control thread takes every queue's lock
 * (after raising `pause`, so a busy queue lets go) to change guest memory.
 * Once the ring is empty the worker looks at it a little longer (`spin_ns`,
 * yielding the CPU) while kicks have been coming soon after it went to
 * sleep: on this kind of host a wake-up from poll costs tens of
 * microseconds.  An optional I/O pool (qb_vu_pool_new) runs large reads and
 * writes side by side; see vhost_user_blk_fast.py for what it measured.
 *
 * With an inflight region (`inflight`, qbackend.models.inflight has the layout
 * and why the order), a chain this side takes is recorded (counter, then
 * inflight = 1) before it is carried out, and each push records its return
 * around the used idx store (last_batch_head; the used element and idx; then
 * inflight = 0; then the region's used_idx), one store after the other, so a
 * back end killed at any instruction leaves a region the next one can read.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vhost_user_blk_fast.h"
#include "../block/read_map_impl.h"

/* Wire numbers of qbackend.models.virtqueue and virtio_blk (tests/test_wire_constants.py). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define DESC_SIZE 16
#define USED_ELEM_SIZE 8
#define INDIRECT_REACH 65536
#define BLK_HEADER_SIZE 16
#define BLK_SECTOR_SHIFT 9
#define BLK_ID_BYTES 20
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
/* The inflight region's layout (qbackend.protocol.vhost_user INFLIGHT_*). */
#define INFLIGHT_HEADER_SIZE 16
#define INFLIGHT_DESC_SIZE 16
#define INFLIGHT_LAST_BATCH_HEAD_OFFSET 12
#define INFLIGHT_USED_IDX_OFFSET 14
#define INFLIGHT_DESC_COUNTER_OFFSET 8

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct chain {
	struct iovec iov[QB_VU_MAX_IOV];
	uint32_t niov;
	uint32_t nreadable;  /* iov[0:nreadable] device-readable, the rest device-writable */
	uint64_t readable;   /* bytes */
	uint64_t writable;
};

static uint16_t load16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }

/* The host address of [gpa, gpa+len) when it lies inside one region, else NULL. */
static uint8_t *one_region(const struct qb_vu_mem *mem, uint64_t gpa, uint64_t len)
{
	uint32_t i;

	for (i = 0; i < mem->count; i++) {
		const struct qb_vu_region *r = &mem->regions[i];

		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

/* [gpa, gpa+len) as iovecs appended to c (across regions that adjoin); 0, or -1. */
static int add_buffer(const struct qb_vu_mem *mem, struct chain *c, uint64_t gpa, uint64_t len)
{
	while (len) {
		const struct qb_vu_region *r = NULL;
		uint64_t n;
		uint32_t i;

		for (i = 0; i < mem->count; i++)
			if (gpa >= mem->regions[i].gpa && gpa - mem->regions[i].gpa < mem->regions[i].size) {
				r = &mem->regions[i];
				break;
			}
		if (!r || c->niov == QB_VU_MAX_IOV)
			return -1;
		n = r->size - (gpa - r->gpa);
		if (n > len)
			n = len;
		c->iov[c->niov].iov_base = r->host + (gpa - r->gpa);
		c->iov[c->niov].iov_len = n;
		c->niov++;
		gpa += n;
		len -= n;
	}
	return 0;
}

/* Walk the chain at `head` into c, by the model's rules; 0, or -1: Python's. */
static int walk(const struct qb_vu_queue *q, uint16_t head, struct chain *c)
{
	const uint8_t *table = q->desc;
	uint64_t limit = q->num, seen = 0, total = 0;
	uint32_t index = head;
	int in_indirect = 0, any_writable = 0;
	struct desc d;

	c->niov = c->nreadable = 0;
	c->readable = c->writable = 0;
	for (;;) {
		if (++seen > limit)
			return -1; /* a loop */
		memcpy(&d, table + (uint64_t)DESC_SIZE * index, sizeof(d));
		__atomic_signal_fence(__ATOMIC_SEQ_CST); /* d is a copy: never read twice from the guest */
		if (d.flags & VIRTQ_DESC_F_INDIRECT) {
			if (!q->indirect || in_indirect || (d.flags & VIRTQ_DESC_F_NEXT) || d.len == 0 ||
			    d.len % DESC_SIZE)
				return -1;
			table = one_region(q->mem, d.addr, d.len);
			if (!table)
				return -1;
			limit = d.len / DESC_SIZE;
			if (limit > INDIRECT_REACH)
				limit = INDIRECT_REACH;
			index = 0;
			seen = 0;
			in_indirect = 1;
			continue;
		}
		if (d.flags & VIRTQ_DESC_F_WRITE) {
			any_writable = 1;
			c->writable += d.len;
		} else {
			if (any_writable)
				return -1;
			c->readable += d.len;
		}
		if (d.len && add_buffer(q->mem, c, d.addr, d.len))
			return -1;
		if (!(d.flags & VIRTQ_DESC_F_WRITE))
			c->nreadable = c->niov;
		total += d.len;
		if (!(d.flags & VIRTQ_DESC_F_NEXT))
			break;
		index = d.next;
		if (index >= limit)
			return -1;
	}
	return total > (1ull << 32) ? -1 : 0;
}

/* iov[0:n] less its first `skip` bytes and its last `cut`, into out; the count, or -1 if none. */
static int trim(const struct iovec *iov, uint32_t n, uint64_t skip, uint64_t cut, struct iovec *out)
{
	uint32_t i, k = 0;

	for (i = 0; i < n; i++) {
		uint8_t *base = iov[i].iov_base;
		uint64_t len = iov[i].iov_len;

		if (skip >= len) {
			skip -= len;
			continue;
		}
		out[k].iov_base = base + skip;
		out[k].iov_len = len - skip;
		skip = 0;
		k++;
	}
	while (cut && k) {
		if (out[k - 1].iov_len > cut) {
			out[k - 1].iov_len -= cut;
			cut = 0;
		} else {
			cut -= out[k - 1].iov_len;
			k--;
		}
	}
	return (int)k;
}

/* All of iov[0:n] (`length` bytes) read from (or written to) the file at host; 0 or -1. */
static int file_iov(int fd, struct iovec *iov, int n, uint64_t length, uint64_t host, int write)
{
	while (length) {
		ssize_t got = write ? pwritev(fd, iov, n, (off_t)host) : preadv(fd, iov, n, (off_t)host);
		uint64_t adv;

		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return -1;
		host += (uint64_t)got;
		length -= (uint64_t)got;
		adv = (uint64_t)got;
		while (n && adv >= iov->iov_len) {
			adv -= iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (uint8_t *)iov->iov_base + adv;
			iov->iov_len -= adv;
		}
	}
	return 0;
}

/* Guest bytes [offset, offset+length) moved between the file and data[0:n], run by run of the
 * map (every byte must be mapped; a write is checked whole first); 0, or -1: Python's. */
static int map_io(struct qb_read_map *map, struct iovec *data, int n, uint64_t offset, uint64_t length,
		  int write, int sync)
{
	struct iovec part[QB_VU_MAX_IOV];
	uint64_t done, run = 0, host;
	int ok = 1, i = 0;
	uint64_t into = 0; /* bytes of data[i] already used */

	pthread_rwlock_rdlock(&map->lock);
	if (write)
		for (done = 0; ok && done < length; done += run)
			ok = qb_read_map_run(map, offset + done, length - done, &run) != UINT64_MAX;
	for (done = 0; ok && done < length; done += run) {
		uint64_t want, got = 0;
		int k = 0;

		host = qb_read_map_run(map, offset + done, length - done, &run);
		if (host == UINT64_MAX) {
			ok = 0;
			break;
		}
		want = run;
		while (got < want && i < n) {
			uint64_t take = data[i].iov_len - into;

			if (take > want - got)
				take = want - got;
			part[k].iov_base = (uint8_t *)data[i].iov_base + into;
			part[k].iov_len = take;
			k++;
			got += take;
			into += take;
			if (into == data[i].iov_len) {
				i++;
				into = 0;
			}
		}
		ok = got == want && file_iov(map->fd, part, k, want, host, write) == 0;
	}
	if (ok && sync)
		ok = fdatasync(map->fd) == 0;
	pthread_rwlock_unlock(&map->lock);
	return ok ? 0 : -1;
}

static int flush_file(struct qb_read_map *map)
{
	int ok;

	pthread_rwlock_rdlock(&map->lock);
	ok = map->fd >= 0 && fdatasync(map->fd) == 0;
	pthread_rwlock_unlock(&map->lock);
	return ok ? 0 : -1;
}

/* What one plain request is to do, found by prepare() and done by execute(). */
struct request {
	uint32_t type;
	struct qb_read_map *map;
	struct iovec data[QB_VU_MAX_IOV];
	int n;
	uint64_t offset, length;
	int write, sync;
	uint8_t *status;
	int64_t used; /* the used length once done */
};

/* The request in c checked and planned; 0, or -1: Python's (nothing done). */
static int prepare(struct qb_vu_queue *q, struct chain *c, struct request *r)
{
	struct iovec *iov = c->iov, *w = c->iov + c->nreadable;
	uint32_t nw = c->niov - c->nreadable;
	uint8_t header[BLK_HEADER_SIZE];
	uint64_t out_len, in_len, sector, count, i, pos = 0;
	struct qb_read_map *map = q->map;

	if (!c->writable || c->readable < BLK_HEADER_SIZE)
		return -1; /* no status byte (the queue breaks), or a short header (IOERR): Python's */
	r->status = (uint8_t *)w[nw - 1].iov_base + w[nw - 1].iov_len - 1;
	for (i = 0; pos < BLK_HEADER_SIZE; i++) {
		uint64_t take = iov[i].iov_len < BLK_HEADER_SIZE - pos ? iov[i].iov_len : BLK_HEADER_SIZE - pos;

		memcpy(header + pos, iov[i].iov_base, take);
		pos += take;
	}
	__atomic_signal_fence(__ATOMIC_SEQ_CST); /* the header is a copy: never read twice from the guest */
	memcpy(&r->type, header, 4);
	memcpy(&sector, header + 8, 8);
	out_len = c->readable - BLK_HEADER_SIZE;
	in_len = c->writable - 1;
	r->map = map;
	r->n = 0;
	r->length = 0;
	r->write = r->sync = 0;
	if (r->type == BLK_T_IN || r->type == BLK_T_OUT) {
		int reading = r->type == BLK_T_IN;
		uint64_t len = reading ? in_len : out_len;

		if ((reading ? out_len : in_len) || len == 0 || len % (1u << BLK_SECTOR_SHIFT) || !map)
			return -1;
		if (!reading && (q->readonly || !map->writable))
			return -1;
		count = len >> BLK_SECTOR_SHIFT;
		if (sector > q->capacity || count > q->capacity - sector)
			return -1;
		r->n = reading ? trim(w, nw, 0, 1, r->data) : trim(iov, c->nreadable, BLK_HEADER_SIZE, 0, r->data);
		if (r->n <= 0)
			return -1;
		r->offset = sector << BLK_SECTOR_SHIFT;
		r->length = len;
		r->write = !reading;
		r->sync = !reading && q->writethrough;
		r->used = reading ? (int64_t)len + 1 : 1;
		return 0;
	}
	if (r->type == BLK_T_FLUSH) {
		if (q->readonly || !map || !map->writable)
			return -1;
		r->used = 1;
		return 0;
	}
	if (r->type == BLK_T_GET_ID) {
		if (out_len)
			return -1;
		r->n = in_len ? trim(w, nw, 0, 1, r->data) : 0;
		r->length = in_len < BLK_ID_BYTES ? in_len : BLK_ID_BYTES;
		r->used = (int64_t)r->length + 1;
		return 0;
	}
	return -1;
}

/* Carry a prepared request out (but its status and used entry); 0, or -1: Python's. */
static int execute(const struct qb_vu_queue *q, struct request *r)
{
	if (r->type == BLK_T_IN || r->type == BLK_T_OUT)
		return map_io(r->map, r->data, r->n, r->offset, r->length, r->write, r->sync);
	if (r->type == BLK_T_FLUSH)
		return flush_file(r->map);
	if (r->type == BLK_T_GET_ID) {
		uint64_t done = 0;
		int k;

		for (k = 0; k < r->n && done < r->length; k++) {
			uint64_t take = r->data[k].iov_len < r->length - done ? r->data[k].iov_len : r->length - done;

			memcpy(r->data[k].iov_base, q->serial + done, take);
			done += take;
		}
		return 0;
	}
	return -1;
}

static void count_request(struct qb_vu_queue *q, const struct request *r)
{
	if (r->type == BLK_T_IN) {
		q->reads++;
		q->bytes_read += r->length;
	} else if (r->type == BLK_T_OUT) {
		q->writes++;
		q->bytes_written += r->length;
	} else if (r->type == BLK_T_FLUSH) {
		q->flushes++;
	}
}

/* -- the I/O pool: large reads and writes run side by side ---------------------------------
 *
 * While the queue's thread holds the lock, it hands large reads and writes to the pool's
 * threads (first come, first served) and goes on walking the ring; the used entries follow in
 * ring order, each as soon as it and every one before it is done.  Everything the drain took
 * is done before it returns (so before the lock goes, before Python takes a chain over): the
 * pool never outlives a drain. */

struct job {
	struct request r;
	uint16_t head;
	uint16_t avail_idx; /* where the chain is in the available ring (to hand it over again) */
	int result;
	int done;
};

struct qb_vu_pool {
	pthread_mutex_t mu;
	pthread_cond_t work, done;
	int nthreads, stopping;
	pthread_t threads[QB_VU_POOL_MAX_THREADS];
	struct job *todo[QB_VU_POOL_JOBS]; /* FIFO */
	uint32_t todo_first, todo_count;
	struct job jobs[QB_VU_POOL_JOBS]; /* taken, waiting for their used entries: a ring, in ring order */
	uint32_t first, njobs;
	const struct qb_vu_queue *q;
};

static void *pool_thread(void *opaque)
{
	struct qb_vu_pool *pool = opaque;

	pthread_mutex_lock(&pool->mu);
	for (;;) {
		struct job *job;
		int result;

		while (!pool->todo_count && !pool->stopping)
			pthread_cond_wait(&pool->work, &pool->mu);
		if (pool->stopping)
			break;
		job = pool->todo[pool->todo_first];
		pool->todo_first = (pool->todo_first + 1) % QB_VU_POOL_JOBS;
		pool->todo_count--;
		pthread_mutex_unlock(&pool->mu);
		result = execute(pool->q, &job->r);
		pthread_mutex_lock(&pool->mu);
		job->result = result;
		job->done = 1;
		pthread_cond_signal(&pool->done);
	}
	pthread_mutex_unlock(&pool->mu);
	return NULL;
}

void *qb_vu_pool_new(int nthreads)
{
	struct qb_vu_pool *pool = calloc(1, sizeof(*pool));
	int i;

	if (!pool)
		return NULL;
	if (nthreads > QB_VU_POOL_MAX_THREADS)
		nthreads = QB_VU_POOL_MAX_THREADS;
	pthread_mutex_init(&pool->mu, NULL);
	pthread_cond_init(&pool->work, NULL);
	pthread_cond_init(&pool->done, NULL);
	for (i = 0; i < nthreads; i++) {
		if (pthread_create(&pool->threads[i], NULL, pool_thread, pool))
			break;
		pool->nthreads++;
	}
	return pool;
}

void qb_vu_pool_free(void *opaque)
{
	struct qb_vu_pool *pool = opaque;
	int i;

	pthread_mutex_lock(&pool->mu);
	pool->stopping = 1;
	pthread_cond_broadcast(&pool->work);
	pthread_mutex_unlock(&pool->mu);
	for (i = 0; i < pool->nthreads; i++)
		pthread_join(pool->threads[i], NULL);
	pthread_cond_destroy(&pool->work);
	pthread_cond_destroy(&pool->done);
	pthread_mutex_destroy(&pool->mu);
	free(pool);
}

int qb_vu_set_rings(struct qb_vu_queue *q, uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa)
{
	uint64_t num = q->num;

	if (!q->mem || !num || (num & (num - 1)) || num > 32768)
		return -1;
	q->desc = one_region(q->mem, desc_gpa, DESC_SIZE * num);
	q->avail = one_region(q->mem, avail_gpa, 6 + 2 * num);
	q->used = one_region(q->mem, used_gpa, 6 + USED_ELEM_SIZE * num);
	if (!q->desc || !q->avail || !q->used || desc_gpa % 16 || avail_gpa % 2 || used_gpa % 4) {
		q->desc = q->avail = q->used = NULL;
		return -1;
	}
	return 0;
}

static uint8_t *inflight_entry(const struct qb_vu_queue *q, uint16_t head)
{
	return q->inflight + INFLIGHT_HEADER_SIZE + (uint64_t)INFLIGHT_DESC_SIZE * head;
}

/* A chain taken (before it is carried out): its counter, then its inflight flag. */
static void inflight_start(struct qb_vu_queue *q, uint16_t head)
{
	uint8_t *e;

	if (!q->inflight)
		return;
	e = inflight_entry(q, head);
	__atomic_store_n((uint64_t *)(e + INFLIGHT_DESC_COUNTER_OFFSET), q->counter, __ATOMIC_RELEASE);
	q->counter++;
	__atomic_store_n(e, (uint8_t)1, __ATOMIC_RELEASE);
}

static void push(struct qb_vu_queue *q, uint16_t head, uint32_t written)
{
	uint8_t *elem = q->used + 4 + USED_ELEM_SIZE * (q->used_idx & (q->num - 1));
	uint32_t id = head;

	/* Release stores: each one after the one before it (a plain store on x86; the
	 * compiler may not move them), so the region is consistent at every instruction. */
	if (q->inflight)
		__atomic_store_n((uint16_t *)(q->inflight + INFLIGHT_LAST_BATCH_HEAD_OFFSET), head, __ATOMIC_RELEASE);
	memcpy(elem, &id, 4);
	memcpy(elem + 4, &written, 4);
	q->used_idx++;
	/* The element before the index that publishes it. */
	__atomic_store_n((uint16_t *)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
	if (q->inflight) {
		__atomic_store_n(inflight_entry(q, head), (uint8_t)0, __ATOMIC_RELEASE);
		__atomic_store_n((uint16_t *)(q->inflight + INFLIGHT_USED_IDX_OFFSET), q->used_idx, __ATOMIC_RELEASE);
	}
	q->need_notify = 1;
	q->pushed++;
	q->requests++;
}

/* Push the taken jobs that are done, in ring order, up to the first not done; with `wait`,
 * wait for the first to be done if it is not.  The first that failed goes back to the ring for
 * Python with every job after it (waited for, then dropped: they are done again later; a read
 * or write done twice is the same read or write).  QB_VU_PYTHON then, else 0. */
static int push_done(struct qb_vu_queue *q, struct qb_vu_pool *pool, int wait)
{
	int pushed = 0;

	pthread_mutex_lock(&pool->mu);
	while (pool->njobs) {
		struct job *job = &pool->jobs[pool->first];

		if (!job->done) {
			if (!wait || pushed)
				break;
			pthread_cond_wait(&pool->done, &pool->mu);
			continue;
		}
		if (job->result) {
			uint32_t i;

			for (i = 0; i < pool->njobs; i++)
				while (!pool->jobs[(pool->first + i) % QB_VU_POOL_JOBS].done)
					pthread_cond_wait(&pool->done, &pool->mu);
			q->last_avail_idx = job->avail_idx;
			q->handed_over++;
			pool->njobs = 0;
			pthread_mutex_unlock(&pool->mu);
			return QB_VU_PYTHON;
		}
		count_request(q, &job->r);
		*job->r.status = BLK_S_OK;
		push(q, job->head, (uint32_t)job->r.used);
		pushed++;
		pool->first = (pool->first + 1) % QB_VU_POOL_JOBS;
		pool->njobs--;
	}
	pthread_mutex_unlock(&pool->mu);
	return 0;
}

/* Whether r and a job not pushed yet touch the same bytes of the disk, one of them writing:
 * then r waits for the jobs (the disk sees requests that overlap in ring order). */
static int overlaps(const struct qb_vu_pool *pool, const struct request *r)
{
	uint32_t i;

	if (r->type != BLK_T_IN && r->type != BLK_T_OUT)
		return 0;
	for (i = 0; i < pool->njobs; i++) {
		const struct request *o = &pool->jobs[(pool->first + i) % QB_VU_POOL_JOBS].r;

		if ((o->type == BLK_T_IN || o->type == BLK_T_OUT) && (o->write || r->write) &&
		    r->offset < o->offset + o->length && o->offset < r->offset + r->length)
			return 1;
	}
	return 0;
}

/* Every taken job done and pushed (or handed back); QB_VU_PYTHON if one failed, else rc. */
static int finish_jobs(struct qb_vu_queue *q, struct qb_vu_pool *pool, int rc)
{
	if (!pool)
		return rc;
	while (pool->njobs)
		if (push_done(q, pool, 1) == QB_VU_PYTHON)
			return QB_VU_PYTHON;
	return rc;
}

/* avail_event (VIRTIO_F_EVENT_IDX): the driver kicks once it makes the next chain available. */
static void ask_for_kick(struct qb_vu_queue *q)
{
	__atomic_store_n((uint16_t *)(q->used + 4 + USED_ELEM_SIZE * q->num), q->last_avail_idx, __ATOMIC_RELAXED);
}

/* Serve from the ring until it is empty (EMPTY), the next chain is Python's (PYTHON) or the
 * batch is full (MORE).  Large reads and writes go to the pool, the rest is done here; the used
 * entries are pushed in ring order. */
static int drain(struct qb_vu_queue *q)
{
	static __thread struct chain c;
	static __thread struct request inline_req;
	struct qb_vu_pool *pool = q->pool;
	uint32_t served = 0;

	if (pool)
		pool->q = q;
	for (;;) {
		uint16_t last, idx, head;
		struct request *r = &inline_req;
		struct job *job = NULL;
		int pooled;

		if (pool && pool->njobs) {
			/* What the pool has done goes out now (the driver may be waiting for it). */
			if (push_done(q, pool, pool->njobs == QB_VU_POOL_JOBS) == QB_VU_PYTHON)
				return QB_VU_PYTHON;
			qb_vu_notify(q);
		}
		if (served >= q->max_batch || (served && __atomic_load_n(&q->pause, __ATOMIC_ACQUIRE)))
			return finish_jobs(q, pool, QB_VU_MORE); /* let go of the lock now and then */
		last = q->last_avail_idx;
		idx = load16(q->avail + 2);
		if (idx == last && pool && pool->njobs) {
			/* Nothing new: wait for the next job, push it, look again. */
			if (push_done(q, pool, 1) == QB_VU_PYTHON)
				return QB_VU_PYTHON;
			qb_vu_notify(q);
			continue;
		}
		if (idx == last) {
			if (!q->event_idx || q->quiet)
				return QB_VU_EMPTY; /* quiet: no kick asked for (an interrupt may be held) */
			/* Kick me for the next one; then look once more past a full fence. */
			ask_for_kick(q);
			__atomic_thread_fence(__ATOMIC_SEQ_CST);
			idx = load16(q->avail + 2);
			if (idx == last)
				return QB_VU_EMPTY;
		}
		if ((uint16_t)(idx - last) > q->num)
			return finish_jobs(q, pool, QB_VU_PYTHON); /* the index jumped: the model breaks the queue */
		head = load16(q->avail + 4 + 2 * (last & (q->num - 1)));
		if (pool) {
			job = &pool->jobs[(pool->first + pool->njobs) % QB_VU_POOL_JOBS];
			r = &job->r;
		}
		if (head >= q->num || walk(q, head, &c) || prepare(q, &c, r)) {
			q->handed_over++;
			return finish_jobs(q, pool, QB_VU_PYTHON);
		}
		pooled = pool && pool->nthreads && r->length >= q->pool_min && r->type != BLK_T_FLUSH &&
			 r->type != BLK_T_GET_ID;
		if ((r->type == BLK_T_FLUSH || (pool && overlaps(pool, r))) && finish_jobs(q, pool, 0) == QB_VU_PYTHON)
			return QB_VU_PYTHON; /* a flush covers what went before it, a write follows what it overlaps */
		inflight_start(q, head); /* taken: recorded before anything of it is done */
		if (pooled || (pool && pool->njobs)) {
			/* Large, or behind a job not pushed yet: taken as a job, pushed in ring order. */
			job->head = head;
			job->avail_idx = last;
			job->result = 0;
			job->done = !pooled;
			if (!pooled)
				job->result = execute(q, r);
			pthread_mutex_lock(&pool->mu);
			pool->njobs++;
			if (pooled) {
				pool->todo[(pool->todo_first + pool->todo_count) % QB_VU_POOL_JOBS] = job;
				pool->todo_count++;
				pthread_cond_signal(&pool->work);
			}
			pthread_mutex_unlock(&pool->mu);
			q->last_avail_idx = last + 1;
			served++;
			continue;
		}
		if (execute(q, r)) {
			q->handed_over++;
			return QB_VU_PYTHON;
		}
		count_request(q, r);
		*r->status = BLK_S_OK;
		q->last_avail_idx = last + 1;
		push(q, head, (uint32_t)r->used);
		if (q->notify_each)
			qb_vu_notify(q); /* the driver may take this one while the next is served */
		served++;
	}
}

int qb_vu_drain(struct qb_vu_queue *q)
{
	if (!q->serving || !q->desc)
		return QB_VU_EMPTY;
	return drain(q);
}

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int qb_vu_notify(struct qb_vu_queue *q)
{
	uint16_t new_idx, old;
	int valid, notify;
	uint64_t one = 1;

	if (!q->need_notify || !q->avail)
		return 0;
	q->need_notify = 0;
	q->held_since = 0;
	__atomic_thread_fence(__ATOMIC_SEQ_CST); /* used idx out before used_event / flags are read */
	new_idx = q->used_idx;
	old = q->signalled_used;
	valid = q->signalled_valid;
	q->signalled_used = new_idx;
	q->signalled_valid = 1;
	if (valid && new_idx == old)
		return 0;
	if (!q->event_idx)
		notify = !(load16(q->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
	else if (!valid)
		notify = 1;
	else
		notify = need_event(load16(q->avail + 4 + 2 * q->num), new_idx, old);
	if (!notify)
		return 0;
	q->notifications++;
	if (q->call_fd >= 0)
		while (write(q->call_fd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
	return 1;
}

static void clear(int fd)
{
	uint64_t value;

	while (read(fd, &value, sizeof(value)) < 0 && errno == EINTR)
		;
}

static int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* After a drain found the ring empty: look at the avail index a little longer (holding the
 * lock, as long as nobody wants it), since a wake-up from poll costs more here than a short
 * spin; 1 if the driver made something available meanwhile. */
static int spin(struct qb_vu_queue *q)
{
	int64_t deadline = now_ns() + q->spin_ns;

	if (!q->serving || !q->avail)
		return 0;
	do {
		if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE) || __atomic_load_n(&q->pause, __ATOMIC_ACQUIRE))
			return 0;
		if (load16(q->avail + 2) != q->last_avail_idx)
			return 1;
		sched_yield();
	} while (now_ns() < deadline);
	return 0;
}

/* Holding an interrupt.  A TCG guest pays dearly for each kick and each interrupt (an exit,
 * QEMU's main loop, its own handler), and one that refills its queue adds a request at a
 * time: answered at once, with a kick asked for as soon as the ring is empty, each request
 * costs it about one of each.  So once a drain that served something finds the ring empty,
 * the interrupt it owes may wait up to hold_ns, during which no kick is asked for (the avail
 * event stays behind): the guest goes on adding without kicking, the worker looks again when
 * the hold ends (or at a kick that was on its way), and one interrupt answers all.
 *
 * A hold that catches nothing (the guest waits for this very interrupt: QD1, or every request
 * of its depth answered) makes the next drains notify at once, twice as many after each such
 * hold in a row (up to HOLD_BACKOFF_MAX), so holding is tried again now and then but costs
 * next to nothing where it does not pay.  An interrupt owed with nothing new served (at queue
 * start) is not held.  Only with VIRTIO_F_EVENT_IDX: without it no kick can be put off. */
#define HOLD_BACKOFF_FIRST 16
#define HOLD_MAX_REQUEST_BYTES 65536
#define HOLD_BACKOFF_MAX 1024

static void judge_hold(struct qb_vu_queue *q)
{
	if (q->hold_joined) {
		q->holds_caught++;
		q->hold_backoff = 0;
		return;
	}
	q->holds_missed++;
	q->hold_backoff = q->hold_backoff ? q->hold_backoff * 2 : HOLD_BACKOFF_FIRST;
	if (q->hold_backoff > HOLD_BACKOFF_MAX)
		q->hold_backoff = HOLD_BACKOFF_MAX;
	q->hold_skip = q->hold_backoff;
}

/* After a quiet drain found the ring empty, having served `served` requests of `bytes` in all:
 * 1 to hold (or go on holding) the interrupt.  Large requests start no hold: their interrupt
 * is a small part of their cost, and a guest that has them all answered but one interrupt
 * late sits idle while the next ones are served. */
static int hold_interrupt(struct qb_vu_queue *q, uint64_t served, uint64_t bytes)
{
	if (!q->held_since) {
		if (!q->hold_ns || !q->event_idx || !q->need_notify || !served ||
		    bytes > served * HOLD_MAX_REQUEST_BYTES)
			return 0;
		if (q->hold_skip) {
			q->hold_skip--;
			return 0;
		}
		q->held_since = now_ns();
		q->hold_joined = 0;
		return 1;
	}
	if (served)
		q->hold_joined = 1;
	if (now_ns() - q->held_since < q->hold_ns)
		return 1;
	judge_hold(q);
	return 0;
}

/* Python wants the queue while an interrupt is held: ask for kicks again and let it go. */
static void end_hold(struct qb_vu_queue *q)
{
	pthread_mutex_lock(q->lock);
	if (q->held_since && q->serving && q->used) {
		ask_for_kick(q);
		qb_vu_notify(q);
	}
	pthread_mutex_unlock(q->lock);
}

int qb_vu_run(struct qb_vu_queue *q)
{
	pthread_mutex_t *lock = q->lock;

	for (;;) {
		struct pollfd fds[2];
		struct timespec hold, *timeout = NULL;
		int64_t waited;
		int rc;

		if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE))
			return QB_VU_WAKE;
		if (__atomic_load_n(&q->pause, __ATOMIC_ACQUIRE)) {
			/* The control thread is taking the lock: wait until it is done (it signals wake). */
			fds[0].fd = q->wake_fd;
			fds[0].events = POLLIN;
			if (poll(fds, 1, 10) > 0)
				clear(q->wake_fd);
			continue;
		}
		pthread_mutex_lock(lock);
		if (q->stop || q->pause) {
			pthread_mutex_unlock(lock);
			continue;
		}
		if (!q->ready) {
			pthread_mutex_unlock(lock);
			return QB_VU_RELOAD;
		}
		do {
			uint64_t before = q->requests, bytes_before = q->bytes_read + q->bytes_written;

			q->quiet = q->hold_ns > 0; /* a hold may follow: no kick asked for yet */
			rc = qb_vu_drain(q);
			q->quiet = 0;
			if (rc == QB_VU_EMPTY && hold_interrupt(q, q->requests - before,
								q->bytes_read + q->bytes_written - bytes_before))
				break;
			if (rc == QB_VU_EMPTY && q->hold_ns > 0)
				rc = qb_vu_drain(q); /* no hold: ask for a kick, and look once more */
			if (rc != QB_VU_PYTHON)
				qb_vu_notify(q); /* else Python serves the next one first, and this is called after it */
		} while (rc == QB_VU_EMPTY && q->spin_ns > 0 && q->spinning && spin(q));
		if (rc == QB_VU_EMPTY && q->held_since) {
			int64_t left = q->held_since + q->hold_ns - now_ns();

			if (left < 0)
				left = 0;
			hold.tv_sec = left / 1000000000;
			hold.tv_nsec = left % 1000000000;
			timeout = &hold;
		}
		pthread_mutex_unlock(lock);
		if (rc == QB_VU_PYTHON)
			return QB_VU_PYTHON;
		if (rc == QB_VU_MORE)
			continue;
		fds[0].fd = q->kick_fd;
		fds[0].events = POLLIN;
		fds[1].fd = q->wake_fd;
		fds[1].events = POLLIN;
		waited = now_ns();
		rc = ppoll(fds, 2, timeout, NULL);
		if (rc == 0)
			continue; /* the hold ran out: look at the ring, then the interrupt goes */
		/* Spin next time only while kicks come soon after the ring runs dry. */
		q->spinning = now_ns() - waited < q->spin_window_ns;
		if (rc < 0 && errno == EINTR)
			continue;
		if (rc < 0) {
			q->error = errno;
			return QB_VU_FAILED;
		}
		if (fds[0].revents & (POLLERR | POLLNVAL) || fds[1].revents & (POLLERR | POLLNVAL)) {
			q->error = EBADF;
			return QB_VU_FAILED;
		}
		if (fds[0].revents & POLLIN) {
			clear(q->kick_fd);
			q->kicks++;
		}
		if (fds[1].revents & POLLIN) {
			clear(q->wake_fd);
			if (q->held_since && !__atomic_load_n(&q->pause, __ATOMIC_ACQUIRE))
				end_hold(q); /* Python may stop the queue now */
			return QB_VU_WAKE;
		}
	}
}
