//! The KV cache of one shard's sessions: one pool per shard, one slot per session.
//!
//! As llama.cpp's KV cache with a stream per sequence (its default, `--kv-unified` off): per
//! layer one keys tensor and one values tensor, each holding every slot's `n_ctx` cells,
//! `[n_embd_kv, n_ctx * n_slots]` F16, slot after slot. A batch whose sessions hold consecutive
//! slots then runs its attention as one `flash_attn_ext` per layer over a 4-d view of the pool
//! (`[head_dim, n_kv, n_head_kv, n_streams]`, one mask per stream, see
//! [`super::forward::step_batch`]) instead of one call per session: for 16 one-token steps
//! that was 16 small graph nodes per layer, each a barrier of every compute thread.
//!
//! A session owns its slot's `n_ctx` cells from its first step to its end, as it owned a cache
//! of its own before: its keys, values and positions are its own, and no other session's step
//! writes them.
//!
//! Memory: the pool reserves address space for `n_slots = min(max_sessions, kv_budget /
//! slot_bytes)` slots, the most the engine's limits can admit on one shard, in one anonymous
//! map. A page costs memory only once a cell on it is written (the map reads as zeros until
//! then), and a freed slot's pages go back to the system (`MADV_DONTNEED`), so the memory held
//! follows the cells written by live sessions: at most `slot_bytes` per session (the figure the
//! session limits count, as before), where the former caches were zeroed whole when created.

use super::ggml::{self, Cache};

/// A shard's pooled KV cache. See the module docs.
pub struct KvPool {
    cache: Cache,
    n_ctx: u32,
    /// Per slot, whether a session holds it.
    used: Vec<bool>,
    /// Bytes of one slot in one tensor: `n_ctx` cells of `n_embd_kv` F16 values.
    slot_stride: usize,
}

impl KvPool {
    /// Reserves `n_slots` slots of `n_ctx` cells, `n_embd_kv` values each, for `layers` layers.
    /// Errors: the address space could not be reserved, or the sizes overflow.
    pub fn new(layers: u32, n_embd_kv: u32, n_ctx: u32, n_slots: u32) -> Result<KvPool, String> {
        if layers == 0 || n_embd_kv == 0 || n_ctx == 0 || n_slots == 0 {
            return Err("a KV pool needs at least one layer, value, cell and slot".into());
        }
        let cells = (n_ctx as i64).checked_mul(n_slots as i64).ok_or("KV pool size overflows")?;
        let shapes: Vec<Vec<i64>> = (0..2 * layers).map(|_| vec![n_embd_kv as i64, cells]).collect();
        let cache = Cache::reserved(ggml::F16, &shapes)?;
        let slot_stride = ggml::row_size(ggml::F16, n_embd_kv as i64) * n_ctx as usize;
        Ok(KvPool { cache, n_ctx, used: vec![false; n_slots as usize], slot_stride })
    }

    /// Bytes one session's slot takes over all layers (keys and values): what a session counts
    /// against `kv_budget`.
    pub fn slot_bytes(layers: u32, n_embd_kv: u32, n_ctx: u32) -> u64 {
        2 * layers as u64 * n_embd_kv as u64 * n_ctx as u64 * 2
    }

    /// The lowest free slot, now held; `None` when every slot is held.
    pub fn alloc(&mut self) -> Option<u32> {
        let slot = self.used.iter().position(|u| !u)?;
        self.used[slot] = true;
        Some(slot as u32)
    }

    /// Frees `slot` and gives its pages back (its cells read as zeros when next held). A slot
    /// not held is left alone.
    pub fn free(&mut self, slot: u32) {
        let Some(used) = self.used.get_mut(slot as usize) else { return };
        if !std::mem::replace(used, false) {
            return;
        }
        for i in 0..self.cache.len() {
            self.cache.release(i, slot as usize * self.slot_stride, self.slot_stride);
        }
    }

    /// The pooled tensors: per layer keys then values, each `[n_embd_kv, n_ctx * n_slots]`.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn n_slots(&self) -> u32 {
        self.used.len() as u32
    }

    pub fn held(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }

    /// Whether `slot` is held by a session.
    pub fn is_held(&self, slot: u32) -> bool {
        self.used.get(slot as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_lowest_first_and_given_back() {
        let mut pool = KvPool::new(2, 64, 256, 3).unwrap();
        assert_eq!((pool.alloc(), pool.alloc(), pool.alloc(), pool.alloc()), (Some(0), Some(1), Some(2), None));
        pool.free(1);
        pool.free(1); // twice: nothing more happens
        assert_eq!(pool.held(), 2);
        assert_eq!(pool.alloc(), Some(1));
        assert!(KvPool::new(2, 64, 256, 0).is_err());
    }

    #[test]
    fn memory_follows_the_cells_written_and_a_freed_slot_reads_as_zeros() {
        // 4 layers x 2 tensors x 8 slots x 1 MiB: 64 MiB reserved.
        let mut pool = KvPool::new(4, 512, 1024, 8).unwrap();
        let stride = pool.slot_stride;
        let resident = |pool: &KvPool| -> usize {
            (0..pool.cache.len()).map(|i| pool.cache.resident_bytes(i, 0, pool.n_slots() as usize * stride)).sum()
        };
        assert_eq!(resident(&pool), 0, "reserving commits nothing");
        let (a, b) = (pool.alloc().unwrap(), pool.alloc().unwrap());
        for i in 0..pool.cache.len() {
            pool.cache.fill(i, a as usize * stride, stride, 0x3c);
            pool.cache.fill(i, b as usize * stride, 100, 0x3c);
        }
        let written = resident(&pool);
        assert!(written >= 8 * stride && written <= 8 * stride + 8 * 4096 * 2, "slot a whole, a page of b: {written}");
        pool.free(a);
        assert!(resident(&pool) <= 8 * 4096 * 2, "the freed slot's pages went back: {}", resident(&pool));
        assert!(pool.cache.bytes_at(0, a as usize * stride, stride).iter().all(|b| *b == 0));
        assert!(pool.cache.bytes_at(0, b as usize * stride, 100).iter().all(|b| *b == 0x3c), "slot b kept");
    }
}
