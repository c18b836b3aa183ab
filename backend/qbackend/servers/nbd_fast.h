/* cffi declarations of nbd_fast.c (read by qbackend.servers.nbd_fast, which takes
 * these numbers from the loaded library rather than typing them again). */
#define QB_STOP_END 0     /* everything consumed */
#define QB_STOP_PARTIAL 1 /* a request not whole yet: more bytes may make it servable */
#define QB_STOP_PYTHON 2  /* the next request is Python's */
#define QB_STOP_FULL 3    /* the batch's limit: serve on with an empty `out` */
#define QB_CONN_PYTHON 0
#define QB_CONN_NATIVE 1
#define QB_NBD_LOOP_EVENTS 256
/* qb_nbd_batch.mode: the replies the connection negotiated */
#define QB_NBD_SIMPLE 0
#define QB_NBD_STRUCTURED 1
#define QB_NBD_EXTENDED 2

struct qb_nbd_batch {
	const uint8_t *input;
	uint32_t in_len;
	uint8_t *out;
	uint32_t out_size;
	uint32_t soft_limit;
	uint32_t mode;
	uint64_t max_length;
	uint32_t consumed;
	uint32_t produced;
	uint32_t stop;
	uint32_t reads;
	uint32_t writes;
	uint64_t bytes_read;
	uint64_t bytes_written;
};

/* One connection of the transmission loop. */
struct qb_nbd_conn {
	int fd;
	uint32_t state;       /* QB_CONN_NATIVE: served by qb_nbd_loop_wait; else reported to Python */
	uint32_t handed_over; /* set when the loop gives it to Python; Python clears it */
	void *map;            /* its export's read map (NULL: always Python's) */
	struct qb_nbd_batch batch;
	uint8_t *received;    /* received and not served: received[0:received_len] */
	uint32_t received_size;
	uint32_t received_len;
	uint32_t out_start;   /* at a hand-over: replies not sent, batch.out[out_start:out_start+out_len] */
	uint32_t out_len;
	int64_t waiting_since_ns; /* CLOCK_MONOTONIC since when the rest of a request is awaited (0: none is) */
};

struct qb_nbd_ready {
	int fd;
	uint32_t events;
};

struct qb_nbd_counts {
	uint64_t reads;
	uint64_t writes;
	uint64_t bytes_read;
	uint64_t bytes_written;
};

int qb_nbd_serve(void *map, struct qb_nbd_batch *batch);
int qb_nbd_loop_new(void);
int qb_nbd_loop_watch(int epfd, int op, struct qb_nbd_conn *conn, uint32_t events);
int qb_nbd_loop_wait(int epfd, struct qb_nbd_ready *ready, int max, int timeout_ms, struct qb_nbd_counts *counts);
