/* Where an image's bytes are in its file, for native readers and writers (read_map.c).
 *
 * A two-level table from guest cluster to file offset, filled by the
 * Python block layer with what it has checked (qbackend.block.read_map);
 * 0 means "ask Python" (unallocated, zero, backing, or not looked up yet).
 * Entries are read and written atomically, without a lock: the block layer
 * clears an entry before the cluster stops holding the guest's data and
 * never gives a cluster to another guest offset, so a reader sees either
 * the mapping or 0.  A map is `writable` when the export is and an
 * in-place write to a mapped cluster is all a write there takes (QED:
 * no metadata changes for a cluster already allocated).  `lock`
 * (read-held by readers and writers around the lookup and the I/O on
 * `fd`, write-held by close) keeps them off a file that
 * has been closed.  An identity map (a raw file) has no table.
 */
#ifndef QB_READ_MAP_IMPL_H
#define QB_READ_MAP_IMPL_H

#include <pthread.h>
#include <stdint.h>

#include "read_map.h" /* QB_MAP_BLOCK_BITS */

struct qb_read_map {
	pthread_rwlock_t lock;
	int fd; /* -1 once closed */
	int identity;
	int writable; /* native writers may write the mapped clusters in place */
	uint64_t size;
	uint32_t cluster_bits;
	uint64_t nblocks;
	uint64_t **blocks;
	uint64_t blocks_allocated;
	uint64_t max_blocks; /* memory bound: clusters past it are left to Python */
};

/* The file offset of guest `offset`, with in *run how many of the `length`
 * bytes from there are mapped and contiguous in the file (at least one);
 * UINT64_MAX if [offset, offset+length) is not wholly inside the image or
 * the first cluster is not mapped.  Call with `lock` read-held. */
static inline uint64_t qb_read_map_run(const struct qb_read_map *map, uint64_t offset, uint64_t length,
				       uint64_t *run)
{
	uint64_t first, last, ci, host = 0, mask = (1ull << map->cluster_bits) - 1;

	if (map->fd < 0 || length == 0 || offset > map->size || length > map->size - offset)
		return UINT64_MAX;
	if (map->identity) {
		*run = length;
		return offset;
	}
	first = offset >> map->cluster_bits;
	last = (offset + length - 1) >> map->cluster_bits;
	for (ci = first; ci <= last; ci++) {
		uint64_t *block = __atomic_load_n(&map->blocks[ci >> QB_MAP_BLOCK_BITS], __ATOMIC_ACQUIRE);
		uint64_t entry = block ? __atomic_load_n(&block[ci & ((1u << QB_MAP_BLOCK_BITS) - 1)],
							 __ATOMIC_ACQUIRE) : 0;

		if (ci == first) {
			if (!entry)
				return UINT64_MAX;
			host = entry;
		} else if (entry != host + ((ci - first) << map->cluster_bits)) {
			break; /* unmapped, or elsewhere in the file: the run ends here */
		}
	}
	*run = ci > last ? length : (ci << map->cluster_bits) - offset;
	return host + (offset & mask);
}

#endif
