/*
 * C shim for DPDK functions that are `static inline` or macros in the headers,
 * so bindgen cannot link to them. Each bitw_* function is a thin, non-inline
 * wrapper; the hot ones (rx/tx burst, mbuf accessors) are small enough that the
 * call overhead is a few cycles per burst, not per byte.
 */
#ifndef BITW_DPDK_SHIM_H
#define BITW_DPDK_SHIM_H
#include <stdint.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_ring.h>

int bitw_rte_errno(void);
unsigned bitw_rte_lcore_id(void);
uint64_t bitw_rte_rdtsc(void);
uint64_t bitw_rte_get_tsc_hz(void);
void bitw_rte_pause(void);

uint16_t bitw_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
                               struct rte_mbuf **rx_pkts, uint16_t nb_pkts);
uint16_t bitw_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
                               struct rte_mbuf **tx_pkts, uint16_t nb_pkts);

struct rte_mbuf *bitw_rte_pktmbuf_alloc(struct rte_mempool *mp);
void bitw_rte_pktmbuf_free(struct rte_mbuf *m);
void bitw_rte_pktmbuf_free_bulk(struct rte_mbuf **mbufs, unsigned count);
uint8_t *bitw_rte_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t bitw_rte_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t bitw_rte_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint16_t bitw_rte_pktmbuf_nb_segs(const struct rte_mbuf *m);
uint16_t bitw_rte_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t bitw_rte_pktmbuf_tailroom(const struct rte_mbuf *m);
char *bitw_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
char *bitw_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
char *bitw_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len);
int bitw_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
uint32_t bitw_rte_mbuf_rss_hash(const struct rte_mbuf *m);
unsigned bitw_rte_mempool_avail_count(const struct rte_mempool *mp);

unsigned bitw_rte_ring_enqueue_burst(struct rte_ring *r, void *const *obj_table,
                                     unsigned n);
unsigned bitw_rte_ring_dequeue_burst(struct rte_ring *r, void **obj_table,
                                     unsigned n);

/* RSS hash functions bitw asks for when a port has several RX queues
 * (RTE_ETH_RSS_IP | TCP | UDP: macros built from RTE_BIT64, opaque to bindgen). */
uint64_t bitw_rss_hf_default(void);

/* Runs `hook` before every munmap() made on EAL's interrupt thread (NULL: none). */
void bitw_set_intr_munmap_hook(void (*hook)(void));
#endif
