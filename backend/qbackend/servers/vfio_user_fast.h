/* cffi declarations of vfio_user_fast.c (read by qbackend.servers.vfio_user_fast). */
#define QB_SCM_MAX_FD 253 /* the kernel's limit of fds per message: room for all, none lost unclosed */
struct qb_window {
	uint32_t region;
	uint32_t writable;
	uint64_t start;
	uint64_t end;
	uint8_t *base;
	const uint8_t *guard;
};

struct qb_access_loop {
	int fd;
	uint32_t bufsize;
	uint8_t *buf;
	uint32_t outsize;
	uint8_t *out;
	const struct qb_window *windows;
	uint32_t nwindows;
	uint32_t nregions;
	void *lock;
	uint64_t *counts;
	uint64_t max_count;
	int64_t spin_ns;
	int64_t spin_window_ns;
	int spinning;
	uint32_t max_fds;
	int *fds;
	uint32_t nfds;
	uint32_t pos;
	uint32_t end;
	uint64_t served;
	int wake_fd;    /* readable: stop waiting and see whether to pause */
	uint32_t pause; /* set by Python: return QB_PAUSED at the next message boundary */
};

#define QB_PAUSED 2

int qb_serve_accesses(struct qb_access_loop *loop);
