/* cffi declarations of vhost_user_blk_fast.c (read by qbackend.servers.vhost_user_blk_fast,
 * which takes these numbers from the loaded library rather than typing them again). */
#define QB_VU_MAX_REGIONS 64 /* vhost_user_blk.MAX_MEM_SLOTS */
#define QB_VU_MAX_IOV 1024   /* buffers of one request (IOV_MAX); more: Python's */
#define QB_VU_POOL_MAX_THREADS 8
#define QB_VU_POOL_JOBS 16   /* requests of one drain waiting for their used entries */
/* qb_vu_drain: why it stopped */
#define QB_VU_EMPTY 0  /* the ring holds nothing more */
#define QB_VU_PYTHON 1 /* the next chain is Python's: not consumed, last_avail_idx names it */
#define QB_VU_MORE 2   /* the batch's limit: more may be waiting */
/* qb_vu_run: why it returned */
#define QB_VU_WAKE 3   /* the wake eventfd, or `stop`: Python looks at the queue */
#define QB_VU_RELOAD 4 /* `ready` is 0: Python loads the queue's state first */
#define QB_VU_FAILED 5 /* poll or read failed (errno in `error`) */

/* Guest memory as the front end's table gives it, sorted by gpa (shared by a
 * connection's queues; changed only while every queue's lock is held). */
struct qb_vu_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *host;
};

struct qb_vu_mem {
	uint32_t count;
	struct qb_vu_region regions[64];
};

/* One queue: what Python set (under the queue's lock), the ring state the native
 * path and the Python model hand each other, and counters. */
struct qb_vu_queue {
	struct qb_vu_mem *mem;
	void *lock;  /* the queue's lock (a native_lock pthread mutex) */
	void *map;   /* the export's read map (NULL: reads and writes are Python's) */
	int kick_fd;
	int wake_fd;
	int call_fd; /* -1: no interrupts */
	uint32_t ready;   /* 0: qb_vu_run returns QB_VU_RELOAD before serving */
	uint32_t serving; /* started, enabled, configured and not broken */
	uint32_t stop;    /* qb_vu_run returns at once */
	uint32_t pause;   /* > 0: the control thread wants the lock; qb_vu_run does not take it */
	/* the ring (qb_vu_set_rings) */
	uint32_t num;
	uint32_t event_idx;
	uint32_t indirect;
	uint8_t *desc;
	uint8_t *avail;
	uint8_t *used;
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint16_t signalled_used;
	uint16_t signalled_valid;
	uint8_t *inflight;    /* this queue's inflight region (NULL: not tracked) */
	uint64_t counter;     /* the next chain taken gets this counter in the region */
	uint32_t need_notify; /* used entries pushed since the last notification decision */
	uint32_t pushed;      /* used entries pushed since Python last zeroed it */
	/* the device */
	uint64_t capacity; /* sectors */
	uint32_t readonly;
	uint32_t writethrough;
	uint32_t max_batch; /* requests per lock hold */
	void *pool;         /* qb_vu_pool_new's (NULL: every request done by the queue's thread) */
	uint64_t pool_min;  /* reads and writes of this many bytes or more go to the pool */
	int64_t spin_ns;    /* how long to look for more once the ring is empty (0: never) */
	int64_t spin_window_ns; /* ... while the last wait for a kick was shorter than this */
	uint32_t spinning;
	uint32_t notify_each; /* decide on an interrupt after each request (else once per drain) */
	int64_t hold_ns;      /* how long an interrupt may wait for more requests (0: never) */
	int64_t held_since;   /* when the interrupt owed now was first held (0: none held) */
	uint32_t hold_skip;   /* drains left that notify at once: the last hold caught nothing */
	uint32_t hold_backoff; /* ... how many the last hold that caught nothing set */
	uint32_t hold_joined; /* the hold under way caught more requests */
	uint32_t quiet;       /* a drain that empties the ring asks for no kick (a hold may follow) */
	uint8_t serial[20];
	int error;
	/* counters */
	uint64_t requests;
	uint64_t reads;
	uint64_t writes;
	uint64_t flushes;
	uint64_t bytes_read;
	uint64_t bytes_written;
	uint64_t notifications;
	uint64_t handed_over;
	uint64_t kicks;        /* wake-ups by the kick eventfd */
	uint64_t holds_caught; /* holds that more requests joined */
	uint64_t holds_missed; /* ... and that ran out with none */
};

void *qb_vu_pool_new(int nthreads);
void qb_vu_pool_free(void *pool);
int qb_vu_set_rings(struct qb_vu_queue *q, uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa);
int qb_vu_drain(struct qb_vu_queue *q);
int qb_vu_notify(struct qb_vu_queue *q);
int qb_vu_run(struct qb_vu_queue *q);
