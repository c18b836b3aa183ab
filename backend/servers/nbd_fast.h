/* cffi declarations of nbd_fast.c (read by qbackend.servers.nbd_fast). */
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
	uint32_t served;
	uint64_t bytes_read;
};

int qb_nbd_serve_reads(void *map, struct qb_nbd_batch *batch);
