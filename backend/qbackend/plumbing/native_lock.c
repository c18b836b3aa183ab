/* A recursive lock that Python and C code share: a pthread mutex.
 *
 * Python takes it through cffi, which lets go of the GIL for the call, so a
 * thread that waits for it never holds the GIL meanwhile; C code (the
 * vfio-user access loop) takes it without the GIL at all.  See
 * qbackend.plumbing.native_lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "native_lock.h"

void *qb_lock_new(void)
{
	pthread_mutexattr_t attr;
	pthread_mutex_t *lock = malloc(sizeof(*lock));

	if (!lock)
		return NULL;
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
	if (pthread_mutex_init(lock, &attr)) {
		free(lock);
		lock = NULL;
	}
	pthread_mutexattr_destroy(&attr);
	return lock;
}

void qb_lock_free(void *lock)
{
	pthread_mutex_destroy(lock);
	free(lock);
}

/* 0 once held; EBUSY or ETIMEDOUT if not.  timeout < 0: wait for ever, 0: do not wait. */
int qb_lock_acquire(void *lock, double timeout)
{
	struct timespec until;
	time_t seconds;

	if (timeout < 0)
		return pthread_mutex_lock(lock);
	if (timeout == 0)
		return pthread_mutex_trylock(lock);
	clock_gettime(CLOCK_REALTIME, &until);
	seconds = (time_t)timeout;
	until.tv_nsec += (long)((timeout - (double)seconds) * 1e9);
	until.tv_sec += seconds + until.tv_nsec / 1000000000L;
	until.tv_nsec %= 1000000000L;
	return pthread_mutex_timedlock(lock, &until);
}

/* 0, or EPERM when the calling thread does not hold the lock. */
int qb_lock_release(void *lock)
{
	return pthread_mutex_unlock(lock);
}
