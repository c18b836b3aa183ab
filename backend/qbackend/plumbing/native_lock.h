/* cffi declarations of native_lock.c (read by qbackend.plumbing.native_lock). */
void *qb_lock_new(void);
void qb_lock_free(void *lock);
int qb_lock_acquire(void *lock, double timeout);
int qb_lock_release(void *lock);
