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
    /// With `repack`: the matrices copied into ggml's CPU repack layout, in memory of their own.
    repacked: Option<(Context, NonNull<sys::ggml_backend_buffer>)>,
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

impl Weights {
    /// Wraps `specs`, whose data must lie inside `map`. Sizes are checked against ggml's own
    /// arithmetic, so a tensor can never reach past the map.
    ///
    /// With `repack`, matrices ggml's CPU backend has a faster layout for (Q4_0, Q4_K, IQ4_NL, ...
    /// on this CPU) are copied into that layout instead: faster products, at the cost of
    /// anonymous memory the size of those weights.
    pub fn over_map(map: &[u8], specs: &[WeightSpec], repack: bool) -> Result<Weights, String> {
        let buft = if repack { repack_buffer_type() } else { None };
        let to_repack: Vec<bool> =
            specs.iter().map(|s| s.matmul_only && buft.is_some_and(|b| repackable(b, s.dtype, &s.ne))).collect();
        let ctx = Context::new(specs.len(), 0);
        // SAFETY: the map is valid for map.len() bytes for as long as the caller keeps it (see
        // the type's doc); ggml only reads weights.
        let buffer = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(map.as_ptr() as *mut c_void, map.len()) };
        let buffer = NonNull::new(buffer).ok_or("ggml could not wrap the shard's map")?;
        let mut weights = Weights { ctx, buffer, tensors: Vec::new(), repacked: None };
        let base = map.as_ptr() as usize;
        let n_repack = to_repack.iter().filter(|r| **r).count();
        let mut copies: Vec<(NonNull<sys::ggml_tensor>, &[u8])> = Vec::new();
        if let (Some(buft), true) = (buft, n_repack > 0) {
            let rctx = Context::new(n_repack, 0);
            for (spec, _) in specs.iter().zip(&to_repack).filter(|(_, r)| **r) {
                let t = rctx.new_tensor(spec.dtype, &spec.ne);
                // SAFETY: a fresh header from rctx.
                if unsafe { sys::ggml_nbytes(t) } != spec.data.len() {
                    return Err(format!("tensor {}: data does not match its shape", spec.name));
                }
                set_name(t, spec.name);
                weights.tensors.push((spec.name.to_string(), NonNull::new(t).unwrap()));
                copies.push((NonNull::new(t).unwrap(), spec.data));
            }
            // SAFETY: allocates rctx's tensors in one repack buffer, then fills each (the buffer
            // type's set_tensor rewrites the blocks into its layout).
            unsafe {
                let rbuf = sys::ggml_backend_alloc_ctx_tensors_from_buft(rctx.raw(), buft);
                let rbuf = NonNull::new(rbuf).ok_or("out of memory for repacked weights")?;
                for (t, data) in &copies {
                    sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr() as *const c_void, 0, data.len());
                }
                weights.repacked = Some((rctx, rbuf));
            }
        }
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
    /// Bytes copied into the repack layout (0 without `repack`).
    pub fn repacked_bytes(&self) -> usize {
        // SAFETY: a live buffer we own.
        self.repacked.as_ref().map_or(0, |(_, b)| unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) })
    }
}

impl Drop for Weights {
    fn drop(&mut self) {
        // SAFETY: the buffer wraps memory it does not own; freeing it frees only the wrapper.
        // The repack buffer is ours and is freed before its context.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer.as_ptr());
            if let Some((_, b)) = &self.repacked {
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
        Ok(Cache { ctx, buffer, tensors })
    }
    pub fn get(&self, i: usize) -> Tensor<'_> {
        Tensor::new(self.tensors[i].as_ptr())
    }
    pub fn bytes(&self) -> usize {
        // SAFETY: a live buffer we own.
        unsafe { sys::ggml_backend_buffer_get_size(self.buffer.as_ptr()) }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SAFETY: the buffer was allocated for this cache's tensors; the context drops after.
        unsafe { sys::ggml_backend_buffer_free(self.buffer.as_ptr()) }
        let _ = &self.ctx;
    }
}

// SAFETY: as for Weights; a cache is used by one thread at a time.
unsafe impl Send for Cache {}

/// One forward pass: the operations, then `Backend::compute`, then reading outputs.
pub struct Graph {
    ctx: Context,
    graph: NonNull<sys::ggml_cgraph>,
    inputs: std::cell::RefCell<Vec<(NonNull<sys::ggml_tensor>, Vec<u8>)>>,
}

impl Graph {
    pub fn new(max_nodes: usize) -> Graph {
        let ctx = Context::new(max_nodes, max_nodes);
        // SAFETY: the context was sized for a graph of max_nodes.
        let graph = unsafe { sys::ggml_new_graph_custom(ctx.raw(), max_nodes, false) };
        Graph { ctx, graph: NonNull::new(graph).expect("graph"), inputs: Default::default() }
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
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        self.wrap(unsafe { sys::ggml_permute(self.ctx.raw(), a.ptr(), axes[0], axes[1], axes[2], axes[3]) })
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
    /// Fused attention: q [d, n_q, heads], k/v [d, n_kv, kv_heads] (F16), mask F16 [n_kv, n_q].
    /// Result [d, heads, n_q], accumulated in F32.
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

/// The CPU backend with its thread pool, and a graph allocator whose buffer grows to the largest
/// graph seen and is then reused.
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
    galloc: NonNull<sys::ggml_gallocr>,
    threads: usize,
    /// Threads kept between graphs, sleeping (not spinning) while there is no work.
    pool: Option<NonNull<sys::ggml_threadpool>>,
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
            let galloc = NonNull::new(sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()))
                .ok_or("ggml graph allocator failed")?;
            let mut params = sys::ggml_threadpool_params_default(threads.max(1) as i32);
            params.poll = 0;
            let pool = NonNull::new(sys::ggml_threadpool_new(&mut params));
            if let Some(p) = pool {
                sys::ggml_backend_cpu_set_threadpool(raw.as_ptr(), p.as_ptr());
            }
            Ok(Backend { raw, galloc, threads: threads.max(1), pool })
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Bytes the graph allocator holds for intermediate results.
    pub fn compute_buffer_bytes(&self) -> usize {
        // SAFETY: a live allocator.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.galloc.as_ptr(), 0) }
    }

    /// Allocates the graph's intermediate tensors, fills its inputs and runs it.
    pub fn compute(&mut self, graph: &Graph) -> Result<(), String> {
        // SAFETY: the graph and every tensor in it are alive for the duration of the call; inputs
        // were checked against their tensors' sizes when they were added.
        unsafe {
            if !sys::ggml_gallocr_alloc_graph(self.galloc.as_ptr(), graph.graph.as_ptr()) {
                return Err("out of memory for the compute buffer".into());
            }
            for (t, data) in graph.inputs.borrow().iter() {
                sys::ggml_backend_tensor_set(t.as_ptr(), data.as_ptr() as *const c_void, 0, data.len());
            }
            let status = sys::ggml_backend_graph_compute(self.raw.as_ptr(), graph.graph.as_ptr());
            if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                return Err(format!("ggml compute failed (status {status})"));
            }
        }
        Ok(())
    }

    /// Reads an F32 output tensor computed by the last `compute`.
    pub fn read_f32(&self, t: Tensor) -> Vec<f32> {
        assert_eq!(t.dtype(), F32, "read_f32 on a non-F32 tensor");
        let n = t.nbytes() / 4;
        let mut out = vec![0f32; n];
        // SAFETY: out has exactly nbytes; the tensor was allocated by compute.
        unsafe { sys::ggml_backend_tensor_get(t.ptr(), out.as_mut_ptr() as *mut c_void, 0, n * 4) };
        out
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: both created in `cpu`, freed once.
        unsafe {
            sys::ggml_gallocr_free(self.galloc.as_ptr());
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
