//! The safe face of ggml: every `unsafe` call into the vendored library is in this file.
//!
//! Three owners hold ggml memory, each freed on drop:
//! - [`Weights`]: tensor headers whose data points into a shard's read-only memory map (wrapped as a
//!   CPU backend buffer, so no weight is ever copied);
//! - [`Cache`]: tensors that own memory (a session's KV cache), zeroed on creation;
//! - [`Graph`]: one forward pass's operations, built fresh per call, allocated by the [`Backend`]'s
//!   graph allocator (which reuses its buffer from call to call).
//!
//! [`Tensor`] is a `Copy` handle whose lifetime ties it to the owner it came from. ggml checks
//! shapes with assertions that abort the process, so callers validate every input (token ids,
//! widths, positions) before building a graph; the engine does.

use super::sys;
use std::ffi::{CStr, CString, c_char, c_void};
use std::marker::PhantomData;
use std::ptr::NonNull;

pub use sys::ggml_type as RawType;

/// ggml type ids (the same numbers GGUF stores).
pub const F32: RawType = sys::ggml_type_GGML_TYPE_F32;
pub const F16: RawType = sys::ggml_type_GGML_TYPE_F16;
pub const I32: RawType = sys::ggml_type_GGML_TYPE_I32;
pub const I64: RawType = sys::ggml_type_GGML_TYPE_I64;

#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    raw: NonNull<sys::ggml_tensor>,
    _owner: PhantomData<&'a ()>,
}

impl<'a> Tensor<'a> {
    fn new(raw: *mut sys::ggml_tensor) -> Tensor<'a> {
        Tensor { raw: NonNull::new(raw).expect("ggml returned a null tensor (context full)"), _owner: PhantomData }
    }
    fn ptr(self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }
    fn header(&self) -> &sys::ggml_tensor {
        // SAFETY: the owner ('a) keeps the context holding this header alive.
        unsafe { self.raw.as_ref() }
    }
    pub fn ne(&self) -> [i64; 4] {
        self.header().ne
    }
    pub fn nb(&self) -> [usize; 4] {
        self.header().nb
    }
    pub fn dtype(&self) -> RawType {
        self.header().type_
    }
    pub fn element_size(&self) -> usize {
        // SAFETY: a valid tensor header.
        unsafe { sys::ggml_element_size(self.ptr()) }
    }
    pub fn nbytes(&self) -> usize {
        // SAFETY: a valid tensor header.
        unsafe { sys::ggml_nbytes(self.ptr()) }
    }
    /// Address of the first byte (0 before the tensor is placed).
    fn data_addr(&self) -> usize {
        self.header().data as usize
    }
}

/// Bytes of a row of `n` elements of `dtype` (blocks for quantized types).
pub fn row_size(dtype: RawType, n: i64) -> usize {
    // SAFETY: pure function of its arguments.
    unsafe { sys::ggml_row_size(dtype, n) }
}

/// A ggml context that only holds tensor headers (`no_alloc`): data lives in backend buffers.
struct Context(NonNull<sys::ggml_context>);

impl Context {
    fn new(tensors: usize, graph_nodes: usize) -> Context {
        // SAFETY: size queries, then ggml_init with a size it allocates itself.
        let ctx = unsafe {
            let mut size = sys::ggml_tensor_overhead() * tensors + 1024;
            if graph_nodes > 0 {
                size += sys::ggml_graph_overhead_custom(graph_nodes, false);
            }
            sys::ggml_init(sys::ggml_init_params { mem_size: size, mem_buffer: std::ptr::null_mut(), no_alloc: true })
        };
        Context(NonNull::new(ctx).expect("ggml_init failed"))
    }
    fn raw(&self) -> *mut sys::ggml_context {
        self.0.as_ptr()
    }
    fn new_tensor(&self, dtype: RawType, ne: &[i64]) -> *mut sys::ggml_tensor {
        // SAFETY: the context has room for the headers it was sized for; ne has 1..=4 entries.
        unsafe {
            match *ne {
                [a] => sys::ggml_new_tensor_1d(self.raw(), dtype, a),
                [a, b] => sys::ggml_new_tensor_2d(self.raw(), dtype, a, b),
                [a, b, c] => sys::ggml_new_tensor_3d(self.raw(), dtype, a, b, c),
                [a, b, c, d] => sys::ggml_new_tensor_4d(self.raw(), dtype, a, b, c, d),
                _ => panic!("tensor rank {} unsupported", ne.len()),
            }
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init, freed once.
        unsafe { sys::ggml_free(self.raw()) }
    }
}

fn set_name(t: *mut sys::ggml_tensor, name: &str) {
    let name = CString::new(name.replace('\0', "")).unwrap();
    // SAFETY: ggml copies at most 63 bytes of the NUL-terminated name.
    unsafe { sys::ggml_set_name(t, name.as_ptr()) };
}

/// Tensors over a shard's read-only memory map. The map must outlive this value; the owner
/// (the engine's loaded shard) keeps an `Arc` of it beside.
pub struct Weights {
    ctx: Context,
    buffer: NonNull<sys::ggml_backend_buffer>,
    tensors: Vec<(String, NonNull<sys::ggml_tensor>)>,
    /// Matrices in ggml's CPU repack layout: their headers, the buffer holding them, and whether
    /// that is anonymous memory ([`Layout::RepackCopy`]) rather than a wrapper over the sidecar's
    /// map ([`Layout::Repacked`]).
    repacked: Option<(Context, NonNull<sys::ggml_backend_buffer>, bool)>,
}

/// One weight to wrap: its name, type, dims (GGUF order, innermost first) and its bytes in the map.
pub struct WeightSpec<'m> {
    pub name: &'m str,
    pub dtype: RawType,
    pub ne: Vec<i64>,
    pub data: &'m [u8],
    /// Used only as the left side of matrix products (may be repacked).
    pub matmul_only: bool,
}

/// Where the matrices ggml's CPU backend has a faster layout for come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout<'s> {
    /// The shard's own layout, from its map (ggml's generic kernels).
    AsIs,
    /// Copied into the repack layout in anonymous memory at load (what llama.cpp does).
    RepackCopy,
    /// Already in the repack layout in `map` (the repack sidecar, mapped read-only): the weight
    /// of `specs[i]` is at `offsets[i]` (ignored for weights [`repack_plan`] does not pick).
    Repacked { map: &'s [u8], offsets: &'s [usize] },
}

/// ggml's CPU "repack" buffer type (weights re-laid out for the CPU's SIMD kernels), if any.
fn repack_buffer_type() -> Option<sys::ggml_backend_buffer_type_t> {
    // SAFETY: registry queries; the proc address, when found, has the declared signature.
    unsafe {
        let reg = sys::ggml_backend_cpu_reg();
        let dev = sys::ggml_backend_reg_dev_get(reg, 0);
        let name = CString::new("ggml_backend_dev_get_extra_bufts").unwrap();
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if f.is_null() {
            return None;
        }
        let f: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(f);
        let mut list = f?(dev);
        while !list.is_null() && !(*list).is_null() {
            if CStr::from_ptr(sys::ggml_backend_buft_name(*list)).to_bytes() == b"CPU_REPACK" {
                return Some(*list);
            }
            list = list.add(1);
        }
        None
    }
}

/// Whether the CPU backend would run `W x` from the repack layout for this weight shape.
fn repackable(buft: sys::ggml_backend_buffer_type_t, dtype: RawType, ne: &[i64]) -> bool {
    if ne.len() != 2 {
        return false;
    }
    let probe = Context::new(3, 0);
    // SAFETY: a zero-sized buffer of the type stands in for the real one while the CPU device
    // is asked whether it supports the product (llama.cpp asks the same way).
    unsafe {
        let dummy = sys::ggml_backend_buft_alloc_buffer(buft, 0);
        if dummy.is_null() {
            return false;
        }
        let w = probe.new_tensor(dtype, ne);
        (*w).buffer = dummy;
        let x = probe.new_tensor(F32, &[ne[0], 1]);
        let op = sys::ggml_mul_mat(probe.raw(), w, x);
        let dev = sys::ggml_backend_reg_dev_get(sys::ggml_backend_cpu_reg(), 0);
        let ok = sys::ggml_backend_dev_supports_op(dev, op);
        sys::ggml_backend_buffer_free(dummy);
        ok
    }
}

/// Which of `specs` the CPU backend runs from a repacked layout on this machine (all false when
/// ggml has no repack kernels here).
pub fn repack_plan(specs: &[WeightSpec]) -> Vec<bool> {
    let buft = repack_buffer_type();
    specs.iter().map(|s| s.matmul_only && buft.is_some_and(|b| repackable(b, s.dtype, &s.ne))).collect()
}

/// Alignment of a repacked tensor's data (ggml's `TENSOR_ALIGNMENT`, rounded up to a cache line).
pub const REPACK_ALIGN: usize = 64;

/// `spec`'s data rewritten into the repack layout (same size: the kernels interleave blocks of
/// rows). Only for specs [`repack_plan`] picked. Holds one tensor's worth of anonymous memory
/// while it runs.
pub fn repack_one(spec: &WeightSpec) -> Result<Vec<u8>, String> {
    let buft = repack_buffer_type().ok_or("ggml has no repack kernels on this CPU")?;
    let ctx = Context::new(1, 0);
    let t = ctx.new_tensor(spec.dtype, &spec.ne);
    // SAFETY: a fresh header; the buffer is sized for it, the tensor placed at its base, filled
    // through the buffer type's set_tensor (which repacks), read back, freed.
    unsafe {
        let size = sys::ggml_nbytes(t);
        if size != spec.data.len() {
            return Err(format!("tensor {}: data does not match its shape", spec.name));
        }
        let buf = NonNull::new(sys::ggml_backend_buft_alloc_buffer(buft, size)).ok_or("out of memory repacking")?;
        let base = sys::ggml_backend_buffer_get_base(buf.as_ptr());
        let status = sys::ggml_backend_tensor_alloc(buf.as_ptr(), t, base);
        if status != sys::ggml_status_GGML_STATUS_SUCCESS || (*t).extra.is_null() {
            sys::ggml_backend_buffer_free(buf.as_ptr());
            return Err(format!("tensor {}: ggml has no repack layout for it", spec.name));
        }
        sys::ggml_backend_tensor_set(t, spec.data.as_ptr() as *const c_void, 0, size);
        let out = std::slice::from_raw_parts(base as *const u8, size).to_vec();
        sys::ggml_backend_buffer_free(buf.as_ptr());
        Ok(out)
    }
}

/// What decides the repack layout this build writes: ggml's version and the CPU features its
/// kernels choose by. A sidecar written under another value is rebuilt.
pub fn repack_layout_id() -> String {
    // SAFETY: feature queries without arguments.
    let f = unsafe {
        [
            ("avx2", sys::ggml_cpu_has_avx2()),
            ("avx512", sys::ggml_cpu_has_avx512()),
            ("neon", sys::ggml_cpu_has_neon()),
            ("dotprod", sys::ggml_cpu_has_dotprod()),
            ("i8mm", sys::ggml_cpu_has_matmul_int8()),
            ("sve", sys::ggml_cpu_has_sve()),
            ("riscv_v", sys::ggml_cpu_has_riscv_v()),
            ("vxe", sys::ggml_cpu_has_vxe()),
        ]
    };
    let features: Vec<&str> = f.iter().filter(|(_, on)| *on != 0).map(|(n, _)| *n).collect();
    format!("ggml {} {} {}", ggml_version(), std::env::consts::ARCH, features.join(","))
}

/// The vendored ggml's version and commit (`ggml_version`, `ggml_commit`).
pub fn ggml_version() -> String {
    // SAFETY: static NUL-terminated strings.
    unsafe {
        format!(
            "{} ({})",
            CStr::from_ptr(sys::ggml_version()).to_string_lossy(),
            CStr::from_ptr(sys::ggml_commit()).to_string_lossy()
        )
    }
}

unsafe extern "C" {
    /// `src/engine/repack_map.c`: `ptr..ptr+size` (tensors already in the repack layout) as a
    /// buffer of the repack type; NULL when the type cannot allocate.
    fn shardnet_repacked_buffer_from_ptr(
        repack_buft: sys::ggml_backend_buffer_type_t,
        ptr: *mut c_void,
        size: usize,
    ) -> *mut sys::ggml_backend_buffer;
}

impl Weights {
    /// Wraps `specs`, whose data must lie inside `map`. Sizes are checked against ggml's own
    /// arithmetic, so a tensor can never reach past the map (or the sidecar's map).
    ///
    /// `layout` says where the matrices ggml's CPU backend has a faster layout for (Q4_0, Q4_K,
    /// IQ4_NL, ... on this CPU; see [`repack_plan`]) come from: the shard as it is, a copy in
    /// anonymous memory, or a sidecar file already in that layout.
    pub fn over_map(map: &[u8], specs: &[WeightSpec], layout: Layout) -> Result<Weights, String> {
        let buft = if layout == Layout::AsIs { None } else { repack_buffer_type() };
        let to_repack: Vec<bool> = if buft.is_some() { repack_plan(specs) } else { vec![false; specs.len()] };
        let ctx = Context::new(specs.len(), 0);
        // SAFETY: the map is valid for map.len() bytes for as long as the caller keeps it (see
        // the type's doc); ggml only reads weights.
        let buffer = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(map.as_ptr() as *mut c_void, map.len()) };
        let buffer = NonNull::new(buffer).ok_or("ggml could not wrap the shard's map")?;
        let mut weights = Weights { ctx, buffer, tensors: Vec::new(), repacked: None };
        let n_repack = to_repack.iter().filter(|r| **r).count();
        if let (Some(buft), true) = (buft, n_repack > 0) {
            let rctx = Context::new(n_repack, 0);
            let picked: Vec<(usize, &WeightSpec)> = specs.iter().enumerate().filter(|(i, _)| to_repack[*i]).collect();
            let mut headers = Vec::with_capacity(picked.len());
            for (_, spec) in &picked {
                let t = rctx.new_tensor(spec.dtype, &spec.ne);
                // SAFETY: a fresh header from rctx.
                if unsafe { sys::ggml_nbytes(t) } != spec.data.len() {
                    return Err(format!("tensor {}: data does not match its shape", spec.name));
                }
                set_name(t, spec.name);
                weights.tensors.push((spec.name.to_string(), NonNull::new(t).unwrap()));
                headers.push(t);
            }
            match layout {
                Layout::Repacked { map: side, offsets } => {
                    // SAFETY: the sidecar's map is valid for its length while the caller keeps it;
                    // every tensor's range is checked to lie inside it before it is placed.
                    unsafe {
                        let rbuf = shardnet_repacked_buffer_from_ptr(buft, side.as_ptr() as *mut c_void, side.len());
                        let rbuf = NonNull::new(rbuf).ok_or("ggml could not wrap the repack sidecar")?;
                        weights.repacked = Some((rctx, rbuf, false));
                        for ((i, spec), t) in picked.iter().zip(&headers) {
                            let off = *offsets.get(*i).ok_or("the sidecar lists too few tensors")?;
                            let need = sys::ggml_nbytes(*t);
                            if off % REPACK_ALIGN != 0 || off.checked_add(need).is_none_or(|end| end > side.len()) {
                                return Err(format!("tensor {}: outside the repack sidecar", spec.name));
                            }
                            let at = side.as_ptr().add(off) as *mut c_void;
                            let status = sys::ggml_backend_tensor_alloc(rbuf.as_ptr(), *t, at);
                            if status != sys::ggml_status_GGML_STATUS_SUCCESS || (**t).extra.is_null() {
                                return Err(format!("tensor {}: ggml refused its repacked data", spec.name));
                            }
                        }
                    }
                }
                _ => {
                    // SAFETY: allocates rctx's tensors in one repack buffer, then fills each (the
                    // buffer type's set_tensor rewrites the blocks into its layout).
                    unsafe {
                        let rbuf = sys::ggml_backend_alloc_ctx_tensors_from_buft(rctx.raw(), buft);
                        let rbuf = NonNull::new(rbuf).ok_or("out of memory for repacked weights")?;
                        for ((_, spec), t) in picked.iter().zip(&headers) {
                            sys::ggml_backend_tensor_set(*t, spec.data.as_ptr() as *const c_void, 0, spec.data.len());
                        }
                        weights.repacked = Some((rctx, rbuf, true));
                    }
                }
            }
        }
        let base = map.as_ptr() as usize;
        for (spec, _) in specs.iter().zip(&to_repack).filter(|(_, r)| !**r) {
            let t = weights.ctx.new_tensor(spec.dtype, &spec.ne);
            // SAFETY: t is a fresh header from our context.
            let need = unsafe { sys::ggml_nbytes(t) };
            let start = spec.data.as_ptr() as usize;
            if start < base || start + need > base + map.len() || need != spec.data.len() {
                return Err(format!("tensor {}: {} bytes of data, its shape needs {need}", spec.name, spec.data.len()));
            }
            set_name(t, spec.name);
            // SAFETY: the address range was just checked to lie inside the buffer.
            let status = unsafe { sys::ggml_backend_tensor_alloc(weights.buffer.as_ptr(), t, start as *mut c_void) };
            if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                return Err(format!("tensor {}: ggml refused its address", spec.name));
            }
            weights.tensors.push((spec.name.to_string(), NonNull::new(t).unwrap()));
        }
        Ok(weights)
    }

    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| Tensor::new(t.as_ptr()))
    }
}

impl Weights {
    /// Weight bytes copied into the repack layout in anonymous memory ([`Layout::RepackCopy`]).
    pub fn repacked_bytes(&self) -> usize {
        match &self.repacked {
            // SAFETY: a live buffer we own.
            Some((_, b, true)) => unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) },
            _ => 0,
        }
    }

    /// Weights computed from a repacked layout (anonymous or mapped): how many.
    pub fn repacked_count(&self) -> usize {
        self.repacked.as_ref().map_or(0, |(ctx, ..)| {
            // SAFETY: counts the tensors of a live context.
            let mut n = 0;
            unsafe {
                let mut t = sys::ggml_get_first_tensor(ctx.raw());
                while !t.is_null() {
                    n += 1;
                    t = sys::ggml_get_next_tensor(ctx.raw(), t);
                }
            }
            n
        })
    }
}

impl Drop for Weights {
    fn drop(&mut self) {
        // SAFETY: the buffer wraps memory it does not own; freeing it frees only the wrapper.
        // The repack buffer (ours, or a wrapper over the sidecar) is freed before its context.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer.as_ptr());
            if let Some((_, b, _)) = &self.repacked {
                sys::ggml_backend_buffer_free(b.as_ptr());
            }
        }
    }
}

// SAFETY: Weights only holds pointers to its own context and to read-only memory; the engine
// moves it between threads but never shares it.
unsafe impl Send for Weights {}

/// Tensors that own zeroed memory (a KV cache).
pub struct Cache {
    ctx: Context,
    buffer: NonNull<sys::ggml_backend_buffer>,
    tensors: Vec<NonNull<sys::ggml_tensor>>,
    id: u64,
    /// The anonymous map the tensors live in, for a cache made by [`Cache::reserved`]; dropped
    /// after the buffer that wraps it.
    map: Option<memmap2::MmapMut>,
}

fn next_cache_id() -> u64 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Cache {
    /// One tensor per entry of `shapes`, all allocated in one CPU buffer.
    pub fn new(dtype: RawType, shapes: &[Vec<i64>]) -> Result<Cache, String> {
        let ctx = Context::new(shapes.len(), 0);
        let tensors: Vec<_> = shapes.iter().map(|ne| NonNull::new(ctx.new_tensor(dtype, ne)).unwrap()).collect();
        // SAFETY: allocates every tensor of ctx in one buffer of the CPU buffer type.
        let buffer =
            unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.raw(), sys::ggml_backend_cpu_buffer_type()) };
        let buffer = NonNull::new(buffer).ok_or("out of memory for the KV cache")?;
        // SAFETY: a live buffer we own.
        unsafe { sys::ggml_backend_buffer_clear(buffer.as_ptr(), 0) };
        Ok(Cache { ctx, buffer, tensors, id: next_cache_id(), map: None })
    }

    /// As [`Cache::new`], in an anonymous map of its own: the tensors read as zeros, a page
    /// costs memory only once written, and [`Cache::release`] gives pages back. Errors: the map
    /// could not be made (no address space).
    pub fn reserved(dtype: RawType, shapes: &[Vec<i64>]) -> Result<Cache, String> {
        let ctx = Context::new(shapes.len(), 0);
        let tensors: Vec<_> = shapes.iter().map(|ne| NonNull::new(ctx.new_tensor(dtype, ne)).unwrap()).collect();
        // SAFETY: a size query of the CPU buffer type.
        let align = unsafe { sys::ggml_backend_buft_get_alignment(sys::ggml_backend_cpu_buffer_type()) }.max(1);
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut total = 0usize;
        for t in &tensors {
            let at = total.checked_next_multiple_of(align).ok_or("KV cache size overflows")?;
            // SAFETY: a header of our context.
            total = at.checked_add(unsafe { sys::ggml_nbytes(t.as_ptr()) }).ok_or("KV cache size overflows")?;
            offsets.push(at);
        }
        // No swap reserved up front (MAP_NORESERVE): the limits bound what is written, and a
        // reservation for every slot would count unwritten slots against the commit limit.
        let mut map = memmap2::MmapOptions::new()
            .len(total.max(1))
            .no_reserve_swap()
            .map_anon()
            .map_err(|e| format!("reserving {total} bytes for the KV cache: {e}"))?;
        let base = map.as_mut_ptr();
        // SAFETY: the buffer wraps `total` bytes of the map, which outlives it (dropped after it
        // in Drop); each tensor gets its own aligned range within them.
        let buffer = unsafe {
            let buffer = sys::ggml_backend_cpu_buffer_from_ptr(base.cast(), total.max(1));
            let buffer = NonNull::new(buffer).ok_or("ggml could not wrap the KV cache's memory")?;
            for (t, &at) in tensors.iter().zip(&offsets) {
                let status = sys::ggml_backend_tensor_alloc(buffer.as_ptr(), t.as_ptr(), base.add(at).cast());
                if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                    sys::ggml_backend_buffer_free(buffer.as_ptr());
                    return Err("ggml could not place a KV cache tensor".into());
                }
            }
            buffer
        };
        Ok(Cache { ctx, buffer, tensors, id: next_cache_id(), map: Some(map) })
    }

    /// Gives back the whole pages within bytes `offset..offset + len` of tensor `i` (a cache made
    /// by [`Cache::reserved`]; for others nothing happens): they read as zeros afterwards and
    /// hold no memory until written again. Ranges past the tensor are cut to it.
    pub fn release(&mut self, i: usize, offset: usize, len: usize) {
        let Some(map) = &self.map else { return };
        let t = self.get(i);
        let end = offset.saturating_add(len).min(t.nbytes());
        // SAFETY: sysconf reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = t.data_addr() + offset;
        let (first, last) = (start.next_multiple_of(page), (t.data_addr() + end) / page * page);
        if first >= last {
            return;
        }
        debug_assert!(first >= map.as_ptr() as usize && last <= map.as_ptr() as usize + map.len());
        // SAFETY: whole pages of our private anonymous map (the range lies within tensor i, which
        // lies within the map). No graph runs while `&mut self` is held, and no Rust reference to
        // the bytes exists (ggml reads them through raw pointers only); MADV_DONTNEED on private
        // anonymous memory makes the pages read as zeros.
        let rc = unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
        if rc != 0 {
            crate::debug!("madvise on the KV cache failed: {}", std::io::Error::last_os_error());
        }
    }

    /// This cache's number, never given to another cache of this process (a graph kept for a
    /// cache names it by this, not by an address a later cache could get).
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn get(&self, i: usize) -> Tensor<'_> {
        Tensor::new(self.tensors[i].as_ptr())
    }
    /// Tensors in the cache.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn bytes(&self) -> usize {
        // SAFETY: a live buffer we own.
        unsafe { sys::ggml_backend_buffer_get_size(self.buffer.as_ptr()) }
    }

    /// Sets bytes `offset..offset + len` of tensor `i` to `byte` (tests).
    #[cfg(test)]
    pub(crate) fn fill(&mut self, i: usize, offset: usize, len: usize, byte: u8) {
        let t = self.get(i);
        assert!(offset + len <= t.nbytes());
        // SAFETY: within tensor i's memory, which we own; no graph runs under `&mut self`.
        unsafe { std::ptr::write_bytes((t.data_addr() + offset) as *mut u8, byte, len) }
    }

    /// Bytes of the pages within `offset..offset + len` of tensor `i` that hold memory (tests;
    /// `mincore`, so other threads' allocations do not count).
    #[cfg(test)]
    pub(crate) fn resident_bytes(&self, i: usize, offset: usize, len: usize) -> usize {
        let t = self.get(i);
        // SAFETY: sysconf reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let first = (t.data_addr() + offset) / page * page;
        let end = t.data_addr() + offset + len;
        let mut vec = vec![0u8; (end - first).div_ceil(page)];
        // SAFETY: the range lies in our mapped memory; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(first as *mut libc::c_void, end - first, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|v| **v & 1 == 1).count() * page
    }

    /// A copy of bytes `offset..offset + len` of tensor `i` (tests).
    #[cfg(test)]
    pub(crate) fn bytes_at(&self, i: usize, offset: usize, len: usize) -> Vec<u8> {
        let t = self.get(i);
        assert!(offset + len <= t.nbytes());
        // SAFETY: within tensor i's memory; no graph runs while tests read it.
        unsafe { std::slice::from_raw_parts((t.data_addr() + offset) as *const u8, len) }.to_vec()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SAFETY: the buffer was allocated for this cache's tensors (or wraps its map); the
        // context and the map drop after it.
        unsafe { sys::ggml_backend_buffer_free(self.buffer.as_ptr()) }
        let _ = &self.ctx;
    }
}

// SAFETY: as for Weights; a cache is used by one thread at a time.
unsafe impl Send for Cache {}

/// A graph allocator (`ggml_gallocr`): places a graph's intermediate tensors in a CPU buffer it
/// owns, grown to the largest graph it has placed.
struct Allocator(NonNull<sys::ggml_gallocr>);

impl Allocator {
    fn cpu() -> Result<Allocator, String> {
        // SAFETY: a plain constructor, checked for null.
        let raw = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        NonNull::new(raw).map(Allocator).ok_or_else(|| "ggml graph allocator failed".to_string())
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: made in `cpu`, freed once; the tensors placed by it are not used after.
        unsafe { sys::ggml_gallocr_free(self.0.as_ptr()) }
    }
}

/// One forward pass: the operations, then `Backend::compute`, then reading outputs.
///
/// A graph made with [`Graph::reusable`] has its own allocator: its intermediate tensors are
/// placed once, at its first compute, and stay placed, so it can be computed again with new
/// input values ([`Graph::refill`]) without being built or placed again (llama.cpp's graph reuse).
pub struct Graph {
    ctx: Context,
    graph: NonNull<sys::ggml_cgraph>,
    inputs: std::cell::RefCell<Vec<(NonNull<sys::ggml_tensor>, Vec<u8>)>>,
    outputs: std::cell::RefCell<Vec<NonNull<sys::ggml_tensor>>>,
    /// Its own allocator (reusable graphs) and whether it has placed the tensors yet.
    own: Option<(Allocator, std::cell::Cell<bool>)>,
}

// SAFETY: as for Cache: a graph (kept between steps by the engine) is used by one thread at a time.
unsafe impl Send for Graph {}

impl Graph {
    pub fn new(max_nodes: usize) -> Graph {
        let ctx = Context::new(max_nodes, max_nodes);
        // SAFETY: the context was sized for a graph of max_nodes.
        let graph = unsafe { sys::ggml_new_graph_custom(ctx.raw(), max_nodes, false) };
        Graph {
            ctx,
            graph: NonNull::new(graph).expect("graph"),
            inputs: Default::default(),
            outputs: Default::default(),
            own: None,
        }
    }

    /// A graph that can be computed many times (see the type's docs). Its buffer is its own, so
    /// it is meant for small graphs (decode steps), not for prompts.
    pub fn reusable(max_nodes: usize) -> Result<Graph, String> {
        let mut g = Graph::new(max_nodes);
        g.own = Some((Allocator::cpu()?, std::cell::Cell::new(false)));
        Ok(g)
    }

    /// New values for the inputs, in the order they were added, each exactly as long as before.
    /// Errors: a count or a length that differs (the graph is left unchanged).
    pub fn refill(&self, data: Vec<Vec<u8>>) -> Result<(), String> {
        let mut inputs = self.inputs.borrow_mut();
        if inputs.len() != data.len() || inputs.iter().zip(&data).any(|((_, old), new)| old.len() != new.len()) {
            return Err("new input values do not match the graph's inputs".into());
        }
        for ((_, old), new) in inputs.iter_mut().zip(data) {
            *old = new;
        }
        Ok(())
    }

    /// The `i`th tensor marked with [`Graph::output`].
    pub fn output_at(&self, i: usize) -> Tensor<'_> {
        Tensor::new(self.outputs.borrow()[i].as_ptr())
    }

    fn wrap(&self, t: *mut sys::ggml_tensor) -> Tensor<'_> {
        Tensor::new(t)
    }

    /// An input tensor, filled with `data` once the graph is allocated.
    pub fn input<'a>(&'a self, name: &str, dtype: RawType, ne: &[i64], data: Vec<u8>) -> Tensor<'a> {
        let t = self.ctx.new_tensor(dtype, ne);
        set_name(t, name);
        // SAFETY: a fresh header from our context.
        unsafe {
            assert_eq!(sys::ggml_nbytes(t), data.len(), "input {name}: data does not match its shape");
            sys::ggml_set_input(t);
        }
        self.inputs.borrow_mut().push((NonNull::new(t).unwrap(), data));
        Tensor::new(t)
    }

    /// Adds `t` and everything it depends on to the graph, in order.
    pub fn expand(&self, t: Tensor) {
        // SAFETY: both belong to this graph's context (or to weights/caches that outlive it).
        unsafe { sys::ggml_build_forward_expand(self.graph.as_ptr(), t.ptr()) }
    }

    /// Marks `t` as an output (never overwritten by the allocator) and adds it to the graph.
    pub fn output(&self, t: Tensor) {
        // SAFETY: as above.
        unsafe { sys::ggml_set_output(t.ptr()) };
        self.outputs.borrow_mut().push(NonNull::new(t.ptr()).expect("a tensor"));
        self.expand(t);
    }

    pub fn mul_mat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY (every op below): ggml builds a header in our context from live inputs.
        self.wrap(unsafe { sys::ggml_mul_mat(self.ctx.raw(), a.ptr(), b.ptr()) })
    }
    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_mul(self.ctx.raw(), a.ptr(), b.ptr()) })
    }
    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_add(self.ctx.raw(), a.ptr(), b.ptr()) })
    }
    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_rms_norm(self.ctx.raw(), a.ptr(), eps) })
    }
    pub fn get_rows<'a>(&'a self, a: Tensor<'a>, rows: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_get_rows(self.ctx.raw(), a.ptr(), rows.ptr()) })
    }
    pub fn swiglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_swiglu_split(self.ctx.raw(), gate.ptr(), up.ptr()) })
    }
    pub fn reshape_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_reshape_2d(self.ctx.raw(), a.ptr(), ne0, ne1) })
    }
    pub fn reshape_3d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_reshape_3d(self.ctx.raw(), a.ptr(), ne0, ne1, ne2) })
    }
    pub fn view_1d<'a>(&'a self, a: Tensor<'a>, ne0: i64, offset: usize) -> Tensor<'a> {
        assert!(offset + row_size(a.dtype(), ne0) <= a.nbytes(), "view past the end of its tensor");
        self.wrap(unsafe { sys::ggml_view_1d(self.ctx.raw(), a.ptr(), ne0, offset) })
    }
    pub fn view_2d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 2], nb1: usize, offset: usize) -> Tensor<'a> {
        assert!(offset + (ne[1] as usize - 1) * nb1 + row_size(a.dtype(), ne[0]) <= a.nbytes(), "view past the end");
        self.wrap(unsafe { sys::ggml_view_2d(self.ctx.raw(), a.ptr(), ne[0], ne[1], nb1, offset) })
    }
    pub fn view_3d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 3], nb1: usize, nb2: usize, offset: usize) -> Tensor<'a> {
        let last = offset + (ne[1] as usize - 1) * nb1 + (ne[2] as usize - 1) * nb2 + row_size(a.dtype(), ne[0]);
        assert!(last <= a.nbytes(), "view past the end of its tensor");
        self.wrap(unsafe { sys::ggml_view_3d(self.ctx.raw(), a.ptr(), ne[0], ne[1], ne[2], nb1, nb2, offset) })
    }
    pub fn view_4d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 4], nb: [usize; 3], offset: usize) -> Tensor<'a> {
        let last = offset
            + (ne[1] as usize - 1) * nb[0]
            + (ne[2] as usize - 1) * nb[1]
            + (ne[3] as usize - 1) * nb[2]
            + row_size(a.dtype(), ne[0]);
        assert!(last <= a.nbytes(), "view past the end of its tensor");
        self.wrap(unsafe {
            sys::ggml_view_4d(self.ctx.raw(), a.ptr(), ne[0], ne[1], ne[2], ne[3], nb[0], nb[1], nb[2], offset)
        })
    }
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_permute(self.ctx.raw(), a.ptr(), axes[0], axes[1], axes[2], axes[3]) })
    }
    /// `a` and `b` joined along dimension `dim` (every other dimension equal).
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_concat(self.ctx.raw(), a.ptr(), b.ptr(), dim) })
    }
    /// Rows `rows[i]` (I64 `[n]`) of `a` (`[w, m]`) set from the rows of `b` (`[w, n]`, F32,
    /// converted to `a`'s type); the result must be expanded for the write to run.
    pub fn set_rows<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, rows: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_set_rows(self.ctx.raw(), a.ptr(), b.ptr(), rows.ptr()) })
    }
    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_cont(self.ctx.raw(), a.ptr()) })
    }
    /// Copies `a` into `b` (converting type); the result must be expanded for the copy to run.
    pub fn cpy<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_cpy(self.ctx.raw(), a.ptr(), b.ptr()) })
    }
    #[allow(clippy::too_many_arguments)]
    pub fn rope_ext<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        freq_factors: Option<Tensor<'a>>,
        n_dims: i32,
        mode: i32,
        rope: &RopeParams,
    ) -> Tensor<'a> {
        let c = freq_factors.map_or(std::ptr::null_mut(), |t| t.ptr());
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.ctx.raw(),
                a.ptr(),
                pos.ptr(),
                c,
                n_dims,
                mode,
                rope.n_ctx_orig,
                rope.freq_base,
                rope.freq_scale,
                rope.ext_factor,
                rope.attn_factor,
                rope.beta_fast,
                rope.beta_slow,
            )
        })
    }
    /// Fused attention: q [d, n_q, heads, streams], k/v [d, n_kv, kv_heads, streams] (F16), mask
    /// F16 [n_kv, n_q, 1, streams]; each stream attends to its own keys and values. Result
    /// [d, heads, n_q, streams], accumulated in F32.
    pub fn flash_attn_ext<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
    ) -> Tensor<'a> {
        // SAFETY: builds the op; then sets its precision on the header it returned.
        unsafe {
            let t = sys::ggml_flash_attn_ext(self.ctx.raw(), q.ptr(), k.ptr(), v.ptr(), mask.ptr(), scale, 0.0, 0.0);
            sys::ggml_flash_attn_ext_set_prec(t, sys::ggml_prec_GGML_PREC_F32);
            self.wrap(t)
        }
    }

    pub fn node_count(&self) -> i32 {
        // SAFETY: a live graph.
        unsafe { sys::ggml_graph_n_nodes(self.graph.as_ptr()) }
    }
}

/// RoPE settings from the model's metadata (see `ggml_rope_ext`).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// [`Backend::compute`]'s error for a graph stopped by its abort flag.
pub const ABORTED: &str = "the computation was stopped: every client it was for is gone";

/// The CPU backend with its thread pool, and a graph allocator whose buffer grows to the largest
/// graph seen and is then reused.
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
    galloc: Allocator,
    threads: usize,
    /// Threads kept between graphs, sleeping (not spinning) while there is no work.
    pool: Option<NonNull<sys::ggml_threadpool>>,
    /// Set while a graph runs: ggml stops it after the node in progress (see [`Backend::set_abort`]).
    abort: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// ggml's abort callback: reads the flag [`Backend::set_abort`] gave (checked by the CPU
/// backend's first thread after each node of a graph).
unsafe extern "C" fn abort_requested(data: *mut c_void) -> bool {
    // SAFETY: `data` is the `AtomicBool` inside the `Arc` the backend keeps alive.
    unsafe { (*(data as *const std::sync::atomic::AtomicBool)).load(std::sync::atomic::Ordering::Relaxed) }
}

// SAFETY: the backend is driven by one thread at a time (the inference worker owns it).
unsafe impl Send for Backend {}

impl Backend {
    pub fn cpu(threads: usize) -> Result<Backend, String> {
        install_log_hook();
        // SAFETY: plain constructors; checked for null.
        unsafe {
            let raw = NonNull::new(sys::ggml_backend_cpu_init()).ok_or("ggml CPU backend failed to start")?;
            sys::ggml_backend_cpu_set_n_threads(raw.as_ptr(), threads.max(1) as i32);
            let galloc = Allocator::cpu()?;
            let mut params = sys::ggml_threadpool_params_default(threads.max(1) as i32);
            params.poll = 0;
            let pool = NonNull::new(sys::ggml_threadpool_new(&mut params));
            if let Some(p) = pool {
                sys::ggml_backend_cpu_set_threadpool(raw.as_ptr(), p.as_ptr());
            }
            Ok(Backend { raw, galloc, threads: threads.max(1), pool, abort: None })
        }
    }

    /// Graphs stop early, after the node in progress, while `flag` is set
    /// (`ggml_backend_cpu_set_abort_callback`): [`Backend::compute`] then answers
    /// [`ABORTED`]. The flag is read, never reset, here.
    pub fn set_abort(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let data = std::sync::Arc::as_ptr(&flag) as *mut c_void;
        // SAFETY: the flag lives as long as the backend (kept in `self.abort`).
        unsafe { sys::ggml_backend_cpu_set_abort_callback(self.raw.as_ptr(), Some(abort_requested), data) };
        self.abort = Some(flag);
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Bytes the graph allocator holds for intermediate results.
    pub fn compute_buffer_bytes(&self) -> usize {
        // SAFETY: a live allocator.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.galloc.0.as_ptr(), 0) }
    }

    /// Allocates the graph's intermediate tensors (a reusable graph: once, in its own buffer),
    /// fills its inputs and runs it.
    pub fn compute(&mut self, graph: &Graph) -> Result<(), String> {
        // SAFETY: the graph and every tensor in it are alive for the duration of the call; inputs
        // were checked against their tensors' sizes when they were added (and refilled). A
        // reusable graph's tensors stay where its own allocator placed them: nothing else
        // allocates in that buffer.
        unsafe {
            let (galloc, placed) = match &graph.own {
                Some((a, placed)) => (a.0, placed.get()),
                None => (self.galloc.0, false),
            };
            if !placed {
                if !sys::ggml_gallocr_alloc_graph(galloc.as_ptr(), graph.graph.as_ptr()) {
                    return Err("out of memory for the compute buffer".into());
                }
                if let Some((_, placed)) = &graph.own {
                    placed.set(true);
                }
            }
            for (t, data) in graph.inputs.borrow().iter() {
                sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr() as *const c_void, 0, data.len());
            }
            let status = sys::ggml_backend_graph_compute(self.raw.as_ptr(), graph.graph.as_ptr());
            if status == sys::ggml_status_GGML_STATUS_ABORTED {
                return Err(ABORTED.into());
            }
            if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                return Err(format!("ggml compute failed (status {status})"));
            }
        }
        Ok(())
    }

    /// Reads an F32 output tensor computed by the last `compute`.
    pub fn read_f32(&self, t: Tensor) -> Vec<f32> {
        assert_eq!(t.dtype(), F32, "read_f32 on a non-F32 tensor");
        self.read_f32_part(t, 0, t.nbytes() / 4)
    }

    /// `n` floats of an F32 tensor computed by [`Backend::compute`], from float `first` on (a
    /// batch's rows of one sequence): read straight into their own vector, no copy of the
    /// whole tensor in between. Panics when the range passes the tensor's end.
    pub fn read_f32_part(&self, t: Tensor, first: usize, n: usize) -> Vec<f32> {
        assert_eq!(t.dtype(), F32, "read_f32_part on a non-F32 tensor");
        assert!((first + n) * 4 <= t.nbytes(), "read_f32_part past the tensor's end");
        let mut out: Vec<f32> = Vec::with_capacity(n);
        // SAFETY: `out` has room for n floats and the range lies within the tensor (checked
        // above), which compute allocated; ggml_backend_tensor_get writes all n*4 bytes before
        // set_len makes them visible.
        unsafe {
            sys::ggml_backend_tensor_get(t.ptr(), out.as_mut_ptr() as *mut c_void, first * 4, n * 4);
            out.set_len(n);
        }
        out
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: both created in `cpu`, freed once.
        unsafe {
            sys::ggml_backend_free(self.raw.as_ptr());
            if let Some(p) = self.pool {
                sys::ggml_threadpool_free(p.as_ptr());
            }
        }
    }
}

/// ggml's own log lines go through our logger (debug level) instead of straight to stderr.
fn install_log_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    unsafe extern "C" fn hook(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
        if text.is_null() {
            return;
        }
        // SAFETY: ggml passes a NUL-terminated string valid for the call.
        let line = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        if level == sys::ggml_log_level_GGML_LOG_LEVEL_ERROR {
            crate::warn!("ggml: {line}");
        } else {
            crate::debug!("ggml: {line}");
        }
    }
    // SAFETY: registers a function that lives for the program's lifetime.
    ONCE.call_once(|| unsafe { sys::ggml_log_set(Some(hook), std::ptr::null_mut()) });
}
