/* An image's guest-to-file map for native readers: see read_map_impl.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "read_map_impl.h" /* and read_map.h */

void *qb_read_map_new(int fd, uint64_t size, uint32_t cluster_bits, int identity, uint64_t max_blocks,
		      int writable)
{
	struct qb_read_map *map = calloc(1, sizeof(*map));
	uint64_t clusters;

	if (!map || cluster_bits < 9 || cluster_bits > 40)
		goto fail;
	map->fd = fd;
	map->identity = identity;
	map->writable = writable;
	map->size = size;
	map->cluster_bits = cluster_bits;
	map->max_blocks = max_blocks;
	if (!identity) {
		clusters = (size >> cluster_bits) + 1;
		map->nblocks = (clusters >> QB_MAP_BLOCK_BITS) + 1;
		map->blocks = calloc(map->nblocks, sizeof(*map->blocks));
		if (!map->blocks)
			goto fail;
	}
	if (pthread_rwlock_init(&map->lock, NULL))
		goto fail;
	return map;
fail:
	if (map)
		free(map->blocks);
	free(map);
	return NULL;
}

void qb_read_map_free(void *opaque)
{
	struct qb_read_map *map = opaque;
	uint64_t i;

	for (i = 0; i < map->nblocks; i++)
		free(map->blocks[i]);
	free(map->blocks);
	pthread_rwlock_destroy(&map->lock);
	free(map);
}

/* Called by one writer at a time (the block layer's lock); readers may run meanwhile. */
int qb_read_map_set(void *opaque, uint64_t cluster, uint64_t host)
{
	struct qb_read_map *map = opaque;
	uint64_t *block;

	if (map->identity || (cluster >> QB_MAP_BLOCK_BITS) >= map->nblocks)
		return EINVAL;
	block = map->blocks[cluster >> QB_MAP_BLOCK_BITS];
	if (!block) {
		if (!host)
			return 0;
		if (map->blocks_allocated >= map->max_blocks)
			return ENOSPC;
		block = calloc(1u << QB_MAP_BLOCK_BITS, sizeof(*block));
		if (!block)
			return ENOMEM;
		map->blocks_allocated++;
		__atomic_store_n(&map->blocks[cluster >> QB_MAP_BLOCK_BITS], block, __ATOMIC_RELEASE);
	}
	__atomic_store_n(&block[cluster & ((1u << QB_MAP_BLOCK_BITS) - 1)], host, __ATOMIC_RELEASE);
	return 0;
}

/* Clusters first.. at entries[0..count), 0 for "not mapped". */
int qb_read_map_set_many(void *opaque, uint64_t first, const uint64_t *entries, uint64_t count)
{
	uint64_t i;
	int rc;

	for (i = 0; i < count; i++)
		if ((rc = qb_read_map_set(opaque, first + i, entries[i])) && rc != ENOSPC)
			return rc;
	return 0;
}

uint64_t qb_read_map_get(void *opaque, uint64_t cluster)
{
	struct qb_read_map *map = opaque;
	uint64_t *block;

	if (map->identity)
		return cluster << map->cluster_bits;
	if ((cluster >> QB_MAP_BLOCK_BITS) >= map->nblocks)
		return 0;
	block = __atomic_load_n(&map->blocks[cluster >> QB_MAP_BLOCK_BITS], __ATOMIC_ACQUIRE);
	return block ? __atomic_load_n(&block[cluster & ((1u << QB_MAP_BLOCK_BITS) - 1)], __ATOMIC_ACQUIRE) : 0;
}

void qb_read_map_forget_all(void *opaque)
{
	struct qb_read_map *map = opaque;
	uint64_t i, j;

	for (i = 0; i < map->nblocks; i++)
		if (map->blocks[i])
			for (j = 0; j < (1u << QB_MAP_BLOCK_BITS); j++)
				__atomic_store_n(&map->blocks[i][j], 0, __ATOMIC_RELEASE);
}

/* No reader uses the file once this returns: the caller may close it. */
void qb_read_map_close(void *opaque)
{
	struct qb_read_map *map = opaque;

	pthread_rwlock_wrlock(&map->lock);
	map->fd = -1;
	pthread_rwlock_unlock(&map->lock);
}
