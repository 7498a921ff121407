#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_pause.h>
#include <rte_ethdev.h>
#include <rte_interrupts.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "shim.h"

int bitw_rte_errno(void) { return rte_errno; }
unsigned bitw_rte_lcore_id(void) { return rte_lcore_id(); }
uint64_t bitw_rte_rdtsc(void) { return rte_rdtsc(); }
uint64_t bitw_rte_get_tsc_hz(void) { return rte_get_tsc_hz(); }
void bitw_rte_pause(void) { rte_pause(); }

uint16_t bitw_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
                               struct rte_mbuf **rx_pkts, uint16_t nb_pkts)
{
	return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t bitw_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
                               struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
	return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *bitw_rte_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }
void bitw_rte_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
void bitw_rte_pktmbuf_free_bulk(struct rte_mbuf **mbufs, unsigned count) { rte_pktmbuf_free_bulk(mbufs, count); }
uint8_t *bitw_rte_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }
uint16_t bitw_rte_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }
uint32_t bitw_rte_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }
uint16_t bitw_rte_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
uint16_t bitw_rte_pktmbuf_headroom(const struct rte_mbuf *m) { return rte_pktmbuf_headroom(m); }
uint16_t bitw_rte_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }
char *bitw_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_prepend(m, len); }
char *bitw_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }
char *bitw_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_adj(m, len); }
int bitw_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }
uint32_t bitw_rte_mbuf_rss_hash(const struct rte_mbuf *m) { return m->hash.rss; }
unsigned bitw_rte_mempool_avail_count(const struct rte_mempool *mp) { return rte_mempool_avail_count(mp); }

unsigned bitw_rte_ring_enqueue_burst(struct rte_ring *r, void *const *obj_table, unsigned n)
{
	return rte_ring_enqueue_burst(r, obj_table, n, NULL);
}

unsigned bitw_rte_ring_dequeue_burst(struct rte_ring *r, void **obj_table, unsigned n)
{
	return rte_ring_dequeue_burst(r, obj_table, n, NULL);
}

uint64_t bitw_rss_hf_default(void) { return RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP; }

/*
 * munmap() for the whole process (the executable exports it, so it also
 * serves the DPDK drivers' calls; see dataplane/build.rs). On EAL's interrupt
 * thread it first runs the hook bitw installed: net_memif unmaps a departed
 * peer's shared memory from that thread while a worker may still be inside
 * rx/tx burst on it, and the hook waits until every worker has left its burst.
 * Everywhere else it is the plain system call.
 */
static void (*bitw_intr_munmap_hook)(void);

void bitw_set_intr_munmap_hook(void (*hook)(void))
{
	__atomic_store_n(&bitw_intr_munmap_hook, hook, __ATOMIC_RELEASE);
}

int munmap(void *addr, size_t len)
{
	void (*hook)(void) = __atomic_load_n(&bitw_intr_munmap_hook, __ATOMIC_ACQUIRE);

	if (hook != NULL && rte_thread_is_intr())
		hook();
	return (int)syscall(SYS_munmap, addr, len);
}
