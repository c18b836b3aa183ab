/* cffi declarations of read_map.c (read by qbackend.block.read_map); the
 * struct itself is read_map_impl.h's, for C code that looks things up. */
#define QB_MAP_BLOCK_BITS 12 /* 4096 entries (32 KiB) per second-level block */
void *qb_read_map_new(int fd, uint64_t size, uint32_t cluster_bits, int identity, uint64_t max_blocks, int writable);
void qb_read_map_free(void *map);
int qb_read_map_set(void *map, uint64_t cluster, uint64_t host);
int qb_read_map_set_many(void *map, uint64_t first, const uint64_t *entries, uint64_t count);
uint64_t qb_read_map_get(void *map, uint64_t cluster);
void qb_read_map_forget_all(void *map);
void qb_read_map_close(void *map);
